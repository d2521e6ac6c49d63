//! The rollout engine of drover-server (`engine.rs`), rebuilt over the
//! simulated store: how a tick turns persisted records and observations
//! into the planner's input, the analysis and preview verdicts, and the
//! writes a tick, an operator's control or a new rollout make — as a list,
//! so the simulation can kill the server between any two of them.

use super::scenario::Scenario;
use super::world::{Obs, Rec, Store, PROXY_FRESH_MS};
use drover_core::analysis::{self, Verdict, Window};
use drover_core::planner::{Action, Plan, PlanInput};
use drover_core::{
    DeploySettings, Desired, Health, Instance, Millis, Node, Rollout, RolloutState, Strategy,
};
use std::collections::BTreeMap;

/// A canary step: (rollout id, step index, when it started).
type StepId = (i64, u32, Millis);

/// The engine's memory, lost when the server dies.
#[derive(Debug, Default)]
pub struct Mem {
    /// Canary analysis: the step being judged and the traffic total
    /// (requests, errors) of its release when the engine first saw the
    /// step (the window's baseline).
    pub window: Option<(StepId, (u64, u64), Millis)>,
    /// Blue/green preview checks by rollout id: when it answers, and what.
    pub checks: BTreeMap<i64, (Millis, Verdict)>,
}

/// One persisted step. The real engine writes a tick's actions in one
/// transaction; the simulation persists them one by one (a stronger test:
/// the planner must converge from any prefix of its own plan).
#[derive(Debug, Clone)]
pub enum Write {
    Act(Action),
    UpdateRollout(Rollout),
    /// The live release and the rollout that made it live, in one step.
    SetLiveAndRollout(String, Rollout),
    /// A new rollout; the store assigns its id.
    CreateRollout(Rollout),
    BumpIndex,
}

/// An operator's say over the active rollout (drover-server's `Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
    Promote { full: bool },
}

/// Everything one tick hands the planner.
pub struct Input {
    pub settings: DeploySettings,
    pub rollout: Option<Rollout>,
    pub live: Option<String>,
    pub instances: Vec<Instance>,
    pub nodes: Vec<Node>,
    pub now: Millis,
    pub verdict: Option<Verdict>,
}

impl Input {
    pub fn plan_input(&self) -> PlanInput<'_> {
        PlanInput {
            settings: &self.settings,
            rollout: self.rollout.as_ref(),
            live: self.live.as_deref(),
            instances: &self.instances,
            nodes: &self.nodes,
            now: self.now,
            verdict: self.verdict.as_ref(),
        }
    }
}

/// The planner's view of an instance's health (drover-server's `view::health_of`).
fn health_of(o: Option<Obs>, node_ready: bool) -> Health {
    match o {
        None => Health::Pending,
        Some(Obs::Stopped) => Health::Stopped,
        Some(_) if !node_ready => Health::Unhealthy,
        Some(Obs::Preparing | Obs::Starting) => Health::Starting,
        Some(Obs::Healthy) => Health::Healthy,
        Some(Obs::Unhealthy | Obs::Crashed | Obs::Stopping) => Health::Unhealthy,
        Some(Obs::Failed) => Health::Failed,
    }
}

