-- Secrets per app and environment, each value sealed by the server's key
-- (kept in a file apart from this database); the store never sees a value.
CREATE TABLE secrets (
    app        TEXT NOT NULL,
    env        TEXT NOT NULL,
    name       TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (app, env, name)
);

-- What each release runs with: a copy of the app's secrets (still sealed)
-- taken when the release was made, so a rollback restores them.
CREATE TABLE release_secrets (
    app        TEXT NOT NULL,
    number     INTEGER NOT NULL,
    env        TEXT NOT NULL,
    name       TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    PRIMARY KEY (app, number, env, name)
);
