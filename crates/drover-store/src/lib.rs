//! drover's persistent state.
//!
//! [`Store`] is the interface the server uses. [`SqliteStore`] implements it
//! on an embedded SQLite file in WAL mode (one server); [`PgStore`] on a
//! PostgreSQL database that several servers share, one of them leading.
//! Migrations live in `migrations/sqlite/` and `migrations/postgres/` and
//! run at open.
//!
//! *Fencing*: on PostgreSQL the writes only the leader makes (runs,
//! releases, rollouts, instances, the index, deployments, node leases,
//! deliveries) are refused with [`StoreError::Fenced`] once another server
//! took over leadership (a higher epoch in the `leader` row), so a deposed
//! leader that still believes it leads cannot change anything.
//!
//! *Architecture Invariant*: every write that changes what agents or proxies
//! should do (instance placement, desired state, routing) bumps the global
//! `index` in the same transaction. Agents and proxies long-poll on that
//! index, so a change is never missed and the index never goes backwards,
//! even across server restarts.
#![forbid(unsafe_code)]

pub mod election;
mod postgres;
mod rows;
mod sqlite;
pub mod testing;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use drover_core::{Desired, Millis, Rollout};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("the disk is full: {0}; free some space, drover retries")]
    NoSpace(String),
    #[error("stored record does not parse: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Db(String),
    /// A leader write by a server that does not (or no longer) lead(s):
    /// the database's fencing epoch is not its own.
    #[error("this server is no longer the leader (fencing epoch {mine}, the database's is {current}); it stepped down")]
    Fenced { mine: u64, current: u64 },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let s = e.to_string();
        if s.contains("database or disk is full") || s.contains("No space left") {
            StoreError::NoSpace(s)
        } else {
            StoreError::Db(s)
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub repo: String,
    pub branch: String,
    /// JSON of the spec at registration.
    pub spec: String,
    pub created_at: Millis,
    /// The branch tip the poller saw last (runs start only for new tips).
    #[serde(default)]
    pub polled_commit: Option<String>,
    /// HMAC-SHA256 key for push webhooks.
    #[serde(default, skip_serializing)]
    pub webhook_secret: Option<String>,
}

/// One environment of an app ("" for an app without `[environments]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub app: String,
    pub env: String,
    pub live_release: Option<String>,
    /// The release live before `live_release`: the default rollback target.
    pub prev_release: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub app: String,
    pub number: i64,
    pub commit: String,
    pub artifact_sha256: String,
    pub artifact_size: u64,
    /// A container image release: the image id (`sha256:…`) its artifact
    /// (a `docker save` archive) holds.
    pub image: Option<String>,
    /// Pushed to a registry: where agents pull it, `host/repo@sha256:…`.
    pub image_ref: Option<String>,
    /// JSON snapshot of the spec of that commit.
    pub spec: String,
    pub created_at: Millis,
    /// `ok`, or `failed` when its `[release]` command failed (never deployed).
    pub status: String,
}

/// One agent's report: its heartbeat and what it observed of its instances
/// (JSON per instance id).
#[derive(Debug, Clone)]
pub struct Observations {
    pub node: String,
    pub observed: Vec<(String, String)>,
    pub now: Millis,
}

/// What a new release is made of (its number is the store's to give).
#[derive(Debug, Clone, Copy)]
pub struct NewRelease<'a> {
    pub app: &'a str,
    pub commit: &'a str,
    /// The artifact's sha256 (hex) and size.
    pub sha256: &'a str,
    pub size: u64,
    /// A container image release: the image id its artifact holds.
    pub image: Option<&'a str>,
    /// Pushed to a registry: `host/repo@sha256:…`.
    pub image_ref: Option<&'a str>,
    /// JSON snapshot of the spec of that commit.
    pub spec: &'a str,
}

impl ReleaseRecord {
    pub fn name(&self) -> String {
        format!("r{}", self.number)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub app: String,
    pub env: String,
    pub release: String,
    pub node: String,
    pub desired: Desired,
    /// The routing index at which it left routing (while draining).
    pub drain_index: Option<u64>,
    pub routed: bool,
    pub created_at: Millis,
    /// JSON of the agent's last report on it.
    pub observed: Option<String>,
    pub observed_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub registered_at: Millis,
    pub last_seen: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub name: String,
    pub applied_index: u64,
    pub oldest_live_index: u64,
    pub last_seen: Millis,
}

/// A secret of an app in an environment ("" for none), sealed by the
/// server: the store holds only the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub app: String,
    pub env: String,
    pub name: String,
    pub ciphertext: String,
    pub updated_at: Millis,
}

/// An API token. The secret itself is never stored: only its sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id, part of the token string (`drv_<id>_<secret>`).
    pub id: String,
    pub name: String,
    /// admin, deployer, viewer or node.
    pub role: String,
    /// Hex sha256 of the secret part.
    #[serde(skip_serializing)]
    pub secret_hash: String,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
}