/// The planner's input for this tick (`tick_deployment` up to `plan`); None
/// when there is nothing to plan (no rollout ever, no live release).
pub fn input(
    sc: &Scenario,
    store: &Store,
    traffic: &Totals,
    mem: &mut Mem,
    now: Millis,
) -> Option<Input> {
    let rollout = store.latest().cloned();
    let active = rollout.as_ref().filter(|r| !r.state.is_final());
    let settings_release = match active {
        Some(r) if r.reverting => r.from.clone().unwrap_or_else(|| r.to.clone()),
        Some(r) => r.to.clone(),
        None => match (&store.live, &rollout) {
            (Some(l), _) => l.clone(),
            (None, Some(r)) => r.to.clone(),
            (None, None) => return None,
        },
    };
    let settings = sc.release(&settings_release).settings.clone();
    // Out of routing on every live proxy with no request in flight that
    // could still reach it, or past the drain timeout.
    let floor =
        (now.saturating_sub(store.proxy_seen) < PROXY_FRESH_MS).then_some(store.proxy_oldest);
    let drained = |rec: &Rec| -> bool {
        let Desired::Drain { since } = rec.desired else {
            return false;
        };
        now.saturating_sub(since) >= settings.drain_timeout_ms
            || floor.is_none_or(|f| f >= rec.drain_index.unwrap_or(u64::MAX))
    };
    let instances = store
        .instances
        .values()
        .map(|rec| Instance {
            id: rec.id.clone(),
            release: rec.release.clone(),
            node: rec.node.clone(),
            desired: rec.desired,
            routed: rec.routed,
            health: health_of(rec.observed, store.node_ready(&rec.node, now)),
            created_at: rec.created_at,
            drained: drained(rec),
            last_check: None,
        })
        .collect();
    // The nodes the environment's selector allows.
    let nodes = sc
        .nodes
        .iter()
        .filter(|n| sc.selector.iter().all(|l| n.labels.contains(l)))
        .map(|n| Node {
            name: n.name.clone(),
            ready: store.node_ready(&n.name, now),
            labels: n.labels.iter().cloned().collect(),
        })
        .collect();
    let (verdict, since) = match settings.strategy {
        Strategy::BlueGreen => (
            preview_verdict(sc, store, mem, active, &settings, now),
            None,
        ),
        _ => match canary_verdict(traffic, mem, active, &settings, now) {
            Some((v, since)) => (Some(v), Some(since)),
            None => (None, None),
        },
    };
    // As the engine: the analysis deadline counts from when measuring began.
    let mut rollout = rollout;
    if let (Some(cp), Some(_)) = (rollout.as_mut().and_then(|r| r.canary.as_mut()), since) {
        cp.window_started_at = since;
    }
    Some(Input {
        settings,
        rollout,
        live: store.live.clone(),
        instances,
        nodes,
        now,
        verdict,
    })
}

/// The proxies' cumulative (requests, errors) per release (the server's
/// `traffic` totals).
pub type Totals = BTreeMap<String, (u64, u64)>;

/// The analysis of the active canary step so far (`canary_verdict`): the
/// release's traffic since the engine first saw the step, and when that was.
fn canary_verdict(
    traffic: &Totals,
    mem: &mut Mem,
    active: Option<&Rollout>,
    settings: &DeploySettings,
    now: Millis,
) -> Option<(Verdict, Millis)> {
    let (r, a) = match (active, &settings.analysis) {
        (Some(r), Some(a)) if !r.reverting => (r, a),
        _ => {
            mem.window = None;
            return None;
        }
    };
    let cp = r.canary.as_ref()?;
    let started = cp.step_started_at?;
    let step = (r.id, cp.step, started);
    let total = traffic.get(&r.to).copied().unwrap_or_default();
    let (base, since) = match mem.window {
        Some((s, base, since)) if s == step => (base, since),
        _ => {
            let since = now.max(started);
            mem.window = Some((step, total, since));
            (total, since)
        }
    };
    let w = Window {
        requests: total.0 - base.0,
        errors: total.1 - base.1,
        latency_buckets: Vec::new(),
        latency_sum_us: 0,
    };
    Some((analysis::judge(&w, a, &[]), since))
}

/// Blue/green: the pre-promotion check of a ready new set
/// (`preview_verdict`), running once per rollout "in its own task".
fn preview_verdict(
    sc: &Scenario,
    store: &Store,
    mem: &mut Mem,
    active: Option<&Rollout>,
    settings: &DeploySettings,
    now: Millis,
) -> Option<Verdict> {
    let r = active.filter(|r| !r.reverting && r.from.is_some())?;
    settings.preview_check.as_ref()?;
    if r.blue_green
        .as_ref()
        .is_some_and(|b| b.switched_at.is_some())
    {
        return None;
    }
    let serving = store
        .instances
        .values()
        .filter(|i| i.release == r.to && store.serves(i, now))
        .count() as u32;
    if serving < settings.instances {
        return None;
    }
    match mem.checks.get(&r.id) {
        Some((at, v)) if now >= *at => Some(v.clone()),
        Some(_) => Some(Verdict::Inconclusive(
            "running GET /ready on the new set".into(),
        )),
        None => {
            let v = if sc.release(&r.to).preview_ok {
                Verdict::Pass("GET /ready answered 2xx".into())
            } else {
                Verdict::Fail("GET /ready answered 503".into())
            };
            // The check takes a moment; it answers on a later tick.
            mem.checks.insert(r.id, (now + 1_000, v));
            Some(Verdict::Inconclusive(
                "running GET /ready on the new set".into(),
            ))
        }
    }
}

