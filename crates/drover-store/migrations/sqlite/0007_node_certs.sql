-- Certificates the built-in CA issued to agents, by serial (hex). A peer's
-- certificate is accepted only while its row is here, for its node and not
-- revoked: a node registered again with the join token revokes its older
-- ones. Rows are dropped some time after they expire.
CREATE TABLE node_certs (
    serial     TEXT PRIMARY KEY,
    node       TEXT NOT NULL,
    issued_at  INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX node_certs_node ON node_certs (node);
