//! `GET /metrics`: the control plane's figures in the Prometheus/OpenMetrics
//! text format, so a Prometheus can scrape drover and canary analysis can
//! ask that Prometheus (`[[deploy.analysis.query]]`).
//!
//! Per (app, environment, release), from the proxies' reports summed over
//! all proxies (monotonic, see [`crate::traffic`]):
//! - `drover_release_requests_total`
//! - `drover_release_errors_total` (5xx and upstream failures)
//! - `drover_release_request_duration_seconds` (histogram)

use crate::traffic::Key;
use drover_api::LATENCY_BUCKETS_MS;
use drover_core::analysis::Window;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Per-release traffic as of one scrape.
#[derive(Debug)]
struct ReleaseTraffic(Vec<(Key, Window)>);

/// One metric of every release, encoded by `f`.
struct PerRelease<'a> {
    rows: &'a [(Key, Window)],
    kind: MetricType,
    f: fn(&Window, &mut MetricEncoder) -> Result<(), std::fmt::Error>,
}

impl std::fmt::Debug for PerRelease<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerRelease")
    }
}

impl EncodeMetric for PerRelease<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for ((app, env, release), w) in self.rows {
            let labels = [
                ("app", app.as_str()),
                ("env", env.as_str()),
                ("release", release.as_str()),
            ];
            let mut family = encoder.encode_family(&labels)?;
            (self.f)(w, &mut family)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

impl Collector for ReleaseTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics: [(&str, &str, PerRelease); 3] = [
            (
                "drover_release_requests",
                "Requests answered for a release, through all proxies.",
                PerRelease {
                    rows: &self.0,
                    kind: MetricType::Counter,
                    f: |w, e| e.encode_counter::<NoLabelSet, _, u64>(&w.requests, None),
                },
            ),
            (
                "drover_release_errors",
                "Requests of a release answered 5xx or failed upstream.",
                PerRelease {
                    rows: &self.0,
                    kind: MetricType::Counter,
                    f: |w, e| e.encode_counter::<NoLabelSet, _, u64>(&w.errors, None),
                },
            ),
            (
                "drover_release_request_duration_seconds",
                "Time from the proxy receiving a request to its response, per release.",
                PerRelease {
                    rows: &self.0,
                    kind: MetricType::Histogram,
                    f: |w, e| {
                        let buckets = histogram_buckets(w);
                        e.encode_histogram::<NoLabelSet>(
                            w.latency_sum_us as f64 / 1e6,
                            w.requests,
                            &buckets,
                            None,
                        )
                    },
                },
            ),
        ];
        for (name, help, metric) in metrics {
            let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(m)?;
        }
        Ok(())
    }
}

/// `(upper bound in seconds, count in that bucket)`, ending with +Inf; the
/// encoder makes them cumulative.
fn histogram_buckets(w: &Window) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
        .iter()
        .map(|ms| ms / 1000.0)
        .chain([f64::INFINITY])
        .enumerate()
        .map(|(i, bound)| (bound, w.latency_buckets.get(i).copied().unwrap_or(0)))
        .collect();
    // The buckets must add up to the count.
    let counted: u64 = out.iter().map(|b| b.1).sum();
    if let Some(last) = out.last_mut() {
        last.1 += w.requests.saturating_sub(counted);
    }
    out
}

/// The text of one scrape.
pub fn encode(traffic: Vec<(Key, Window)>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReleaseTraffic(traffic)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_release_series_are_encoded_with_labels_and_a_cumulative_histogram() {
        let mut buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        buckets[0] = 3;
        buckets[2] = 1;
        let w = Window {
            requests: 4,
            errors: 1,
            latency_buckets: buckets,
            latency_sum_us: 2_500,
        };
        let text = encode(vec![(("web".into(), "prod".into(), "r2".into()), w)]);
        let labels = r#"app="web",env="prod",release="r2""#;
        assert!(
            text.contains(&format!("drover_release_requests_total{{{labels}}} 4")),
            "{text}"
        );
        assert!(
            text.contains(&format!("drover_release_errors_total{{{labels}}} 1")),
            "{text}"
        );
        assert!(
            text.contains("# TYPE drover_release_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "drover_release_request_duration_seconds_bucket{{le=\"+Inf\",{labels}}} 4"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "drover_release_request_duration_seconds_count{{{labels}}} 4"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "drover_release_request_duration_seconds_sum{{{labels}}} 0.0025"
            )),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
