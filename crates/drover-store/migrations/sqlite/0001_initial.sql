-- drover's initial schema (SQLite).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('index', '1');

CREATE TABLE apps (
    name          TEXT PRIMARY KEY,
    repo          TEXT NOT NULL,
    branch        TEXT NOT NULL,
    spec          TEXT NOT NULL,          -- JSON of drover_core::spec::AppSpec at registration
    live_release  TEXT,
    prev_release  TEXT,
    created_at    INTEGER NOT NULL
);

CREATE TABLE releases (
    app             TEXT NOT NULL REFERENCES apps(name),
    number          INTEGER NOT NULL,
    commit_sha      TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    artifact_size   INTEGER NOT NULL,
    spec            TEXT NOT NULL,        -- JSON snapshot of the spec of that commit
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (app, number)
);

CREATE TABLE rollouts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    app         TEXT NOT NULL REFERENCES apps(name),
    state       TEXT NOT NULL,
    data        TEXT NOT NULL,            -- JSON of drover_core::Rollout
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX rollouts_app ON rollouts(app, id);

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    app          TEXT NOT NULL REFERENCES apps(name),
    release      TEXT NOT NULL,
    node         TEXT NOT NULL,
    desired      TEXT NOT NULL,           -- run | drain | stop
    drain_since  INTEGER,
    drain_index  INTEGER,
    routed       INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    observed     TEXT,                    -- JSON of the agent's last InstanceReport
    observed_at  INTEGER
);
CREATE INDEX instances_app ON instances(app);
CREATE INDEX instances_node ON instances(node);

CREATE TABLE nodes (
    name          TEXT PRIMARY KEY,
    labels        TEXT NOT NULL,          -- JSON object
    registered_at INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL
);

CREATE TABLE proxies (
    name              TEXT PRIMARY KEY,
    applied_index     INTEGER NOT NULL,
    oldest_live_index INTEGER NOT NULL,
    last_seen         INTEGER NOT NULL
);

CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    app      TEXT,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL
);
CREATE INDEX events_app ON events(app, id);
