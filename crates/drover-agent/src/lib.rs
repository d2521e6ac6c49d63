//! drover's per-server agent with the `process` driver.
//!
//! [`run`] registers with the control plane, long-polls this node's
//! assignments and converges to them: downloads and verifies artifacts,
//! unpacks each release read-only, runs instances in their own process
//! groups under supervision (restart with backoff, health checks, graceful
//! stop), and reports. Apps survive the agent: on shutdown (or SIGKILL) the
//! agent leaves them running and re-adopts them by pid + start time from
//! its state file when it starts again.
//!
//! Files: `config` (what to run with), `client` (HTTP protocol), `session`
//! (register/poll/report loops), `supervisor` (per-instance tasks),
//! `artifacts` + `unpack` (releases), `process` (spawn/identify/signal),
//! `health` (checks), `state` (state file), `logs` (log files), `logship`
//! (log files → control plane), `ports`.
#![forbid(unsafe_code)]

/// This node's key, certificate and CA (from its registration), in the
/// agent's data dir, mode 0600.
pub const IDENTITY_FILE: &str = "identity.json";

pub mod artifacts;
pub mod client;
pub mod config;
pub mod health;
pub mod logs;
pub mod logship;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod session;
pub mod state;
pub mod supervisor;
pub mod unpack;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

use crate::artifacts::ArtifactStore;
use crate::client::ControlClient;
use crate::session::Session;
use crate::supervisor::{Supervisor, SupervisorConfig};

/// Runs the agent until `shutdown` is cancelled, then returns without
/// stopping any app process.
///
/// Errors only when it cannot start at all (data dir not creatable, bad
/// server URL); an unreachable server is retried forever.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let client = ControlClient::new(&config.server, config.token.as_deref())
        .with_context(|| format!("bad control plane URL {:?}", config.server))?
        .with_identity_file(config.data_dir.join(IDENTITY_FILE), &config.node);
    let artifacts = Arc::new(ArtifactStore::new(config.data_dir.clone(), client.clone()));
    // Adopt what runs before talking to anyone: supervision resumes at once.
    let sup = Arc::new(Supervisor::start(
        SupervisorConfig::new(
            config.data_dir.clone(),
            config.advertise_host.clone(),
            config.port_range,
        ),
        artifacts,
    )?);
    tracing::info!(node = %config.node, server = %config.server,
        data_dir = %config.data_dir.display(), "agent started");
    let metrics = match &config.metrics_addr {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            Some(tokio::spawn(metrics::serve(l, sup.clone())))
        }
        None => None,
    };
    let request = drover_api::RegisterRequest {
        node: config.node.clone(),
        labels: config.labels.clone(),
        csr: None,
    };
    if let Some(session) = Session::establish(client.clone(), request, shutdown.clone()).await {
        let poll = tokio::spawn(session.clone().assignments_loop(sup.clone()));
        let renew = tokio::spawn(session.clone().renew_loop());
        let report = tokio::spawn(session.report_loop(sup.clone()));
        let ship = tokio::spawn(logship::ship_loop(
            config.node.clone(),
            client.clone(),
            sup.clone(),
            config.data_dir.clone(),
            shutdown.clone(),
        ));
        shutdown.cancelled().await;
        let _ = poll.await;
        let _ = report.await;
        let _ = renew.await;
        let _ = ship.await;
    }
    if let Some(m) = metrics {
        m.abort();
        let _ = m.await;
    }
    match Arc::try_unwrap(sup) {
        Ok(sup) => sup.detach().await,
        Err(sup) => drop(sup),
    }
    tracing::info!(node = %config.node, "agent stopped (apps left running)");
    Ok(())
}

/// Stops the app processes recorded in the state file under `data_dir`
/// (which a stopped agent deliberately leaves running): SIGTERM to each
/// process group, up to `grace` for them to exit, then SIGKILL. For
/// `drover up`'s shutdown and test harnesses; blocking.
pub fn stop_recorded_apps(data_dir: &std::path::Path, grace: std::time::Duration) {
    use nix::sys::signal::Signal;
    use process::{is_alive, signal_group};
    let loaded = state::load(&state::state_path(data_dir));
    let procs: Vec<(u32, u64)> = loaded
        .state
        .instances
        .values()
        .filter_map(|i| Some((i.pid?, i.start_time?)))
        .collect();
    for (pid, start) in &procs {
        signal_group(*pid, *start, Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && procs.iter().any(|(p, s)| is_alive(*p, *s)) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (pid, start) in &procs {
        signal_group(*pid, *start, Signal::SIGKILL);
    }
    // Containers (docker driver): `docker stop` with the same grace, then
    // removed. On a thread of its own, so callers inside a runtime can
    // block here too.
    let containers: Vec<String> = loaded
        .state
        .instances
        .values()
        .filter_map(|i| i.container.clone())
        .collect();
    if !containers.is_empty() {
        let secs = grace.as_secs().min(i32::MAX as u64) as i32;
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(d) = drover_docker::connect().await else {
                    return;
                };
                for id in containers {
                    let _ = drover_docker::stop_and_remove(&d, &id, secs).await;
                }
            });
        })
        .join();
    }
}
