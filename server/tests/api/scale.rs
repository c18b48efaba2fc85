//! Several instances on one database, and deletes racing builds.

