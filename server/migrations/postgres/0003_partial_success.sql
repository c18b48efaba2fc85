-- Partial success and manual retry: the data types a completed export had
-- to leave out (JSON [{data_type, reason}]), and the attempt count at the
-- last manual retry (a retried export gets its automatic requeue again).
ALTER TABLE export_requests ADD COLUMN failed_types TEXT;
ALTER TABLE export_requests ADD COLUMN retry_base BIGINT NOT NULL DEFAULT 0;