/// A certificate the built-in CA issued to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertRecord {
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    pub node: String,
    pub issued_at: Millis,
    pub not_after: Millis,
    pub revoked_at: Option<Millis>,
}

/// A certificate just issued to a registering node (see
/// [`Store::register_node`]).
#[derive(Debug, Clone)]
pub struct IssuedCert<'a> {
    pub record: NodeCertRecord,
    /// A certificate of the node's that stays valid beside the new one (a
    /// renewal over mutual TLS keeps the one in use); every other is revoked.
    pub keep: Option<&'a str>,
    /// Certificates that expired before this are forgotten.
    pub prune_before: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: i64,
    pub at: Millis,
    pub app: Option<String>,
    pub kind: String,
    pub message: String,
}

/// One webhook delivery of one rollout event (see migration 0006).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Also in the body and the `X-Drover-Delivery` header: the same on
    /// every attempt, so receivers can drop duplicates.
    pub id: String,
    pub app: String,
    pub env: String,
    /// `rollout.started`, `rollout.step`, …
    pub event: String,
    pub url: String,
    /// The name of the app's secret that keys the signature.
    pub secret: String,
    /// The JSON body, fixed when the event happened.
    pub body: String,
    /// pending | delivered | failed
    pub state: String,
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    pub next_at: Millis,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: i64,
    pub app: String,
    pub commit: String,
    pub git_ref: String,
    /// manual | poll | webhook
    pub trigger: String,
    pub delivery: Option<String>,
    /// queued | running | succeeded | failed | superseded
    pub state: String,
    /// JSON list of steps (owned by the server's pipeline).
    pub steps: String,
    pub release: Option<String>,
    pub rollout_id: Option<i64>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A change to one instance, applied with others in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceChange {
    Insert(InstanceRecord),
    SetRouted {
        id: String,
        routed: bool,
    },
    /// Out of routing for good; draining from `since`, at the new index.
    Drain {
        id: String,
        since: Millis,
    },
    Stop {
        id: String,
    },
    Delete {
        id: String,
    },
}

