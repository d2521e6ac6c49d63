//! The invariants (listed in `tests/sim.rs`): of every plan against its
//! input, of the store after every persisted step and world event, and of
//! the outcome once the faults have stopped.

use super::engine::Input;
use super::scenario::{Class, Scenario, Traffic};
use super::world::{PState, World};
use drover_core::analysis::Verdict;
use drover_core::planner::{canary_instances, Action, Plan};
use drover_core::{Desired, Health, Instance, Millis, Rollout, RolloutState, Strategy};
use std::collections::{BTreeMap, BTreeSet};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

/// Alive instances a plan may bring about (ARCHITECTURE.md, *Bounds*).
pub fn max_alive(s: &drover_core::DeploySettings) -> u32 {
    let n = s.instances;
    if s.strategy.splits() {
        (2 * n).max(n + s.max_surge)
    } else {
        n + s.max_surge
    }
}

/// Instances a canary (or partial) step runs of its new release.
fn step_instances(s: &drover_core::DeploySettings, step: usize) -> u32 {
    if s.strategy == Strategy::Partial {
        s.partial_instances.clamp(1, s.instances)
    } else {
        canary_instances(s.instances, s.steps[step].weight)
    }
}

/// Whether `r` is in a canary (or partial) step, where old instances stay.
fn in_canary_steps(r: &Rollout, s: &drover_core::DeploySettings) -> bool {
    matches!(s.strategy, Strategy::Canary | Strategy::Partial)
        && !r.reverting
        && r.from.is_some()
        && r.canary.as_ref().map_or(0, |c| c.step as usize) < s.steps.len()
}

/// Whether `r` is a blue/green rollout before the end of its bake, where
/// the old set stays.
fn before_bake(r: &Rollout, s: &drover_core::DeploySettings, now: Millis) -> bool {
    s.strategy == Strategy::BlueGreen
        && !r.reverting
        && r.from.is_some()
        && r.blue_green
            .as_ref()
            .and_then(|b| b.switched_at)
            .is_none_or(|t| now.saturating_sub(t) < s.bake_ms)
}

/// What a plan did that the invariants allow but the report counts.
#[derive(Debug, Default)]
pub struct Notes {
    /// More alive than max(2n, n + surge), in a canary/blue-green split
    /// phase that did not start clean.
    pub over_bound: bool,
}

