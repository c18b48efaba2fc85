-- Where each file's encrypted bytes are: 'dir' (a file in the export
-- directory, shared between instances when it is on shared storage) or
-- 'db' (chunks in export_file_chunks, reachable from every instance).
-- `path` names the bytes either way: each build attempt writes under a
-- name of its own, so a stopped attempt never touches the next one's.
ALTER TABLE export_files ADD COLUMN storage TEXT NOT NULL DEFAULT 'dir';

CREATE TABLE export_file_chunks (
    request_id  TEXT NOT NULL,
    file        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (request_id, file, seq)
);
