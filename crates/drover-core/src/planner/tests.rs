//! Table-driven planner tests through one helper, [`check`]: instances are
//! written one per line, the expected plan as text.
//!
//! Instance line: `id release node desired health [routed] [drained] [t=MS]`
//! where desired ∈ run|drain|stop and health ∈ pending|starting|healthy|
//! unhealthy|failed|stopped. `t` is the creation time (default 0).

use super::*;

pub(crate) fn settings(strategy: Strategy, n: u32, surge: u32, unavail: u32) -> DeploySettings {
    DeploySettings {
        strategy,
        instances: n,
        max_surge: surge,
        max_unavailable: unavail,
        health_deadline_ms: 60_000,
        drain_timeout_ms: 30_000,
        stop_timeout_ms: 10_000,
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

pub(crate) fn rollout(from: Option<&str>, to: &str) -> Rollout {
    Rollout {
        id: 1,
        state: RolloutState::Progressing,
        ..Rollout::new("hello", "", from.map(Into::into), to, 0)
    }
}

fn parse_instances(text: &str) -> Vec<Instance> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let desired = match w[3] {
                "run" => Desired::Run,
                "drain" => Desired::Drain { since: 0 },
                "stop" => Desired::Stop,
                d => panic!("bad desired {d}"),
            };
            let health = match w[4] {
                "pending" => Health::Pending,
                "starting" => Health::Starting,
                "healthy" => Health::Healthy,
                "unhealthy" => Health::Unhealthy,
                "failed" => Health::Failed,
                "stopped" => Health::Stopped,
                h => panic!("bad health {h}"),
            };
            let created_at = w[5..]
                .iter()
                .find_map(|f| f.strip_prefix("t="))
                .map(|t| t.parse().unwrap())
                .unwrap_or(0);
            Instance {
                id: w[0].into(),
                release: w[1].into(),
                node: w[2].into(),
                desired,
                routed: w[5..].contains(&"routed"),
                health,
                created_at,
                drained: w[5..].contains(&"drained"),
                last_check: Some("GET /healthz → 503".into()),
            }
        })
        .collect()
}

fn nodes(names: &[&str]) -> Vec<Node> {
    names
        .iter()
        .map(|n| Node {
            name: n.to_string(),
            ready: true,
            labels: Default::default(),
        })
        .collect()
}

/// Runs the planner and compares its actions (and the rollout state, when
/// `state` is given) with the expectation.
fn check(
    s: &DeploySettings,
    r: Option<&Rollout>,
    instances: &str,
    now: Millis,
    expect: &[&str],
    state: Option<RolloutState>,
) -> Plan {
    check_lost(s, r, instances, now, &[], expect, state)
}

/// [`check`] with the nodes of `lost` past their lease.
fn check_lost(
    s: &DeploySettings,
    r: Option<&Rollout>,
    instances: &str,
    now: Millis,
    lost: &[&str],
    expect: &[&str],
    state: Option<RolloutState>,
) -> Plan {
    let inst = parse_instances(instances);
    let mut ns = nodes(&["n1", "n2", "n3"]);
    for n in ns.iter_mut() {
        n.ready = !lost.contains(&n.name.as_str());
    }
    let plan = plan(&PlanInput {
        settings: s,
        rollout: r,
        live: Some("r1"),
        instances: &inst,
        nodes: &ns,
        now,
        verdict: None,
    });
    let got: Vec<String> = plan.actions.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        got, expect,
        "\nplan for:\n{instances}\nrollout: {:?}",
        plan.rollout
    );
    if let Some(st) = state {
        let got = plan
            .rollout
            .as_ref()
            .map(|r| r.state)
            .or(r.map(|r| r.state));
        assert_eq!(got, Some(st), "rollout: {:?}", plan.rollout);
    }
    plan
}

const THREE_R1: &str = "
    a r1 n1 run healthy routed
    b r1 n2 run healthy routed
    c r1 n3 run healthy routed";