/// Checks one plan against the input it was made from. The instance view is
/// the planner's: the input with the plan's actions applied in order.
pub fn plan(input: &Input, p: &Plan) -> Result<Notes, String> {
    let s = &input.settings;
    let n = s.instances;
    let now = input.now;
    let old = input.rollout.as_ref();
    let active = old.filter(|r| !r.state.is_final());
    let paused = active.is_some_and(|r| r.state == RolloutState::Paused);
    // The rollout after this plan (a failure may have turned it around).
    let new = p.rollout.as_ref().or(old);
    let target = new.and_then(|r| r.target().map(str::to_string));

    if let (Some(o), Some(nr)) = (old, &p.rollout) {
        ensure!(!o.state.is_final(), "a final rollout was updated: {nr:?}");
        ensure!(
            nr.id == o.id && nr.from == o.from && nr.to == o.to,
            "the plan changed the rollout's identity: {o:?} → {nr:?}"
        );
        ensure!(
            !o.reverting || nr.reverting,
            "a rollback turned forward again"
        );
    }

    let mut view: BTreeMap<String, Instance> = input
        .instances
        .iter()
        .map(|i| (i.id.clone(), i.clone()))
        .collect();
    let input_of: BTreeMap<&str, &Instance> =
        input.instances.iter().map(|i| (i.id.as_str(), i)).collect();
    // A node past its lease is lost: what should run there is retired and
    // replaced, and no longer counts as alive.
    let lost: BTreeSet<&str> = input
        .nodes
        .iter()
        .filter(|n| !n.ready)
        .map(|n| n.name.as_str())
        .collect();
    let counts = |i: &Instance| i.alive() && !lost.contains(i.node.as_str());
    let alive = |v: &BTreeMap<String, Instance>| v.values().filter(|i| counts(i)).count() as u32;
    let failed = old.is_some_and(|r| r.state == RolloutState::Failed);
    let serving =
        |v: &BTreeMap<String, Instance>| v.values().filter(|i| i.serving()).count() as u32;
    let before_alive = alive(&view);
    let before_serving = serving(&view);
    let mut placed = 0;
    let mut retired: Vec<String> = Vec::new();

    for a in &p.actions {
        match a {
            Action::Place { release, node } => {
                if active.is_none() {
                    // The steady state keeps the live release at n.
                    ensure!(
                        input.live.as_deref() == Some(release.as_str()) && !failed,
                        "{a}: placed without a progressing rollout, not the live release {:?} (or after a failure)",
                        input.live
                    );
                    let running = view
                        .values()
                        .filter(|i| i.release == *release && i.desired == Desired::Run)
                        .count() as u32;
                    ensure!(
                        running < n,
                        "{a}: the live release already runs {running} of {n}"
                    );
                } else {
                    ensure!(!paused, "{a}: placed without a progressing rollout");
                    let r = new.expect("active");
                    ensure!(
                        target.as_deref() == Some(release.as_str()) && !r.state.is_final(),
                        "{a}: not the target of rollout {r:?}"
                    );
                    ensure!(
                        Some(release) == r.from.as_ref() || *release == r.to,
                        "{a}: a release outside from/to"
                    );
                }
                ensure!(
                    input.nodes.iter().any(|n| n.name == *node && n.ready),
                    "{a}: not a ready node the environment allows"
                );
                placed += 1;
                let id = format!("+{placed}");
                view.insert(
                    id.clone(),
                    Instance {
                        id,
                        release: release.clone(),
                        node: node.clone(),
                        desired: Desired::Run,
                        routed: false,
                        health: Health::Pending,
                        created_at: now,
                        drained: false,
                        last_check: None,
                    },
                );
            }
            Action::Route { instance } => {
                let want = if active.is_some() {
                    target.clone()
                } else {
                    input.live.clone()
                };
                let i = view
                    .get_mut(instance)
                    .ok_or_else(|| format!("{a}: no such instance"))?;
                ensure!(
                    i.desired == Desired::Run && i.health == Health::Healthy && !i.routed,
                    "{a}: routed an instance that is not a healthy unrouted running one: {i:?}"
                );
                ensure!(
                    want.as_deref() == Some(i.release.as_str()),
                    "{a}: routed {} but the rollout moves to {want:?}",
                    i.release
                );
                i.routed = true;
            }
            Action::Unroute { instance } => {
                let i = view
                    .get_mut(instance)
                    .ok_or_else(|| format!("{a}: no such instance"))?;
                ensure!(
                    i.desired == Desired::Run && i.routed && i.health != Health::Healthy,
                    "{a}: unrouted an instance that is not an unhealthy routed one: {i:?}"
                );
                i.routed = false;
            }
            Action::Retire { instance } => {
                let i = view
                    .get_mut(instance)
                    .ok_or_else(|| format!("{a}: no such instance"))?;
                let on_lost = lost.contains(i.node.as_str());
                ensure!(
                    on_lost || (active.is_some() && !paused),
                    "{a}: retired without a progressing rollout"
                );
                ensure!(
                    i.desired == Desired::Run,
                    "{a}: not a running instance: {i:?}"
                );
                i.desired = Desired::Drain { since: now };
                i.routed = false;
                if !on_lost {
                    retired.push(instance.clone());
                }
            }
            Action::Stop { instance } => {
                let i = view
                    .get_mut(instance)
                    .ok_or_else(|| format!("{a}: no such instance"))?;
                ensure!(
                    matches!(i.desired, Desired::Drain { .. }) && i.drained,
                    "{a}: stopped an instance that has not drained: {i:?}"
                );
                i.desired = Desired::Stop;
            }
            Action::Forget { instance } => {
                let i = view
                    .get(instance)
                    .ok_or_else(|| format!("{a}: no such instance"))?;
                ensure!(
                    i.desired == Desired::Stop && i.health == Health::Stopped,
                    "{a}: forgot an instance that has not stopped: {i:?}"
                );
                view.remove(instance);
            }
        }
    }

    // Bounds: alive instances and serving capacity. Canary steps and
    // blue/green before its bake put their new instances beside the old
    // ones without a surge check: the documented max(2n, n + surge) holds
    // when the rollout started clean. With more old instances alive than
    // the target's `instances` (a release that scales down, what a
    // superseded rollout left) or target instances still draining (a
    // rollback whose rollout update died with the server), the new ones
    // still number at most the step's share (checked below), but the total
    // may exceed the bound: noted, not failed (see the report).
    let after_alive = alive(&view);
    let old_alive = input
        .instances
        .iter()
        .filter(|i| i.alive() && Some(i.release.as_str()) != target.as_deref())
        .count() as u32;
    let target_draining = input
        .instances
        .iter()
        .filter(|i| {
            i.alive() && i.desired != Desired::Run && Some(i.release.as_str()) == target.as_deref()
        })
        .count();
    let split_phase = active.is_some_and(|o| {
        !paused
            && !new.is_some_and(|nr| nr.reverting != o.reverting || nr.state.is_final())
            && (in_canary_steps(o, s) || before_bake(o, s, now))
    });
    let bound = max_alive(s);
    let mut notes = Notes::default();
    if after_alive > bound.max(before_alive) {
        ensure!(
            split_phase && (old_alive > n || target_draining > 0),
            "{after_alive} instances alive after the plan, more than max(bound {bound}, {before_alive} before)"
        );
        notes.over_bound = true;
    }
    let floor = if s.strategy == Strategy::Recreate || target.is_none() {
        0
    } else {
        n.saturating_sub(s.max_unavailable)
    };
    let after_serving = serving(&view);
    ensure!(
        after_serving >= floor.min(before_serving),
        "serving dropped from {before_serving} to {after_serving}, below the floor {floor}"
    );

    // Routed means healthy and running, as of this tick's observations
    // (an instance that turned unhealthy is unrouted in the same tick).
    for i in view.values().filter(|i| i.routed) {
        ensure!(
            i.desired == Desired::Run && i.health == Health::Healthy,
            "{} stays routed after the plan but is {:?} {:?}",
            i.id,
            i.desired,
            i.health
        );
    }

    let target_run = |v: &BTreeMap<String, Instance>, t: &str| {
        v.values()
            .filter(|i| i.release == t && i.desired == Desired::Run)
            .count() as u32
    };
    let target_serving = |v: &BTreeMap<String, Instance>, t: &str| {
        v.values().filter(|i| i.release == t && i.serving()).count() as u32
    };
    let Some(o) = active.filter(|_| !paused) else {
        return Ok(notes);
    };
    let nr = new.expect("active");
    let turned = nr.reverting != o.reverting || nr.state.is_final();
    // A release neither the rollout's `from` nor its target: what a
    // superseded rollout left (a canary or preview that never went live).
    let superseded = |release: &str| release != o.to && Some(release) != o.from.as_deref();

    // Canary and partial steps: old serving instances stay, at most the
    // step's share of new ones run, a step passes only when its pause is
    // over and (with analysis) on a pass, a failing verdict rolls back.
    if in_canary_steps(o, s) {
        let k = o.canary.as_ref().map_or(0, |c| c.step as usize);
        let want = step_instances(s, k);
        if !turned {
            for id in &retired {
                let i = input_of
                    .get(id.as_str())
                    .expect("retired an input instance");
                ensure!(
                    i.release == o.to || !i.serving() || superseded(&i.release),
                    "retired serving old instance {id} during canary step {k}"
                );
            }
            ensure!(
                target_run(&view, &o.to) <= want,
                "{} instances of {} run during canary step {k}, more than {want}",
                target_run(&view, &o.to),
                o.to
            );
        }
        let next = nr.canary.as_ref().map_or(0, |c| c.step as usize);
        if next > k && !nr.reverting {
            let started = o.canary.as_ref().and_then(|c| c.step_started_at);
            let elapsed = started.map_or(0, |t| now.saturating_sub(t));
            ensure!(
                elapsed >= s.steps[k].pause_ms,
                "canary step {k} passed after {elapsed} ms, before its pause of {} ms",
                s.steps[k].pause_ms
            );
            if let Some(a) = &s.analysis {
                ensure!(
                    matches!(input.verdict, Some(Verdict::Pass(_))) && elapsed >= a.interval_ms,
                    "canary step {k} passed on {:?} after {elapsed} ms",
                    input.verdict
                );
            }
        }
        if s.analysis.is_some()
            && matches!(input.verdict, Some(Verdict::Fail(_)))
            && target_serving(&view, &o.to) >= want
        {
            ensure!(
                nr.reverting || nr.state == RolloutState::Failed,
                "canary analysis failed at step {k} but the rollout goes on: {nr:?}"
            );
        }
    }

    // Blue/green: the switch waits for the whole new set (and its check or
    // a promotion); the old set stays until the bake is over.
    if s.strategy == Strategy::BlueGreen && !o.reverting && o.from.is_some() && !turned {
        let was = o.blue_green.clone().unwrap_or_default();
        let bg = nr.blue_green.clone().unwrap_or_default();
        ensure!(
            target_run(&view, &o.to) <= n,
            "blue/green runs {} instances of {}, more than {n}",
            target_run(&view, &o.to),
            o.to
        );
        // What a superseded rollout left may go at once.
        retired.retain(|id| {
            input_of
                .get(id.as_str())
                .is_none_or(|i| !superseded(&i.release))
        });
        if !retired.is_empty() {
            let baked = was
                .switched_at
                .is_some_and(|t| now.saturating_sub(t) >= s.bake_ms);
            ensure!(
                baked,
                "blue/green retired {retired:?} before its bake was over ({was:?})"
            );
        }
        if was.switched_at.is_none() && bg.switched_at.is_some() {
            ensure!(
                target_serving(&view, &o.to) >= n,
                "blue/green switched with {} of {n} new instances serving",
                target_serving(&view, &o.to)
            );
            ensure!(
                bg.promoted
                    || (s.auto_promote
                        && (s.preview_check.is_none()
                            || matches!(input.verdict, Some(Verdict::Pass(_))))),
                "blue/green switched without a promotion or a passed check: {:?}",
                input.verdict
            );
        }
    }

    // Recreate: the new release starts only once nothing else runs.
    if s.strategy == Strategy::Recreate && placed > 0 {
        let t = target.as_deref().unwrap_or_default();
        let others: Vec<&Instance> = view
            .values()
            .filter(|i| i.release != t && counts(i))
            .collect();
        ensure!(
            others.is_empty(),
            "recreate placed {t} while others are alive: {others:?}"
        );
    }

    // A rollout ends only with its target on exactly n serving instances.
    if matches!(nr.state, RolloutState::Succeeded | RolloutState::RolledBack) && !o.state.is_final()
    {
        let t = target.as_deref().unwrap_or_default();
        let others = view
            .values()
            .filter(|i| i.release != t && counts(i))
            .count();
        ensure!(
            target_serving(&view, t) == n && target_run(&view, t) == n && others == 0,
            "{} with {} serving and {} running of {t} (n = {n}) and {others} other(s) alive",
            nr.state,
            target_serving(&view, t),
            target_run(&view, t)
        );
    }
    Ok(notes)
}

