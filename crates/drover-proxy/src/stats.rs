//! Per-(app, env, release) traffic counters: requests, errors and a latency
//! histogram — the raw material of canary analysis on the control plane.
//!
//! Counters are created once per (app, env, release) when a routing table that
//! mentions the release is built, and each upstream entry of the table keeps
//! an `Arc` to its counters, so recording a request is a few relaxed atomic
//! adds with no lock and no map lookup. The map itself is only locked when a
//! table is built and when a report snapshot is taken. Counters are
//! cumulative for the life of the process and never removed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::{ReleaseStats, LATENCY_BUCKETS_MS};

/// Number of histogram buckets: one per bound plus +Inf.
pub const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// Counters of one (app, env, release).
#[derive(Debug, Default)]
pub struct ReleaseCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
}

impl ReleaseCounters {
    /// Records one finished request.
    pub fn record(&self, latency: Duration, is_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if is_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.buckets[bucket_index(latency)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self, app: &str, env: &str, release: &str) -> ReleaseStats {
        ReleaseStats {
            app: app.to_string(),
            env: env.to_string(),
            release: release.to_string(),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Index of the (non-cumulative) bucket a latency falls in: the first bound
/// `>=` the latency in milliseconds, else the final +Inf bucket.
pub fn bucket_index(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    LATENCY_BUCKETS_MS
        .iter()
        .position(|&bound| ms <= bound)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

type StatsKey = (String, String, String);

/// All counters of this proxy, keyed by (app, env, release).
#[derive(Debug, Default)]
pub struct Stats {
    by_release: Mutex<BTreeMap<StatsKey, Arc<ReleaseCounters>>>,
}

impl Stats {
    /// The counters of (app, env, release), created on first use.
    pub fn counters(&self, app: &str, env: &str, release: &str) -> Arc<ReleaseCounters> {
        let mut map = self.by_release.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((app.to_string(), env.to_string(), release.to_string()))
            .or_default()
            .clone()
    }

    /// Cumulative counters of every release seen so far, sorted by app, env
    /// then release.
    pub fn snapshot(&self) -> Vec<ReleaseStats> {
        let entries: Vec<_> = {
            let map = self.by_release.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        entries
            .iter()
            .map(|((app, env, release), c)| c.snapshot(app, env, release))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing() {
        assert_eq!(bucket_index(Duration::ZERO), 0);
        assert_eq!(bucket_index(Duration::from_micros(999)), 0);
        assert_eq!(bucket_index(Duration::from_millis(1)), 0);
        assert_eq!(bucket_index(Duration::from_micros(1001)), 1);
        assert_eq!(bucket_index(Duration::from_millis(2)), 1);
        assert_eq!(bucket_index(Duration::from_millis(3)), 2);
        assert_eq!(bucket_index(Duration::from_millis(250)), 8);
        assert_eq!(
            bucket_index(Duration::from_secs(30)),
            LATENCY_BUCKETS_MS.len() - 1
        );
        assert_eq!(
            bucket_index(Duration::from_secs(31)),
            LATENCY_BUCKETS_MS.len()
        );
        assert_eq!(bucket_index(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn records_and_snapshots() {
        let stats = Stats::default();
        let a = stats.counters("hello", "", "r2");
        let same = stats.counters("hello", "", "r2");
        assert!(Arc::ptr_eq(&a, &same));
        a.record(Duration::from_millis(3), false);
        a.record(Duration::from_millis(3), true);
        a.record(Duration::from_secs(60), false);
        stats
            .counters("hello", "", "r1")
            .record(Duration::from_micros(10), false);

        let snap = stats.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].release, "r1");
        assert_eq!(snap[0].requests, 1);
        assert_eq!(snap[0].latency_buckets[0], 1);
        let r2 = &snap[1];
        assert_eq!((r2.app.as_str(), r2.release.as_str()), ("hello", "r2"));
        assert_eq!(r2.requests, 3);
        assert_eq!(r2.errors, 1);
        assert_eq!(r2.latency_buckets.len(), LATENCY_BUCKETS_MS.len() + 1);
        assert_eq!(r2.latency_buckets[2], 2);
        assert_eq!(r2.latency_buckets[BUCKETS - 1], 1);
        assert_eq!(r2.latency_buckets.iter().sum::<u64>(), r2.requests);
    }
}
