-- Webhook deliveries (`[[notify]]`): an outbox. The engine adds a row per
-- rollout event and webhook; the notifier posts it until it is delivered,
-- retrying with backoff, across server restarts. `secret` is the name of
-- the app's secret that signs the body, never its value.
CREATE TABLE deliveries (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    env         TEXT NOT NULL,
    event       TEXT NOT NULL,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    body        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    next_at     INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (state, next_at);
CREATE INDEX deliveries_app ON deliveries (app, created_at);
