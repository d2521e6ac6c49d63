//! Several servers on one PostgreSQL database (high availability).
//!
//! One server leads (elected by [`drover_store::election`]): only it runs
//! the rollout engine, pipelines, the branch poller and the webhook
//! notifier, each leader term from a fresh start on what the database
//! holds. Every server serves reads, agents (reports, assignments,
//! artifacts) and proxies' routing tables; a follower forwards every other
//! call that changes something to the leader, so clients may use any
//! server. Followers learn the global index from the database (every
//! [`INDEX_POLL`]), so their long polls wake for the leader's changes.
//!
//! With SQLite there is one server, always the leader.

use crate::Server;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_store::election::Role;
use drover_store::PgStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a server reads the global index from the database.
pub const INDEX_POLL: Duration = Duration::from_millis(100);

/// Marks a call a follower forwarded (a leader that is no longer one
/// answers it with 503 instead of forwarding it again).
const FORWARDED: HeaderName = HeaderName::from_static("x-drover-forwarded-by");

/// Largest body a follower forwards (the API's own limit).
const FORWARD_LIMIT: usize = crate::serve::MAX_BODY;

pub struct Ha {
    /// None: SQLite, one server, always the leader.
    pg: Option<PgStore>,
    role: watch::Receiver<Role>,
    /// A leader term is running (the engine and the rest are up).
    leading: watch::Sender<bool>,
    http: reqwest::Client,
    /// This server's name.
    pub name: String,
}

impl Ha {
    /// The single server of a SQLite store.
    pub fn single(name: String) -> Self {
        let (_, role) = watch::channel(Role::Leader { epoch: 0 });
        Self::new(None, role, name)
    }

    pub fn new(pg: Option<PgStore>, role: watch::Receiver<Role>, name: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .tls_certs_merge(drover_api::trusted_cas().unwrap_or_default())
            .build()
            .expect("the forwarding client builds");
        Ha {
            pg,
            role,
            leading: watch::channel(false).0,
            http,
            name,
        }
    }

    /// The election's view of this server.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// This server leads and its term's tasks run.
    pub fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Several servers share the database.
    pub fn shared(&self) -> bool {
        self.pg.is_some()
    }

    /// (epoch, name, API URL) of the leader the database names.
    pub async fn leader(&self) -> Option<(u64, String, String)> {
        match &self.pg {
            None => Some((0, self.name.clone(), String::new())),
            Some(pg) => match pg.current_leader().await {
                Ok(l) if l.0 > 0 && !l.2.is_empty() => Some(l),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read who leads");
                    None
                }
            },
        }
    }
}

