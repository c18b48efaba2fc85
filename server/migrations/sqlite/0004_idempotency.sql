-- Idempotency-Key on create: the key a client sent with its create, the
-- fingerprint of the body it came with, and the export it created. A key
-- is honoured for 24 hours; a later create with it starts afresh.
CREATE TABLE idempotency_keys (
    user_id     TEXT NOT NULL,
    company_id  TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    export_id   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (user_id, company_id, idem_key)
);
