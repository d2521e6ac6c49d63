//! Property tests of the planner's safety invariants over a small simulated
//! cluster: random health outcomes, crashes, drains and stops, on a fake
//! clock, with the invariants checked after every plan.

use drover_core::planner::{plan, Action, Plan, PlanInput};
use drover_core::Strategy as DeployStrategy;
use drover_core::{
    CanaryStep, DeploySettings, Desired, Health, Instance, Millis, Node, Rollout, RolloutState,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct World {
    instances: Vec<Instance>,
    next_id: u32,
    now: Millis,
}

fn settings(strategy: DeployStrategy, n: u32, surge: u32, unavail: u32) -> DeploySettings {
    DeploySettings {
        strategy,
        instances: n,
        max_surge: surge,
        max_unavailable: unavail,
        health_deadline_ms: 5_000,
        drain_timeout_ms: 2_000,
        stop_timeout_ms: 1_000,
        auto_rollback: true,
        steps: Vec::new(),
        analysis: None,
        auto_promote: true,
        bake_ms: 0,
        partial_users: Vec::new(),
        partial_instances: 0,
        partial_nodes: Default::default(),
        preview_check: None,
    }
}

fn apply(w: &mut World, actions: &[Action]) {
    for a in actions {
        match a {
            Action::Place { release, node } => {
                w.next_id += 1;
                w.instances.push(Instance {
                    id: format!("i{}", w.next_id),
                    release: release.clone(),
                    node: node.clone(),
                    desired: Desired::Run,
                    routed: false,
                    health: Health::Pending,
                    created_at: w.now,
                    drained: false,
                    last_check: None,
                });
            }
            Action::Route { instance } => w.get(instance).routed = true,
            Action::Unroute { instance } => w.get(instance).routed = false,
            Action::Retire { instance } => {
                let now = w.now;
                let i = w.get(instance);
                i.routed = false;
                i.desired = Desired::Drain { since: now };
            }
            Action::Stop { instance } => w.get(instance).desired = Desired::Stop,
            Action::Forget { instance } => w.instances.retain(|i| &i.id != instance),
        }
    }
}

impl World {
    fn get(&mut self, id: &str) -> &mut Instance {
        self.instances
            .iter_mut()
            .find(|i| i.id == id)
            .expect("instance exists")
    }
}

/// One random observation: `roll` picks the instance and outcome.
fn observe(w: &mut World, roll: u32, good_release: &str) {
    if w.instances.is_empty() {
        return;
    }
    let idx = (roll as usize / 7) % w.instances.len();
    let i = &mut w.instances[idx];
    match (i.desired, roll % 7) {
        (Desired::Run, 0..=3) if i.release == good_release || i.release == "r1" => {
            i.health = Health::Healthy
        }
        (Desired::Run, 4) => i.health = Health::Unhealthy,
        (Desired::Run, _) if i.health == Health::Pending => i.health = Health::Starting,
        (Desired::Drain { .. }, _) => i.drained = true,
        (Desired::Stop, _) => i.health = Health::Stopped,
        _ => {}
    }
}

fn run_sim(s: &DeploySettings, events: &[u32], good: bool) -> (World, Rollout) {
    let n = s.instances;
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| Node {
            name: n.to_string(),
            ready: true,
            labels: Default::default(),
        })
        .collect();
    let mut w = World {
        instances: Vec::new(),
        next_id: 0,
        now: 0,
    };
    for k in 0..n {
        w.next_id += 1;
        w.instances.push(Instance {
            id: format!("i{}", w.next_id),
            release: "r1".into(),
            node: nodes[k as usize % 3].name.clone(),
            desired: Desired::Run,
            routed: true,
            health: Health::Healthy,
            created_at: 0,
            drained: false,
            last_check: None,
        });
    }
    let mut r = Rollout {
        id: 1,
        ..Rollout::new("a", "", Some("r1".into()), "r2", 0)
    };
    let good_release = if good { "r2" } else { "r1" };
    let min_available = if s.strategy == DeployStrategy::Recreate {
        0
    } else {
        n - s.max_unavailable
    };
    // Canary and blue/green run their new instances beside all the old
    // ones; after a canary's steps the rest rolls within the surge.
    let max_alive = if s.strategy.splits() {
        (2 * n).max(n + s.max_surge)
    } else {
        n + s.max_surge
    };
    for (step, &e) in events.iter().enumerate() {
        w.now += 250;
        observe(&mut w, e, good_release);
        let before_serving = w.instances.iter().filter(|i| i.serving()).count() as u32;
        let before_alive = w.instances.iter().filter(|i| i.alive()).count() as u32;
        let was_final = r.state.is_final();
        let p = plan_now(s, &r, &w, &nodes);
        for a in &p.actions {
            match a {
                Action::Route { instance } => {
                    let i = w.instances.iter().find(|i| &i.id == instance).unwrap();
                    assert_eq!(
                        i.health,
                        Health::Healthy,
                        "step {step}: routed an unhealthy instance {i:?}"
                    );
                }
                Action::Stop { instance } => {
                    let i = w.instances.iter().find(|i| &i.id == instance).unwrap();
                    assert!(
                        i.drained,
                        "step {step}: stopped an undrained instance {i:?}"
                    );
                }
                Action::Place { .. } | Action::Retire { .. } => {
                    assert!(!was_final, "step {step}: a final rollout acted: {a}");
                }
                _ => {}
            }
        }
        apply(&mut w, &p.actions);
        let after_alive = w.instances.iter().filter(|i| i.alive()).count() as u32;
        let after_serving = w.instances.iter().filter(|i| i.serving()).count() as u32;
        assert!(
            after_alive <= max_alive.max(before_alive),
            "step {step}: {after_alive} alive > {max_alive}"
        );
        assert!(
            after_serving >= min_available.min(before_serving),
            "step {step}: serving dropped from {before_serving} to {after_serving} (< {min_available})"
        );
        if let Some(nr) = p.rollout {
            r = nr;
        }
        if r.state.is_final() {
            // One more plan must be a no-op for a final rollout.
            let p = plan_now(s, &r, &w, &nodes);
            assert!(
                p.actions
                    .iter()
                    .all(|a| !matches!(a, Action::Place { .. } | Action::Retire { .. })),
                "final rollout acted: {:?}",
                p.actions
            );
            break;
        }
    }
    (w, r)
}

