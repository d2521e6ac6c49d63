//! The agent's conversation with the control plane: register (with
//! backoff until it answers), long-poll assignments → reconcile, and report
//! (periodically and promptly after changes). A 404 from report or
//! assignments means the server forgot the node: register again. While the
//! server is unreachable everything keeps running; the outage is logged
//! once, not per attempt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drover_api::{AgentReport, RegisterRequest, RegisterResponse};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{now_ms, ClientError, ControlClient};
use crate::supervisor::Supervisor;

/// Long-poll wait asked of the server.
pub const WAIT_MS: u64 = 30_000;
/// Delay after a report-triggering change before reporting (debounce: batches
/// changes that arrive together; short, since the rollout waits on reports).
pub const REPORT_DEBOUNCE: Duration = Duration::from_millis(10);
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Logs an outage once, and its end once.
#[derive(Debug, Default)]
pub struct OutageLog {
    what: &'static str,
    down: bool,
}

impl OutageLog {
    pub fn new(what: &'static str) -> Self {
        OutageLog { what, down: false }
    }

    pub fn failed(&mut self, err: &ClientError) {
        if !self.down {
            warn!(error = %err, "{}: control plane not answering; apps keep running, retrying", self.what);
            self.down = true;
        }
    }

    pub fn ok(&mut self) {
        if self.down {
            info!("{}: control plane answering again", self.what);
            self.down = false;
        }
    }
}

/// Shared registration state; re-registration after a 404 happens once
/// even if both loops see it.
pub struct Session {
    client: ControlClient,
    request: RegisterRequest,
    generation: AsyncMutex<u64>,
    report_interval_ms: AtomicU64,
    shutdown: CancellationToken,
}

impl Session {
    /// Registers (retrying until the server answers or shutdown).
    pub async fn establish(
        client: ControlClient,
        request: RegisterRequest,
        shutdown: CancellationToken,
    ) -> Option<Arc<Session>> {
        let resp = register_until_ok(&client, &request, &shutdown).await?;
        Some(Arc::new(Session {
            client,
            request,
            generation: AsyncMutex::new(0),
            report_interval_ms: AtomicU64::new(resp.report_interval_ms),
            shutdown,
        }))
    }

    pub fn node(&self) -> &str {
        &self.request.node
    }

    fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms.load(Ordering::Relaxed).max(100))
    }

    async fn generation(&self) -> u64 {
        *self.generation.lock().await
    }

    /// Registers again unless someone already did since `seen`.
    async fn reregister(&self, seen: u64) {
        let mut generation = self.generation.lock().await;
        if *generation != seen {
            return;
        }
        warn!(node = %self.request.node, "control plane does not know this node (404): registering again");
        if let Some(resp) = register_until_ok(&self.client, &self.request, &self.shutdown).await {
            self.report_interval_ms
                .store(resp.report_interval_ms, Ordering::Relaxed);
            *generation += 1;
        }
    }

    /// Long-polls assignments and reconciles, until shutdown.
    pub async fn assignments_loop(self: Arc<Self>, sup: Arc<Supervisor>) {
        let mut index = 0u64;
        let mut outage = OutageLog::new("assignments");
        let mut delay = RETRY_MIN;
        loop {
            let generation = self.generation().await;
            let started = tokio::time::Instant::now();
            let res = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = self.client.assignments(self.node(), index, WAIT_MS) => r,
            };
            match res {
                Ok(resp) => {
                    outage.ok();
                    delay = RETRY_MIN;
                    let same = resp.index == index;
                    index = resp.index;
                    sup.reconcile_keeping(&resp.assignments, &resp.unchanged);
                    // A server that answers at once without news must not
                    // make this spin.
                    if same && started.elapsed() < Duration::from_millis(50) {
                        self.pause(Duration::from_millis(50)).await;
                    }
                }
                Err(ClientError::NotFound) => {
                    index = 0;
                    self.reregister(generation).await;
                }
                Err(e) => {
                    outage.failed(&e);
                    self.pause(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
            if self.shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Reports every `report_interval_ms`, and shortly after any change.
    pub async fn report_loop(self: Arc<Self>, sup: Arc<Supervisor>) {
        let mut changes = sup.changes();
        let mut outage = OutageLog::new("report");
        loop {
            let generation = self.generation().await;
            changes.borrow_and_update();
            let report = AgentReport {
                node: self.node().to_string(),
                instances: sup.reports(),
            };
            let res = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = self.client.report(&report) => r,
            };
            match res {
                Ok(pace) => {
                    outage.ok();
                    if let Some(p) = pace {
                        self.report_interval_ms
                            .store(p.report_interval_ms, Ordering::Relaxed);
                    }
                }
                Err(ClientError::NotFound) => {
                    self.reregister(generation).await;
                    continue;
                }
                Err(e) => outage.failed(&e),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.report_interval()) => {}
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.pause(REPORT_DEBOUNCE).await;
                }
            }
        }
    }

    /// Renews this node's certificate at two thirds of its lifetime (a new
    /// key each time), until shutdown; a failed renewal is retried, and a
    /// certificate that expires anyway makes the next call register again
    /// with the join token.
    pub async fn renew_loop(self: Arc<Self>) {
        let mut delay = RETRY_MIN;
        loop {
            let wait = match self.client.identity() {
                Some(id) => Duration::from_millis(id.renew_at_ms().saturating_sub(now_ms())),
                // Not registered (any more): look again soon.
                None => Duration::from_secs(1),
            };
            if !wait.is_zero() {
                self.pause(wait.min(Duration::from_secs(60))).await;
                if self.shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            let res = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = self.client.renew(&self.request) => r,
            };
            match res {
                Ok(id) => {
                    delay = RETRY_MIN;
                    info!(node = %self.request.node, valid_until_ms = id.not_after_ms,
                        "renewed this node's certificate");
                }
                Err(e) => {
                    warn!(node = %self.request.node, error = %e,
                        "cannot renew this node's certificate; retrying");
                    self.pause(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// `POST /v1/agent/register` until it succeeds; `None` on shutdown.
pub async fn register_until_ok(
    client: &ControlClient,
    request: &RegisterRequest,
    shutdown: &CancellationToken,
) -> Option<RegisterResponse> {
    let mut outage = OutageLog::new("register");
    let mut delay = RETRY_MIN;
    loop {
        let res = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = client.register(request) => r,
        };
        match res {
            Ok(resp) => {
                outage.ok();
                info!(node = %resp.node, server = %client.base(), lease_ms = resp.lease_ms,
                    report_interval_ms = resp.report_interval_ms, "registered with the control plane");
                return Some(resp);
            }
            Err(e) => outage.failed(&e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}
