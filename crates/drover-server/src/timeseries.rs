//! A short in-memory history of each deployment's traffic, for the
//! dashboard's live chart: once a second, per (app, environment), the
//! percent of users per release (the split `drover status` shows, from
//! [`drover_core::share`]) and each release's request rate, error rate and
//! p99 latency over the last few seconds (differences of the monotonic
//! [`crate::traffic`] totals).
//!
//! Held in memory and bounded ([`CAPACITY`] samples per deployment): after a
//! server restart the chart starts empty. Nothing decides on these figures;
//! canary analysis judges its own windows of the totals.

use crate::traffic::since;
use crate::{view, Server};
use drover_api::LATENCY_BUCKETS_MS;
use drover_core::analysis::{p99_ms, Window};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Samples kept per deployment: ten minutes at one a second.
pub const CAPACITY: usize = 600;
/// How often the sampler runs.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Rates, error rates and p99 are over the last this many samples (a few
/// seconds smooth single-request noise away).
pub const SMOOTH: usize = 5;

/// One release's figures at one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Percent of users sent to it (None: it gets no share, e.g. only its
    /// last requests are still counted).
    pub percent: Option<u32>,
    /// Requests per second.
    pub rate: f64,
    /// errors / requests; None without requests.
    pub error_rate: Option<f64>,
    /// In milliseconds (the upper bound of the bucket holding the 99th
    /// percentile, capped at the last finite bound); None without requests.
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    /// Release → its figures.
    pub points: BTreeMap<String, Point>,
}

/// Samples of one deployment, oldest first, plus the raw totals the
/// windows are differences of.
#[derive(Default)]
struct Ring {
    samples: VecDeque<Sample>,
    totals: VecDeque<(u64, BTreeMap<String, Window>)>,
}

#[derive(Default)]
pub struct Series {
    rings: HashMap<(String, String), Ring>,
}

impl Series {
    /// Adds one sample of (app, env) taken at `at_ms`: the traffic totals
    /// of its releases now and the percent of users per release.
    pub fn record(
        &mut self,
        app: &str,
        env: &str,
        at_ms: u64,
        totals: BTreeMap<String, Window>,
        shares: &BTreeMap<String, u32>,
    ) {
        let ring = self
            .rings
            .entry((app.to_string(), env.to_string()))
            .or_default();
        // The window starts at the oldest totals kept (at most SMOOTH
        // samples back); the first sample has no window yet.
        let base = ring.totals.front().cloned();
        let mut points = BTreeMap::new();
        let releases: std::collections::BTreeSet<&String> =
            totals.keys().chain(shares.keys()).collect();
        for release in releases {
            let now = totals.get(release).cloned().unwrap_or_default();
            let (window, secs) = match &base {
                Some((at, before)) if at_ms > *at => (
                    since(&now, &before.get(release).cloned().unwrap_or_default()),
                    (at_ms - at) as f64 / 1000.0,
                ),
                _ => (Window::default(), 0.0),
            };
            let percent = shares.get(release).copied();
            // A release without a share and without new requests is history.
            if percent.is_none() && window.requests == 0 {
                continue;
            }
            let has = window.requests > 0;
            points.insert(
                release.clone(),
                Point {
                    percent,
                    rate: if secs > 0.0 {
                        window.requests as f64 / secs
                    } else {
                        0.0
                    },
                    error_rate: has.then(|| window.errors as f64 / window.requests as f64),
                    p99_ms: p99_ms(&window.latency_buckets, &LATENCY_BUCKETS_MS).map(|v| {
                        if v.is_finite() {
                            v
                        } else {
                            LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.len() - 1]
                        }
                    }),
                },
            );
        }
        ring.totals.push_back((at_ms, totals));
        while ring.totals.len() > SMOOTH {
            ring.totals.pop_front();
        }
        if points.is_empty() {
            return;
        }
        ring.samples.push_back(Sample { at_ms, points });
        while ring.samples.len() > CAPACITY {
            ring.samples.pop_front();
        }
    }

    /// The samples of (app, env) taken at or after `from_ms`, oldest first.
    pub fn samples(&self, app: &str, env: &str, from_ms: u64) -> Vec<Sample> {
        self.rings
            .get(&(app.to_string(), env.to_string()))
            .map(|r| {
                r.samples
                    .iter()
                    .filter(|s| s.at_ms >= from_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the history of deployments that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.rings.retain(|(a, e), _| keep(a, e));
    }
}

/// Samples every deployment once per [`INTERVAL`] until shutdown.
pub async fn sample_loop(server: Arc<Server>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut splits: Option<Splits> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server.shutdown.cancelled() => return,
        }
        if let Err(e) = sample(&server, &mut splits).await {
            tracing::debug!(error = %e, "traffic sample skipped");
        }
    }
}