#[test]
fn rolling_with_surge_starts_one_new_instance_and_retires_nothing() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        THREE_R1,
        1,
        &["place r2 on n1"],
        Some(RolloutState::Progressing),
    );
}

#[test]
fn rolling_waits_while_the_new_instance_is_starting() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = format!("{THREE_R1}\n d r2 n1 run starting t=0");
    let plan = check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        &inst,
        5_000,
        &[],
        None,
    );
    let msg = plan.rollout.unwrap().message;
    assert!(
        msg.contains("waiting for d on n1 to become healthy"),
        "{msg}"
    );
    assert!(msg.contains("GET /healthz → 503"), "{msg}");
}

#[test]
fn rolling_routes_a_healthy_new_instance_then_retires_one_old() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = format!("{THREE_R1}\n d r2 n1 run healthy");
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        &inst,
        1,
        &["route d", "retire a"],
        None,
    );
}

#[test]
fn rolling_does_not_start_more_while_a_retired_instance_is_still_alive() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        a r1 n1 drain healthy
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        d r2 n1 run healthy routed";
    check(&s, Some(&rollout(Some("r1"), "r2")), inst, 1, &[], None);
}

#[test]
fn a_drained_instance_is_stopped_and_a_stopped_one_forgotten() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        a r1 n1 drain healthy drained
        x r1 n1 stop stopped
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        d r2 n1 run healthy routed";
    // x is gone, a is stopping (still alive): no room to place yet.
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        inst,
        1,
        &["stop a", "forget x"],
        None,
    );
}

#[test]
fn rolling_with_unavailable_and_no_surge_retires_first_then_places() {
    let s = settings(Strategy::Rolling, 3, 0, 1);
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        THREE_R1,
        1,
        &["retire a"],
        None,
    );
    let inst = "
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed";
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        inst,
        1,
        &["place r2 on n1"],
        None,
    );
}

#[test]
fn rolling_finishes_when_all_new_serve_and_no_old_remains() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        d r2 n1 run healthy routed
        e r2 n2 run healthy routed
        f r2 n3 run healthy
        c r1 n3 stop stopped";
    let plan = check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        inst,
        1,
        &["forget c", "route f"],
        Some(RolloutState::Succeeded),
    );
    assert_eq!(plan.rollout.unwrap().step, 3);
}

#[test]
fn an_unhealthy_routed_instance_leaves_routing_but_keeps_running() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        a r1 n1 run unhealthy routed
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed";
    check(&s, None, inst, 1, &["unroute a"], None);
}

#[test]
fn steady_state_routes_healthy_instances_of_the_live_release() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        a r1 n1 run healthy
        b r1 n2 run starting
        c r1 n3 run healthy routed";
    check(&s, None, inst, 1, &["route a"], None);
}

#[test]
fn steady_state_keeps_the_live_release_at_its_instance_count() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = "
        a r1 n1 run healthy routed
        b r1 n2 run healthy routed";
    check(&s, None, inst, 1, &["place r1 on n3"], None);
}

#[test]
fn a_lost_nodes_instances_are_retired_and_replaced_on_ready_nodes() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    check_lost(
        &s,
        None,
        THREE_R1,
        1,
        &["n2"],
        &["retire b", "place r1 on n1"],
        None,
    );
    // Retired there, it no longer counts; once drained its stop waits for
    // the agent, and the replacement is not placed twice.
    let inst = "
        a r1 n1 run healthy routed
        b r1 n2 stop unhealthy
        c r1 n3 run healthy routed
        d r1 n1 run starting";
    check_lost(&s, None, inst, 2, &["n2"], &[], None);
    // The node is back and its agent stopped the stale copy: forgotten.
    let inst = "
        a r1 n1 run healthy routed
        b r1 n2 stop stopped
        c r1 n3 run healthy routed
        d r1 n1 run healthy";
    check(&s, None, inst, 3, &["forget b", "route d"], None);
}

