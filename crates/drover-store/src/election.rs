//! Leader election among servers sharing one PostgreSQL database.
//!
//! One leader at a time holds a session-level advisory lock on a
//! dedicated connection (not one of the pool's). Taking the lock, it bumps
//! the `leader` row's epoch and writes under that epoch from then on: every
//! leader write checks it ([`crate::PgStore`]'s fenced transactions), so a
//! deposed leader's writes are refused, whatever it believes.
//!
//! The lock lives as long as the session. The dedicated connection sets
//! `idle_session_timeout` to the lease, and the leader runs a query on it
//! every [`Election::check_every`]: a leader that stops (crashed, paused,
//! cut off) loses its session, hence its lock, within the lease, and the
//! next server takes over. A leader whose check fails or times out steps
//! down at once (epoch 0: its fenced writes fail from then on) and
//! campaigns again.

use crate::{PgStore, Result, StoreError};
use sqlx::{Connection, PgConnection};
use std::time::Duration;
use tokio::sync::watch;

/// The advisory lock's key: "drover" in ASCII.
const LOCK_KEY: i64 = 0x6472_6f76_6572;

/// What this server is, as the election sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not (yet) connected to the database's lock.
    Unknown,
    Follower,
    /// Leading under this fencing epoch.
    Leader {
        epoch: u64,
    },
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// One server's campaign.
#[derive(Debug, Clone)]
pub struct Election {
    /// This server's name (in the `leader` row and logs).
    pub holder: String,
    /// Where other servers forward what only the leader does.
    pub api_url: String,
    /// How long a silent leader keeps the lock.
    pub lease: Duration,
    /// How often the leader checks its session, and a follower tries the lock.
    pub check_every: Duration,
}

impl Election {
    pub fn new(holder: &str, api_url: &str) -> Self {
        Election {
            holder: holder.into(),
            api_url: api_url.into(),
            lease: Duration::from_secs(5),
            check_every: Duration::from_millis(500),
        }
    }

    /// Campaigns until `stop` is cancelled, publishing this server's role
    /// on `role` (and setting `store`'s fencing epoch to match).
    pub async fn run(
        self,
        store: PgStore,
        role: watch::Sender<Role>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut logged_error = None::<String>;
        loop {
            let res = tokio::select! {
                _ = &mut stop => break,
                res = self.term(&store, &role) => res,
            };
            // The session is gone or unusable: whatever we were, we lead
            // no more.
            store.set_epoch(0);
            role.send_replace(Role::Unknown);
            if let Err(e) = res {
                let msg = e.to_string();
                if logged_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, "leader election: the database connection failed; trying again");
                    logged_error = Some(msg);
                }
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(self.check_every) => {}
            }
        }
        store.set_epoch(0);
        role.send_replace(Role::Unknown);
    }

    /// One session: follow until the lock is ours, then lead until the
    /// session fails. Returns only with the session's error.
    async fn term(&self, store: &PgStore, role: &watch::Sender<Role>) -> Result<()> {
        let mut conn = tokio::time::timeout(self.lease, PgConnection::connect(store.url()))
            .await
            .map_err(|_| StoreError::Db("connecting for the leader lock timed out".into()))??;
        // A number we format ourselves: nothing from outside is in it.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET idle_session_timeout = {}",
            self.lease.as_millis()
        )))
        .execute(&mut conn)
        .await?;
        role.send_replace(Role::Follower);
        loop {
            let got: bool = self
                .bounded(
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(LOCK_KEY)
                        .fetch_one(&mut conn),
                )
                .await??;
            if got {
                break;
            }
            tokio::time::sleep(self.check_every).await;
        }
        let epoch: i64 = self
            .bounded(
                sqlx::query_scalar("UPDATE leader SET epoch = epoch + 1, holder = $1, api_url = $2, since = $3 WHERE id = 1 RETURNING epoch")
                    .bind(&self.holder)
                    .bind(&self.api_url)
                    .bind(now_ms() as i64)
                    .fetch_one(&mut conn),
            )
            .await??;
        let epoch = epoch as u64;
        store.set_epoch(epoch);
        role.send_replace(Role::Leader { epoch });
        tracing::info!(holder = %self.holder, epoch, "this server leads");
        loop {
            tokio::time::sleep(self.check_every).await;
            let check = self
                .bounded(
                    sqlx::query_scalar::<_, i64>("SELECT epoch FROM leader WHERE id = 1")
                        .fetch_one(&mut conn),
                )
                .await;
            match check {
                Ok(Ok(e)) if e as u64 == epoch => {}
                Ok(Ok(e)) => {
                    tracing::error!(
                        epoch,
                        current = e,
                        "another server took over; stepping down"
                    );
                    return Err(StoreError::Fenced {
                        mine: epoch,
                        current: e as u64,
                    });
                }
                Ok(Err(e)) => {
                    tracing::error!(epoch, error = %e, "lost the leader lock's session; stepping down");
                    return Err(e.into());
                }
                Err(_) => {
                    tracing::error!(
                        epoch,
                        "the leader lock's session does not answer; stepping down"
                    );
                    return Err(StoreError::Db("the leader lock's session timed out".into()));
                }
            }
        }
    }

    /// A query on the lock's session, bounded by the lease.
    async fn bounded<F: std::future::Future>(
        &self,
        f: F,
    ) -> std::result::Result<F::Output, StoreError> {
        tokio::time::timeout(self.lease, f)
            .await
            .map_err(|_| StoreError::Db("the database did not answer within the lease".into()))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
