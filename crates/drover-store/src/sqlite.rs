//! The SQLite implementation of [`Store`]: one file, WAL journal,
//! `synchronous = FULL` so an acknowledged write survives a power cut.

use crate::rows::*;
use crate::*;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(StoreError::from)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // The server checkpoints in the background (`maintain`); a
            // commit checkpoints only if the log grows past ~64 MB anyway.
            .pragma("wal_autocheckpoint", "16384")
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Db(format!("migration failed: {e}")))?;
        Ok(SqliteStore { pool })
    }
}

impl SqliteStore {
    /// A write transaction that takes the write lock up front (`BEGIN
    /// IMMEDIATE`, waiting up to the busy timeout). A deferred transaction
    /// that reads first would fail at once with SQLITE_BUSY when another
    /// connection wrote in between, instead of waiting.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Makes ?1 the live release of (?2 app, ?3 env); the previous live release
/// becomes the default rollback target.
const SET_LIVE: &str = "INSERT INTO deployments (app, env, live_release) VALUES (?2, ?3, ?1) ON CONFLICT (app, env) DO UPDATE SET prev_release = CASE WHEN live_release IS NOT NULL AND live_release != ?1 THEN live_release ELSE prev_release END, live_release = ?1";

async fn write_rollout(
    conn: &mut sqlx::SqliteConnection,
    rollout: &Rollout,
    now: Millis,
) -> Result<()> {
    let data = serde_json::to_string(rollout).map_err(|e| StoreError::Db(e.to_string()))?;
    let res = sqlx::query("UPDATE rollouts SET state = ?, data = ?, updated_at = ? WHERE id = ?")
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
impl Store for SqliteStore {
    async fn index(&self) -> Result<u64> {
        let v: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'index'")
            .fetch_one(&self.pool)
            .await?;
        v.parse()
            .map_err(|_| StoreError::Corrupt(format!("meta index {v:?}")))
    }

    async fn insert_app(&self, app: &AppRecord) -> Result<()> {
        let res = sqlx::query("INSERT INTO apps (name, repo, branch, spec, created_at, polled_commit, webhook_secret) VALUES (?, ?, ?, ?, ?, ?, ?)")
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
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!("app {}", app.name)))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    async fn get_app(&self, name: &str) -> Result<AppRecord> {
        let row = sqlx::query("SELECT * FROM apps WHERE name = ?")
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
        sqlx::query("INSERT INTO deployments (app, env) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(app)
            .bind(env)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_deployment(&self, app: &str, env: &str) -> Result<Option<DeploymentRecord>> {
        let row = sqlx::query("SELECT * FROM deployments WHERE app = ? AND env = ?")
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
        let mut tx = self.write_tx().await?;
        let number: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(number), 0) + 1 FROM releases WHERE app = ?")
                .bind(app)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query("INSERT INTO releases (app, number, commit_sha, artifact_sha256, artifact_size, image, image_ref, spec, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
        sqlx::query("INSERT INTO release_secrets (app, number, env, name, ciphertext) SELECT app, ?, env, name, ciphertext FROM secrets WHERE app = ?")
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

    async fn set_secret(&self, s: &SecretRecord) -> Result<()> {
        sqlx::query("INSERT INTO secrets (app, env, name, ciphertext, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(app, env, name) DO UPDATE SET ciphertext = ?4, updated_at = ?5")
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
        let res = sqlx::query("DELETE FROM secrets WHERE app = ? AND env = ? AND name = ?")
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
        let rows = sqlx::query("SELECT * FROM secrets WHERE app = ? ORDER BY env, name")
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
            "SELECT * FROM release_secrets WHERE app = ? AND number = ? AND env = ? ORDER BY name",
        )
        .bind(app)
        .bind(number)
        .bind(env)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| secret_from_row(r, 0)).collect())
    }

    async fn get_release(&self, app: &str, number: i64) -> Result<ReleaseRecord> {
        let row = sqlx::query("SELECT * FROM releases WHERE app = ? AND number = ?")
            .bind(app)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| release_from_row(&r))
            .ok_or_else(|| StoreError::NotFound(format!("release r{number} of {app}")))
    }

