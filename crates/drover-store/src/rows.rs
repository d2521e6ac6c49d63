//! Records from rows, once for both backends: [`Cols`] reads a column of a
//! SQLite or a PostgreSQL row (both keep integers as 64-bit, text as text).

use crate::*;
use sqlx::Row;

/// The four kinds of column drover's tables have.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> String;
    fn opt_text(&self, col: &str) -> Option<String>;
    fn int(&self, col: &str) -> i64;
    fn opt_int(&self, col: &str) -> Option<i64>;

    fn millis(&self, col: &str) -> Millis {
        self.int(col) as u64
    }
    fn opt_millis(&self, col: &str) -> Option<Millis> {
        self.opt_int(col).map(|v| v as u64)
    }
}

macro_rules! cols_for {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, col: &str) -> String {
                self.get(col)
            }
            fn opt_text(&self, col: &str) -> Option<String> {
                self.get(col)
            }
            fn int(&self, col: &str) -> i64 {
                self.get(col)
            }
            fn opt_int(&self, col: &str) -> Option<i64> {
                self.get(col)
            }
        }
    };
}
cols_for!(sqlx::sqlite::SqliteRow);
cols_for!(sqlx::postgres::PgRow);

pub(crate) fn app_from_row(r: &impl Cols) -> AppRecord {
    AppRecord {
        name: r.text("name"),
        repo: r.text("repo"),
        branch: r.text("branch"),
        spec: r.text("spec"),
        created_at: r.millis("created_at"),
        polled_commit: r.opt_text("polled_commit"),
        webhook_secret: r.opt_text("webhook_secret"),
    }
}

pub(crate) fn secret_from_row(r: &impl Cols, updated_at: Millis) -> SecretRecord {
    SecretRecord {
        app: r.text("app"),
        env: r.text("env"),
        name: r.text("name"),
        ciphertext: r.text("ciphertext"),
        updated_at,
    }
}

pub(crate) fn token_from_row(r: &impl Cols) -> TokenRecord {
    TokenRecord {
        id: r.text("id"),
        name: r.text("name"),
        role: r.text("role"),
        secret_hash: r.text("secret_hash"),
        created_at: r.millis("created_at"),
        expires_at: r.opt_millis("expires_at"),
        revoked_at: r.opt_millis("revoked_at"),
    }
}

pub(crate) fn node_cert_from_row(r: &impl Cols) -> NodeCertRecord {
    NodeCertRecord {
        serial: r.text("serial"),
        node: r.text("node"),
        issued_at: r.millis("issued_at"),
        not_after: r.millis("not_after"),
        revoked_at: r.opt_millis("revoked_at"),
    }
}

pub(crate) fn deployment_from_row(r: &impl Cols) -> DeploymentRecord {
    DeploymentRecord {
        app: r.text("app"),
        env: r.text("env"),
        live_release: r.opt_text("live_release"),
        prev_release: r.opt_text("prev_release"),
    }
}

pub(crate) fn release_from_row(r: &impl Cols) -> ReleaseRecord {
    ReleaseRecord {
        app: r.text("app"),
        number: r.int("number"),
        commit: r.text("commit_sha"),
        artifact_sha256: r.text("artifact_sha256"),
        artifact_size: r.int("artifact_size") as u64,
        image: r.opt_text("image"),
        image_ref: r.opt_text("image_ref"),
        spec: r.text("spec"),
        created_at: r.millis("created_at"),
        status: r.text("status"),
    }
}

pub(crate) fn run_from_row(r: &impl Cols) -> RunRecord {
    RunRecord {
        id: r.int("id"),
        app: r.text("app"),
        commit: r.text("commit_sha"),
        git_ref: r.text("git_ref"),
        trigger: r.text("trigger"),
        delivery: r.opt_text("delivery"),
        state: r.text("state"),
        steps: r.text("steps"),
        release: r.opt_text("release"),
        rollout_id: r.opt_int("rollout_id"),
        error: r.opt_text("error"),
        created_at: r.millis("created_at"),
        updated_at: r.millis("updated_at"),
    }
}

pub(crate) fn instance_from_row(r: &impl Cols) -> InstanceRecord {
    InstanceRecord {
        id: r.text("id"),
        app: r.text("app"),
        env: r.text("env"),
        release: r.text("release"),
        node: r.text("node"),
        desired: match r.text("desired").as_str() {
            "drain" => Desired::Drain {
                since: r.opt_millis("drain_since").unwrap_or(0),
            },
            "stop" => Desired::Stop,
            _ => Desired::Run,
        },
        drain_index: r.opt_int("drain_index").map(|v| v as u64),
        routed: r.int("routed") != 0,
        created_at: r.millis("created_at"),
        observed: r.opt_text("observed"),
        observed_at: r.opt_millis("observed_at"),
    }
}

pub(crate) fn rollout_from_row(r: &impl Cols) -> Result<Rollout> {
    let id = r.int("id");
    let mut ro: Rollout = serde_json::from_str(&r.text("data"))
        .map_err(|e| StoreError::Corrupt(format!("rollout {id}: {e}")))?;
    ro.id = id;
    Ok(ro)
}

pub(crate) fn node_from_row(r: &impl Cols) -> Result<NodeRecord> {
    let name = r.text("name");
    Ok(NodeRecord {
        labels: serde_json::from_str(&r.text("labels"))
            .map_err(|e| StoreError::Corrupt(format!("node {name} labels: {e}")))?,
        name,
        registered_at: r.millis("registered_at"),
        last_seen: r.millis("last_seen"),
    })
}

pub(crate) fn delivery_from_row(r: &impl Cols) -> DeliveryRecord {
    DeliveryRecord {
        id: r.text("id"),
        app: r.text("app"),
        env: r.text("env"),
        event: r.text("event"),
        url: r.text("url"),
        secret: r.text("secret"),
        body: r.text("body"),
        state: r.text("state"),
        attempts: r.int("attempts") as u32,
        next_at: r.millis("next_at"),
        last_status: r.opt_int("last_status").and_then(|s| u16::try_from(s).ok()),
        last_error: r.opt_text("last_error"),
        created_at: r.millis("created_at"),
        updated_at: r.millis("updated_at"),
    }
}

/// The columns of [`instance_from_row`], for a query's `WHERE` clause.
macro_rules! instance_select {
    ($where:literal) => {
        concat!("SELECT id, app, env, release, node, desired, drain_since, drain_index, routed, created_at, observed, observed_at FROM instances WHERE ", $where, " ORDER BY created_at, id")
    };
}
pub(crate) use instance_select;
