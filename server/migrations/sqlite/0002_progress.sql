-- Progress of client exports per data type, updated atomically per page or
-- stream frame (several requests for one export may run at once).
CREATE TABLE export_progress (
    export_id  TEXT NOT NULL,
    data_type  TEXT NOT NULL,
    served     INTEGER NOT NULL DEFAULT 0,  -- distinct records served: the furthest offset reached
    reads      INTEGER NOT NULL DEFAULT 0,  -- records sent in all, re-reads included
    done       INTEGER NOT NULL DEFAULT 0,  -- the last page was served
    PRIMARY KEY (export_id, data_type)
);