#[test]
fn a_rollout_replaces_a_lost_nodes_instances_without_counting_them_against_surge() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let r = rollout(Some("r1"), "r2");
    // n3 lost with an old instance: it is retired and does not use up the
    // one instance of surge.
    let inst = "
        a r1 n1 run healthy routed
        b r1 n2 run healthy routed
        c r1 n3 drain unhealthy";
    check_lost(
        &s,
        Some(&r),
        inst,
        1,
        &["n3"],
        &["place r2 on n1", "place r2 on n2"],
        None,
    );
}

#[test]
fn an_instance_not_healthy_by_its_deadline_fails_the_rollout_and_starts_the_rollback() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let inst = format!("{THREE_R1}\n d r2 n1 run unhealthy t=0");
    let plan = check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        &inst,
        60_001,
        &["retire d"],
        Some(RolloutState::Progressing),
    );
    let r = plan.rollout.unwrap();
    assert!(r.reverting);
    assert!(
        r.failure
            .as_deref()
            .unwrap()
            .contains("instance d of r2 on n1 was not healthy within 1m"),
        "{r:?}"
    );
    assert!(r.message.starts_with("rolling back to r1"), "{r:?}");
}

#[test]
fn a_rollback_keeps_old_instances_until_replacements_serve() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let mut r = rollout(Some("r1"), "r2");
    r.reverting = true;
    r.reverted_at = Some(100);
    r.failure = Some("boom".into());
    // One r1 was already replaced by a healthy r2; the rollback brings r1 back first.
    let inst = "
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        d r2 n1 run healthy routed
        e r2 n1 run starting";
    check(&s, Some(&r), inst, 200, &["retire e"], None);
    let inst = "
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        d r2 n1 run healthy routed";
    check(&s, Some(&r), inst, 200, &["place r1 on n1"], None);
    let inst = "
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        d r2 n1 run healthy routed
        f r1 n1 run healthy t=150";
    check(&s, Some(&r), inst, 200, &["route f", "retire d"], None);
    let inst = "
        b r1 n2 run healthy routed
        c r1 n3 run healthy routed
        f r1 n1 run healthy routed t=150";
    check(&s, Some(&r), inst, 200, &[], Some(RolloutState::RolledBack));
}

#[test]
fn a_failed_rollout_places_and_retires_nothing() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let mut r = rollout(Some("r1"), "r2");
    r.state = RolloutState::Failed;
    let inst = "
        a r1 n1 run healthy routed
        d r2 n1 run unhealthy";
    check(
        &s,
        Some(&r),
        inst,
        1_000_000,
        &[],
        Some(RolloutState::Failed),
    );
}

#[test]
fn without_auto_rollback_a_late_instance_fails_the_rollout_in_place() {
    let mut s = settings(Strategy::Rolling, 3, 1, 0);
    s.auto_rollback = false;
    let inst = format!("{THREE_R1}\n d r2 n1 run starting t=0");
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        &inst,
        60_001,
        &[],
        Some(RolloutState::Failed),
    );
}

#[test]
fn a_first_deploy_places_all_instances_across_nodes() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    check(
        &s,
        Some(&rollout(None, "r1")),
        "",
        1,
        &["place r1 on n1", "place r1 on n2", "place r1 on n3"],
        None,
    );
}

#[test]
fn a_paused_rollout_only_keeps_routing_right() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let mut r = rollout(Some("r1"), "r2");
    r.state = RolloutState::Paused;
    let inst = format!("{THREE_R1}\n d r2 n1 run healthy");
    check(
        &s,
        Some(&r),
        &inst,
        1,
        &["route d"],
        Some(RolloutState::Paused),
    );
}