/// drover's persistent state. All methods are atomic.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current global change index.
    async fn index(&self) -> Result<u64>;

    async fn insert_app(&self, app: &AppRecord) -> Result<()>;
    async fn get_app(&self, name: &str) -> Result<AppRecord>;
    async fn list_apps(&self) -> Result<Vec<AppRecord>>;
    /// Creates the (app, env) deployment if it does not exist.
    async fn ensure_deployment(&self, app: &str, env: &str) -> Result<()>;
    async fn get_deployment(&self, app: &str, env: &str) -> Result<Option<DeploymentRecord>>;
    /// Every environment of every app that ever had a rollout.
    async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>>;
    async fn set_polled_commit(&self, app: &str, commit: &str) -> Result<()>;

    /// Inserts a run (its `id` is assigned). Conflict when the webhook
    /// delivery id was seen before, or an automatic run of that commit exists.
    async fn create_run(&self, run: &RunRecord) -> Result<RunRecord>;
    async fn update_run(&self, run: &RunRecord) -> Result<()>;
    async fn get_run(&self, id: i64) -> Result<RunRecord>;
    /// Newest first.
    async fn list_runs(&self, app: &str, limit: u32) -> Result<Vec<RunRecord>>;
    /// Marks runs left queued or running by a previous server process as
    /// failed; returns how many.
    async fn fail_interrupted_runs(&self, now: Millis) -> Result<u64>;
    /// Any run of this commit (any trigger)?
    async fn has_run_for_commit(&self, app: &str, commit: &str) -> Result<bool>;

    /// Sets (inserts or replaces) a sealed secret.
    async fn set_secret(&self, s: &SecretRecord) -> Result<()>;
    /// Removes a secret; NotFound if there was none.
    async fn unset_secret(&self, app: &str, env: &str, name: &str) -> Result<()>;
    /// The app's current secrets, every environment, by (env, name).
    async fn list_secrets(&self, app: &str) -> Result<Vec<SecretRecord>>;
    /// The secrets release `number` of `app` runs with in `env` (the copy
    /// taken when it was made), by name.
    async fn release_secrets(&self, app: &str, number: i64, env: &str)
        -> Result<Vec<SecretRecord>>;

    /// Inserts a release with the next number and, in the same
    /// transaction, the copy of the app's current secrets it runs with;
    /// returns it.
    async fn create_release(&self, new: NewRelease<'_>, now: Millis) -> Result<ReleaseRecord>;
    async fn get_release(&self, app: &str, number: i64) -> Result<ReleaseRecord>;
    async fn set_release_status(&self, app: &str, number: i64, status: &str) -> Result<()>;
    async fn list_releases(&self, app: &str) -> Result<Vec<ReleaseRecord>>;

    /// Inserts a rollout (its `id` is assigned) and returns it.
    async fn create_rollout(&self, rollout: &Rollout, now: Millis) -> Result<Rollout>;
    async fn update_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()>;
    /// Records a rollout that just succeeded and makes its target the live
    /// release of its environment (the one before becomes the rollback
    /// target), in one transaction: a crash cannot leave one without the
    /// other.
    async fn complete_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()>;
    async fn latest_rollout(&self, app: &str, env: &str) -> Result<Option<Rollout>>;

    /// Every instance of the app, in all its environments.
    async fn list_instances(&self, app: &str) -> Result<Vec<InstanceRecord>>;
    async fn list_node_instances(&self, node: &str) -> Result<Vec<InstanceRecord>>;
    /// Applies changes in one transaction; bumps and returns the index if
    /// anything changed.
    async fn apply_instance_changes(&self, changes: &[InstanceChange]) -> Result<u64>;
    /// Bumps the index without an instance change (routing depends on a
    /// rollout's state or the live release, which changed). Returns it.
    async fn bump_index(&self) -> Result<u64>;
    /// Records an agent's reports (JSON per instance id) for its own
    /// instances and its heartbeat; NotFound when the node never registered.
    async fn record_observations(
        &self,
        node: &str,
        observed: &[(String, String)],
        now: Millis,
    ) -> Result<()> {
        let one = Observations {
            node: node.to_string(),
            observed: observed.to_vec(),
            now,
        };
        self.record_observations_batch(&[one])
            .await?
            .pop()
            .unwrap_or(Ok(()))
    }
    /// Many agents' [`Store::record_observations`] in one transaction (one
    /// commit for all: heartbeats arrive by the thousand). One result per
    /// report, in order — NotFound for a node never registered, which does
    /// not hold up the others; an error of the transaction itself fails all.
    async fn record_observations_batch(&self, batch: &[Observations]) -> Result<Vec<Result<()>>>;

    /// Housekeeping the server runs about once a second, off every
    /// request's path (SQLite: a passive WAL checkpoint, which otherwise
    /// runs inside whichever commit fills the log and holds up everyone
    /// waiting on that commit).
    async fn maintain(&self) -> Result<()> {
        Ok(())
    }

    /// Registers a node, in one transaction (one commit: thousands of
    /// agents register at once after a server's first start): with `cert`,
    /// records the certificate just issued to it and revokes the node's
    /// others but `cert.keep`; then inserts the node, or updates its labels
    /// and last report. Returns how many certificates were revoked.
    /// Conflict when the certificate's serial is already recorded.
    async fn register_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        cert: Option<&IssuedCert<'_>>,
        now: Millis,
    ) -> Result<u64>;
    /// Gives every node a fresh lease (at server start).
    async fn renew_node_leases(&self, now: Millis) -> Result<()>;
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
    /// One node; None when it never registered.
    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>>;

    async fn upsert_proxy(&self, p: &ProxyRecord) -> Result<()>;
    async fn list_proxies(&self) -> Result<Vec<ProxyRecord>>;

    async fn add_event(
        &self,
        app: Option<&str>,
        kind: &str,
        message: &str,
        now: Millis,
    ) -> Result<()>;
    async fn list_events(&self, app: Option<&str>, limit: u32) -> Result<Vec<EventRecord>>;

    /// Conflict when the id exists.
    async fn insert_token(&self, t: &TokenRecord) -> Result<()>;
    /// NotFound when there is no such token.
    async fn get_token(&self, id: &str) -> Result<TokenRecord>;
    /// Oldest first, revoked ones included.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// NotFound when there is no such token; revoking twice keeps the first time.
    async fn revoke_token(&self, id: &str, now: Millis) -> Result<()>;

    /// NotFound when no such certificate was issued (or it was pruned).
    async fn get_node_cert(&self, serial: &str) -> Result<NodeCertRecord>;
    /// A node's certificates, newest first.
    async fn list_node_certs(&self, node: &str) -> Result<Vec<NodeCertRecord>>;

    /// Adds deliveries (one transaction); ended ones older than `prune_before`
    /// are dropped at the same time.
    async fn add_deliveries(&self, d: &[DeliveryRecord], prune_before: Millis) -> Result<()>;
    /// Pending deliveries due at `now`, oldest first.
    async fn due_deliveries(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryRecord>>;
    /// Records an attempt's outcome (state, attempts, next_at, last_*).
    async fn update_delivery(&self, d: &DeliveryRecord) -> Result<()>;
    /// An app's deliveries, newest first.
    async fn list_deliveries(&self, app: &str, limit: u32) -> Result<Vec<DeliveryRecord>>;
}

pub fn desired_str(d: Desired) -> &'static str {
    match d {
        Desired::Run => "run",
        Desired::Drain { .. } => "drain",
        Desired::Stop => "stop",
    }
}

#[cfg(test)]
mod tests;