/// Runs leader terms until shutdown: waits to lead, then starts the
/// leader's work (`term` is cancelled when leadership ends) and waits for
/// it to end. `started`: the first term's [`start_term`] already ran (a
/// single server does it before it serves anything).
pub async fn lead<F, Fut>(server: Arc<Server>, mut started: bool, mut term_work: F)
where
    F: FnMut(Arc<Server>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut role = server.ha.role.clone();
    loop {
        loop {
            if role.borrow_and_update().is_leader() {
                break;
            }
            tokio::select! {
                _ = server.shutdown.cancelled() => return,
                changed = role.changed() => if changed.is_err() { return },
            }
        }
        let term = server.shutdown.child_token();
        let watcher = {
            let term = term.clone();
            let mut role = role.clone();
            tokio::spawn(async move {
                while role.borrow_and_update().is_leader() {
                    if role.changed().await.is_err() {
                        // No election any more (a single server, or
                        // shutdown): the role is final, the term lasts
                        // until shutdown cancels it.
                        return;
                    }
                }
                term.cancel();
            })
        };
        let start = if std::mem::take(&mut started) {
            Ok(())
        } else {
            start_term(&server).await
        };
        if let Err(e) = start {
            tracing::error!(error = %e, "cannot start leading; trying again in a second");
        } else {
            server.ha.leading.send_replace(true);
            term_work(server.clone(), term.clone()).await;
        }
        server.ha.leading.send_replace(false);
        term.cancel();
        watcher.abort();
        if server.shutdown.is_cancelled() {
            return;
        }
        // Runs this term started stop: their writes would be refused, and
        // the next leader marks them failed.
        if let Ok(runs) = server.run_cancels.lock() {
            for cancel in runs.values() {
                cancel.cancel();
            }
        }
        tracing::warn!("this server's leader term ended");
        // Still the leader (the term's start failed): try again soon;
        // otherwise wait above for the next election.
        tokio::select! {
            _ = server.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What a new leader does first, under its epoch.
pub async fn start_term(server: &Server) -> anyhow::Result<()> {
    let now = crate::now_ms();
    // Every known node gets a fresh lease, as a new leader does in Nomad:
    // a server back after a while (or a new leader) must not take them
    // all for lost (and replace their instances) before their agents had
    // a chance to report.
    server.store.renew_node_leases(now).await?;
    let interrupted = server.store.fail_interrupted_runs(now).await?;
    if interrupted > 0 {
        tracing::warn!(
            runs = interrupted,
            "runs interrupted by the last leader's end were marked failed"
        );
    }
    Ok(())
}

/// Follows the database's global index (servers sharing it): the leader
/// moves it, every server's long polls wait on it.
pub async fn follow_index(server: Arc<Server>) {
    let mut tick = tokio::time::interval(INDEX_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = server.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A follower's pace for agents: the cluster's size, every 5 s.
        if n % 50 == 0 && !server.ha.leading() {
            if let Ok(nodes) = server.store.list_nodes().await {
                server
                    .node_count
                    .store(nodes.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Ok(i) = server.store.index().await {
            server.index.send_if_modified(|v| {
                let newer = i > *v;
                if newer {
                    *v = i;
                }
                newer
            });
        }
    }
}

/// `GET /v1/leader`: who leads, and what this server is.
pub async fn leader_status(State(server): State<Arc<Server>>) -> axum::Json<serde_json::Value> {
    let leader = server.ha.leader().await;
    let role = match server.ha.role() {
        Role::Unknown => "unknown",
        Role::Follower => "follower",
        Role::Leader { .. } => "leader",
    };
    axum::Json(serde_json::json!({
        "server": server.ha.name,
        "role": role,
        "leading": server.ha.leading(),
        "leader": leader.as_ref().map(|l| l.1.clone()),
        "leader_url": leader.as_ref().map(|l| l.2.clone()),
        "epoch": leader.as_ref().map(|l| l.0),
    }))
}

/// Middleware of the API port: a follower forwards what changes something
/// to the leader. Reads, and agents' registration (it touches only
/// what every server may write), are served here.
pub async fn forward(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let local = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.uri().path().starts_with("/v1/agent/")
        || !server.ha.shared()
        || server.ha.leading();
    if local {
        return next.run(req).await;
    }
    let unavailable = |msg: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(drover_api::ApiError { error: msg }),
        )
            .into_response()
    };
    if req.headers().contains_key(&FORWARDED) {
        return unavailable(format!(
            "server {} was forwarded this call but does not lead (any more); try again in a few seconds",
            server.ha.name
        ));
    }
    let Some((_, leader, url)) = server.ha.leader().await else {
        return unavailable(
            "no server leads yet (one is elected within seconds of the last one's end); try again"
                .into(),
        );
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, FORWARD_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(drover_api::ApiError {
                    error: format!("cannot read the request body: {e}"),
                }),
            )
                .into_response()
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut rb = server.ha.http.request(
        parts.method.clone(),
        format!("{}{path}", url.trim_end_matches('/')),
    );
    for (k, v) in &parts.headers {
        if !is_hop_by_hop(k) {
            rb = rb.header(k, v);
        }
    }
    rb = rb.header(&FORWARDED, server.ha.name.as_str());
    match rb.body(body).send().await {
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                if !is_hop_by_hop(k) {
                    out = out.header(k, v);
                }
            }
            out.body(Body::from_stream(resp.bytes_stream()))
                .unwrap_or_else(|e| unavailable(e.to_string()))
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            axum::Json(drover_api::ApiError {
                error: format!(
                    "the leader ({leader} at {url}) does not answer: {e}; a new one is elected within seconds, try again"
                ),
            }),
        )
            .into_response(),
    }
}

fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}
