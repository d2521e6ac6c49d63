-- Pipeline runs, release status, source tracking.
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    app         TEXT NOT NULL REFERENCES apps(name),
    commit_sha  TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    trigger     TEXT NOT NULL,            -- manual | poll | webhook
    delivery    TEXT UNIQUE,              -- webhook delivery id: one run per delivery
    state       TEXT NOT NULL,            -- queued | running | succeeded | failed | superseded
    steps       TEXT NOT NULL,            -- JSON list of steps
    release     TEXT,
    rollout_id  INTEGER,
    error       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX runs_app ON runs(app, id);
-- One automatic run per commit, whoever saw it first (poll or webhook).
CREATE UNIQUE INDEX runs_auto_commit ON runs(app, commit_sha) WHERE trigger != 'manual';

ALTER TABLE releases ADD COLUMN status TEXT NOT NULL DEFAULT 'ok';   -- ok | failed
ALTER TABLE apps ADD COLUMN polled_commit TEXT;                       -- branch tip last seen by the poller
ALTER TABLE apps ADD COLUMN webhook_secret TEXT;
