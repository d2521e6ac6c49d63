//! What one seed chooses: the cluster (nodes, labels, the environment's
//! selector), the releases (their `[deploy]` settings and how their
//! instances behave), the faults and how busy the operator is.

use super::rng::Rng;
use drover_core::{AnalysisSettings, CanaryStep, DeploySettings, Millis, Strategy};
use std::fmt;

/// How a release's instances behave once started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Healthy within a few seconds.
    Good,
    /// Healthy after half to one and a half health deadlines.
    Slow,
    /// Crashes a second or so after every start, never healthy.
    CrashLoop,
    /// Cannot run at all (bad artifact): reported failed.
    BadArtifact,
    /// Healthy, but its health check flaps while faults are on.
    Flaky,
}

impl Quality {
    /// Can it be live: every instance healthy at once, for good?
    pub fn can_serve(self) -> bool {
        matches!(self, Quality::Good | Quality::Slow | Quality::Flaky)
    }
}

/// What the proxies measure for a release while it is a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Plenty of requests, no errors: analysis passes.
    Good,
    /// Plenty of requests, 20% errors: analysis fails.
    Bad,
    /// A trickle of requests: analysis stays inconclusive.
    Quiet,
}

#[derive(Debug, Clone)]
pub struct Release {
    pub name: String,
    /// Its `[deploy]` (and health/run timings) as the planner sees them.
    pub settings: DeploySettings,
    pub quality: Quality,
    pub traffic: Traffic,
    /// Blue/green: the pre-promotion check answers 2xx.
    pub preview_ok: bool,
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// Chances of faults, per mille per simulation step (a step is 100–800 ms).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A running instance crashes (its agent restarts it with backoff).
    pub crash: u32,
    /// Health flaps of `Flaky` releases.
    pub flap: u32,
    /// A node is cut off from the control plane (its apps keep running).
    pub partition: u32,
    /// A node's host dies (its processes are gone) and reboots later.
    pub host_down: u32,
    /// The proxy loses the control plane (stops reporting drain progress).
    pub proxy_cut: u32,
    /// The server dies between two engine ticks.
    pub server_crash: u32,
    /// The server dies in the middle of writing a tick's plan (after any
    /// prefix of its persisted steps).
    pub crash_mid_write: u32,
}

/// How often the operator acts during the storm, per mille per step.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    /// Deploy the next release while a rollout is under way (supersede).
    pub supersede: u32,
    pub pause: u32,
    pub resume: u32,
    pub abort: u32,
    /// `drover rollback` (an abort mid-rollout, else back to the previous release).
    pub rollback: u32,
    pub promote: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Good releases, no faults but server restarts, an operator who only
    /// promotes what waits for a promotion: every rollout must succeed.
    Clean,
    /// Anything goes; safety must hold, and the last rollout must end once
    /// the faults stop.
    Chaos,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub class: Class,
    pub nodes: Vec<NodeSpec>,
    /// The environment's node selector (empty: every node).
    pub selector: Vec<(String, String)>,
    /// r1, r2, …: deployed in this order.
    pub releases: Vec<Release>,
    /// Start from nothing (r1 is a first deploy) rather than r1 live.
    pub first_deploy: bool,
    pub faults: Faults,
    pub operator: Operator,
    /// Faults and operator actions happen during this long; then calm.
    pub storm_ms: Millis,
}

