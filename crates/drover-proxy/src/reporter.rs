//! The reporter: tells the control plane, every [`REPORT_INTERVAL`] and right
//! after a new table is installed, which table index this proxy applies, the
//! oldest index still held by an in-flight request (drain tracking), and the
//! cumulative per-release stats, by `POST {server}/v1/proxy/report`.
//! Failures are logged (rate-limited) and never stop the proxy.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::state::ProxyState;
use crate::warn_limiter::WarnLimiter;

/// Period of the reports.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Sends one report.
pub async fn send_report(
    client: &reqwest::Client,
    server: &str,
    state: &ProxyState,
) -> anyhow::Result<()> {
    let url = format!("{server}/v1/proxy/report");
    let report = state.report();
    let resp = client
        .post(&url)
        .timeout(Duration::from_secs(5))
        .json(&report)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("POST {url}: {status}: {}", body.trim());
    }
    Ok(())
}

/// Runs forever.
pub async fn run(client: reqwest::Client, servers: Arc<crate::Servers>, state: Arc<ProxyState>) {
    let mut limiter = WarnLimiter::new(Duration::from_secs(30));
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.table_installed.notified() => {}
        }
        let server = servers.get().to_string();
        match send_report(&client, &server, &state).await {
            Ok(()) => {
                let failures = limiter.success();
                if failures > 0 {
                    tracing::info!(failures, "proxy reports recovered");
                }
            }
            Err(e) => {
                servers.failed(&server);
                if limiter.failure() {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        failures = limiter.failures(),
                        "proxy report failed"
                    );
                } else {
                    tracing::debug!(error = format!("{e:#}"), "proxy report failed");
                }
            }
        }
    }
}
