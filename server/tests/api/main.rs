//! handover-server over real HTTP on a real port: one test binary, each
//! test with a fresh database and demo data (zero-to-production's
//! `spawn_app`). The same suite runs on SQLite and, with
//! `HANDOVER_TEST_POSTGRES` set (scripts/test.sh starts a throwaway
//! cluster), on PostgreSQL.

mod helpers;

mod audit;
mod auth;
mod copies;
mod errors;
mod isolation;
mod jwks;
mod lifecycle;
mod limits;
mod operations;
mod partial;
mod privacy;
mod records;
mod scale;
mod webhooks;