impl Scenario {
    pub fn release(&self, name: &str) -> &Release {
        self.releases
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("unknown release {name}"))
    }

    /// The strategy of the release the seed is about (r2, or r1 on a first deploy).
    pub fn strategy(&self) -> Strategy {
        self.releases[usize::from(!self.first_deploy)]
            .settings
            .strategy
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} ({:?}): {} node(s) {:?}, selector {:?}, {}, storm {} ms",
            self.seed,
            self.class,
            self.nodes.len(),
            self.nodes
                .iter()
                .map(|n| format!("{}{:?}", n.name, n.labels))
                .collect::<Vec<_>>(),
            self.selector,
            if self.first_deploy {
                "first deploy"
            } else {
                "r1 live"
            },
            self.storm_ms
        )?;
        for r in &self.releases {
            let s = &r.settings;
            writeln!(
                f,
                "  {}: {} n={} surge={} unavailable={} health_deadline={} drain_timeout={} stop_timeout={} auto_rollback={} steps={:?} analysis={:?} auto_promote={} bake={} preview_check={:?} partial_instances={} users={:?}; {:?}, traffic {:?}, preview ok {}",
                r.name,
                s.strategy,
                s.instances,
                s.max_surge,
                s.max_unavailable,
                s.health_deadline_ms,
                s.drain_timeout_ms,
                s.stop_timeout_ms,
                s.auto_rollback,
                s.steps
                    .iter()
                    .map(|st| (st.weight, st.pause_ms))
                    .collect::<Vec<_>>(),
                s.analysis
                    .as_ref()
                    .map(|a| (a.min_requests, a.interval_ms, a.deadline_ms)),
                s.auto_promote,
                s.bake_ms,
                s.preview_check,
                s.partial_instances,
                s.partial_users,
                r.quality,
                r.traffic,
                r.preview_ok
            )?;
        }
        writeln!(f, "  faults {:?}", self.faults)?;
        write!(f, "  operator {:?}", self.operator)
    }
}

const STRATEGIES: [Strategy; 5] = [
    Strategy::Rolling,
    Strategy::Recreate,
    Strategy::Canary,
    Strategy::BlueGreen,
    Strategy::Partial,
];

/// The scenario of `seed`. Drawn from its own stream, so a seed's scenario
/// stays the same when the simulation's dynamics change.
pub fn generate(seed: u64) -> Scenario {
    let mut g = Rng::new(seed ^ 0x5CE7_A210_0000_0001);
    let class = if g.chance(150) {
        Class::Clean
    } else {
        Class::Chaos
    };
    let clean = class == Class::Clean;

    // Nodes: web nodes in two zones, sometimes a batch node the
    // environment's selector leaves out.
    let web = g.range(2, 4);
    let mut nodes: Vec<NodeSpec> = (0..web)
        .map(|k| NodeSpec {
            name: format!("node-{}", k + 1),
            labels: vec![
                ("role".into(), "web".into()),
                ("zone".into(), if k % 2 == 0 { "a" } else { "b" }.into()),
            ],
        })
        .collect();
    let selector = if g.chance(700) {
        vec![("role".to_string(), "web".to_string())]
    } else {
        Vec::new()
    };
    if g.chance(300) {
        nodes.push(NodeSpec {
            name: "batch-1".into(),
            labels: vec![("role".into(), "batch".into())],
        });
    }

    // Releases: one strategy for the seed, the odd release with another.
    let base = *g.pick(&STRATEGIES);
    let count = g.range(2, 4);
    let mut releases = Vec::new();
    for k in 0..count {
        let strategy = if !clean && k > 0 && g.chance(150) {
            *g.pick(&STRATEGIES)
        } else {
            base
        };
        let settings = settings(&mut g, strategy, clean);
        let (quality, traffic, preview_ok) = if clean || k == 0 {
            (Quality::Good, Traffic::Good, true)
        } else {
            let q = match g.below(100) {
                0..=54 => Quality::Good,
                55..=64 => Quality::Slow,
                65..=74 => Quality::CrashLoop,
                75..=79 => Quality::BadArtifact,
                _ => Quality::Flaky,
            };
            let t = match g.below(100) {
                0..=59 => Traffic::Good,
                60..=84 => Traffic::Bad,
                _ => Traffic::Quiet,
            };
            (q, t, g.chance(800))
        };
        releases.push(Release {
            name: format!("r{}", k + 1),
            settings,
            quality,
            traffic,
            preview_ok,
        });
    }

    let faults = if clean {
        Faults {
            server_crash: g.range(0, 10) as u32,
            crash_mid_write: g.range(0, 60) as u32,
            ..Faults::default()
        }
    } else {
        Faults {
            crash: g.range(0, 15) as u32,
            flap: g.range(10, 60) as u32,
            partition: g.range(0, 6) as u32,
            host_down: g.range(0, 3) as u32,
            proxy_cut: g.range(0, 3) as u32,
            server_crash: g.range(0, 10) as u32,
            crash_mid_write: g.range(0, 60) as u32,
        }
    };
    let operator = if clean || g.chance(200) {
        Operator::default()
    } else {
        Operator {
            supersede: g.range(0, 10) as u32,
            pause: g.range(0, 10) as u32,
            resume: g.range(20, 200) as u32,
            abort: g.range(0, 5) as u32,
            rollback: g.range(0, 4) as u32,
            promote: g.range(0, 20) as u32,
        }
    };
    Scenario {
        seed,
        class,
        nodes,
        selector,
        releases,
        first_deploy: g.chance(200),
        faults,
        operator,
        storm_ms: g.range(40_000, 150_000),
    }
}

