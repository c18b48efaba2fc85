-- handover's own tables on PostgreSQL: the same schema as on SQLite
-- (timestamps are RFC 3339 text, JSON is text), so every instance and both
-- engines read and write them alike. The operator's data lives in their own
-- tables, reached through the data type config.

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    user_id      TEXT NOT NULL,
    companies    TEXT NOT NULL,
    permissions  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    revoked_at   TEXT
);

CREATE TABLE export_requests (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    company_id         TEXT NOT NULL,
    status             TEXT NOT NULL,
    delivery           TEXT NOT NULL,
    export_format      TEXT NOT NULL,
    data_types         TEXT NOT NULL,
    date_start         TEXT,
    date_end           TEXT,
    metadata           TEXT NOT NULL,
    manifest           TEXT NOT NULL,
    estimated_records  BIGINT NOT NULL,
    estimated_bytes    BIGINT NOT NULL,
    records_served     BIGINT NOT NULL DEFAULT 0,
    current_type       TEXT,
    progress           TEXT NOT NULL DEFAULT '{}',
    attempts           BIGINT NOT NULL DEFAULT 0,
    record_count       BIGINT,
    byte_size          BIGINT,
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

CREATE TABLE export_files (
    request_id   TEXT NOT NULL,
    format       TEXT NOT NULL,
    path         TEXT NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    byte_size    BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    storage      TEXT NOT NULL DEFAULT 'db',
    PRIMARY KEY (request_id, format)
);

CREATE TABLE export_file_chunks (
    request_id  TEXT NOT NULL,
    file        TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    data        BYTEA NOT NULL,
    PRIMARY KEY (request_id, file, seq)
);

CREATE TABLE rate_events (
    bucket  TEXT NOT NULL,
    at_ms   BIGINT NOT NULL
);
CREATE INDEX rate_events_bucket ON rate_events (bucket, at_ms);

CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          TEXT NOT NULL,
    request_id  TEXT,
    actor       TEXT,
    company_id  TEXT,
    action      TEXT NOT NULL,
    resource    TEXT,
    outcome     TEXT NOT NULL,
    status      BIGINT,
    ip          TEXT,
    user_agent  TEXT,
    details     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_log_company ON audit_log (company_id, seq);

CREATE TABLE export_progress (
    export_id  TEXT NOT NULL,
    data_type  TEXT NOT NULL,
    served     BIGINT NOT NULL DEFAULT 0,
    reads      BIGINT NOT NULL DEFAULT 0,
    done       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (export_id, data_type)
);
