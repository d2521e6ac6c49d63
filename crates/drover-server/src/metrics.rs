//! `GET /metrics`: the control plane's figures in the Prometheus/OpenMetrics
//! text format, so a Prometheus can scrape drover and canary analysis can
//! ask that Prometheus (`[[deploy.analysis.query]]`).
//!
//! - Per (app, environment, release), from the proxies' reports summed over
//!   all proxies (monotonic, see [`crate::traffic`]):
//!   `drover_release_requests_total`, `drover_release_errors_total` and the
//!   histogram `drover_release_request_duration_seconds` (see
//!   `drover_api::metrics`).
//! - Read from the store at each scrape: `drover_rollout_state` (1 for the
//!   latest rollout's state of each deployment, 0 for the others),
//!   `drover_rollout_step`, `drover_rollout_canary_weight_percent`,
//!   `drover_instances` (by app, env, release and state), `drover_nodes` and
//!   `drover_node_heartbeat_age_seconds`.
//! - Observed by the engine and the pipeline as things happen (in memory,
//!   reset by a restart, as Prometheus counters may be):
//!   `drover_rollout_step_duration_seconds`, `drover_rollout_duration_seconds`
//!   (by outcome), `drover_pipeline_run_duration_seconds` (by outcome) and
//!   `drover_notify_deliveries_total` (by outcome).

use crate::traffic::Key;
use drover_api::ReleaseStats;
use drover_core::analysis::Window;
use drover_core::{Rollout, RolloutState};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use drover_api::metrics::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds: from a health check's interval to a long bake.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

fn histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What the engine, the pipeline and the notifier observe as it happens.
#[derive(Debug, Clone)]
pub struct Observed {
    step_seconds: Histograms,
    rollout_seconds: Histograms,
    run_seconds: Histograms,
    deliveries: Family<Labels, Counter>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            step_seconds: Family::new_with_constructor(histogram),
            rollout_seconds: Family::new_with_constructor(histogram),
            run_seconds: Family::new_with_constructor(histogram),
            deliveries: Family::default(),
        }
    }
}

impl Observed {
    /// One step of a rollout (a canary step, a batch of a rolling rollout,
    /// blue/green's preview) took `ms`.
    pub fn step(&self, r: &Rollout, strategy: &str, ms: u64) {
        self.step_seconds
            .get_or_create(&vec![
                ("app", r.app.clone()),
                ("env", r.env.clone()),
                ("strategy", strategy.to_string()),
            ])
            .observe(ms as f64 / 1000.0);
    }

    /// A rollout ended in `r.state` after `ms`.
    pub fn rollout(&self, r: &Rollout, strategy: &str, ms: u64) {
        self.rollout_seconds
            .get_or_create(&vec![
                ("app", r.app.clone()),
                ("env", r.env.clone()),
                ("strategy", strategy.to_string()),
                ("outcome", r.state.as_str().to_string()),
            ])
            .observe(ms as f64 / 1000.0);
    }

