//! `drover plan`: a dry run of a rollout. The real planner is driven against
//! a simulated cluster in which every placed instance becomes healthy after
//! `ready_ms`, drains after `drain_ms` and stops at once, canary analysis
//! passes and pauses elapse — what happens when all goes well, step by step,
//! with the traffic split after each step and the expected duration.

use crate::analysis::Verdict;
use crate::duration::format_ms;
use crate::model::*;
use crate::planner::{plan, Action, PlanInput};
use crate::share::{rollout_split, shares};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long things take in the simulation.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// From placement to healthy (start + health checks).
    pub ready_ms: u64,
    /// From leaving routing to drained.
    pub drain_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryStep {
    /// Since the rollout started.
    pub at_ms: u64,
    /// What changes, e.g. "start r2 on node-1", "stop r1 (a1b2) on node-2".
    pub changes: Vec<String>,
    /// Percent of users per release after this step.
    pub traffic: BTreeMap<String, u32>,
    /// The rollout's status line after it.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    pub steps: Vec<DryStep>,
    /// Until the rollout would be final (or waits for an operator).
    pub duration_ms: u64,
    /// "succeeded", or why it stops (e.g. waits for `drover promote`).
    pub outcome: String,
}

const TICK_MS: u64 = 100;
const MAX_TICKS: u64 = 200_000;

/// Simulates moving `instances` (live: `from`) to release `to`.
pub fn dry_run(
    settings: &DeploySettings,
    from: Option<&str>,
    to: &str,
    instances: &[Instance],
    nodes: &[Node],
    timing: Timing,
) -> DryRun {
    let mut inst: Vec<Instance> = instances
        .iter()
        .filter(|i| i.desired == Desired::Run)
        .cloned()
        .collect();
    let mut r = Rollout::new("app", "", from.map(str::to_string), to, 0);
    let pass = Verdict::Pass("assumed to pass".into());
    let mut steps = Vec::new();
    let mut next = 0u32;
    let mut last_traffic = traffic(&inst, &r, settings);
    let mut now = 0;
    let mut quiet = 0u64;
    for _ in 0..MAX_TICKS {
        let p = plan(&PlanInput {
            settings,
            rollout: Some(&r),
            live: from,
            instances: &inst,
            nodes,
            now,
            verdict: Some(&pass),
        });
        let mut changes = Vec::new();
        for a in &p.actions {
            match a {
                Action::Place { release, node } => {
                    next += 1;
                    inst.push(Instance {
                        id: format!("new-{next}"),
                        release: release.clone(),
                        node: node.clone(),
                        desired: Desired::Run,
                        routed: false,
                        health: Health::Starting,
                        created_at: now,
                        drained: false,
                        last_check: None,
                    });
                    changes.push(format!("start {release} on {node}"));
                }
                Action::Route { instance } => set(&mut inst, instance, |i| i.routed = true),
                Action::Unroute { instance } => set(&mut inst, instance, |i| i.routed = false),
                Action::Retire { instance } => {
                    if let Some(i) = inst.iter().find(|i| &i.id == instance) {
                        changes.push(format!("drain {} ({}) on {}", i.release, i.id, i.node));
                    }
                    set(&mut inst, instance, |i| {
                        i.routed = false;
                        i.desired = Desired::Drain { since: now };
                    });
                }
                Action::Stop { instance } => {
                    if let Some(i) = inst.iter().find(|i| &i.id == instance) {
                        changes.push(format!("stop {} ({}) on {}", i.release, i.id, i.node));
                    }
                    set(&mut inst, instance, |i| {
                        i.desired = Desired::Stop;
                        i.health = Health::Stopped;
                    });
                }
                Action::Forget { instance } => inst.retain(|i| &i.id != instance),
            }
        }
        if let Some(new) = p.rollout {
            r = new;
        }
        let t = traffic(&inst, &r, settings);
        if !changes.is_empty() || t != last_traffic {
            steps.push(DryStep {
                at_ms: now,
                changes,
                traffic: t.clone(),
                message: r.message.clone(),
            });
            last_traffic = t;
            quiet = 0;
        }
        if r.state.is_final() {
            return DryRun {
                steps,
                duration_ms: now,
                outcome: r.state.to_string(),
            };
        }
        // Waiting for an operator: nothing more happens by itself.
        quiet += 1;
        if quiet > 100 && r.message.contains("`drover promote") {
            return DryRun {
                steps,
                duration_ms: now,
                outcome: format!("then waits: {}", r.message),
            };
        }
        // Time passes: the world moves.
        now += TICK_MS;
        for i in &mut inst {
            match i.desired {
                Desired::Run
                    if i.health == Health::Starting && now >= i.created_at + timing.ready_ms =>
                {
                    i.health = Health::Healthy
                }
                Desired::Drain { since } if now >= since + timing.drain_ms => i.drained = true,
                _ => {}
            }
        }
    }
    DryRun {
        steps,
        duration_ms: now,
        outcome: format!(
            "not final after {} of simulated time: {}",
            format_ms(now),
            r.message
        ),
    }
}