/// What the invariants over time remember.
#[derive(Debug, Default)]
pub struct Track {
    /// The furthest desired state seen per instance (0 run, 1 drain, 2 stop).
    desired: BTreeMap<String, u8>,
    forgotten: BTreeSet<String>,
    /// Per rollout id: (from, to, reverting seen, final state seen).
    rollouts: BTreeMap<i64, (Option<String>, String, bool, Option<RolloutState>)>,
}

fn rank(d: Desired) -> u8 {
    match d {
        Desired::Run => 0,
        Desired::Drain { .. } => 1,
        Desired::Stop => 2,
    }
}

/// Invariants of the persisted state (and of the agents' processes), after
/// every persisted step and every world event.
pub fn state(world: &World, track: &mut Track) -> Result<(), String> {
    let store = &world.store;
    for rec in store.instances.values() {
        ensure!(
            rec.desired == Desired::Run || !rec.routed,
            "{} is routed but {:?}",
            rec.id,
            rec.desired
        );
        ensure!(
            !track.forgotten.contains(&rec.id),
            "{} came back after it was forgotten",
            rec.id
        );
        let r = rank(rec.desired);
        let seen = track.desired.entry(rec.id.clone()).or_insert(r);
        ensure!(
            r >= *seen,
            "{} went back from desired rank {seen} to {:?}",
            rec.id,
            rec.desired
        );
        *seen = r;
    }
    let gone: Vec<String> = track
        .desired
        .keys()
        .filter(|id| !store.instances.contains_key(*id))
        .cloned()
        .collect();
    for id in gone {
        track.desired.remove(&id);
        track.forgotten.insert(id);
    }

    // Rollouts: only the latest may be active; identity is fixed, a
    // rollback never turns forward, a final state is final.
    let last = store.rollouts.len().saturating_sub(1);
    for (k, r) in store.rollouts.iter().enumerate() {
        ensure!(
            k == last || r.state.is_final(),
            "rollout {} is {} but not the latest",
            r.id,
            r.state
        );
        let t = track
            .rollouts
            .entry(r.id)
            .or_insert_with(|| (r.from.clone(), r.to.clone(), false, None));
        ensure!(
            t.0 == r.from && t.1 == r.to,
            "rollout {} changed from/to",
            r.id
        );
        ensure!(!t.2 || r.reverting, "rollout {} stopped reverting", r.id);
        t.2 = r.reverting;
        if let Some(f) = t.3 {
            ensure!(
                r.state == f,
                "rollout {} was {f} and is now {}",
                r.id,
                r.state
            );
        }
        if r.state.is_final() {
            t.3 = Some(r.state);
        }
    }
    // The live release is one that succeeded (or, between the engine's two
    // writes, the latest rollout's target about to).
    if let Some(live) = &store.live {
        ensure!(
            store.rollouts.iter().any(|r| &r.to == live
                && (r.state == RolloutState::Succeeded
                    || Some(r.id) == store.latest().map(|l| l.id))),
            "live release {live} never succeeded"
        );
    }

    // No process runs without its record (nothing the server could no
    // longer stop).
    for a in &world.agents {
        for (id, p) in &a.procs {
            ensure!(
                !p.state.running() || store.instances.contains_key(id),
                "{id} runs on {} ({:?}) but has no record",
                a.node,
                p.state
            );
        }
    }
    Ok(())
}

