//! Canary analysis: judging a release from the proxies' own figures for it
//! over a window of time. Pure: the server gathers the window, this decides.
//!
//! Too few requests is *inconclusive* — it never passes; the planner holds
//! the step and fails it at the analysis deadline.

use crate::duration::format_ms;
use crate::model::AnalysisSettings;
use serde::{Deserialize, Serialize};

/// A release's traffic during a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    /// Non-cumulative counts per latency bucket (upper bounds in `bounds_ms`,
    /// plus a final +Inf bucket).
    pub latency_buckets: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    Inconclusive(String),
}

impl Verdict {
    pub fn text(&self) -> &str {
        match self {
            Verdict::Pass(s) | Verdict::Fail(s) | Verdict::Inconclusive(s) => s,
        }
    }
}

/// The 99th percentile, as the upper bound of the bucket it falls in
/// (None: no request, or it falls in the +Inf bucket → `f64::INFINITY`).
pub fn p99_ms(buckets: &[u64], bounds_ms: &[f64]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket whose cumulative count reaches 99% of requests.
    let need = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, c) in buckets.iter().enumerate() {
        seen += c;
        if seen >= need {
            return Some(bounds_ms.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    Some(f64::INFINITY)
}

/// Judges a window against the thresholds. Failing figures fail only with
/// enough requests to mean something (`min_requests`), like passing ones.
pub fn judge(w: &Window, a: &AnalysisSettings, bounds_ms: &[f64]) -> Verdict {
    if w.requests < a.min_requests.max(1) {
        return Verdict::Inconclusive(format!(
            "inconclusive: {} request(s) to the new release, {} needed",
            w.requests,
            a.min_requests.max(1)
        ));
    }
    let rate = w.errors as f64 / w.requests as f64;
    let mut figures = vec![format!(
        "error rate {:.2}% ({}/{})",
        rate * 100.0,
        w.errors,
        w.requests
    )];
    if let Some(max) = a.max_error_rate {
        if rate > max {
            return Verdict::Fail(format!(
                "error rate {:.2}% ({} of {} requests) is above the threshold {:.2}%",
                rate * 100.0,
                w.errors,
                w.requests,
                max * 100.0
            ));
        }
    }
    if let Some(max) = a.max_p99_ms {
        let p99 = p99_ms(&w.latency_buckets, bounds_ms).unwrap_or(0.0);
        if p99 > max as f64 {
            let shown = if p99.is_finite() {
                format!("≤ {p99}ms")
            } else {
                format!("> {}ms", bounds_ms.last().copied().unwrap_or(0.0))
            };
            return Verdict::Fail(format!(
                "p99 latency {shown} is above the threshold {}",
                format_ms(max)
            ));
        }
        figures.push(format!(
            "p99 ≤ {}ms",
            p99_ms(&w.latency_buckets, bounds_ms).unwrap_or(0.0)
        ));
    }
    Verdict::Pass(format!("passed: {}", figures.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 4] = [1.0, 10.0, 100.0, 1000.0];

    fn settings() -> AnalysisSettings {
        AnalysisSettings {
            max_error_rate: Some(0.01),
            max_p99_ms: Some(100),
            min_requests: 50,
            interval_ms: 1000,
            deadline_ms: 60_000,
        }
    }

    fn window(requests: u64, errors: u64, slow: u64) -> Window {
        Window {
            requests,
            errors,
            latency_buckets: vec![0, requests - slow, 0, slow, 0],
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive_never_a_pass_or_a_fail() {
        assert!(matches!(
            judge(&window(49, 40, 49), &settings(), &BOUNDS),
            Verdict::Inconclusive(_)
        ));
        assert!(matches!(
            judge(&Window::default(), &settings(), &BOUNDS),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn error_rate_above_the_threshold_fails_with_value_and_threshold() {
        let v = judge(&window(100, 5, 0), &settings(), &BOUNDS);
        let Verdict::Fail(why) = v else {
            panic!("{v:?}")
        };
        assert!(why.contains("5.00% (5 of 100 requests)"), "{why}");
        assert!(why.contains("threshold 1.00%"), "{why}");
        assert!(matches!(
            judge(&window(100, 1, 0), &settings(), &BOUNDS),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn p99_comes_from_the_histogram() {
        assert_eq!(p99_ms(&[0, 99, 0, 1, 0], &BOUNDS), Some(10.0));
        assert_eq!(p99_ms(&[0, 98, 0, 2, 0], &BOUNDS), Some(1000.0));
        assert_eq!(p99_ms(&[0, 0, 0, 0, 5], &BOUNDS), Some(f64::INFINITY));
        assert_eq!(p99_ms(&[0, 0, 0, 0, 0], &BOUNDS), None);
        let v = judge(&window(100, 0, 2), &settings(), &BOUNDS);
        assert!(
            matches!(&v, Verdict::Fail(w) if w.contains("p99 latency ≤ 1000ms")),
            "{v:?}"
        );
        assert!(matches!(
            judge(&window(100, 0, 1), &settings(), &BOUNDS),
            Verdict::Pass(_)
        ));
    }
}
