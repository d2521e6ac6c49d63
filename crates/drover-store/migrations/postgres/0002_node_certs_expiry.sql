-- Every certificate issued deletes the rows of those expired a day ago:
-- by index, not by a scan of one row per certificate ever issued.
CREATE INDEX node_certs_not_after ON node_certs (not_after);