fn set(inst: &mut [Instance], id: &str, f: impl FnOnce(&mut Instance)) {
    if let Some(i) = inst.iter_mut().find(|i| i.id == id) {
        f(i);
    }
}

/// Percent of users per release after a step.
fn traffic(inst: &[Instance], r: &Rollout, s: &DeploySettings) -> BTreeMap<String, u32> {
    let mut serving: BTreeMap<String, u32> = BTreeMap::new();
    for i in inst.iter().filter(|i| i.serving()) {
        *serving.entry(i.release.clone()).or_default() += 1;
    }
    shares(serving, rollout_split(r, s).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::settings;

    fn live(n: u32) -> (Vec<Instance>, Vec<Node>) {
        let nodes: Vec<Node> = (1..=3)
            .map(|i| Node {
                name: format!("node-{i}"),
                ready: true,
                labels: Default::default(),
            })
            .collect();
        let inst = (0..n)
            .map(|i| Instance {
                id: format!("old-{i}"),
                release: "r1".into(),
                node: format!("node-{}", i % 3 + 1),
                desired: Desired::Run,
                routed: true,
                health: Health::Healthy,
                created_at: 0,
                drained: false,
                last_check: None,
            })
            .collect();
        (inst, nodes)
    }

    const T: Timing = Timing {
        ready_ms: 1_000,
        drain_ms: 500,
    };

    #[test]
    fn a_rolling_dry_run_replaces_one_at_a_time_and_takes_the_expected_time() {
        let s = settings(Strategy::Rolling, 3, 1, 0);
        let (inst, nodes) = live(3);
        let d = dry_run(&s, Some("r1"), "r2", &inst, &nodes, T);
        assert_eq!(d.outcome, "succeeded");
        let starts = d
            .steps
            .iter()
            .flat_map(|s| &s.changes)
            .filter(|c| c.starts_with("start r2"))
            .count();
        let stops = d
            .steps
            .iter()
            .flat_map(|s| &s.changes)
            .filter(|c| c.starts_with("stop r1"))
            .count();
        assert_eq!((starts, stops), (3, 3));
        // Three waves of (ready 1 s, drain 0.5 s): a few seconds in all.
        assert!((3_000..6_000).contains(&d.duration_ms), "{}", d.duration_ms);
        assert_eq!(
            d.steps.last().unwrap().traffic,
            BTreeMap::from([("r2".to_string(), 100)])
        );
    }

    #[test]
    fn a_canary_dry_run_shows_each_step_weight_and_its_pauses() {
        let mut s = settings(Strategy::Canary, 4, 1, 0);
        s.steps = vec![
            CanaryStep {
                weight: 25,
                pause_ms: 60_000,
            },
            CanaryStep {
                weight: 50,
                pause_ms: 60_000,
            },
        ];
        let (inst, nodes) = live(4);
        let d = dry_run(&s, Some("r1"), "r2", &inst, &nodes, T);
        assert_eq!(d.outcome, "succeeded");
        let weights: Vec<u32> = d
            .steps
            .iter()
            .filter_map(|s| s.traffic.get("r2").copied())
            .collect();
        assert!(
            weights.contains(&25) && weights.contains(&50),
            "{weights:?}"
        );
        assert!(
            d.duration_ms >= 120_000,
            "two one-minute pauses: {}",
            d.duration_ms
        );
    }

    #[test]
    fn a_manual_blue_green_dry_run_stops_at_the_promote() {
        let mut s = settings(Strategy::BlueGreen, 2, 1, 0);
        s.auto_promote = false;
        let (inst, nodes) = live(2);
        let d = dry_run(&s, Some("r1"), "r2", &inst, &nodes, T);
        assert!(d.outcome.contains("drover promote"), "{}", d.outcome);
        assert_eq!(
            d.steps.last().unwrap().traffic,
            BTreeMap::from([("r1".to_string(), 100), ("r2".to_string(), 0)])
        );
    }
}
