//! drover's control plane.
//!
//! - [`api`]: the HTTP/JSON API (CLI, agents, proxies) and the one place
//!   where errors become HTTP statuses.
//! - [`auth`]: API tokens, roles and the per-route access check.
//! - [`pki`]: the built-in CA; agents' certificates and mutual TLS.
//! - [`engine`]: the rollout engine. It alone writes rollouts and instance
//!   placement: every tick it feeds persisted + observed state to the pure
//!   planner (`drover_core::planner`) and applies the actions.
//! - [`pipeline`]: runs: a commit → fresh checkout → build → test →
//!   content-addressed artifact → release → `[release]` command → rollout.
//! - [`source`]: finding new commits (polling, signed push webhooks).
//! - [`retention`]: pruning old artifacts.
//! - [`git`]: the git CLI, with validated refs and no shell.
//! - [`artifact`]: deterministic tar.zst packing and sha256.
//! - [`view`]: turns records into the status/instance views.
//! - [`metrics`]: `GET /metrics` in the Prometheus text format.
//! - [`prom`]: asks a Prometheus the canary analysis queries.
//! - [`timeseries`]: a short per-second history of each deployment's
//!   traffic split and per-release figures, for the dashboard's chart.
//! - [`dashboard`]: the web dashboard (server-rendered HTML, live by SSE).
#![forbid(unsafe_code)]

pub mod api;
pub mod artifact;
pub mod auth;
pub mod dashboard;
pub mod discovery;
pub mod engine;
pub mod git;
pub mod ha;
pub mod heartbeat;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod pki;
pub mod prom;
pub mod retention;
pub mod secrets;
pub mod serve;
pub mod source;
pub mod timeseries;
pub mod traffic;
pub mod view;

use anyhow::Context;
use drover_store::{PgStore, SqliteStore, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

/// How long a node stays ready without a heartbeat, at least (see
/// [`node_lease_ms`]).
pub const NODE_LEASE_MS: u64 = 10_000;
/// How often agents report, at most (see [`report_interval_ms`]).
pub const REPORT_INTERVAL_MS: u64 = 1_000;
/// Heartbeats are paced as in Nomad: the server asks for no more than
/// this many reports per second in all, so a large cluster's agents report
/// less often (10,000 nodes: every 10 s), and their lease grows with it.
pub const MAX_REPORTS_PER_SEC: u64 = 1_000;

/// How often each of `nodes` agents should report.
pub fn report_interval_ms(nodes: usize) -> u64 {
    (nodes as u64 * 1000 / MAX_REPORTS_PER_SEC).clamp(REPORT_INTERVAL_MS, 60_000)
}

/// How long a node of a cluster of `nodes` stays ready without a report:
/// three report intervals, at least [`NODE_LEASE_MS`].
pub fn node_lease_ms(nodes: usize) -> u64 {
    NODE_LEASE_MS.max(3 * report_interval_ms(nodes))
}
/// A proxy that has not reported this long is not waited for when draining.
pub const PROXY_FRESH_MS: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// The agent listener (mutual TLS only).
    pub agent_addr: SocketAddr,
    /// Service discovery over DNS (UDP) here: `<app>.service.drover`.
    pub dns_addr: Option<SocketAddr>,
    /// The API's certificate chain and key (PEM files): it serves HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long an agent's certificate is valid (renewed at 2/3 of it).
    pub agent_cert_ttl: std::time::Duration,
    pub data_dir: PathBuf,
    /// How often tracked branches are polled for new commits (zero: off).
    pub poll_interval: std::time::Duration,
    /// Releases per app whose artifacts are kept (besides live, rollback
    /// target and any in use).
    pub keep_releases: usize,
    /// The key secrets are sealed with (None: `<data_dir>/secrets.key`),
    /// created at first start; keep it apart from copies of the database.
    pub secrets_key_file: Option<PathBuf>,
    /// How long a client may take to send a request's headers, and between
    /// the pieces of its body.
    pub timeouts: serve::Timeouts,
    /// A PostgreSQL URL: the store is there instead of SQLite in the data
    /// dir, and several servers may share it (one leads; see [`ha`]).
    pub database: Option<String>,
    /// This server's name among several (default: the host name and port).
    pub name: Option<String>,
    /// Where other servers reach this one's API (default: `http://<addr>`).
    pub advertise: Option<String>,
}

impl ServerConfig {
    /// A single server on SQLite with `data_dir`, listening on `addr`
    /// (and the agent port next to it); the rest at defaults.
    pub fn new(addr: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            addr,
            agent_addr: SocketAddr::new(addr.ip(), addr.port().wrapping_add(1)),
            dns_addr: None,
            tls: None,
            agent_cert_ttl: std::time::Duration::from_secs(72 * 3600),
            data_dir,
            poll_interval: std::time::Duration::from_secs(10),
            keep_releases: 10,
            secrets_key_file: None,
            timeouts: serve::Timeouts::default(),
            database: None,
            name: None,
            advertise: None,
        }
    }
}

