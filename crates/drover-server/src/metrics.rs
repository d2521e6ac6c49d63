//! `GET /metrics`: the control plane's figures in the Prometheus/OpenMetrics
//! text format, so a Prometheus can scrape drover and canary analysis can
//! ask that Prometheus (`[[deploy.analysis.query]]`).
//!
//! Per (app, environment, release), from the proxies' reports summed over
//! all proxies (monotonic, see [`crate::traffic`]): `drover_release_requests_total`,
//! `drover_release_errors_total` and the histogram
//! `drover_release_request_duration_seconds` (see `drover_api::metrics`).

use crate::traffic::Key;
use drover_api::ReleaseStats;
use drover_core::analysis::Window;

pub use drover_api::metrics::CONTENT_TYPE;

/// The text of one scrape.
pub fn encode(traffic: Vec<(Key, Window)>) -> String {
    let rows = traffic
        .into_iter()
        .map(|((app, env, release), w)| ReleaseStats {
            app,
            env,
            release,
            requests: w.requests,
            errors: w.errors,
            latency_buckets: w.latency_buckets,
            latency_sum_us: w.latency_sum_us,
        })
        .collect();
    drover_api::metrics::encode_release_traffic("drover_release", rows)
}