#[test]
fn recreate_retires_all_old_then_places_all_new() {
    let s = settings(Strategy::Recreate, 3, 0, 0);
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        THREE_R1,
        1,
        &["retire a", "retire b", "retire c"],
        None,
    );
    let inst = "
        a r1 n1 stop stopping";
    let inst = inst.replace("stopping", "healthy");
    check(&s, Some(&rollout(Some("r1"), "r2")), &inst, 1, &[], None);
    check(
        &s,
        Some(&rollout(Some("r1"), "r2")),
        "",
        1,
        &["place r1 on n1", "place r1 on n2", "place r1 on n3"]
            .map(|a| a.replace("r1", "r2"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        None,
    );
}

#[test]
fn recreate_aborted_while_the_old_instances_drain_waits_for_them_to_stop() {
    // Found by the simulation (tests/sim.rs): r1 → r2 retired all of r1,
    // then the operator aborted. Reverting to r1 must not start three
    // fresh r1 beside the three still draining (6 alive > instances +
    // max_surge); it starts them once those have stopped.
    let s = settings(Strategy::Recreate, 3, 0, 0);
    let mut r = rollout(Some("r1"), "r2");
    r.reverting = true;
    r.reverted_at = Some(1);
    let draining = "
        a r1 n1 drain healthy
        b r1 n2 drain healthy
        c r1 n3 stop unhealthy";
    check(&s, Some(&r), draining, 2, &[], None);
    check(
        &s,
        Some(&r),
        "c r1 n3 stop stopped",
        2,
        &[
            "forget c",
            "place r1 on n1",
            "place r1 on n2",
            "place r1 on n3",
        ],
        None,
    );
}

#[test]
fn a_rollout_without_progress_fails_at_its_progress_deadline() {
    let s = settings(Strategy::Rolling, 3, 1, 0);
    // No ready nodes: nothing can be placed.
    let inst = parse_instances(THREE_R1);
    let r = rollout(Some("r1"), "r2");
    let nodes = vec![Node {
        name: "n1".into(),
        ready: false,
        labels: Default::default(),
    }];
    let now = s.progress_deadline_ms() + 1;
    let plan = plan(&PlanInput {
        settings: &s,
        rollout: Some(&r),
        live: Some("r1"),
        instances: &inst,
        nodes: &nodes,
        now,
        verdict: None,
    });
    let r = plan.rollout.unwrap();
    assert!(r.failure.unwrap().starts_with("no progress for"));
}

// ---------------------------------------------------------------- canary ----

fn canary_settings() -> DeploySettings {
    let mut s = settings(Strategy::Canary, 3, 1, 0);
    s.steps = vec![
        CanaryStep {
            weight: 10,
            pause_ms: 1_000,
        },
        CanaryStep {
            weight: 50,
            pause_ms: 0,
        },
    ];
    s.analysis = Some(AnalysisSettings {
        max_error_rate: Some(0.01),
        max_p99_ms: None,
        min_requests: 20,
        interval_ms: 500,
        deadline_ms: 10_000,
        builtin: true,
        prometheus: None,
        queries: Vec::new(),
    });
    s
}

fn canary_plan(
    s: &DeploySettings,
    r: &Rollout,
    instances: &str,
    now: Millis,
    verdict: Option<&Verdict>,
) -> Plan {
    let inst = parse_instances(instances);
    let ns = nodes(&["n1", "n2", "n3"]);
    plan(&PlanInput {
        settings: s,
        rollout: Some(r),
        live: Some("r1"),
        instances: &inst,
        nodes: &ns,
        now,
        verdict,
    })
}

fn actions(p: &Plan) -> Vec<String> {
    p.actions.iter().map(|a| a.to_string()).collect()
}

#[test]
fn a_partial_by_node_label_places_the_new_release_only_on_matching_nodes() {
    let mut s = settings(Strategy::Partial, 3, 1, 0);
    s.steps = vec![CanaryStep {
        weight: 0,
        pause_ms: u64::MAX,
    }];
    s.partial_instances = 1;
    s.partial_nodes = [("region".to_string(), "eu".to_string())].into();
    let mut ns = nodes(&["n1", "n2", "n3"]);
    ns[2].labels = s.partial_nodes.clone();
    let inst = parse_instances(THREE_R1);
    let r = rollout(Some("r1"), "r2");
    let input = |ns: &[Node]| {
        plan(&PlanInput {
            settings: &s,
            rollout: Some(&r),
            live: Some("r1"),
            instances: &inst,
            nodes: ns,
            now: 0,
            verdict: None,
        })
    };
    // n1 is the least loaded by name, but only n3 is in region=eu.
    let p = input(&ns);
    assert_eq!(actions(&p), ["place r2 on n3"]);
    assert!(
        p.rollout
            .unwrap()
            .message
            .contains("users of proxies with region=eu"),
        "the segment is named"
    );
    // No ready node in the segment (n3 lost: its old instance is retired):
    // nothing is placed, and it says why.
    ns[2].ready = false;
    let p = input(&ns);
    assert_eq!(actions(&p), ["retire c"]);
    let msg = p.rollout.unwrap().message;
    assert!(msg.contains("no ready node has region=eu"), "{msg}");
}

#[test]
fn a_canary_step_adds_its_share_of_new_instances_and_retires_no_old_one() {
    let s = canary_settings();
    let r = rollout(Some("r1"), "r2");
    let p = canary_plan(&s, &r, THREE_R1, 0, None);
    assert_eq!(actions(&p), ["place r2 on n1"], "ceil(3 × 10%) = 1");
    let r = p.rollout.unwrap();
    let cp = r.canary.clone().unwrap();
    assert_eq!((cp.step, cp.weight, cp.step_started_at), (0, 0, None));
    assert!(
        r.message.contains("step 1/2 (10% of users)"),
        "{}",
        r.message
    );

    // Healthy: routed, the weight applies and the step's window starts.
    let with_new = format!("{THREE_R1}\n d r2 n1 run healthy");
    let p = canary_plan(&s, &r, &with_new, 100, None);
    assert_eq!(actions(&p), ["route d"]);
    let cp = p.rollout.as_ref().unwrap().canary.clone().unwrap();
    assert_eq!((cp.weight, cp.step_started_at), (10, Some(100)));
}

#[test]
fn a_canary_step_passes_only_after_its_pause_and_a_passing_verdict() {
    let s = canary_settings();
    let mut r = rollout(Some("r1"), "r2");
    r.canary = Some(CanaryProgress {
        step: 0,
        weight: 10,
        step_started_at: Some(1_000),
        analysis: None,
        window_started_at: None,
    });
    let inst = format!("{THREE_R1}\n d r2 n1 run healthy routed");
    let pass = Verdict::Pass("passed: error rate 0.00% (0/40)".into());
    let low = Verdict::Inconclusive("inconclusive: 3 request(s)".into());
    // Pause not over: holds even with a pass.
    let p = canary_plan(&s, &r, &inst, 1_500, Some(&pass));
    let held = p.rollout.unwrap();
    assert_eq!(held.canary.as_ref().unwrap().step, 0);
    assert!(
        held.message.contains("pause, 500ms left"),
        "{}",
        held.message
    );
    // Pause over, too few requests: holds, never passes.
    let p = canary_plan(&s, &r, &inst, 2_500, Some(&low));
    assert_eq!(p.rollout.unwrap().canary.unwrap().step, 0);
    // Pause over and a pass: next step, whose instances come first.
    let p = canary_plan(&s, &r, &inst, 2_500, Some(&pass));
    let next = p.rollout.unwrap();
    let cp = next.canary.clone().unwrap();
    assert_eq!((cp.step, cp.weight, cp.step_started_at), (1, 10, None));
    let p = canary_plan(&s, &next, &inst, 2_600, None);
    assert_eq!(actions(&p), ["place r2 on n2"], "ceil(3 × 50%) = 2");
}

#[test]
fn a_failing_verdict_rolls_back_and_an_inconclusive_one_fails_at_the_deadline() {
    let s = canary_settings();
    let mut r = rollout(Some("r1"), "r2");
    r.canary = Some(CanaryProgress {
        step: 0,
        weight: 10,
        step_started_at: Some(1_000),
        analysis: None,
        window_started_at: None,
    });
    let inst = format!("{THREE_R1}\n d r2 n1 run healthy routed");
    let bad =
        Verdict::Fail("error rate 5.00% (5 of 100 requests) is above the threshold 1.00%".into());
    let p = canary_plan(&s, &r, &inst, 1_200, Some(&bad));
    assert_eq!(
        actions(&p),
        ["retire d"],
        "the canary goes, the old ones stay"
    );
    let back = p.rollout.unwrap();
    assert!(back.reverting);
    assert!(back
        .failure
        .as_deref()
        .unwrap()
        .contains("above the threshold 1.00%"));

    let low =
        Verdict::Inconclusive("inconclusive: 3 request(s) to the new release, 20 needed".into());
    let p = canary_plan(&s, &r, &inst, 1_000 + 10_001, Some(&low));
    let back = p.rollout.unwrap();
    assert!(back.reverting);
    assert!(
        back.failure
            .as_deref()
            .unwrap()
            .contains("was still inconclusive"),
        "{:?}",
        back.failure
    );
}

#[test]
fn after_the_last_step_the_rest_rolls_and_the_rollout_succeeds() {
    let s = canary_settings();
    let mut r = rollout(Some("r1"), "r2");
    r.canary = Some(CanaryProgress {
        step: 2,
        weight: 50,
        step_started_at: None,
        analysis: None,
        window_started_at: None,
    });
    let inst = format!("{THREE_R1}\n d r2 n1 run healthy routed\n e r2 n2 run healthy routed");
    let p = canary_plan(&s, &r, &inst, 5_000, None);
    // Rolling from here: old ones leave while `instances` stay serving; the
    // last new one comes once the drained ones free surge room.
    assert_eq!(actions(&p), ["retire a", "retire b"]);
    let done = "
        d r2 n1 run healthy routed
        e r2 n2 run healthy routed
        f r2 n3 run healthy routed";
    let p = canary_plan(&s, &r, done, 6_000, None);
    assert_eq!(p.rollout.unwrap().state, RolloutState::Succeeded);
}

#[test]
fn canary_instances_round_up_and_stay_within_the_instance_count() {
    assert_eq!(canary_instances(3, 0), 0);
    assert_eq!(canary_instances(3, 1), 1);
    assert_eq!(canary_instances(3, 34), 2);
    assert_eq!(canary_instances(10, 25), 3);
    assert_eq!(canary_instances(4, 100), 4);
}

// ------------------------------------------------------------ blue/green ----

fn blue_green_settings(auto_promote: bool) -> DeploySettings {
    let mut s = settings(Strategy::BlueGreen, 3, 1, 0);
    s.auto_promote = auto_promote;
    s.bake_ms = 60_000;
    s
}

const THREE_R1_THREE_R2: &str = "
    a r1 n1 run healthy routed
    b r1 n2 run healthy routed
    c r1 n3 run healthy routed
    d r2 n1 run healthy routed
    e r2 n2 run healthy routed
    f r2 n3 run healthy routed";

#[test]
fn blue_green_starts_a_full_new_set_beside_the_old_and_waits_for_promote() {
    let s = blue_green_settings(false);
    let r = rollout(Some("r1"), "r2");
    let p = canary_plan(&s, &r, THREE_R1, 0, None);
    assert_eq!(
        actions(&p),
        ["place r2 on n1", "place r2 on n2", "place r2 on n3"],
        "the whole set at once, no old one retired"
    );
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 1_000, None);
    assert!(actions(&p).is_empty());
    let held = p.rollout.unwrap();
    assert_eq!(held.blue_green.as_ref().unwrap().switched_at, None);
    assert!(
        held.message.contains("waiting for `drover promote hello`"),
        "{}",
        held.message
    );

    let mut promoted = held.clone();
    promoted.blue_green = Some(BlueGreenProgress {
        promoted: true,
        switched_at: None,
    });
    let p = canary_plan(&s, &promoted, THREE_R1_THREE_R2, 2_000, None);
    assert!(
        actions(&p).is_empty(),
        "the switch is a routing change only"
    );
    let switched = p.rollout.unwrap();
    assert_eq!(
        switched.blue_green.as_ref().unwrap().switched_at,
        Some(2_000)
    );
}