/// The writes of one tick's plan, in the engine's order: the actions, then
/// the rollout (with the live release, in one transaction, when it
/// succeeds: `Store::complete_rollout`), an index bump when routing must
/// follow the rollout's state or split.
pub fn tick_writes(old: Option<&Rollout>, p: &Plan) -> Vec<Write> {
    let mut w: Vec<Write> = p.actions.iter().cloned().map(Write::Act).collect();
    if let Some(new) = &p.rollout {
        let old = old.expect("an update implies a rollout");
        if new.state == RolloutState::Succeeded && old.state != RolloutState::Succeeded {
            w.push(Write::SetLiveAndRollout(new.to.clone(), new.clone()));
        } else {
            w.push(Write::UpdateRollout(new.clone()));
        }
        let split = |r: &Rollout| {
            (
                r.reverting,
                r.canary.as_ref().map(|c| (c.step, c.weight)),
                r.blue_green.as_ref().map(|b| b.switched_at.is_some()),
            )
        };
        if new.state != old.state || split(new) != split(old) {
            w.push(Write::BumpIndex);
        }
    }
    w
}

/// A new rollout to `to` (`start_rollout`): the active one is superseded.
pub fn start_rollout(store: &Store, to: &str, now: Millis) -> Vec<Write> {
    let mut w = Vec::new();
    if let Some(active) = store.active() {
        let mut a = active.clone();
        a.state = RolloutState::Aborted;
        a.message = format!("superseded by a rollout to {to}");
        w.push(Write::UpdateRollout(a));
    }
    w.push(Write::CreateRollout(Rollout::new(
        "app",
        "",
        store.live.clone(),
        to,
        now,
    )));
    w.push(Write::BumpIndex);
    w
}

/// An operator's control of the active rollout (`Engine::control`): its
/// writes, or why it is refused.
pub fn control(
    sc: &Scenario,
    store: &Store,
    c: Control,
    now: Millis,
) -> Result<Vec<Write>, String> {
    let Some(mut r) = store.active().cloned() else {
        return Err("no rollout in progress".into());
    };
    match c {
        Control::Pause => {
            if r.state == RolloutState::Paused {
                return Err("paused already".into());
            }
            r.state = RolloutState::Paused;
            r.message = format!("paused by the operator: {}", r.message);
        }
        Control::Resume => {
            if r.state != RolloutState::Paused {
                return Err("not paused".into());
            }
            r.state = RolloutState::Progressing;
            r.progress_at = now;
        }
        Control::Abort => {
            if r.reverting {
                return Err("rolling back already".into());
            }
            let reason = "aborted by the operator".to_string();
            r.state = RolloutState::Progressing;
            r.reverting = true;
            r.reverted_at = Some(now);
            r.progress_at = now;
            r.step = 0;
            r.message = match &r.from {
                Some(f) => format!("rolling back to {f}: {reason}"),
                None => format!("removing {}: {reason}", r.to),
            };
            r.failure = Some(reason);
        }
        Control::Promote { .. } if r.blue_green.is_some() => {
            let bg = r.blue_green.as_mut().expect("checked");
            if bg.switched_at.is_some() || bg.promoted || r.reverting {
                return Err("switched already; nothing to promote".into());
            }
            bg.promoted = true;
            r.progress_at = now;
        }
        Control::Promote { full } => {
            let total = sc.release(&r.to).settings.steps.len() as u32;
            let reverting = r.reverting;
            let Some(cp) = r.canary.as_mut().filter(|c| c.step < total && !reverting) else {
                return Err("no canary step to promote".into());
            };
            cp.step = if full { total } else { cp.step + 1 };
            cp.step_started_at = None;
            cp.analysis = None;
            r.progress_at = now;
        }
    }
    Ok(vec![Write::UpdateRollout(r), Write::BumpIndex])
}

/// What `drover rollback` asks of the engine (the API's `rollback`): mid-
/// rollout, back to where it started (an abort); otherwise a new rollout to
/// the previous live release.
pub enum RollbackOp {
    Abort,
    To(String),
}

pub fn rollback(store: &Store) -> Result<RollbackOp, String> {
    if store
        .active()
        .is_some_and(|r| !r.reverting && r.from.is_some())
    {
        return Ok(RollbackOp::Abort);
    }
    store
        .prev
        .clone()
        .map(RollbackOp::To)
        .ok_or_else(|| "no earlier live release to roll back to".into())
}
