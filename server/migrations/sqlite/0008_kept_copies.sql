-- End-to-end encrypted copies of browser-built exports: the browser uploads
-- ciphertext in parts (stored as files `copy.NNNNNN` of the export, removed
-- with it); the server never sees the key. copy_state: NULL (no copy),
-- 'uploading' or 'kept'.
ALTER TABLE export_requests ADD COLUMN copy_state TEXT;
ALTER TABLE export_requests ADD COLUMN copy_received BIGINT NOT NULL DEFAULT 0;
ALTER TABLE export_requests ADD COLUMN copy_parts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE export_requests ADD COLUMN copy_sha256 TEXT;