/// How long the split of every deployment, once read, is used while the
/// index stays put (a node's lease running out changes what serves without
/// a bump; everything else that changes the split bumps it).
const SPLITS_MAX_AGE_MS: u64 = 5_000;

/// The percent of users per release of every deployment, as read from the
/// store at `index`: rollouts and routing are not read again every second.
struct Splits {
    index: u64,
    at_ms: u64,
    /// (app, env) → release → percent.
    shares: Vec<((String, String), BTreeMap<String, u32>)>,
}

/// The split of every deployment now (what `drover status` shows).
async fn read_splits(s: &Server, index: u64, now: u64) -> Result<Splits, crate::api::ApiErr> {
    let deployments = s.store.list_deployments().await?;
    let ready = view::nodes_ready(&s.store.list_nodes().await?, now);
    let mut instances: HashMap<String, Vec<drover_store::InstanceRecord>> = HashMap::new();
    let mut shares = Vec::new();
    for d in &deployments {
        if !instances.contains_key(&d.app) {
            instances.insert(d.app.clone(), s.store.list_instances(&d.app).await?);
        }
        let statuses: Vec<drover_api::InstanceStatus> = instances[&d.app]
            .iter()
            .filter(|i| i.env == d.env)
            .map(|i| view::instance_status(i, ready.get(&i.node).copied().unwrap_or(false)))
            .collect();
        let split = match s.store.latest_rollout(&d.app, &d.env).await? {
            Some(r) => view::target_spec(s, &d.app, &r)
                .await
                .and_then(|spec| view::rollout_split(&r, &spec)),
            None => None,
        };
        shares.push((
            (d.app.clone(), d.env.clone()),
            view::traffic(&statuses, split.as_ref()),
        ));
    }
    Ok(Splits {
        index,
        at_ms: now,
        shares,
    })
}

