-- Demo tokens expire, and only work while the server runs in demo mode.
ALTER TABLE api_tokens ADD COLUMN expires_at TEXT;
ALTER TABLE api_tokens ADD COLUMN demo BIGINT NOT NULL DEFAULT 0;
