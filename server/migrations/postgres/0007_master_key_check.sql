-- The master key a database was set up with, as a fingerprint (a key
-- derived from it, which does not reveal it): a server or operator command
-- started with another key is refused before it writes rows, files or
-- cursors that the first key's holders could not check or open.
CREATE TABLE master_key_check (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL
);
