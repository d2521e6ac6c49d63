//! drover's traffic layer: an edge HTTP proxy with two engines.
//!
//! The proxy routes each request by its Host header to one of the healthy
//! instances the control plane lists for that host, retries safely on
//! connection failures, adds `x-drover-release`/`x-drover-instance` to
//! responses, records per-release request/error/latency stats, and reports
//! them — with the drain-tracking `oldest_live_index` — to the control plane.
//!
//! Two request paths ([`Engine`]) share all of that logic: pingora's HTTP
//! proxy ([`service`]) and drover's own HTTP/1.1 forwarding path ([`h1`],
//! the default: one parse per request into a fixed buffer, bytes streamed,
//! per-thread upstream pools, no per-request boxing or channels).
//!
//! Layout:
//! - [`table`]: immutable routing tables, atomic swap, drain registry,
//!   smooth weighted round robin within a route's upstream groups;
//! - [`split`]: traffic splitting between a route's new and stable releases
//!   (canary share, listed users, blue/green preview, sticky cookie);
//! - [`stats`]: per-(app, env, release) counters and latency histograms;
//! - [`service`]: the pingora `ProxyHttp` implementation (request path);
//! - [`h1`]: the h1 engine (listeners and signals, request path, framing,
//!   upstream pool);
//! - [`poller`]: long-polls the control plane for new routing tables;
//! - [`reporter`]: posts `ProxyReport`s to the control plane;
//! - [`state`]: what the request path and the control loop share.
//!
//! [`run`] starts the control loop on a thread of its own, then hands the
//! process to the engine: pingora owns the process (its own runtimes,
//! signal handling and exit); the h1 engine runs its worker threads and
//! returns after SIGTERM's graceful stop or at SIGINT.
#![forbid(unsafe_code)]

pub mod h1;
pub mod poller;
pub mod reporter;
pub mod service;
pub mod split;
pub mod state;
pub mod stats;
pub mod table;
mod warn_limiter;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;

pub use service::DroverProxy;
pub use state::ProxyState;

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Listen address for HTTP traffic, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// Control-plane base URL, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// Proxy id used in reports, e.g. `proxy-1`.
    pub name: String,
    /// pingora worker threads.
    pub threads: usize,
    /// On SIGTERM, keep serving in-flight requests this long.
    pub grace_period_secs: u64,
    /// This proxy's labels (e.g. region=eu): a partial deployment by node
    /// label sends the users of proxies with its labels to the new release.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The join token (role `node`) sent with every request to the server.
    pub token: Option<String>,
    /// Where to serve `GET /metrics` (per-release traffic of this proxy, in
    /// the Prometheus text format); None: nowhere.
    pub metrics_addr: Option<String>,
    /// Serve HTTPS on `listen` with this certificate chain and key (PEM
    /// file paths); None: plain HTTP.
    pub tls: Option<(String, String)>,
    /// Which request path serves traffic.
    pub engine: Engine,
    /// h1: an upgraded connection (WebSocket) with no bytes either way for
    /// this long is closed, so that clients gone without a FIN and
    /// half-closed tunnels do not hold connections forever.
    pub tunnel_idle_timeout: Duration,
}

/// The proxy's request path. Both route, split, retry, count and drain
/// the same way (the `table`, `split` and `stats` logic is shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// pingora's HTTP proxy ([`service`]).
    Pingora,
    /// drover's own HTTP/1.1 forwarding path ([`h1`]): the default, 2.4 ×
    /// pingora's requests per CPU-second (BENCHMARKS.md, proxy tuning).
    #[default]
    H1,
}

/// The environment variable that selects the engine (`h1` or `pingora`)
/// for `drover proxy`, `drover up`'s proxy and `drover-proxy-dev`.
pub const ENGINE_ENV: &str = "DROVER_PROXY_ENGINE";

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Engine, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pingora" => Ok(Engine::Pingora),
            "h1" => Ok(Engine::H1),
            _ => Err(format!(
                "unknown proxy engine {s:?}; use \"pingora\" or \"h1\""
            )),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Pingora => "pingora",
            Engine::H1 => "h1",
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:8080".into(),
            server: "http://127.0.0.1:7070".into(),
            name: "proxy-1".into(),
            threads: 2,
            grace_period_secs: 5,
            labels: Default::default(),
            token: None,
            metrics_addr: None,
            tls: None,
            engine: Engine::default(),
            tunnel_idle_timeout: TUNNEL_IDLE_TIMEOUT,
        }
    }
}

/// The default [`ProxyConfig::tunnel_idle_timeout`]: an hour, HAProxy's
/// usual `timeout tunnel` (nginx's 60 s `proxy_read_timeout` closes quiet
/// WebSockets that ping less often than once a minute).
pub const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long [`run`] waits for a first routing table before it starts
/// listening anyway (requests then get 503 until a table arrives).
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(3);