    async fn set_release_status(&self, app: &str, number: i64, status: &str) -> Result<()> {
        sqlx::query("UPDATE releases SET status = ? WHERE app = ? AND number = ?")
            .bind(status)
            .bind(app)
            .bind(number)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_polled_commit(&self, app: &str, commit: &str) -> Result<()> {
        sqlx::query("UPDATE apps SET polled_commit = ? WHERE name = ?")
            .bind(commit)
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_run(&self, run: &RunRecord) -> Result<RunRecord> {
        let res = sqlx::query_scalar::<_, i64>(
            "INSERT INTO runs (app, commit_sha, git_ref, trigger, delivery, state, steps, release, rollout_id, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
        .fetch_one(&self.pool)
        .await;
        match res {
            Ok(id) => Ok(RunRecord { id, ..run.clone() }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                    "a run of {} for commit {} (or delivery {:?})",
                    run.app, run.commit, run.delivery
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn update_run(&self, run: &RunRecord) -> Result<()> {
        sqlx::query("UPDATE runs SET state = ?, steps = ?, release = ?, rollout_id = ?, error = ?, updated_at = ? WHERE id = ?")
            .bind(&run.state)
            .bind(&run.steps)
            .bind(&run.release)
            .bind(run.rollout_id)
            .bind(&run.error)
            .bind(run.updated_at as i64)
            .bind(run.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_run(&self, id: i64) -> Result<RunRecord> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| run_from_row(&r))
            .ok_or_else(|| StoreError::NotFound(format!("run {id}")))
    }

    async fn list_runs(&self, app: &str, limit: u32) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE app = ? ORDER BY id DESC LIMIT ?")
            .bind(app)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    async fn fail_interrupted_runs(&self, now: Millis) -> Result<u64> {
        let res = sqlx::query("UPDATE runs SET state = 'failed', error = 'interrupted by a server restart; deploy the commit again with drover deploy --ref', updated_at = ? WHERE state IN ('queued', 'running')")
            .bind(now as i64)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected())
    }

    async fn has_run_for_commit(&self, app: &str, commit: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE app = ? AND commit_sha = ?")
                .bind(app)
                .bind(commit)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    async fn list_releases(&self, app: &str) -> Result<Vec<ReleaseRecord>> {
        let rows = sqlx::query("SELECT * FROM releases WHERE app = ? ORDER BY number DESC")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(release_from_row).collect())
    }

    async fn create_rollout(&self, rollout: &Rollout, now: Millis) -> Result<Rollout> {
        let data = serde_json::to_string(rollout).map_err(|e| StoreError::Db(e.to_string()))?;
        let id: i64 = sqlx::query_scalar("INSERT INTO rollouts (app, env, state, data, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id")
            .bind(&rollout.app)
            .bind(&rollout.env)
            .bind(rollout.state.as_str())
            .bind(data)
            .bind(now as i64)
            .bind(now as i64)
            .fetch_one(&self.pool)
            .await?;
        let mut r = rollout.clone();
        r.id = id;
        Ok(r)
    }

    async fn update_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        write_rollout(&mut conn, rollout, now).await
    }

    async fn complete_rollout(&self, rollout: &Rollout, now: Millis) -> Result<()> {
        let mut tx = self.write_tx().await?;
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
            "SELECT id, data FROM rollouts WHERE app = ? AND env = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(app)
        .bind(env)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| rollout_from_row(&r)).transpose()
    }

    async fn list_instances(&self, app: &str) -> Result<Vec<InstanceRecord>> {
        let rows = sqlx::query(instance_select!("app = ?"))
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    async fn list_node_instances(&self, node: &str) -> Result<Vec<InstanceRecord>> {
        let rows = sqlx::query(instance_select!("node = ?"))
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    async fn apply_instance_changes(&self, changes: &[InstanceChange]) -> Result<u64> {
        let mut tx = self.write_tx().await?;
        let index: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'index'")
            .fetch_one(&mut *tx)
            .await?;
        let index: u64 = index
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("meta index {index:?}")))?;
        if changes.is_empty() {
            return Ok(index);
        }
        let next = index + 1;
        for c in changes {
            match c {
                InstanceChange::Insert(i) => {
                    sqlx::query("INSERT INTO instances (id, app, env, release, node, desired, drain_since, drain_index, routed, created_at) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)")
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
                    sqlx::query("UPDATE instances SET routed = ? WHERE id = ?")
                        .bind(*routed as i64)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Drain { id, since } => {
                    sqlx::query("UPDATE instances SET routed = 0, desired = 'drain', drain_since = ?, drain_index = ? WHERE id = ?")
                        .bind(*since as i64)
                        .bind(next as i64)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Stop { id } => {
                    sqlx::query("UPDATE instances SET routed = 0, desired = 'stop' WHERE id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                InstanceChange::Delete { id } => {
                    sqlx::query("DELETE FROM instances WHERE id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'index'")
            .bind(next.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(next)
    }

    async fn bump_index(&self) -> Result<u64> {
        let v: String = sqlx::query_scalar("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'index' RETURNING value")
            .fetch_one(&self.pool)
            .await?;
        v.parse()
            .map_err(|_| StoreError::Corrupt(format!("meta index {v:?}")))
    }

    async fn record_observations_batch(&self, batch: &[Observations]) -> Result<Vec<Result<()>>> {
        let mut tx = self.write_tx().await?;
        let mut out = Vec::with_capacity(batch.len());
        for o in batch {
            let seen = sqlx::query("UPDATE nodes SET last_seen = ? WHERE name = ?")
                .bind(o.now as i64)
                .bind(&o.node)
                .execute(&mut *tx)
                .await?;
            if seen.rows_affected() == 0 {
                out.push(Err(StoreError::NotFound(format!("node {}", o.node))));
                continue;
            }
            for (id, json) in &o.observed {
                sqlx::query(
                    "UPDATE instances SET observed = ?, observed_at = ? WHERE id = ? AND node = ?",
                )
                .bind(json)
                .bind(o.now as i64)
                .bind(id)
                .bind(&o.node)
                .execute(&mut *tx)
                .await?;
            }
            out.push(Ok(()));
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn maintain(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn register_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        cert: Option<&IssuedCert<'_>>,
        now: Millis,
    ) -> Result<u64> {
        let labels = serde_json::to_string(labels).map_err(|e| StoreError::Db(e.to_string()))?;
        let mut tx = self.write_tx().await?;
        let mut revoked = 0;
        if let Some(c) = cert {
            let r = &c.record;
            debug_assert_eq!(r.node, name);
            sqlx::query("DELETE FROM node_certs WHERE not_after < ?")
                .bind(c.prune_before as i64)
                .execute(&mut *tx)
                .await?;
            let res = sqlx::query("INSERT INTO node_certs (serial, node, issued_at, not_after, revoked_at) VALUES (?, ?, ?, ?, ?)")
                .bind(&r.serial)
                .bind(name)
                .bind(r.issued_at as i64)
                .bind(r.not_after as i64)
                .bind(r.revoked_at.map(|v| v as i64))
                .execute(&mut *tx)
                .await;
            match res {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Err(StoreError::Conflict(format!("certificate {}", r.serial)))
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            revoked = sqlx::query("UPDATE node_certs SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL AND serial != ? AND serial != ?")
                .bind(now as i64)
                .bind(name)
                .bind(&r.serial)
                .bind(c.keep.unwrap_or(&r.serial))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        sqlx::query("INSERT INTO nodes (name, labels, registered_at, last_seen) VALUES (?1, ?2, ?3, ?3) ON CONFLICT(name) DO UPDATE SET labels = ?2, last_seen = ?3")
            .bind(name)
            .bind(labels)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn renew_node_leases(&self, now: Millis) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_seen = MAX(last_seen, ?)")
            .bind(now as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query("SELECT * FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>> {
        let row = sqlx::query("SELECT * FROM nodes WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        let res = sqlx::query("INSERT INTO tokens (id, name, role, secret_hash, created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
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
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!("token {}", t.id)))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = ?")
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
            sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
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
        let row = sqlx::query("SELECT * FROM node_certs WHERE serial = ?")
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(node_cert_from_row)
            .ok_or_else(|| StoreError::NotFound(format!("certificate {serial}")))
    }

    async fn list_node_certs(&self, node: &str) -> Result<Vec<NodeCertRecord>> {
        let rows =
            sqlx::query("SELECT * FROM node_certs WHERE node = ? ORDER BY issued_at DESC, serial")
                .bind(node)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(node_cert_from_row).collect())
    }

    async fn add_deliveries(&self, d: &[DeliveryRecord], prune_before: Millis) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM deliveries WHERE state != 'pending' AND updated_at < ?")
            .bind(prune_before as i64)
            .execute(&mut *tx)
            .await?;
        for d in d {
            sqlx::query("INSERT INTO deliveries (id, app, env, event, url, secret, body, state, attempts, next_at, last_status, last_error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY created_at, rowid LIMIT ?",
        )
        .bind(now as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(delivery_from_row).collect())
    }

    async fn update_delivery(&self, d: &DeliveryRecord) -> Result<()> {
        let res = sqlx::query("UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_status = ?, last_error = ?, updated_at = ? WHERE id = ?")
            .bind(&d.state)
            .bind(d.attempts as i64)
            .bind(d.next_at as i64)
            .bind(d.last_status.map(i64::from))
            .bind(&d.last_error)
            .bind(d.updated_at as i64)
            .bind(&d.id)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("delivery {}", d.id)));
        }
        Ok(())
    }

    async fn list_deliveries(&self, app: &str, limit: u32) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM deliveries WHERE app = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
        )
        .bind(app)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(delivery_from_row).collect())
    }

    async fn upsert_proxy(&self, p: &ProxyRecord) -> Result<()> {
        sqlx::query("INSERT INTO proxies (name, applied_index, oldest_live_index, last_seen) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO UPDATE SET applied_index = ?2, oldest_live_index = ?3, last_seen = ?4")
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
        sqlx::query("INSERT INTO events (at, app, kind, message) VALUES (?, ?, ?, ?)")
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
                sqlx::query("SELECT * FROM events WHERE app = ? ORDER BY id DESC LIMIT ?")
                    .bind(a)
                    .bind(limit as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM events ORDER BY id DESC LIMIT ?")
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
}
