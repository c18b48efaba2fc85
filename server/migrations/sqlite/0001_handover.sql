-- handover's own tables. The operator's data lives in their own tables,
-- reached through the data type config (config/*.toml).

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,              -- public part, e.g. 3f9a1c2b7d4e
    token_hash   TEXT NOT NULL UNIQUE,          -- SHA-256 of the whole token, hex
    user_id      TEXT NOT NULL,
    companies    TEXT NOT NULL,                 -- JSON array
    permissions  TEXT NOT NULL,                 -- JSON array
    created_at   TEXT NOT NULL,
    revoked_at   TEXT
);

CREATE TABLE export_requests (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    company_id         TEXT NOT NULL,
    status             TEXT NOT NULL,           -- pending|processing|completed|failed|expired
    delivery           TEXT NOT NULL,           -- client|server|cli
    export_format      TEXT NOT NULL,
    data_types         TEXT NOT NULL,           -- JSON array
    date_start         TEXT,
    date_end           TEXT,
    metadata           TEXT NOT NULL,           -- JSON object
    manifest           TEXT NOT NULL,           -- JSON (handover::model::Manifest)
    estimated_records  INTEGER NOT NULL,
    estimated_bytes    INTEGER NOT NULL,
    records_served     INTEGER NOT NULL DEFAULT 0,
    current_type       TEXT,
    progress           TEXT NOT NULL DEFAULT '{}', -- per type: served, cursors (client delivery)
    attempts           INTEGER NOT NULL DEFAULT 0,
    record_count       INTEGER,
    byte_size          INTEGER,
    sha256             TEXT,
    failure_reason     TEXT,
    created_at         TEXT NOT NULL,
    started_at         TEXT,
    completed_at       TEXT,
    failed_at          TEXT,
    expires_at         TEXT NOT NULL,
    last_activity_at   TEXT NOT NULL,
    deleted_at         TEXT
);
CREATE INDEX export_requests_owner ON export_requests (user_id, company_id, created_at);
CREATE INDEX export_requests_status ON export_requests (status);

-- Files of server-built exports: encrypted at rest; the data key is
-- wrapped by the master key and destroyed with the row.
CREATE TABLE export_files (
    request_id   TEXT NOT NULL,
    format       TEXT NOT NULL,
    path         TEXT NOT NULL,
    wrapped_key  BLOB NOT NULL,
    byte_size    INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    PRIMARY KEY (request_id, format)
);

CREATE TABLE rate_events (
    bucket  TEXT NOT NULL,
    at_ms   INTEGER NOT NULL
);
CREATE INDEX rate_events_bucket ON rate_events (bucket, at_ms);

CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    request_id  TEXT,
    actor       TEXT,
    company_id  TEXT,
    action      TEXT NOT NULL,
    resource    TEXT,
    outcome     TEXT NOT NULL,                  -- allowed|refused|error|event
    status      INTEGER,
    ip          TEXT,
    user_agent  TEXT,
    details     TEXT NOT NULL,                  -- JSON object
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_log_company ON audit_log (company_id, seq);