/// One sample of every deployment.
async fn sample(s: &Server, splits: &mut Option<Splits>) -> Result<(), crate::api::ApiErr> {
    let now = crate::now_ms();
    let index = *s.index.borrow();
    let fresh = splits
        .as_ref()
        .is_some_and(|c| c.index == index && now.saturating_sub(c.at_ms) < SPLITS_MAX_AGE_MS);
    if !fresh {
        *splits = Some(read_splits(s, index, now).await?);
    }
    let Some(splits) = splits.as_ref() else {
        return Ok(());
    };
    let all = s.traffic.lock().map(|t| t.all()).unwrap_or_default();
    let mut series = s.series.lock().unwrap_or_else(|p| p.into_inner());
    for ((app, env), shares) in &splits.shares {
        let totals: BTreeMap<String, Window> = all
            .iter()
            .filter(|((a, e, _), _)| a == app && e == env)
            .map(|((_, _, r), w)| (r.clone(), w.clone()))
            .collect();
        series.record(app, env, now, totals, shares);
    }
    series.retain(|a, e| {
        splits
            .shares
            .iter()
            .any(|((app, env), _)| app == a && env == e)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals of `requests` requests, `errors` of them failed, all in
    /// latency bucket `bucket`.
    fn w(requests: u64, errors: u64, bucket: usize) -> Window {
        let mut latency_buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        latency_buckets[bucket] = requests;
        Window {
            requests,
            errors,
            latency_buckets,
            latency_sum_us: 0,
        }
    }

    fn totals(list: &[(&str, Window)]) -> BTreeMap<String, Window> {
        list.iter()
            .map(|(r, w)| (r.to_string(), w.clone()))
            .collect()
    }

    fn shares(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(r, p)| (r.to_string(), *p)).collect()
    }

    #[test]
    fn a_sample_holds_the_split_and_each_releases_rate_error_rate_and_p99_of_its_window() {
        let mut s = Series::default();
        s.record(
            "web",
            "",
            1_000,
            totals(&[("r1", w(100, 0, 2))]),
            &shares(&[("r1", 100)]),
        );
        // The first sample has no window yet: the split only.
        let first = &s.samples("web", "", 0)[0];
        assert_eq!(first.points["r1"].percent, Some(100));
        assert_eq!(first.points["r1"].error_rate, None);
        // One second later: 50 more on r1, 10 on the canary r2, 2 failed, slow.
        s.record(
            "web",
            "",
            2_000,
            totals(&[("r1", w(150, 0, 2)), ("r2", w(10, 2, 8))]),
            &shares(&[("r1", 80), ("r2", 20)]),
        );
        let last = s.samples("web", "", 1_500);
        assert_eq!(last.len(), 1);
        let p = &last[0].points;
        assert_eq!(p["r1"].percent, Some(80));
        assert_eq!(p["r1"].rate, 50.0);
        assert_eq!(p["r1"].error_rate, Some(0.0));
        assert_eq!(p["r1"].p99_ms, Some(LATENCY_BUCKETS_MS[2]));
        assert_eq!(p["r2"].percent, Some(20));
        assert_eq!(p["r2"].rate, 10.0);
        assert_eq!(p["r2"].error_rate, Some(0.2));
        assert_eq!(p["r2"].p99_ms, Some(LATENCY_BUCKETS_MS[8]));
        // Other deployments are separate.
        assert!(s.samples("web", "staging", 0).is_empty());
    }

    #[test]
    fn windows_span_the_last_few_samples_and_the_history_is_bounded() {
        let mut s = Series::default();
        for i in 0..(CAPACITY as u64 + 50) {
            // 10 requests a second, every one over the last bound.
            s.record(
                "web",
                "",
                i * 1000,
                totals(&[("r1", w(10 * i, 0, LATENCY_BUCKETS_MS.len()))]),
                &shares(&[("r1", 100)]),
            );
        }
        let all = s.samples("web", "", 0);
        assert_eq!(all.len(), CAPACITY);
        let last = &all[CAPACITY - 1].points["r1"];
        assert_eq!(last.rate, 10.0);
        // Beyond the last bucket: shown at the last finite bound.
        assert_eq!(
            last.p99_ms,
            Some(LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.len() - 1])
        );
    }

    #[test]
    fn a_release_without_share_or_new_requests_drops_out_and_gone_deployments_are_forgotten() {
        let mut s = Series::default();
        let t = totals(&[("r1", w(100, 0, 1)), ("r2", w(40, 0, 1))]);
        s.record("web", "", 1_000, t.clone(), &shares(&[("r1", 100)]));
        s.record("web", "", 2_000, t, &shares(&[("r1", 100)]));
        let last = s.samples("web", "", 2_000);
        assert_eq!(last[0].points.keys().collect::<Vec<_>>(), ["r1"]);
        assert_eq!(last[0].points["r1"].rate, 0.0);
        assert_eq!(last[0].points["r1"].error_rate, None);
        s.retain(|app, _| app != "web");
        assert!(s.samples("web", "", 0).is_empty());
    }
}