#[test]
fn blue_green_keeps_the_old_set_warm_for_the_bake_then_retires_it_and_rollback_is_a_flip() {
    let s = blue_green_settings(true);
    let mut r = rollout(Some("r1"), "r2");
    r.blue_green = Some(BlueGreenProgress {
        promoted: false,
        switched_at: Some(10_000),
    });
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 30_000, None);
    assert!(actions(&p).is_empty(), "baking: nothing retired");
    assert!(p.rollout.unwrap().message.contains("40s left"));
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 70_001, None);
    assert_eq!(actions(&p), ["retire a", "retire b", "retire c"]);

    // Rolled back inside the bake: the new set goes, the warm old one stays.
    let mut back = r.clone();
    back.reverting = true;
    back.reverted_at = Some(30_000);
    let p = canary_plan(&s, &back, THREE_R1_THREE_R2, 30_000, None);
    assert_eq!(actions(&p), ["retire d", "retire e", "retire f"]);
}

#[test]
fn blue_green_with_a_preview_check_switches_only_on_its_pass_and_fails_on_its_failure() {
    let mut s = blue_green_settings(true);
    s.preview_check = Some("/ready".into());
    let r = rollout(Some("r1"), "r2");
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 1_000, None);
    let bg = p.rollout.unwrap().blue_green.unwrap();
    assert_eq!(bg.switched_at, None, "no verdict yet: no switch");
    let pass = Verdict::Pass("GET /ready answered 2xx".into());
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 1_000, Some(&pass));
    assert_eq!(
        p.rollout.unwrap().blue_green.unwrap().switched_at,
        Some(1_000)
    );
    let fail = Verdict::Fail("GET /ready on 127.0.0.1:1 answered 503".into());
    let p = canary_plan(&s, &r, THREE_R1_THREE_R2, 1_000, Some(&fail));
    let back = p.rollout.unwrap();
    assert!(back.reverting);
    assert!(back
        .failure
        .unwrap()
        .contains("the preview check of r2 failed"));
}

