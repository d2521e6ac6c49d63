//! Per-release traffic in the Prometheus/OpenMetrics text format, shared by
//! the server (summed over all proxies) and each proxy (its own counters).
//!
//! For a `prefix` such as `drover_release`, per (app, env, release):
//! - `{prefix}_requests_total`
//! - `{prefix}_errors_total` (5xx and upstream failures)
//! - `{prefix}_request_duration_seconds` (histogram)

use crate::{ReleaseStats, LATENCY_BUCKETS_MS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of [`encode_release_traffic`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Per-release traffic as of one scrape.
#[derive(Debug)]
struct ReleaseTraffic {
    prefix: String,
    rows: Vec<ReleaseStats>,
}

/// One metric of every release, encoded by `f`.
struct PerRelease<'a> {
    rows: &'a [ReleaseStats],
    kind: MetricType,
    f: fn(&ReleaseStats, &mut MetricEncoder) -> Result<(), std::fmt::Error>,
}

impl std::fmt::Debug for PerRelease<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerRelease")
    }
}

impl EncodeMetric for PerRelease<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for s in self.rows {
            let labels = [
                ("app", s.app.as_str()),
                ("env", s.env.as_str()),
                ("release", s.release.as_str()),
            ];
            let mut family = encoder.encode_family(&labels)?;
            (self.f)(s, &mut family)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

impl Collector for ReleaseTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = &self.prefix;
        let metrics: [(String, &str, PerRelease); 3] = [
            (
                format!("{p}_requests"),
                "Requests answered for a release.",
                PerRelease {
                    rows: &self.rows,
                    kind: MetricType::Counter,
                    f: |s, e| e.encode_counter::<NoLabelSet, _, u64>(&s.requests, None),
                },
            ),
            (
                format!("{p}_errors"),
                "Requests of a release answered 5xx or failed upstream.",
                PerRelease {
                    rows: &self.rows,
                    kind: MetricType::Counter,
                    f: |s, e| e.encode_counter::<NoLabelSet, _, u64>(&s.errors, None),
                },
            ),
            (
                format!("{p}_request_duration_seconds"),
                "Time from the proxy receiving a request to its response, per release.",
                PerRelease {
                    rows: &self.rows,
                    kind: MetricType::Histogram,
                    f: |s, e| {
                        let buckets = histogram_buckets(s);
                        e.encode_histogram::<NoLabelSet>(
                            s.latency_sum_us as f64 / 1e6,
                            s.requests,
                            &buckets,
                            None,
                        )
                    },
                },
            ),
        ];
        for (name, help, metric) in &metrics {
            let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(m)?;
        }
        Ok(())
    }
}

/// `(upper bound in seconds, count in that bucket)`, ending with +Inf; the
/// encoder makes them cumulative.
fn histogram_buckets(s: &ReleaseStats) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
        .iter()
        .map(|ms| ms / 1000.0)
        .chain([f64::INFINITY])
        .enumerate()
        .map(|(i, bound)| (bound, s.latency_buckets.get(i).copied().unwrap_or(0)))
        .collect();
    // The buckets must add up to the count.
    let counted: u64 = out.iter().map(|b| b.1).sum();
    if let Some(last) = out.last_mut() {
        last.1 += s.requests.saturating_sub(counted);
    }
    out
}

/// Adds `rows`, named `{prefix}_…`, to `registry` (beside a role's other
/// metrics, so one scrape is one exposition).
pub fn register_release_traffic(registry: &mut Registry, prefix: &str, rows: Vec<ReleaseStats>) {
    registry.register_collector(Box::new(ReleaseTraffic {
        prefix: prefix.to_string(),
        rows,
    }));
}

/// The text of one scrape of `rows`, named `{prefix}_…`.
pub fn encode_release_traffic(prefix: &str, rows: Vec<ReleaseStats>) -> String {
    let mut registry = Registry::default();
    register_release_traffic(&mut registry, prefix, rows);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_release_series_are_encoded_with_labels_and_a_histogram() {
        let mut buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        buckets[0] = 3;
        buckets[2] = 1;
        let s = ReleaseStats {
            app: "web".into(),
            env: "prod".into(),
            release: "r2".into(),
            requests: 4,
            errors: 1,
            latency_buckets: buckets,
            latency_sum_us: 2_500,
        };
        let text = encode_release_traffic("drover_release", vec![s]);
        let labels = r#"app="web",env="prod",release="r2""#;
        for want in [
            format!("drover_release_requests_total{{{labels}}} 4"),
            format!("drover_release_errors_total{{{labels}}} 1"),
            "# TYPE drover_release_request_duration_seconds histogram".to_string(),
            format!("drover_release_request_duration_seconds_bucket{{le=\"0.001\",{labels}}} 3"),
            format!("drover_release_request_duration_seconds_bucket{{le=\"0.005\",{labels}}} 4"),
            format!("drover_release_request_duration_seconds_bucket{{le=\"+Inf\",{labels}}} 4"),
            format!("drover_release_request_duration_seconds_count{{{labels}}} 4"),
            format!("drover_release_request_duration_seconds_sum{{{labels}}} 0.0025"),
        ] {
            assert!(text.contains(&want), "{want} missing in:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