/// A release's `[deploy]` settings of `strategy`, within what the spec
/// accepts (`spec.rs`): durations in ms, scaled down to keep runs short.
fn settings(g: &mut Rng, strategy: Strategy, clean: bool) -> DeploySettings {
    let n = g.range(1, 5) as u32;
    let (mut surge, mut unavailable) = (g.range(0, 2) as u32, g.range(0, u64::from(n)) as u32);
    // The spec rejects a rolling deploy that could never replace anything.
    // It accepts that for canary and partial, whose rolling replacement
    // after the steps then stalls (a known issue, see
    // `known_issues::canary_without_surge_or_unavailable_stalls_after_its_steps`
    // in sim.rs): chaos seeds keep it (its rollback must be safe and end),
    // clean seeds, which must succeed, leave it out.
    let stalls = matches!(strategy, Strategy::Canary | Strategy::Partial) && clean;
    if (strategy == Strategy::Rolling || stalls) && surge == 0 && unavailable == 0 {
        if g.chance(500) {
            surge = 1;
        } else {
            unavailable = 1;
        }
    }
    let mut s = DeploySettings {
        strategy,
        instances: n,
        max_surge: surge,
        max_unavailable: unavailable,
        health_deadline_ms: g.range(15_000, 40_000),
        drain_timeout_ms: g.range(1_000, 8_000),
        stop_timeout_ms: g.range(1_000, 5_000),
        auto_rollback: clean || g.chance(900),
        steps: Vec::new(),
        analysis: None,
        auto_promote: true,
        bake_ms: 0,
        preview_check: None,
        partial_users: Vec::new(),
        partial_instances: 0,
        partial_nodes: Default::default(),
    };
    match strategy {
        Strategy::Rolling | Strategy::Recreate => {}
        Strategy::Canary => {
            let mut weight = 0;
            for _ in 0..g.range(1, 3) {
                weight = g.range(weight.max(1), 100);
                s.steps.push(CanaryStep {
                    weight: weight as u32,
                    pause_ms: g.range(0, 6_000),
                });
            }
            if g.chance(700) {
                s.analysis = Some(analysis(g));
            }
        }
        Strategy::BlueGreen => {
            s.auto_promote = g.chance(700);
            s.bake_ms = g.range(0, 15_000);
            if g.chance(500) {
                s.preview_check = Some("/ready".into());
            }
        }
        Strategy::Partial => {
            // As spec.rs builds it: one step, held until promoted.
            let percent = if g.chance(500) {
                s.partial_users = vec!["alice".into(), "bob".into()];
                0
            } else {
                g.range(1, 50) as u32
            };
            s.partial_instances = g.range(1, u64::from(n)) as u32;
            s.steps = vec![CanaryStep {
                weight: percent,
                pause_ms: u64::MAX,
            }];
            if percent > 0 && g.chance(300) {
                s.analysis = Some(analysis(g));
            }
        }
    }
    s
}

fn analysis(g: &mut Rng) -> AnalysisSettings {
    AnalysisSettings {
        max_error_rate: Some(0.05),
        max_p99_ms: None,
        min_requests: g.range(10, 100),
        interval_ms: g.range(1_000, 4_000),
        deadline_ms: g.range(15_000, 40_000),
        builtin: true,
        prometheus: None,
        queries: Vec::new(),
    }
}