/// Whether the latest rollout has ended and the cluster settled: for a
/// rollout that succeeded or rolled back, exactly its release serving on
/// every record; otherwise nothing left draining or stopping.
pub fn settled(world: &World, now: Millis) -> bool {
    let store = &world.store;
    // Every process the agents run is healthy (crashes restarted, flaps over).
    let procs = world.agents.iter().all(|a| {
        a.procs
            .values()
            .all(|p| !p.state.running() || p.state == PState::Healthy)
    });
    let Some(r) = store.latest() else {
        return procs;
    };
    if !r.state.is_final() {
        return false;
    }
    match r.state {
        RolloutState::Succeeded | RolloutState::RolledBack => {
            // Each record serves and really runs (observations may be stale).
            procs
                && store.instances.values().all(|i| {
                    store.serves(i, now)
                        && world.agents.iter().any(|a| {
                            a.node == i.node
                                && a.procs
                                    .get(&i.id)
                                    .is_some_and(|p| p.state == PState::Healthy)
                        })
                })
        }
        _ => store.instances.values().all(|i| i.desired == Desired::Run),
    }
}

/// The outcome once settled: the cluster matches the final state, and no
/// rollout the design forbids to succeed did.
pub fn outcome(
    sc: &Scenario,
    world: &World,
    forced: &BTreeSet<i64>,
    now: Millis,
) -> Result<(), String> {
    let store = &world.store;
    if let Some(r) = store.latest() {
        let expect = match r.state {
            RolloutState::Succeeded => Some(r.to.clone()),
            RolloutState::RolledBack => r.from.clone(),
            _ => None,
        };
        if let Some(release) = expect {
            ensure!(
                store.live.as_ref() == Some(&release),
                "rollout {} {} but the live release is {:?}",
                r.id,
                r.state,
                store.live
            );
            let n = sc.release(&release).settings.instances as usize;
            let recs: Vec<String> = store
                .instances
                .values()
                .map(|i| format!("{} {} {:?}", i.id, i.release, i.desired))
                .collect();
            ensure!(
                store.instances.len() == n
                    && store
                        .instances
                        .values()
                        .all(|i| i.release == release && store.serves(i, now)),
                "rollout {} {}: expected {n} serving instance(s) of {release}, found {recs:?}",
                r.id,
                r.state
            );
            // And on the agents, exactly those processes run.
            let running: usize = world
                .agents
                .iter()
                .map(|a| {
                    a.procs
                        .values()
                        .filter(|p| p.state == PState::Healthy)
                        .count()
                })
                .sum();
            let any_other = world.agents.iter().any(|a| {
                a.procs
                    .values()
                    .any(|p| p.state.running() && p.state != PState::Healthy)
            });
            ensure!(
                running == n && !any_other,
                "{running} healthy processes run for {n} instance(s) of {release}"
            );
        }
    }
    for r in &store.rollouts {
        let rel = sc.release(&r.to);
        let s = &rel.settings;
        if r.state != RolloutState::Succeeded {
            if sc.class == Class::Clean {
                return Err(format!(
                    "clean seed: rollout {} {:?} → {} ended {}: {}",
                    r.id, r.from, r.to, r.state, r.message
                ));
            }
            continue;
        }
        ensure!(
            rel.quality.can_serve(),
            "rollout {} of {} succeeded but its instances are {:?}",
            r.id,
            r.to,
            rel.quality
        );
        let judged = matches!(s.strategy, Strategy::Canary | Strategy::Partial)
            && s.analysis.is_some()
            && r.from.is_some()
            && s.steps.iter().any(|st| st.weight > 0);
        ensure!(
            !judged || rel.traffic == Traffic::Good || forced.contains(&r.id),
            "rollout {} of {} succeeded but its canary traffic is {:?} and nobody promoted it",
            r.id,
            r.to,
            rel.traffic
        );
        let checked =
            s.strategy == Strategy::BlueGreen && s.preview_check.is_some() && r.from.is_some();
        ensure!(
            !checked || rel.preview_ok || forced.contains(&r.id),
            "rollout {} of {} switched and succeeded but its preview check fails",
            r.id,
            r.to
        );
    }
    Ok(())
}
