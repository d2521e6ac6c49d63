-- drover's schema (PostgreSQL): the final state of every SQLite migration
-- (migrations/sqlite/0001..0008) in one, plus the leadership (fencing)
-- table of servers sharing this database. Every integer is a BIGINT, read
-- as i64 like SQLite's INTEGER; `routed` stays a 0/1 BIGINT for the same
-- row mapping.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('index', '1');

-- Leadership among servers sharing this database: `epoch` grows by one at every new leader; every leader write checks it (fencing).
CREATE TABLE leader (id INT PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, holder TEXT NOT NULL, api_url TEXT NOT NULL, since BIGINT NOT NULL);
INSERT INTO leader VALUES (1, 0, '', '', 0);

CREATE TABLE apps (
    name           TEXT PRIMARY KEY,
    repo           TEXT NOT NULL,
    branch         TEXT NOT NULL,
    spec           TEXT NOT NULL,         -- JSON of drover_core::spec::AppSpec at registration
    created_at     BIGINT NOT NULL,
    polled_commit  TEXT,                  -- branch tip last seen by the poller
    webhook_secret TEXT
);

-- Environments: each (app, environment) has its own live release, rollouts
-- and instances. An app without [environments] has one, named ''.
CREATE TABLE deployments (
    app           TEXT NOT NULL REFERENCES apps(name),
    env           TEXT NOT NULL,
    live_release  TEXT,
    prev_release  TEXT,
    PRIMARY KEY (app, env)
);

CREATE TABLE releases (
    app             TEXT NOT NULL REFERENCES apps(name),
    number          BIGINT NOT NULL,
    commit_sha      TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    artifact_size   BIGINT NOT NULL,
    spec            TEXT NOT NULL,        -- JSON snapshot of the spec of that commit
    created_at      BIGINT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'ok',   -- ok | failed
    -- A container image release: the image id (`sha256:…`) its artifact
    -- (a `docker save` archive) holds and, when pushed to a registry, where
    -- agents pull it (`host/repo@sha256:…`); NULL otherwise.
    image           TEXT,
    image_ref       TEXT,
    PRIMARY KEY (app, number)
);

CREATE TABLE rollouts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app         TEXT NOT NULL REFERENCES apps(name),
    state       TEXT NOT NULL,
    data        TEXT NOT NULL,            -- JSON of drover_core::Rollout
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    env         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX rollouts_app ON rollouts(app, env, id);

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    app          TEXT NOT NULL REFERENCES apps(name),
    release      TEXT NOT NULL,
    node         TEXT NOT NULL,
    desired      TEXT NOT NULL,           -- run | drain | stop
    drain_since  BIGINT,
    drain_index  BIGINT,
    routed       BIGINT NOT NULL,         -- 0 | 1
    created_at   BIGINT NOT NULL,
    observed     TEXT,                    -- JSON of the agent's last InstanceReport
    observed_at  BIGINT,
    env          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX instances_app ON instances(app);
CREATE INDEX instances_node ON instances(node);

CREATE TABLE nodes (
    name          TEXT PRIMARY KEY,
    labels        TEXT NOT NULL,          -- JSON object
    registered_at BIGINT NOT NULL,
    last_seen     BIGINT NOT NULL
);

CREATE TABLE proxies (
    name              TEXT PRIMARY KEY,
    applied_index     BIGINT NOT NULL,
    oldest_live_index BIGINT NOT NULL,
    last_seen         BIGINT NOT NULL
);

CREATE TABLE events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       BIGINT NOT NULL,
    app      TEXT,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL
);
CREATE INDEX events_app ON events(app, id);

-- Pipeline runs.
CREATE TABLE runs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app         TEXT NOT NULL REFERENCES apps(name),
    commit_sha  TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    trigger     TEXT NOT NULL,            -- manual | poll | webhook
    delivery    TEXT UNIQUE,              -- webhook delivery id: one run per delivery
    state       TEXT NOT NULL,            -- queued | running | succeeded | failed | superseded
    steps       TEXT NOT NULL,            -- JSON list of steps
    release     TEXT,
    rollout_id  BIGINT,
    error       TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX runs_app ON runs(app, id);
-- One automatic run per commit, whoever saw it first (poll or webhook).
CREATE UNIQUE INDEX runs_auto_commit ON runs(app, commit_sha) WHERE trigger != 'manual';

-- API tokens: only the sha256 of each token's secret is kept.
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

-- Secrets per app and environment, each value sealed by the server's key
-- (kept in a file apart from this database); the store never sees a value.
CREATE TABLE secrets (
    app        TEXT NOT NULL,
    env        TEXT NOT NULL,
    name       TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (app, env, name)
);

-- What each release runs with: a copy of the app's secrets (still sealed)
-- taken when the release was made, so a rollback restores them.
CREATE TABLE release_secrets (
    app        TEXT NOT NULL,
    number     BIGINT NOT NULL,
    env        TEXT NOT NULL,
    name       TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    PRIMARY KEY (app, number, env, name)
);

-- Webhook deliveries (`[[notify]]`): an outbox. The engine adds a row per
-- rollout event and webhook; the notifier posts it until it is delivered,
-- retrying with backoff, across server restarts. `secret` is the name of
-- the app's secret that signs the body, never its value. `seq` is the
-- insertion order (SQLite's rowid): deliveries go out by (created_at, seq).
CREATE TABLE deliveries (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    env         TEXT NOT NULL,
    event       TEXT NOT NULL,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    body        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    BIGINT NOT NULL,
    next_at     BIGINT NOT NULL,
    last_status BIGINT,
    last_error  TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    seq         BIGSERIAL NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (state, next_at);
CREATE INDEX deliveries_app ON deliveries (app, created_at);

-- Certificates the built-in CA issued to agents, by serial (hex). A peer's
-- certificate is accepted only while its row is here, for its node and not
-- revoked: a node registered again with the join token revokes its older
-- ones. Rows are dropped some time after they expire.
CREATE TABLE node_certs (
    serial     TEXT PRIMARY KEY,
    node       TEXT NOT NULL,
    issued_at  BIGINT NOT NULL,
    not_after  BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX node_certs_node ON node_certs (node);
