-- Environments: each (app, environment) has its own live release, rollouts
-- and instances. An app without [environments] has one, named ''.
CREATE TABLE deployments (
    app           TEXT NOT NULL REFERENCES apps(name),
    env           TEXT NOT NULL,
    live_release  TEXT,
    prev_release  TEXT,
    PRIMARY KEY (app, env)
);
INSERT INTO deployments (app, env, live_release, prev_release)
    SELECT name, '', live_release, prev_release FROM apps;
ALTER TABLE apps DROP COLUMN live_release;
ALTER TABLE apps DROP COLUMN prev_release;

ALTER TABLE rollouts ADD COLUMN env TEXT NOT NULL DEFAULT '';
DROP INDEX rollouts_app;
CREATE INDEX rollouts_app ON rollouts(app, env, id);

ALTER TABLE instances ADD COLUMN env TEXT NOT NULL DEFAULT '';