/// The planner's answer for the world as it is now (live release r1 until
/// the rollout succeeds).
fn plan_now(s: &DeploySettings, r: &Rollout, w: &World, nodes: &[Node]) -> Plan {
    let live = match r.state {
        RolloutState::Succeeded => Some(r.to.as_str()),
        _ => r.from.as_deref(),
    };
    plan(&PlanInput {
        settings: s,
        rollout: Some(r),
        live,
        instances: &w.instances,
        nodes,
        now: w.now,
        verdict: None,
    })
}

fn strategy_settings() -> impl proptest::strategy::Strategy<Value = DeploySettings> {
    (1u32..6, 0u32..3, 0u32..3, 0u8..4, 1u32..=100).prop_filter_map(
        "surge or unavailable",
        |(n, surge, unavail, kind, weight)| {
            if kind == 0 {
                return Some(settings(DeployStrategy::Recreate, n, 0, 0));
            }
            if surge == 0 && unavail == 0 || unavail > n {
                return None;
            }
            let mut s = settings(DeployStrategy::Rolling, n, surge, unavail);
            match kind {
                2 => {
                    s.strategy = DeployStrategy::Canary;
                    s.steps = vec![
                        CanaryStep {
                            weight,
                            pause_ms: 500,
                        },
                        CanaryStep {
                            weight: 100,
                            pause_ms: 0,
                        },
                    ];
                }
                3 => {
                    s.strategy = DeployStrategy::BlueGreen;
                    s.bake_ms = 1_000;
                }
                _ => {}
            }
            Some(s)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn safety_invariants_hold_under_random_observations(s in strategy_settings(), events in prop::collection::vec(any::<u32>(), 1..400), good in any::<bool>()) {
        run_sim(&s, &events, good);
    }

    #[test]
    fn a_good_release_eventually_succeeds_and_a_bad_one_rolls_back(s in strategy_settings(), seed in any::<u32>(), good in any::<bool>()) {
        // Enough observations to finish: a deterministic stream cycling all outcomes.
        // No random health flaps here (those may legitimately fail a rollout);
        // health deadline long enough for every instance to be observed.
        let events: Vec<u32> = (0..4000u32)
            .map(|k| k.wrapping_mul(2654435761).wrapping_add(seed) % 1_000_003)
            .map(|e| if e % 7 == 4 { e + 1 } else { e })
            .collect();
        let mut s = s;
        s.health_deadline_ms = 100_000;
        let (w, r) = run_sim(&s, &events, good);
        let expect = if good { RolloutState::Succeeded } else { RolloutState::RolledBack };
        prop_assert_eq!(r.state, expect, "{:?}", r);
        let live = if good { "r2" } else { "r1" };
        let serving = w.instances.iter().filter(|i| i.serving() && i.release == live).count() as u32;
        prop_assert_eq!(serving, s.instances);
        prop_assert!(w.instances.iter().all(|i| i.release == live), "{:?}", w.instances);
    }
}
