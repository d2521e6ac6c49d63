//! The route poller: keeps the routing table in step with the control plane
//! by long-polling `GET {server}/v1/routes?index=I&wait_ms=W`.
//!
//! The server answers at once when its index is past `I`, otherwise after up
//! to `W` ms with the unchanged table. Each answer with a new index is built
//! into a [`Table`] and installed. On any error the last table stays in use
//! (the proxy keeps serving while the control plane is away) and the poller
//! retries after [`RETRY_DELAY`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use drover_api::RoutesResponse;

use crate::state::ProxyState;
use crate::table::Table;
use crate::warn_limiter::WarnLimiter;

/// How long the server may hold a long-poll open.
pub const WAIT_MS: u64 = 30_000;
/// Pause after a failed poll.
pub const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Fetches the routes once. `wait_ms` = 0 asks for the current table now.
pub async fn fetch_routes(
    client: &reqwest::Client,
    server: &str,
    index: u64,
    wait_ms: u64,
) -> anyhow::Result<RoutesResponse> {
    let url = format!("{server}/v1/routes?index={index}&wait_ms={wait_ms}");
    let resp = client
        .get(&url)
        .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("GET {url}: {status}: {}", body.trim());
    }
    resp.json::<RoutesResponse>()
        .await
        .with_context(|| format!("GET {url}: decoding routes"))
}

/// Runs forever: poll, install, repeat.
pub async fn run(client: reqwest::Client, servers: Arc<crate::Servers>, state: Arc<ProxyState>) {
    let mut limiter = WarnLimiter::new(Duration::from_secs(30));
    loop {
        let current = state.tables.load();
        // Until a first table is loaded, ask for whatever the server has now.
        let (index, wait_ms) = if current.loaded {
            (current.index, WAIT_MS)
        } else {
            (0, 0)
        };
        let loaded = current.loaded;
        drop(current);
        let server = servers.get().to_string();
        match fetch_routes(&client, &server, index, wait_ms).await {
            Ok(mut resp) => {
                let failures = limiter.success();
                if failures > 0 {
                    tracing::info!(failures, "route polling recovered");
                }
                // Same index = the long poll timed out without a change.
                if !loaded || resp.index != index {
                    crate::split::localize(&mut resp, &state.labels);
                    let table = Table::build(&resp, &state.stats);
                    let routes = table.routes.len();
                    state.tables.install(table);
                    state.table_installed.notify_one();
                    tracing::info!(index = resp.index, routes, "routing table installed");
                }
            }
            Err(e) => {
                if limiter.failure() {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        failures = limiter.failures(),
                        "route polling failed; serving with the last table"
                    );
                } else {
                    tracing::debug!(error = format!("{e:#}"), "route polling failed");
                }
                servers.failed(&server);
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}
