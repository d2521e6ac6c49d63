//! Benchmark helpers for drover. The binaries: `bench-backend` (a trivial,
//! fast HTTP app: `/healthz` and `/`) and `loadgen` (a bounded HTTP/1.1 load
//! generator that reports requests/s and latency percentiles as JSON).
//! `bench/run.sh` drives them against a `drover up` cluster.
#![forbid(unsafe_code)]

/// Percentile of a sorted slice of microseconds.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