/// Shared state of the control plane.
pub struct Server {
    pub store: Arc<dyn Store>,
    pub data_dir: PathBuf,
    /// The global change index; long polls wait on it.
    pub index: watch::Sender<u64>,
    pub engine: engine::EngineHandle,
    /// One deploy at a time per app (pipeline run or rollback).
    pub deploy_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Limits pipeline runs running at once.
    pub run_slots: tokio::sync::Semaphore,
    pub keep_releases: usize,
    pub shutdown: CancellationToken,
    /// Cancellation of each run in progress (queued or running), by run id.
    pub run_cancels: std::sync::Mutex<HashMap<i64, CancellationToken>>,
    /// Live per-release traffic figures from the proxies' reports.
    pub traffic: std::sync::Mutex<traffic::Traffic>,
    /// A short history of the traffic per deployment (the dashboard's chart).
    pub series: std::sync::Mutex<timeseries::Series>,
    /// Seals and opens secrets.
    pub secrets: secrets::SecretBox,
    /// The last spec each deployment's route was built from, for an app
    /// whose stored records stop parsing: it keeps its route.
    pub route_specs: std::sync::Mutex<HashMap<(String, String), drover_core::spec::AppSpec>>,
    /// Durations and outcomes observed as they happen, for `/metrics`.
    pub observed: metrics::Observed,
    /// The cluster's certificate authority.
    pub pki: Arc<pki::Pki>,
    /// The agent listener's port, told to agents when they register.
    pub agent_port: u16,
    /// Agents' reports, written in batches.
    pub heartbeats: heartbeat::Heartbeats,
    /// Who leads when several servers share the database.
    pub ha: ha::Ha,
    /// How many nodes are registered (as of the last engine tick, or a
    /// follower's last look): what heartbeats are paced by.
    pub node_count: std::sync::atomic::AtomicUsize,
    /// A node registered (or registered again) since the engine last read
    /// the nodes.
    pub nodes_changed: std::sync::atomic::AtomicBool,
    /// Agents' certificates as last read, for authenticating their calls.
    pub node_certs: auth::CertCache,
}

impl Server {
    /// The pace agents are asked to keep now.
    pub fn pace(&self) -> drover_api::ReportResponse {
        let n = self.node_count.load(std::sync::atomic::Ordering::Relaxed);
        drover_api::ReportResponse {
            report_interval_ms: report_interval_ms(n),
            lease_ms: node_lease_ms(n),
        }
    }
}

