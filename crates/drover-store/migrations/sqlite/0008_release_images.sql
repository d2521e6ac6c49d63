-- A container image release records the image id (`sha256:…`) its
-- artifact (a `docker save` archive) holds, and, when it was pushed to a
-- registry, where agents pull it (`host/repo@sha256:…`); NULL otherwise.
ALTER TABLE releases ADD COLUMN image TEXT;
ALTER TABLE releases ADD COLUMN image_ref TEXT;
