//! Canary analysis: judging a release from the proxies' own figures for it
//! over a window of time. Pure: the server gathers the window, this decides.
//!
//! Too few requests is *inconclusive* — it never passes; the planner holds
//! the step and fails it at the analysis deadline.

use crate::duration::format_ms;
use crate::model::{AnalysisSettings, MetricQuery};
use serde::{Deserialize, Serialize};

/// A release's traffic during a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    /// Non-cumulative counts per latency bucket (upper bounds in `bounds_ms`,
    /// plus a final +Inf bucket).
    pub latency_buckets: Vec<u64>,
    /// The sum of all latencies, in microseconds.
    #[serde(default)]
    pub latency_sum_us: u64,
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

/// The placeholders a Prometheus query may use.
pub const QUERY_PLACEHOLDERS: [&str; 5] = ["app", "env", "release", "stable", "window"];

/// The values of a query's placeholders for one canary step.
#[derive(Debug, Clone)]
pub struct QueryVars<'a> {
    pub app: &'a str,
    pub env: &'a str,
    pub release: &'a str,
    pub stable: &'a str,
    /// How long the step has run.
    pub window_ms: u64,
}

/// The placeholders of `query` that are not known, e.g. `{{relase}}`.
pub fn unknown_placeholders(query: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            unknown.push(after.chars().take(20).collect());
            break;
        };
        let name = after[..j].trim();
        if !QUERY_PLACEHOLDERS.contains(&name) {
            unknown.push(name.to_string());
        }
        rest = &after[j + 2..];
    }
    unknown
}

/// The query with its placeholders filled in. The values are names drover
/// validated (app, environment, release), never free text.
pub fn render_query(query: &str, v: &QueryVars<'_>) -> String {
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            out.push_str(&rest[i..]);
            return out;
        };
        match after[..j].trim() {
            "app" => out.push_str(v.app),
            "env" => out.push_str(v.env),
            "release" => out.push_str(v.release),
            "stable" => out.push_str(v.stable),
            "window" => out.push_str(&format!("{}s", v.window_ms.div_ceil(1000).max(1))),
            _ => out.push_str(&rest[i..i + 2 + j + 2]),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

/// What Prometheus answered to one query.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryOutcome {
    /// One number (a scalar, or a vector of exactly one sample).
    Value(f64),
    /// An empty vector: no series matched (yet).
    NoData,
    /// Prometheus refused the query (bad PromQL, or more than one series):
    /// it will not get better by waiting.
    Invalid(String),
    /// Prometheus could not be asked (down, timeout, 5xx): may recover.
    Unavailable(String),
}

/// Judges one query's answer against its condition. NaN (e.g. 0/0 when no
/// request came) and no data are inconclusive, never a pass.
pub fn judge_query(q: &MetricQuery, outcome: &QueryOutcome) -> Verdict {
    match outcome {
        QueryOutcome::Value(v) if v.is_nan() => Verdict::Inconclusive(format!(
            "inconclusive: query {:?} is NaN (no data in the window yet)",
            q.name
        )),
        QueryOutcome::Value(v) if q.condition.holds(*v) => {
            Verdict::Pass(format!("query {:?} = {v} (needs {})", q.name, q.condition))
        }
        QueryOutcome::Value(v) => Verdict::Fail(format!(
            "query {:?} = {v} does not meet the condition {}",
            q.name, q.condition
        )),
        QueryOutcome::NoData => {
            Verdict::Inconclusive(format!("inconclusive: query {:?} returned no data", q.name))
        }
        QueryOutcome::Invalid(why) => {
            Verdict::Fail(format!("query {:?} cannot be judged: {why}", q.name))
        }
        QueryOutcome::Unavailable(why) => Verdict::Inconclusive(format!(
            "inconclusive: query {:?} could not be run: {why}",
            q.name
        )),
    }
}