/// pingora's server configuration for `config`, built in code: no config
/// file, no daemon, no command-line parsing.
pub fn server_conf(config: &ProxyConfig) -> ServerConf {
    let sock_name: String = config
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    ServerConf {
        daemon: false,
        threads: config.threads.max(1),
        // One current-thread runtime per thread, a connection staying on the
        // thread that accepted it (nginx's worker model): no work-stealing
        // scheduler on the request path (BENCHMARKS.md, proxy tuning).
        work_stealing: false,
        grace_period_seconds: Some(config.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(5),
        max_retries: table::MAX_TRIES,
        // Per-proxy paths so that several proxies on one machine (tests,
        // `drover up`) never touch each other's files.
        pid_file: std::env::temp_dir()
            .join(format!("drover-proxy-{sock_name}.pid"))
            .to_string_lossy()
            .into_owned(),
        upgrade_sock: std::env::temp_dir()
            .join(format!("drover-proxy-{sock_name}-upgrade.sock"))
            .to_string_lossy()
            .into_owned(),
        ..ServerConf::default()
    }
}

/// Runs the proxy until the process is told to stop (SIGTERM: graceful,
/// SIGINT: fast). With pingora, which exits the process itself, this only
/// returns on a setup error; the h1 engine returns once it has stopped.
pub fn run(config: ProxyConfig) -> anyhow::Result<()> {
    // reqwest uses rustls; make the process-wide provider choice explicit so
    // that no other crate's rustls features can make it ambiguous. An error
    // means one is installed already, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let server_url = config.server.trim_end_matches('/').to_string();
    let state = Arc::new(ProxyState {
        labels: config.labels.clone(),
        ..ProxyState::new(config.name.clone())
    });
    // Bound here, so a bad address fails the start.
    let metrics = match &config.metrics_addr {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    start_control_loop(
        server_url.clone(),
        config.token.clone(),
        state.clone(),
        metrics,
    )?;

    // Give the poller a moment, so the first requests see real routes.
    let deadline = Instant::now() + FIRST_TABLE_WAIT;
    while !state.tables.load().loaded && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !state.tables.load().loaded {
        tracing::warn!(
            server = server_url,
            "no routing table yet; answering 503 until one arrives"
        );
    }

    if config.engine == Engine::H1 {
        return h1::run(&config, state);
    }
    let conf = server_conf(&config);
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy =
        pingora_proxy::http_proxy_service(&server.configuration, DroverProxy::new(state));
    match &config.tls {
        Some((cert, key)) => {
            for (flag, f) in [("--tls-cert", cert), ("--tls-key", key)] {
                std::fs::metadata(f).with_context(|| format!("{flag} {f}"))?;
            }
            proxy
                .add_tls(&config.listen, cert, key)
                .map_err(|e| anyhow::anyhow!("cannot serve TLS with {cert} and {key}: {e}"))?;
        }
        None => proxy.add_tcp(&config.listen),
    }
    server.add_service(proxy);
    tracing::info!(
        listen = config.listen,
        server = server_url,
        name = config.name,
        "drover proxy starting"
    );
    server.run_forever()
}

/// Serves `GET /metrics` on `listener`: this proxy's per-release counters
/// as `drover_proxy_release_*` series.
async fn serve_metrics(listener: std::net::TcpListener, state: Arc<ProxyState>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        drover_api::metrics::CONTENT_TYPE,
                    )],
                    drover_api::metrics::encode_release_traffic(
                        "drover_proxy_release",
                        state.stats.snapshot(),
                    ),
                )
            }
        }),
    );
    let served = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => axum::serve(l, app).await,
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

/// The control plane's servers (one, or several sharing a database): the
/// poller and the reporter use one until it fails, then the next.
#[derive(Debug)]
pub struct Servers {
    list: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
}

impl Servers {
    /// `urls`: one URL or several separated by commas.
    pub fn new(urls: &str) -> Self {
        let list: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        Servers {
            list,
            current: Default::default(),
        }
    }

    /// The one in use.
    pub fn get(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.list.get(i % self.list.len().max(1)).map_or("", |s| s)
    }

    /// `url` failed: the next one is used, unless another caller moved on
    /// already.
    pub fn failed(&self, url: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.current.load(Relaxed);
        if self.list.len() > 1 && self.get() == url {
            let _ = self.current.compare_exchange(i, i + 1, Relaxed, Relaxed);
            tracing::warn!(failed = url, next = self.get(), "trying the next server");
        }
    }
}

/// Starts the route poller, the reporter and (given a listener) the
/// `/metrics` endpoint on a dedicated thread with a small tokio runtime of
/// its own (pingora's runtimes are its business).
pub fn start_control_loop(
    server: String,
    token: Option<String>,
    state: Arc<ProxyState>,
    metrics: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .default_headers(drover_api::bearer_headers(token.as_deref()))
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(60))
        .tls_certs_merge(drover_api::trusted_cas().map_err(|e| anyhow::anyhow!(e))?)
        .build()
        .context("building the control-plane HTTP client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("drover-proxy-control")
        .build()
        .context("building the control-loop runtime")?;
    std::thread::Builder::new()
        .name("drover-proxy-control".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(l) = metrics {
                    tokio::spawn(serve_metrics(l, state.clone()));
                }
                let servers = Arc::new(Servers::new(&server));
                tokio::join!(
                    poller::run(client.clone(), servers.clone(), state.clone()),
                    reporter::run(client, servers, state),
                );
            });
        })
        .context("spawning the control-loop thread")?;
    Ok(())
}