#[test]
fn a_rollout_that_supersedes_a_canary_retires_the_canary_at_once() {
    // r1 live; a canary of r2 had one instance at its first step; a new
    // rollout r1 → r3 supersedes it: r2 leaves routing now, r1 keeps serving.
    let s = canary_settings();
    let r = rollout(Some("r1"), "r3");
    let with_canary = format!("{THREE_R1}\n d r2 n1 run healthy routed");
    let p = canary_plan(&s, &r, &with_canary, 0, None);
    assert_eq!(actions(&p), ["retire d", "place r3 on n2"]);
}

#[test]
fn a_rollout_that_supersedes_a_blue_green_preview_retires_the_preview_set() {
    let mut s = settings(Strategy::BlueGreen, 3, 1, 0);
    s.auto_promote = false;
    let r = rollout(Some("r1"), "r3");
    check(
        &s,
        Some(&r),
        &THREE_R1_THREE_R2.replace("d r2 n1 run healthy routed", "d r2 n1 run healthy"),
        0,
        &[
            "retire d",
            "retire e",
            "retire f",
            "place r3 on n1",
            "place r3 on n2",
            "place r3 on n3",
        ],
        None,
    );
}

#[test]
fn leftovers_that_carry_the_floor_stay_until_replaced() {
    // The superseded canary had replaced most of r1 (past its steps): r1
    // serves 1 of 3, below the floor of 3 — r2's serving instances stay, a
    // crashed one goes.
    let s = settings(Strategy::Rolling, 3, 1, 0);
    let r = rollout(Some("r1"), "r3");
    check(
        &s,
        Some(&r),
        "
        a r1 n1 run healthy routed
        d r2 n2 run healthy routed
        e r2 n3 run healthy routed
        f r2 n3 run failed",
        0,
        // f drains (still alive): the surge of 1 is used until it stops.
        &["retire f"],
        None,
    );
}