impl Server {
    pub async fn deploy_lock(&self, app: &str) -> Arc<Mutex<()>> {
        self.deploy_locks
            .lock()
            .await
            .entry(app.to_string())
            .or_default()
            .clone()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the control plane until `shutdown` is cancelled.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    for d in ["artifacts", "repos", "work", "logs"] {
        std::fs::create_dir_all(config.data_dir.join(d))?;
    }
    let name = config.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        format!(
            "{}:{}",
            if host.is_empty() { "drover" } else { &host },
            config.addr.port()
        )
    });
    let (store, pg): (Arc<dyn Store>, Option<PgStore>) = match &config.database {
        Some(url) => {
            let pg = PgStore::connect(url)
                .await
                .context("cannot open the store (--database)")?;
            (Arc::new(pg.clone()), Some(pg))
        }
        None => {
            let store = SqliteStore::open(&config.data_dir.join("drover.db"))
                .await
                .with_context(|| {
                    format!("cannot open the store in {}", config.data_dir.display())
                })?;
            (Arc::new(store), None)
        }
    };
    auth::bootstrap(&*store, &config.data_dir)
        .await
        .context("cannot create the bootstrap tokens")?;
    let index = store.index().await?;
    let ha = match &pg {
        None => ha::Ha::single(name.clone()),
        Some(pg) => {
            let api_url = config.advertise.clone().unwrap_or_else(|| {
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", config.addr)
            });
            let (role_tx, role_rx) = watch::channel(drover_store::election::Role::Unknown);
            let election = drover_store::election::Election::new(&name, &api_url);
            let stop = shutdown.clone();
            tokio::spawn(election.run(pg.clone(), role_tx, async move { stop.cancelled().await }));
            ha::Ha::new(Some(pg.clone()), role_rx, name.clone())
        }
    };
    let key_file = config
        .secrets_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("secrets.key"));
    let secrets = secrets::SecretBox::load_or_create(&key_file)?;
    let pki = Arc::new(pki::Pki::load_or_create(
        &config.data_dir.join("ca"),
        config.agent_cert_ttl,
    )?);
    let agent_listener = tokio::net::TcpListener::bind(config.agent_addr)
        .await
        .with_context(|| format!("cannot listen for agents on {}", config.agent_addr))?;
    let agent_tls = pki.agent_tls_config()?;
    let api_tls = match &config.tls {
        Some((cert, key)) => Some(pki::api_tls_config(cert, key)?),
        None => None,
    };
    let (index_tx, _) = watch::channel(index);
    let (engine_handle, engine_rx) = engine::channel();
    let heartbeats = {
        let engine = engine_handle.clone();
        heartbeat::Heartbeats::spawn(store.clone(), move || engine.poke())
    };
    let server = Arc::new(Server {
        node_count: store.list_nodes().await?.len().into(),
        nodes_changed: true.into(),
        node_certs: Default::default(),
        ha,
        heartbeats,
        store,
        data_dir: config.data_dir.clone(),
        index: index_tx,
        engine: engine_handle,
        deploy_locks: Mutex::new(HashMap::new()),
        run_slots: tokio::sync::Semaphore::new(pipeline::MAX_CONCURRENT_RUNS),
        keep_releases: config.keep_releases.max(1),
        shutdown: shutdown.clone(),
        run_cancels: std::sync::Mutex::new(HashMap::new()),
        traffic: std::sync::Mutex::new(traffic::Traffic::default()),
        series: std::sync::Mutex::new(timeseries::Series::default()),
        secrets,
        route_specs: std::sync::Mutex::new(HashMap::new()),
        observed: metrics::Observed::default(),
        pki: pki.clone(),
        agent_port: agent_listener.local_addr()?.port(),
    });
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    tracing::info!(addr = %listener.local_addr()?, agent_addr = %agent_listener.local_addr()?,
        data_dir = %config.data_dir.display(), "drover server listening");
    if let Some(dns) = config.dns_addr {
        let socket = tokio::net::UdpSocket::bind(dns)
            .await
            .with_context(|| format!("cannot listen for DNS on {dns} (--dns-addr)"))?;
        tracing::info!(addr = %socket.local_addr()?, "service discovery over DNS: <app>.service.drover");
        tokio::spawn(discovery::serve_dns(server.clone(), socket));
    }
    // The leader's work, one term at a time (with SQLite: one term, now).
    let poll_interval = config.poll_interval;
    let engine_rx = Arc::new(Mutex::new(engine_rx));
    let started = !server.ha.shared();
    if started {
        ha::start_term(&server).await?;
    }
    let engine_task = tokio::spawn(ha::lead(server.clone(), started, move |server, term| {
        let engine_rx = engine_rx.clone();
        async move {
            tokio::spawn(source::poll_loop(
                server.clone(),
                poll_interval,
                term.clone(),
            ));
            tokio::spawn(notify::run(server.clone(), term.clone()));
            engine::run(server, &mut *engine_rx.lock().await, term).await;
        }
    }));
    if server.ha.shared() {
        tokio::spawn(ha::follow_index(server.clone()));
    }
    tokio::spawn(timeseries::sample_loop(server.clone()));
    tokio::spawn(renew_server_cert(pki, shutdown.clone()));
    tokio::spawn(maintain_store(server.store.clone(), shutdown.clone()));
    let app = api::router(server.clone())
        .merge(dashboard::router(server.clone()))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            ha::forward,
        ));
    let agents = serve::serve_tls(
        agent_listener,
        api::agent_router(server.clone()),
        config.timeouts,
        shutdown.clone(),
        agent_tls,
        serve::Peers::Agents,
    );
    let api = async {
        match api_tls {
            Some(tls) => {
                serve::serve_tls(
                    listener,
                    app,
                    config.timeouts,
                    shutdown.clone(),
                    tls,
                    serve::Peers::Anyone,
                )
                .await
            }
            None => serve::serve(listener, app, config.timeouts, shutdown.clone()).await,
        }
    };
    tokio::join!(api, agents);
    shutdown.cancel();
    let _ = engine_task.await;
    Ok(())
}

/// Re-issues the server's own certificate for the agent port daily.
async fn renew_server_cert(pki: Arc<pki::Pki>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pki::SERVER_CERT_RENEW) => {}
        }
        if let Err(e) = pki.renew_server_cert() {
            tracing::error!(error = %e, "cannot renew the server's certificate for the agent port");
        }
    }
}

/// Runs the store's housekeeping every second until shutdown.
async fn maintain_store(store: Arc<dyn Store>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = store.maintain().await {
            tracing::warn!(error = %e, "store housekeeping failed; retrying in a second");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_slow_down_and_leases_grow_with_the_cluster() {
        let pace = |n| (report_interval_ms(n), node_lease_ms(n));
        assert_eq!(pace(0), (1_000, 10_000));
        assert_eq!(pace(1_000), (1_000, 10_000));
        assert_eq!(pace(4_000), (4_000, 12_000));
        assert_eq!(pace(10_000), (10_000, 30_000));
        assert_eq!(pace(1_000_000), (60_000, 180_000));
    }
}