/// All verdicts of a step together: any failure fails it; otherwise any
/// inconclusive one holds it; it passes only when every part passes.
pub fn combine(verdicts: Vec<Verdict>) -> Option<Verdict> {
    let pick = |want: fn(&Verdict) -> bool| -> Vec<String> {
        verdicts
            .iter()
            .filter(|v| want(v))
            .map(|v| v.text().to_string())
            .collect()
    };
    let fails = pick(|v| matches!(v, Verdict::Fail(_)));
    if !fails.is_empty() {
        return Some(Verdict::Fail(fails.join("; ")));
    }
    let holds = pick(|v| matches!(v, Verdict::Inconclusive(_)));
    if !holds.is_empty() {
        return Some(Verdict::Inconclusive(holds.join("; ")));
    }
    let passes = pick(|v| matches!(v, Verdict::Pass(_)));
    (!passes.is_empty()).then(|| Verdict::Pass(passes.join("; ")))
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
            builtin: true,
            prometheus: None,
            queries: Vec::new(),
        }
    }

    fn window(requests: u64, errors: u64, slow: u64) -> Window {
        Window {
            requests,
            errors,
            latency_buckets: vec![0, requests - slow, 0, slow, 0],
            latency_sum_us: 0,
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

    fn query(cond: &str) -> MetricQuery {
        MetricQuery {
            name: "errors".into(),
            query: "q".into(),
            condition: crate::model::Condition::parse(cond).unwrap(),
        }
    }

    #[test]
    fn placeholders_are_filled_and_unknown_ones_named() {
        let v = QueryVars {
            app: "web",
            env: "prod",
            release: "r3",
            stable: "r2",
            window_ms: 12_300,
        };
        assert_eq!(
            render_query(
                r#"rate(x{app="{{app}}",env="{{ env }}",release="{{release}}"}[{{window}}]) / on() y{release="{{stable}}"}"#,
                &v
            ),
            r#"rate(x{app="web",env="prod",release="r3"}[13s]) / on() y{release="r2"}"#
        );
        assert_eq!(
            render_query("[{{window}}]", &QueryVars { window_ms: 0, ..v }),
            "[1s]"
        );
        assert!(unknown_placeholders("{{app}} {{ window }}").is_empty());
        assert_eq!(
            unknown_placeholders("{{relase}} {{app}} {{env"),
            vec!["relase", "env"]
        );
    }

    #[test]
    fn a_query_passes_only_on_a_number_meeting_its_condition() {
        let q = query("< 0.02");
        assert!(matches!(
            judge_query(&q, &QueryOutcome::Value(0.01)),
            Verdict::Pass(_)
        ));
        let v = judge_query(&q, &QueryOutcome::Value(0.05));
        assert_eq!(
            v,
            Verdict::Fail(r#"query "errors" = 0.05 does not meet the condition < 0.02"#.into())
        );
        for o in [
            QueryOutcome::Value(f64::NAN),
            QueryOutcome::NoData,
            QueryOutcome::Unavailable("connection refused".into()),
        ] {
            assert!(
                matches!(judge_query(&q, &o), Verdict::Inconclusive(_)),
                "{o:?}"
            );
        }
        assert!(matches!(
            judge_query(&q, &QueryOutcome::Invalid("parse error".into())),
            Verdict::Fail(_)
        ));
        let ge = query(">= 100");
        assert!(matches!(
            judge_query(&ge, &QueryOutcome::Value(100.0)),
            Verdict::Pass(_)
        ));
        assert!(crate::model::Condition::parse("=< 1").is_none());
        assert!(crate::model::Condition::parse("< inf").is_none());
        assert!(crate::model::Condition::parse("0.1").is_none());
    }

    #[test]
    fn verdicts_combine_fail_first_then_inconclusive_then_pass() {
        let p = Verdict::Pass("a".into());
        let i = Verdict::Inconclusive("b".into());
        let f = Verdict::Fail("c".into());
        assert_eq!(combine(vec![]), None);
        assert_eq!(combine(vec![p.clone()]), Some(p.clone()));
        assert_eq!(combine(vec![p.clone(), i.clone()]), Some(i.clone()));
        assert_eq!(combine(vec![i, f.clone(), p]), Some(f));
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