    /// A pipeline run of `app` ended as `outcome` `ms` after it was queued.
    pub fn run(&self, app: &str, outcome: &str, ms: u64) {
        self.run_seconds
            .get_or_create(&vec![
                ("app", app.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .observe(ms as f64 / 1000.0);
    }

    /// One webhook attempt for `app`: delivered, retrying or failed.
    pub fn delivery(&self, app: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&vec![
                ("app", app.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }
}

/// The state read from the store for one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The latest rollout of each deployment.
    pub rollouts: Vec<Rollout>,
    /// (app, env, release, state) → instances.
    pub instances: Vec<((String, String, String, String), i64)>,
    /// (node, ready, heartbeat age in ms).
    pub nodes: Vec<(String, bool, u64)>,
}

const ROLLOUT_STATES: [RolloutState; 7] = [
    RolloutState::Pending,
    RolloutState::Progressing,
    RolloutState::Paused,
    RolloutState::Succeeded,
    RolloutState::Failed,
    RolloutState::RolledBack,
    RolloutState::Aborted,
];

/// The text of one scrape.
pub fn encode(traffic: Vec<(Key, Window)>, snap: &Snapshot, observed: &Observed) -> String {
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

    let state = Family::<Labels, Gauge>::default();
    let step = Family::<Labels, Gauge>::default();
    let weight = Family::<Labels, Gauge>::default();
    for r in &snap.rollouts {
        for s in ROLLOUT_STATES {
            state
                .get_or_create(&vec![
                    ("app", r.app.clone()),
                    ("env", r.env.clone()),
                    ("release", r.to.clone()),
                    ("state", s.as_str().to_string()),
                ])
                .set(i64::from(r.state == s));
        }
        let labels = vec![("app", r.app.clone()), ("env", r.env.clone())];
        let n = r.canary.as_ref().map(|c| c.step).unwrap_or(r.step);
        step.get_or_create(&labels).set(i64::from(n));
        if let Some(c) = &r.canary {
            weight.get_or_create(&labels).set(i64::from(c.weight));
        }
    }
    let instances = Family::<Labels, Gauge>::default();
    for ((app, env, release, st), n) in &snap.instances {
        instances
            .get_or_create(&vec![
                ("app", app.clone()),
                ("env", env.clone()),
                ("release", release.clone()),
                ("state", st.clone()),
            ])
            .set(*n);
    }
    let nodes = Family::<Labels, Gauge>::default();
    let age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for st in ["ready", "lost"] {
        let _ = nodes.get_or_create(&vec![("state", st.to_string())]);
    }
    for (name, ready, age_ms) in &snap.nodes {
        let st = if *ready { "ready" } else { "lost" };
        nodes.get_or_create(&vec![("state", st.to_string())]).inc();
        age.get_or_create(&vec![("node", name.clone())])
            .set(*age_ms as f64 / 1000.0);
    }

    let mut registry = Registry::default();
    drover_api::metrics::register_release_traffic(&mut registry, "drover_release", rows);
    registry.register(
        "drover_rollout_state",
        "1 for the state the latest rollout of a deployment is in (release: its target), 0 for the others.",
        state,
    );
    registry.register(
        "drover_rollout_step",
        "The latest rollout's step: the canary step, else the target's instances serving.",
        step,
    );
    registry.register(
        "drover_rollout_canary_weight_percent",
        "Percent of users a canary rollout sends to its target release.",
        weight,
    );
    registry.register(
        "drover_rollout_step_duration_seconds",
        "How long rollout steps took (canary steps, rolling batches, blue/green preview).",
        observed.step_seconds.clone(),
    );
    registry.register(
        "drover_rollout_duration_seconds",
        "How long rollouts took from start to their end, by outcome.",
        observed.rollout_seconds.clone(),
    );
    registry.register(
        "drover_pipeline_run_duration_seconds",
        "How long pipeline runs took from queued to finished, by outcome.",
        observed.run_seconds.clone(),
    );
    registry.register(
        "drover_notify_deliveries",
        "Webhook delivery attempts by outcome (delivered, retrying, failed).",
        observed.deliveries.clone(),
    );
    registry.register(
        "drover_instances",
        "Instances by app, environment, release and state.",
        instances,
    );
    registry.register("drover_nodes", "Nodes by state (ready, lost).", nodes);
    registry.register(
        "drover_node_heartbeat_age_seconds",
        "Seconds since each node's agent was last heard from.",
        age,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_scrape_has_traffic_rollouts_instances_nodes_and_observations() {
        let mut r = Rollout::new("web", "", Some("r1".into()), "r2", 0);
        r.state = RolloutState::Progressing;
        r.canary = Some(drover_core::CanaryProgress {
            step: 1,
            weight: 20,
            step_started_at: None,
            analysis: None,
            window_started_at: None,
        });
        let snap = Snapshot {
            rollouts: vec![r.clone()],
            instances: vec![(("web".into(), "".into(), "r2".into(), "healthy".into()), 2)],
            nodes: vec![("node-1".into(), true, 1500)],
        };
        let obs = Observed::default();
        obs.step(&r, "canary", 2_000);
        obs.run("web", "succeeded", 3_000);
        let w = Window {
            requests: 3,
            ..Window::default()
        };
        let text = encode(
            vec![(("web".into(), "".into(), "r2".into()), w)],
            &snap,
            &obs,
        );
        for line in [
            "drover_release_requests_total{app=\"web\",env=\"\",release=\"r2\"} 3",
            "drover_rollout_state{app=\"web\",env=\"\",release=\"r2\",state=\"progressing\"} 1",
            "drover_rollout_state{app=\"web\",env=\"\",release=\"r2\",state=\"succeeded\"} 0",
            "drover_rollout_canary_weight_percent{app=\"web\",env=\"\"} 20",
            "drover_rollout_step{app=\"web\",env=\"\"} 1",
            "drover_rollout_step_duration_seconds_count{app=\"web\",env=\"\",strategy=\"canary\"} 1",
            "drover_pipeline_run_duration_seconds_sum{app=\"web\",outcome=\"succeeded\"} 3.0",
            "drover_instances{app=\"web\",env=\"\",release=\"r2\",state=\"healthy\"} 2",
            "drover_nodes{state=\"ready\"} 1",
            "drover_nodes{state=\"lost\"} 0",
            "drover_node_heartbeat_age_seconds{node=\"node-1\"} 1.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
