//! The PostgreSQL implementation of [`Store`], for servers that share one
//! database (one leads, the others stand by).
//!
//! Transactions are READ COMMITTED; the read-modify-writes take row locks
//! so that concurrent writers serialize: the app's row for a release's next
//! number, the `meta` index row for instance changes.
//!
//! *Fencing*: the writes only the leader makes (runs, releases, rollouts,
//! instances, the index, deployments, node leases, deliveries) begin with
//! `SELECT epoch FROM leader … FOR SHARE` and go on only when that is this
//! store's [`PgStore::epoch`]. The shared row lock conflicts with the
//! `UPDATE leader SET epoch = epoch + 1` of a new leader, so such a write
//! either commits entirely before a takeover or is refused after it
//! ([`StoreError::Fenced`]). Epoch 0 means "never led": always refused.

use crate::rows::*;
use crate::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The fencing epoch this server leads at (0: it does not lead).
    epoch: Arc<AtomicU64>,
    /// The database's URL, password included: never show it, show
    /// [`PgStore::url_redacted`].
    url: String,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`)
    /// and runs migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_within(url, Duration::from_secs(10)).await
    }

    pub(crate) async fn connect_within(url: &str, acquire_timeout: Duration) -> Result<Self> {
        let redacted = redact_url(url);
        let fail = |e: sqlx::Error| {
            StoreError::Db(format!("cannot connect to PostgreSQL at {redacted}: {e}"))
        };
        let opts = PgConnectOptions::from_str(url)
            .map_err(fail)?
            .application_name("drover");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await
            .map_err(fail)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Db(format!("migration failed on {redacted}: {e}")))?;
        Ok(PgStore {
            pool,
            epoch: Arc::new(AtomicU64::new(0)),
            url: url.to_string(),
        })
    }

    /// The database's URL, its password replaced by `***`.
    pub fn url_redacted(&self) -> String {
        redact_url(self.url())
    }

    /// The database's URL as given, password included (to open another
    /// connection to it, e.g. the leader lock's session): never log it.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Sets the fencing epoch this server leads at (after it won the
    /// election; 0 when it steps down). Shared by every clone.
    pub fn set_epoch(&self, e: u64) {
        self.epoch.store(e, Ordering::SeqCst);
    }

    /// The fencing epoch this server leads at (0: it does not lead).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The leader row: (epoch, holder, api_url).
    pub async fn current_leader(&self) -> Result<(u64, String, String)> {
        let r = sqlx::query("SELECT epoch, holder, api_url FROM leader WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok((
            r.get::<i64, _>("epoch") as u64,
            r.get("holder"),
            r.get("api_url"),
        ))
    }

    /// Tests only: takes the lead without an election (bumps the epoch and
    /// adopts it); returns the new epoch.
    #[doc(hidden)]
    pub async fn lead_for_tests(&self) -> Result<u64> {
        let e: i64 = sqlx::query_scalar(
            "UPDATE leader SET epoch = epoch + 1, holder = 'test' WHERE id = 1 RETURNING epoch",
        )
        .fetch_one(&self.pool)
        .await?;
        self.set_epoch(e as u64);
        Ok(e as u64)
    }

    /// A transaction for a leader write: refused (rolled back) unless this
    /// store leads at the database's current epoch, which it keeps from
    /// changing until the transaction ends.
    async fn fenced_tx(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        let current: i64 = sqlx::query_scalar("SELECT epoch FROM leader WHERE id = 1 FOR SHARE")
            .fetch_one(&mut *tx)
            .await?;
        let (mine, current) = (self.epoch(), current as u64);
        if mine == 0 || mine != current {
            let _ = tx.rollback().await;
            return Err(StoreError::Fenced { mine, current });
        }
        Ok(tx)
    }
}

/// `url` with its password (in the user info or a `password=` parameter)
/// replaced by `***`, for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        // Not a URL (`host=… password=…`): only the parameter.
        None => return redact_password_params(url),
    };
    // The user info ends at the last `@` before the query: a password
    // with an unescaped `/` or `@` is still hidden whole.
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let mut out = head.to_string();
    let after_auth = match rest[..query_at].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(c) => {
                    out.push_str(&userinfo[..c]);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            at
        }
        None => 0,
    };
    out.push_str(&rest[after_auth..query_at]);
    out.push_str(&redact_password_params(&rest[query_at..]));
    out
}

/// Replaces the value of every `password=` parameter (after `?`, `&`, a
/// space or at the start) by `***`.
fn redact_password_params(s: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.to_ascii_lowercase().find(KEY) {
        let starts_param =
            i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ' | b'\t' | b';');
        let value_at = i + KEY.len();
        out.push_str(&rest[..value_at]);
        rest = &rest[value_at..];
        if starts_param {
            let end = rest.find(['&', ' ', '\t', ';', '#']).unwrap_or(rest.len());
            out.push_str("***");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn parse_index(v: &str) -> Result<u64> {
    v.parse()
        .map_err(|_| StoreError::Corrupt(format!("meta index {v:?}")))
}

/// Makes $1 the live release of ($2 app, $3 env); the previous live release
/// becomes the default rollback target.
const SET_LIVE: &str = "INSERT INTO deployments (app, env, live_release) VALUES ($2, $3, $1) ON CONFLICT (app, env) DO UPDATE SET prev_release = CASE WHEN deployments.live_release IS NOT NULL AND deployments.live_release != $1 THEN deployments.live_release ELSE deployments.prev_release END, live_release = $1";

async fn write_rollout(
    conn: &mut sqlx::PgConnection,
    rollout: &Rollout,
    now: Millis,
) -> Result<()> {
    let data = serde_json::to_string(rollout).map_err(|e| StoreError::Db(e.to_string()))?;
    let res =
        sqlx::query("UPDATE rollouts SET state = $1, data = $2, updated_at = $3 WHERE id = $4")
            .bind(rollout.state.as_str())
            .bind(data)
            .bind(now as i64)
            .bind(rollout.id)
            .execute(&mut *conn)
            .await?;
    if res.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("rollout {}", rollout.id)));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn index(&self) -> Result<u64> {
        let v: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'index'")
            .fetch_one(&self.pool)
            .await?;
        parse_index(&v)
    }

    async fn insert_app(&self, app: &AppRecord) -> Result<()> {
        let res = sqlx::query("INSERT INTO apps (name, repo, branch, spec, created_at, polled_commit, webhook_secret) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&app.name)
            .bind(&app.repo)
            .bind(&app.branch)
            .bind(&app.spec)
            .bind(app.created_at as i64)
            .bind(&app.polled_commit)
            .bind(&app.webhook_secret)
            .execute(&self.pool)
            .await;
        match res {
            Err(e) if unique_violation(&e) => {
                Err(StoreError::Conflict(format!("app {}", app.name)))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    async fn get_app(&self, name: &str) -> Result<AppRecord> {
        let row = sqlx::query("SELECT * FROM apps WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| app_from_row(&r))
            .ok_or_else(|| StoreError::NotFound(format!("app {name}")))
    }

    async fn list_apps(&self) -> Result<Vec<AppRecord>> {
        let rows = sqlx::query("SELECT * FROM apps ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(app_from_row).collect())
    }

    async fn ensure_deployment(&self, app: &str, env: &str) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("INSERT INTO deployments (app, env) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(app)
            .bind(env)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_deployment(&self, app: &str, env: &str) -> Result<Option<DeploymentRecord>> {
        let row = sqlx::query("SELECT * FROM deployments WHERE app = $1 AND env = $2")
            .bind(app)
            .bind(env)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| deployment_from_row(&r)))
    }

    async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let rows = sqlx::query("SELECT * FROM deployments ORDER BY app, env")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(deployment_from_row).collect())
    }

    async fn set_polled_commit(&self, app: &str, commit: &str) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("UPDATE apps SET polled_commit = $1 WHERE name = $2")
            .bind(commit)
            .bind(app)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_run(&self, run: &RunRecord) -> Result<RunRecord> {
        let mut tx = self.fenced_tx().await?;
        let res = sqlx::query_scalar::<_, i64>(
            "INSERT INTO runs (app, commit_sha, git_ref, trigger, delivery, state, steps, release, rollout_id, error, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
        )
        .bind(&run.app)
        .bind(&run.commit)
        .bind(&run.git_ref)
        .bind(&run.trigger)
        .bind(&run.delivery)
        .bind(&run.state)
        .bind(&run.steps)
        .bind(&run.release)
        .bind(run.rollout_id)
        .bind(&run.error)
        .bind(run.created_at as i64)
        .bind(run.updated_at as i64)
        .fetch_one(&mut *tx)
        .await;
        match res {
            Ok(id) => {
                tx.commit().await?;
                Ok(RunRecord { id, ..run.clone() })
            }
            Err(e) if unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a run of {} for commit {} (or delivery {:?})",
                run.app, run.commit, run.delivery
            ))),
            Err(e) => Err(e.into()),
        }
    }

    async fn update_run(&self, run: &RunRecord) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("UPDATE runs SET state = $1, steps = $2, release = $3, rollout_id = $4, error = $5, updated_at = $6 WHERE id = $7")
            .bind(&run.state)
            .bind(&run.steps)
            .bind(&run.release)
            .bind(run.rollout_id)
            .bind(&run.error)
            .bind(run.updated_at as i64)
            .bind(run.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_run(&self, id: i64) -> Result<RunRecord> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| run_from_row(&r))
            .ok_or_else(|| StoreError::NotFound(format!("run {id}")))
    }

    async fn list_runs(&self, app: &str, limit: u32) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE app = $1 ORDER BY id DESC LIMIT $2")
            .bind(app)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    async fn fail_interrupted_runs(&self, now: Millis) -> Result<u64> {
        let mut tx = self.fenced_tx().await?;
        let res = sqlx::query("UPDATE runs SET state = 'failed', error = 'interrupted by a server restart; deploy the commit again with drover deploy --ref', updated_at = $1 WHERE state IN ('queued', 'running')")
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected())
    }

    async fn has_run_for_commit(&self, app: &str, commit: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE app = $1 AND commit_sha = $2")
                .bind(app)
                .bind(commit)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    async fn set_secret(&self, s: &SecretRecord) -> Result<()> {
        sqlx::query("INSERT INTO secrets (app, env, name, ciphertext, updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (app, env, name) DO UPDATE SET ciphertext = $4, updated_at = $5")
            .bind(&s.app)
            .bind(&s.env)
            .bind(&s.name)
            .bind(&s.ciphertext)
            .bind(s.updated_at as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn unset_secret(&self, app: &str, env: &str, name: &str) -> Result<()> {
        let res = sqlx::query("DELETE FROM secrets WHERE app = $1 AND env = $2 AND name = $3")
            .bind(app)
            .bind(env)
            .bind(name)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("secret {name}")));
        }
        Ok(())
    }

    async fn list_secrets(&self, app: &str) -> Result<Vec<SecretRecord>> {
        let rows = sqlx::query("SELECT * FROM secrets WHERE app = $1 ORDER BY env, name")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| secret_from_row(r, r.get::<i64, _>("updated_at") as u64))
            .collect())
    }

    async fn release_secrets(
        &self,
        app: &str,
        number: i64,
        env: &str,
    ) -> Result<Vec<SecretRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM release_secrets WHERE app = $1 AND number = $2 AND env = $3 ORDER BY name",
        )
        .bind(app)
        .bind(number)
        .bind(env)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| secret_from_row(r, 0)).collect())
    }

    async fn create_release(&self, new: NewRelease<'_>, now: Millis) -> Result<ReleaseRecord> {
        let NewRelease {
            app,
            commit,
            sha256,
            size,
            image,
            image_ref,
            spec,
        } = new;
        let mut tx = self.fenced_tx().await?;
        // The app's row serializes the app's releases: the next number is
        // read only after the one before committed. (NO KEY UPDATE leaves
        // inserts referencing the app free to go on.)
        sqlx::query("SELECT 1 FROM apps WHERE name = $1 FOR NO KEY UPDATE")
            .bind(app)
            .execute(&mut *tx)
            .await?;
        let number: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(number), 0) + 1 FROM releases WHERE app = $1")
                .bind(app)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query("INSERT INTO releases (app, number, commit_sha, artifact_sha256, artifact_size, image, image_ref, spec, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(app)
            .bind(number)
            .bind(commit)
            .bind(sha256)
            .bind(size as i64)
            .bind(image)
            .bind(image_ref)
            .bind(spec)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO release_secrets (app, number, env, name, ciphertext) SELECT app, $1, env, name, ciphertext FROM secrets WHERE app = $2")
            .bind(number)
            .bind(app)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ReleaseRecord {
            app: app.into(),
            number,
            commit: commit.into(),
            artifact_sha256: sha256.into(),
            artifact_size: size,
            image: image.map(str::to_string),
            image_ref: image_ref.map(str::to_string),
            spec: spec.into(),
            created_at: now,
            status: "ok".into(),
        })
    }

    async fn get_release(&self, app: &str, number: i64) -> Result<ReleaseRecord> {
        let row = sqlx::query("SELECT * FROM releases WHERE app = $1 AND number = $2")
            .bind(app)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| release_from_row(&r))
            .ok_or_else(|| StoreError::NotFound(format!("release r{number} of {app}")))
    }

    async fn set_release_status(&self, app: &str, number: i64, status: &str) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("UPDATE releases SET status = $1 WHERE app = $2 AND number = $3")
            .bind(status)
            .bind(app)
            .bind(number)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_releases(&self, app: &str) -> Result<Vec<ReleaseRecord>> {
        let rows = sqlx::query("SELECT * FROM releases WHERE app = $1 ORDER BY number DESC")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(release_from_row).collect())
    }

    async fn create_rollout(&self, rollout: &Rollout, now: Millis) -> Result<Rollout> {
        let data = serde_json::to_string(rollout).map_err(|e| StoreError::Db(e.to_string()))?;
        let mut tx = self.fenced_tx().await?;
        let id: i64 = sqlx::query_scalar("INSERT INTO rollouts (app, env, state, data, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5) RETURNING id")
            .bind(&rollout.app)
            .bind(&rollout.env)
            .bind(rollout.state.as_str())
            .bind(data)
            .bind(now as i64)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut r = rollout.clone();
        r.id = id;
        Ok(r)
    }

    async fn update_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        write_rollout(&mut tx, rollout, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn complete_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query(SET_LIVE)
            .bind(&rollout.to)
            .bind(&rollout.app)
            .bind(&rollout.env)
            .execute(&mut *tx)
            .await?;
        write_rollout(&mut tx, rollout, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn latest_rollout(&self, app: &str, env: &str) -> Result<Option<Rollout>> {
        let row = sqlx::query(
            "SELECT id, data FROM rollouts WHERE app = $1 AND env = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(app)
        .bind(env)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| rollout_from_row(&r)).transpose()
    }

    async fn list_instances(&self, app: &str) -> Result<Vec<InstanceRecord>> {
        let rows = sqlx::query(instance_select!("app = $1"))
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    async fn list_node_instances(&self, node: &str) -> Result<Vec<InstanceRecord>> {
        let rows = sqlx::query(instance_select!("node = $1"))
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    async fn apply_instance_changes(&self, changes: &[InstanceChange]) -> Result<u64> {
        if changes.is_empty() {
            return self.index().await;
        }
        let mut tx = self.fenced_tx().await?;
        let index: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'index' FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let next = parse_index(&index)? + 1;
        // Lock the instances changed in id order, as observations do: two
        // writers of the same rows then never wait for each other in a cycle.
        let ids: Vec<&str> = changes
            .iter()
            .filter_map(|c| match c {
                InstanceChange::Insert(_) => None,
                InstanceChange::SetRouted { id, .. }
                | InstanceChange::Drain { id, .. }
                | InstanceChange::Stop { id }
                | InstanceChange::Delete { id } => Some(id.as_str()),
            })
            .collect();
        if !ids.is_empty() {
            sqlx::query("SELECT id FROM instances WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        for c in changes {
            match c {
                InstanceChange::Insert(i) => {
                    sqlx::query("INSERT INTO instances (id, app, env, release, node, desired, drain_since, drain_index, routed, created_at) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL, $7, $8)")
                        .bind(&i.id)
                        .bind(&i.app)
                        .bind(&i.env)
                        .bind(&i.release)
                        .bind(&i.node)
                        .bind(desired_str(i.desired))
                        .bind(i.routed as i64)
                        .bind(i.created_at as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::SetRouted { id, routed } => {
                    sqlx::query("UPDATE instances SET routed = $1 WHERE id = $2")
                        .bind(*routed as i64)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Drain { id, since } => {
                    sqlx::query("UPDATE instances SET routed = 0, desired = 'drain', drain_since = $1, drain_index = $2 WHERE id = $3")
                        .bind(*since as i64)
                        .bind(next as i64)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Stop { id } => {
                    sqlx::query("UPDATE instances SET routed = 0, desired = 'stop' WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Delete { id } => {
                    sqlx::query("DELETE FROM instances WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'index'")
            .bind(next.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(next)
    }

    async fn bump_index(&self) -> Result<u64> {
        let mut tx = self.fenced_tx().await?;
        let v: String = sqlx::query_scalar(
            "UPDATE meta SET value = (CAST(value AS BIGINT) + 1)::TEXT WHERE key = 'index' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        parse_index(&v)
    }

    async fn record_observations_batch(&self, batch: &[Observations]) -> Result<Vec<Result<()>>> {
        let mut tx = self.pool.begin().await?;
        // Rows are locked in a fixed order (nodes by name, instances by
        // id) so that concurrent batches and instance changes cannot
        // deadlock; the results keep the batch's order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| batch[a].node.cmp(&batch[b].node));
        let mut known = vec![false; batch.len()];
        for i in order {
            let o = &batch[i];
            let seen = sqlx::query("UPDATE nodes SET last_seen = $1 WHERE name = $2")
                .bind(o.now as i64)
                .bind(&o.node)
                .execute(&mut *tx)
                .await?;
            known[i] = seen.rows_affected() > 0;
        }
        // Stable: a later report on the same instance still comes last.
        let mut updates: Vec<(&str, &str, &str, Millis)> = batch
            .iter()
            .zip(&known)
            .filter(|(_, known)| **known)
            .flat_map(|(o, _)| {
                o.observed
                    .iter()
                    .map(|(id, json)| (id.as_str(), o.node.as_str(), json.as_str(), o.now))
            })
            .collect();
        updates.sort_by(|a, b| a.0.cmp(b.0));
        for (id, node, json, now) in updates {
            sqlx::query(
                "UPDATE instances SET observed = $1, observed_at = $2 WHERE id = $3 AND node = $4",
            )
            .bind(json)
            .bind(now as i64)
            .bind(id)
            .bind(node)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(batch
            .iter()
            .zip(known)
            .map(|(o, known)| {
                if known {
                    Ok(())
                } else {
                    Err(StoreError::NotFound(format!("node {}", o.node)))
                }
            })
            .collect())
    }

    async fn register_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        cert: Option<&IssuedCert<'_>>,
        now: Millis,
    ) -> Result<u64> {
        let labels = serde_json::to_string(labels).map_err(|e| StoreError::Db(e.to_string()))?;
        let mut tx = self.pool.begin().await?;
        let mut revoked = 0;
        if let Some(c) = cert {
            let r = &c.record;
            debug_assert_eq!(r.node, name);
            sqlx::query("DELETE FROM node_certs WHERE not_after < $1")
                .bind(c.prune_before as i64)
                .execute(&mut *tx)
                .await?;
            let res = sqlx::query("INSERT INTO node_certs (serial, node, issued_at, not_after, revoked_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(&r.serial)
                .bind(name)
                .bind(r.issued_at as i64)
                .bind(r.not_after as i64)
                .bind(r.revoked_at.map(|v| v as i64))
                .execute(&mut *tx)
                .await;
            match res {
                Err(e) if unique_violation(&e) => {
                    return Err(StoreError::Conflict(format!("certificate {}", r.serial)))
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            let keep: Vec<&str> = std::iter::once(r.serial.as_str()).chain(c.keep).collect();
            revoked = sqlx::query(
                "UPDATE node_certs SET revoked_at = $1 WHERE node = $2 AND revoked_at IS NULL AND serial <> ALL($3)",
            )
            .bind(now as i64)
            .bind(name)
            .bind(keep)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query("INSERT INTO nodes (name, labels, registered_at, last_seen) VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO UPDATE SET labels = $2, last_seen = $3")
            .bind(name)
            .bind(labels)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn renew_node_leases(&self, now: Millis) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("UPDATE nodes SET last_seen = GREATEST(last_seen, $1)")
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query("SELECT * FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>> {
        let row = sqlx::query("SELECT * FROM nodes WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    async fn upsert_proxy(&self, p: &ProxyRecord) -> Result<()> {
        sqlx::query("INSERT INTO proxies (name, applied_index, oldest_live_index, last_seen) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET applied_index = $2, oldest_live_index = $3, last_seen = $4")
            .bind(&p.name)
            .bind(p.applied_index as i64)
            .bind(p.oldest_live_index as i64)
            .bind(p.last_seen as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_proxies(&self) -> Result<Vec<ProxyRecord>> {
        let rows = sqlx::query("SELECT * FROM proxies ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| ProxyRecord {
                name: r.get("name"),
                applied_index: r.get::<i64, _>("applied_index") as u64,
                oldest_live_index: r.get::<i64, _>("oldest_live_index") as u64,
                last_seen: r.get::<i64, _>("last_seen") as u64,
            })
            .collect())
    }

    async fn add_event(
        &self,
        app: Option<&str>,
        kind: &str,
        message: &str,
        now: Millis,
    ) -> Result<()> {
        sqlx::query("INSERT INTO events (at, app, kind, message) VALUES ($1, $2, $3, $4)")
            .bind(now as i64)
            .bind(app)
            .bind(kind)
            .bind(message)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_events(&self, app: Option<&str>, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = match app {
            Some(a) => {
                sqlx::query("SELECT * FROM events WHERE app = $1 ORDER BY id DESC LIMIT $2")
                    .bind(a)
                    .bind(limit as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM events ORDER BY id DESC LIMIT $1")
                    .bind(limit as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| EventRecord {
                id: r.get("id"),
                at: r.get::<i64, _>("at") as u64,
                app: r.get("app"),
                kind: r.get("kind"),
                message: r.get("message"),
            })
            .collect())
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        let res = sqlx::query("INSERT INTO tokens (id, name, role, secret_hash, created_at, expires_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.role)
            .bind(&t.secret_hash)
            .bind(t.created_at as i64)
            .bind(t.expires_at.map(|v| v as i64))
            .bind(t.revoked_at.map(|v| v as i64))
            .execute(&self.pool)
            .await;
        match res {
            Err(e) if unique_violation(&e) => Err(StoreError::Conflict(format!("token {}", t.id))),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(token_from_row)
            .ok_or_else(|| StoreError::NotFound(format!("token {id}")))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(token_from_row).collect())
    }

    async fn revoke_token(&self, id: &str, now: Millis) -> Result<()> {
        let res =
            sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now as i64)
                .bind(id)
                .execute(&self.pool)
                .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("token {id}")));
        }
        Ok(())
    }

    async fn get_node_cert(&self, serial: &str) -> Result<NodeCertRecord> {
        let row = sqlx::query("SELECT * FROM node_certs WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(node_cert_from_row)
            .ok_or_else(|| StoreError::NotFound(format!("certificate {serial}")))
    }

    async fn list_node_certs(&self, node: &str) -> Result<Vec<NodeCertRecord>> {
        let rows =
            sqlx::query("SELECT * FROM node_certs WHERE node = $1 ORDER BY issued_at DESC, serial")
                .bind(node)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(node_cert_from_row).collect())
    }

    async fn add_deliveries(&self, d: &[DeliveryRecord], prune_before: Millis) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        sqlx::query("DELETE FROM deliveries WHERE state != 'pending' AND updated_at < $1")
            .bind(prune_before as i64)
            .execute(&mut *tx)
            .await?;
        for d in d {
            sqlx::query("INSERT INTO deliveries (id, app, env, event, url, secret, body, state, attempts, next_at, last_status, last_error, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")
                .bind(&d.id)
                .bind(&d.app)
                .bind(&d.env)
                .bind(&d.event)
                .bind(&d.url)
                .bind(&d.secret)
                .bind(&d.body)
                .bind(&d.state)
                .bind(d.attempts as i64)
                .bind(d.next_at as i64)
                .bind(d.last_status.map(i64::from))
                .bind(&d.last_error)
                .bind(d.created_at as i64)
                .bind(d.updated_at as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_deliveries(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= $1 ORDER BY created_at, seq LIMIT $2",
        )
        .bind(now as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(delivery_from_row).collect())
    }

    async fn update_delivery(&self, d: &DeliveryRecord) -> Result<()> {
        let mut tx = self.fenced_tx().await?;
        let res = sqlx::query("UPDATE deliveries SET state = $1, attempts = $2, next_at = $3, last_status = $4, last_error = $5, updated_at = $6 WHERE id = $7")
            .bind(&d.state)
            .bind(d.attempts as i64)
            .bind(d.next_at as i64)
            .bind(d.last_status.map(i64::from))
            .bind(&d.last_error)
            .bind(d.updated_at as i64)
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("delivery {}", d.id)));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_deliveries(&self, app: &str, limit: u32) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM deliveries WHERE app = $1 ORDER BY created_at DESC, seq DESC LIMIT $2",
        )
        .bind(app)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(delivery_from_row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        for (url, want) in [
            (
                "postgres://drover:s3cret@db.example:5432/drover",
                "postgres://drover:***@db.example:5432/drover",
            ),
            (
                "postgresql://drover@db/drover?sslmode=disable",
                "postgresql://drover@db/drover?sslmode=disable",
            ),
            ("postgres://db/drover", "postgres://db/drover"),
            ("postgres://u:p%40ss/w@rd@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u@h/db?sslmode=disable&password=hunter2&x=1",
                "postgres://u@h/db?sslmode=disable&password=***&x=1",
            ),
            (
                "host=db user=u password=hunter2 dbname=d",
                "host=db user=u password=*** dbname=d",
            ),
            ("postgres://u:@h/db", "postgres://u:***@h/db"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_database_is_named_without_its_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://drover:s3cret-pw@127.0.0.1:{port}/drover");
        let Err(StoreError::Db(msg)) =
            PgStore::connect_within(&url, Duration::from_millis(500)).await
        else {
            panic!("connected to nothing?");
        };
        assert!(
            msg.contains(&format!("postgres://drover:***@127.0.0.1:{port}/drover")),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }
}
