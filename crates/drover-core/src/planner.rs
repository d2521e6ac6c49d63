//! The rollout planner: a pure function from what is wanted and what is
//! observed to the next actions.
//!
//! ```text
//! (settings, rollout, live release, instances, nodes, now) ──plan──► actions + rollout update
//! ```
//!
//! The server calls [`plan`] on every tick and whenever an observation
//! changes, applies the actions (records in the store, assignments for agents,
//! routing for proxies) and persists the updated rollout. Because the planner
//! reads only persisted and observed state, a restarted server resumes a
//! rollout where it stood.
//!
//! *Architecture Invariant* — the safety rules, checked by property tests:
//! - never more than `instances + max_surge` alive instances are caused by a plan
//!   (draining and stopping instances count as alive; canary and blue/green:
//!   `max(2 × instances, instances + max_surge)`);
//! - a plan never retires a serving instance if that leaves fewer than
//!   `instances - max_unavailable` serving;
//! - only healthy instances are routed;
//! - an instance is stopped only after it drained (out of routing, nothing in flight);
//! - a rollout in a final state places nothing and retires nothing (but
//!   for the steady-state rules below, and not even those after a failure).
//!
//! A node whose lease ran out is *lost*: whatever should run there is
//! retired at once (out of routing; the agent stops it when it comes back)
//! and no longer counts as alive, so the strategy — or, with no rollout
//! active, the steady state — places replacements on ready nodes. In the
//! steady state the live release is kept at `instances` placed instances.
//!
//! Superseded: a rollout that replaced an unfinished one retires what that
//! one left — instances of a release neither its `from` nor its target —
//! at once while `from` serves the floor (else they are replaced in turn).
//!
//! Canary: during its steps no old instance is retired and at most
//! `ceil(instances × weight%)` new ones run beside them (so up to
//! `2 × instances` are alive); the split of traffic by weight is the
//! proxies' job (the server derives it from `Rollout::canary`). A step ends
//! when its pause is over and the analysis verdict for its window passes; a
//! failing verdict fails the rollout, an inconclusive one holds until the
//! analysis deadline. After the last step the rest is replaced by the
//! rolling algorithm; rolling back is the rolling algorithm towards `from`.

use crate::analysis::Verdict;
use crate::duration::format_ms;
use crate::model::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create an instance of `release` on `node` (desired Run, not routed).
    Place { release: String, node: String },
    /// Add a healthy instance to routing.
    Route { instance: String },
    /// Take an unhealthy instance out of routing (it keeps running).
    Unroute { instance: String },
    /// Take an instance out of routing for good and start draining it.
    Retire { instance: String },
    /// Tell the agent to stop a drained instance.
    Stop { instance: String },
    /// The instance stopped: delete its record.
    Forget { instance: String },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Place { release, node } => write!(f, "place {release} on {node}"),
            Action::Route { instance } => write!(f, "route {instance}"),
            Action::Unroute { instance } => write!(f, "unroute {instance}"),
            Action::Retire { instance } => write!(f, "retire {instance}"),
            Action::Stop { instance } => write!(f, "stop {instance}"),
            Action::Forget { instance } => write!(f, "forget {instance}"),
        }
    }
}

pub struct PlanInput<'a> {
    pub settings: &'a DeploySettings,
    /// The app's latest rollout, if any (final ones included).
    pub rollout: Option<&'a Rollout>,
    /// The release serving when no rollout is active.
    pub live: Option<&'a str>,
    pub instances: &'a [Instance],
    pub nodes: &'a [Node],
    pub now: Millis,
    /// Canary: the analysis of the current step's window (None: none yet).
    pub verdict: Option<&'a Verdict>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The rollout after this plan, when it changed.
    pub rollout: Option<Rollout>,
}

/// Computes the next actions. Pure and deterministic.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let mut p = Planner::new(input);
    let Some(rollout) = input.rollout.filter(|r| !r.state.is_final()) else {
        // Steady state: keep the live release's healthy instances routed
        // and as many placed as it should have (replacing a lost node's).
        if let Some(live) = input.live {
            p.route_healthy(live);
            // A rollout that failed in place (no rollback, or the rollback
            // failed too) is left as it is for the operator.
            let failed = input
                .rollout
                .is_some_and(|r| r.state == RolloutState::Failed);
            if !failed {
                let s = input.settings;
                let missing = s.instances.saturating_sub(p.running_of(live));
                let room = (s.instances + s.max_surge).saturating_sub(p.alive_count());
                p.place(live, missing.min(room));
            }
        }
        return p.finish(None);
    };
    let mut r = rollout.clone();
    if r.state == RolloutState::Pending {
        r.state = RolloutState::Progressing;
        r.progress_at = input.now;
    }
    if r.state == RolloutState::Paused {
        if let Some(t) = r.target().map(str::to_string) {
            p.route_healthy(&t);
        }
        return p.finish(Some((rollout, r)));
    }
    // At most two passes: forward, then (after a failure) reverting.
    for _ in 0..2 {
        match p.rollout_step(&mut r) {
            Step::Continue => return p.finish(Some((rollout, r))),
            Step::Failed(reason) => {
                if !r.reverting && input.settings.auto_rollback {
                    r.reverting = true;
                    r.reverted_at = Some(input.now);
                    r.failure = Some(reason.clone());
                    r.progress_at = input.now;
                    r.step = 0;
                    r.message = match &r.from {
                        Some(f) => format!("rolling back to {f}: {reason}"),
                        None => format!("removing {}: {reason}", r.to),
                    };
                    p.reset_pass();
                    continue;
                }
                r.state = RolloutState::Failed;
                r.message = match (&r.failure, r.reverting) {
                    (Some(first), true) => format!("{first}; rollback also failed: {reason}"),
                    _ => reason,
                };
                p.reset_pass();
                return p.finish(Some((rollout, r)));
            }
        }
    }
    p.finish(Some((rollout, r)))
}

enum Step {
    Continue,
    Failed(String),
}

struct Planner<'a> {
    input: &'a PlanInput<'a>,
    /// Instance view after the actions so far.
    inst: BTreeMap<String, Instance>,
    /// Instance view after housekeeping only (where a rollout pass starts).
    after_housekeeping: BTreeMap<String, Instance>,
    housekeeping: Vec<Action>,
    actions: Vec<Action>,
    placed: Vec<(String, String)>,
    /// Nodes whose lease ran out.
    lost: BTreeSet<String>,
}

impl<'a> Planner<'a> {
    fn new(input: &'a PlanInput<'a>) -> Self {
        let mut p = Planner {
            input,
            inst: input
                .instances
                .iter()
                .map(|i| (i.id.clone(), i.clone()))
                .collect(),
            after_housekeeping: BTreeMap::new(),
            housekeeping: Vec::new(),
            actions: Vec::new(),
            placed: Vec::new(),
            lost: input
                .nodes
                .iter()
                .filter(|n| !n.ready)
                .map(|n| n.name.clone())
                .collect(),
        };
        p.housekeeping();
        p.after_housekeeping = p.inst.clone();
        p
    }

    fn now(&self) -> Millis {
        self.input.now
    }

    /// Rules that hold whatever the rollout does.
    fn housekeeping(&mut self) {
        let ids: Vec<String> = self.inst.keys().cloned().collect();
        for id in ids {
            let i = &self.inst[&id];
            if i.desired == Desired::Run && self.lost.contains(&i.node) {
                self.housekeeping.push(Action::Retire {
                    instance: id.clone(),
                });
                let i = self.inst.get_mut(&id).expect("present");
                i.routed = false;
                i.desired = Desired::Drain {
                    since: self.input.now,
                };
                continue;
            }
            match (i.desired, i.health) {
                (Desired::Stop, Health::Stopped) => {
                    self.housekeeping.push(Action::Forget {
                        instance: id.clone(),
                    });
                    self.inst.remove(&id);
                }
                (Desired::Drain { .. }, _) if i.drained => {
                    self.housekeeping.push(Action::Stop {
                        instance: id.clone(),
                    });
                    self.inst.get_mut(&id).expect("present").desired = Desired::Stop;
                }
                (Desired::Run, h) if i.routed && h != Health::Healthy => {
                    self.housekeeping.push(Action::Unroute {
                        instance: id.clone(),
                    });
                    self.inst.get_mut(&id).expect("present").routed = false;
                }
                _ => {}
            }
        }
    }

    /// Forget the rollout actions of a pass that ended in failure.
    fn reset_pass(&mut self) {
        self.actions.clear();
        self.placed.clear();
        self.inst = self.after_housekeeping.clone();
    }

    fn route_healthy(&mut self, release: &str) {
        let ids: Vec<String> = self
            .inst
            .values()
            .filter(|i| {
                i.release == release
                    && i.desired == Desired::Run
                    && i.health == Health::Healthy
                    && !i.routed
            })
            .map(|i| i.id.clone())
            .collect();
        for id in ids {
            self.actions.push(Action::Route {
                instance: id.clone(),
            });
            self.inst.get_mut(&id).expect("present").routed = true;
        }
    }

    fn retire(&mut self, id: &str) {
        self.actions.push(Action::Retire {
            instance: id.to_string(),
        });
        let i = self.inst.get_mut(id).expect("present");
        i.routed = false;
        i.desired = Desired::Drain {
            since: self.input.now,
        };
    }

    /// Alive and on a node that is not lost (a lost node's instances were
    /// retired and are replaced; the agent stops them when it is back).
    fn counts(&self, i: &Instance) -> bool {
        i.alive() && !self.lost.contains(&i.node)
    }

    fn alive_count(&self) -> u32 {
        (self.inst.values().filter(|i| self.counts(i)).count() + self.placed.len()) as u32
    }

    /// Instances of `release` that should run (placed, not retired).
    fn running_of(&self, release: &str) -> u32 {
        self.inst
            .values()
            .filter(|i| i.release == release && i.desired == Desired::Run)
            .count() as u32
    }

    /// Instances of `release` serving now.
    fn serving_of(&self, release: &str) -> u32 {
        self.inst
            .values()
            .filter(|i| i.release == release && i.serving())
            .count() as u32
    }

    /// Records `ready` (the target's serving instances) as the rollout's
    /// step; more of them, or any action beyond routing, is progress.
    fn note_progress(&self, r: &mut Rollout, ready: u32) {
        let acted = !self
            .actions
            .iter()
            .all(|a| matches!(a, Action::Route { .. }))
            || !self.housekeeping.is_empty();
        if ready > r.step || acted {
            r.progress_at = self.now();
        }
        r.step = ready;
    }

    /// What a superseded rollout left: instances of a release that is
    /// neither this rollout's `from` (the live release when it started) nor
    /// its target — a canary or blue/green preview that never went live.
    /// They leave at once, out of routing first, so no user stays on a
    /// release that was only ever on trial and a new canary or blue/green
    /// set is not placed beside two old ones; while `from` serves less than
    /// the floor (`instances − max_unavailable`, e.g. the superseded rollout
    /// had replaced most of it) the serving ones stay, and the rolling rules
    /// replace them in turn.
    fn retire_superseded(&mut self, r: &Rollout, target: &str) {
        let Some(from) = r.from.as_deref() else {
            return;
        };
        let s = self.input.settings;
        let floor = s.instances.saturating_sub(s.max_unavailable);
        let from_serves_floor = self.serving_of(from) >= floor;
        let left: Vec<String> = self
            .inst
            .values()
            .filter(|i| i.release != from && i.release != target && i.desired == Desired::Run)
            .filter(|i| from_serves_floor || !i.serving())
            .map(|i| i.id.clone())
            .collect();
        for id in left {
            self.retire(&id);
        }
    }

    fn serving_count(&self) -> u32 {
        self.inst.values().filter(|i| i.serving()).count() as u32
    }

    /// One pass of the strategy towards the rollout's target.
    fn rollout_step(&mut self, r: &mut Rollout) -> Step {
        let s = self.input.settings;
        let n = s.instances;
        let Some(target) = r.target().map(str::to_string) else {
            // Reverting a first deploy: nothing to go back to; remove it all.
            let run: Vec<String> = self
                .inst
                .values()
                .filter(|i| i.desired == Desired::Run)
                .map(|i| i.id.clone())
                .collect();
            for id in run {
                self.retire(&id);
            }
            if self.inst.values().any(|i| self.counts(i)) {
                r.message = format!(
                    "removing {}: {}",
                    r.to,
                    r.failure.clone().unwrap_or_default()
                );
                return Step::Continue;
            }
            return Step::Failed(r.failure.clone().unwrap_or_else(|| "failed".into()));
        };
        self.route_healthy(&target);

        // Deadlines: an instance of the target that is not healthy in time.
        let late = self
            .inst
            .values()
            .filter(|i| {
                i.release == target && i.desired == Desired::Run && i.health != Health::Healthy
            })
            .filter(|i| i.created_at >= r.phase_started_at())
            .find(|i| self.now().saturating_sub(i.created_at) > s.health_deadline_ms);
        if let Some(i) = late {
            return Step::Failed(format!(
                "instance {} of {} on {} was not healthy within {} ({}; last check: {})",
                i.id,
                i.release,
                i.node,
                format_ms(s.health_deadline_ms),
                health_word(i.health),
                i.last_check.as_deref().unwrap_or("no check ran yet")
            ));
        }
        if self.now().saturating_sub(r.progress_at) > s.progress_deadline_ms() {
            return Step::Failed(format!(
                "no progress for {}: {}",
                format_ms(s.progress_deadline_ms()),
                r.message
            ));
        }

        if !r.reverting {
            self.retire_superseded(r, &target);
        }
        let is_target = |i: &Instance| i.release == target;
        // A first deploy has no stable release to compare with: no steps.
        let in_steps =
            r.from.is_some() && r.canary.as_ref().map_or(0, |c| c.step as usize) < s.steps.len();
        let stepped = matches!(s.strategy, Strategy::Canary | Strategy::Partial);
        if stepped && !r.reverting && in_steps {
            return self.canary_step(r, &target);
        }
        if s.strategy == Strategy::BlueGreen && !r.reverting && r.from.is_some() {
            if let Some(step) = self.blue_green_step(r, &target) {
                return step;
            }
        }
        match s.strategy {
            Strategy::Rolling | Strategy::Canary | Strategy::BlueGreen | Strategy::Partial => {
                // Old instances that serve nothing can go at once.
                let idle_old: Vec<String> = self
                    .inst
                    .values()
                    .filter(|i| !is_target(i) && i.desired == Desired::Run && !i.serving())
                    .map(|i| i.id.clone())
                    .collect();
                for id in idle_old {
                    self.retire(&id);
                }
                let min_available = n.saturating_sub(s.max_unavailable);
                // Extra target instances beyond `n`: not serving first, then newest.
                let mut new_run: Vec<&Instance> = self
                    .inst
                    .values()
                    .filter(|i| is_target(i) && i.desired == Desired::Run)
                    .collect();
                new_run.sort_by_key(|i| (i.serving(), std::cmp::Reverse(i.created_at)));
                let extra: Vec<String> = new_run
                    .iter()
                    .take(new_run.len().saturating_sub(n as usize))
                    .map(|i| i.id.clone())
                    .collect();
                for id in extra {
                    if !self.inst[&id].serving() || self.serving_count() > min_available {
                        self.retire(&id);
                    }
                }
                // Serving old instances, bounded by availability.
                let serving_old: Vec<String> = self
                    .inst
                    .values()
                    .filter(|i| !is_target(i) && i.serving())
                    .map(|i| i.id.clone())
                    .collect();
                for id in serving_old {
                    if self.serving_count() > min_available {
                        self.retire(&id);
                    }
                }
                // Start new ones, bounded by surge.
                let new_run = self.running_of(&target);
                let room = (n + s.max_surge).saturating_sub(self.alive_count());
                let want = n.saturating_sub(new_run);
                self.place(&target, room.min(want));
            }
            Strategy::Recreate => {
                let old: Vec<String> = self
                    .inst
                    .values()
                    .filter(|i| !is_target(i) && i.desired == Desired::Run)
                    .map(|i| i.id.clone())
                    .collect();
                for id in old {
                    self.retire(&id);
                }
                // Start only when nothing else is alive: neither old
                // instances nor target ones retired earlier and still
                // draining or stopping (a rollout aborted mid-drain).
                let busy =
                    |i: &Instance| self.counts(i) && !(is_target(i) && i.desired == Desired::Run);
                if !self.inst.values().any(busy) {
                    let new_run = self.running_of(&target);
                    self.place(&target, n.saturating_sub(new_run));
                }
            }
        }

        // Progress and completion.
        let ready = self.serving_of(&target);
        self.note_progress(r, ready);
        let others_alive = self
            .inst
            .values()
            .filter(|i| !is_target(i) && self.counts(i))
            .count();
        let target_run = self.running_of(&target);
        if ready == n && target_run == n && others_alive == 0 && self.placed.is_empty() {
            if r.reverting {
                r.state = RolloutState::RolledBack;
                r.message = format!(
                    "rolled back to {target}: {}",
                    r.failure.clone().unwrap_or_default()
                );
            } else {
                r.state = RolloutState::Succeeded;
                r.message = format!("{target} is live on {n} instance(s)");
            }
            return Step::Continue;
        }
        r.message = self.waiting_for(r, &target, ready, n);
        Step::Continue
    }

    /// One pass of a canary step: its share of new instances beside all the
    /// old ones, then its pause and analysis.
    fn canary_step(&mut self, r: &mut Rollout, target: &str) -> Step {
        let s = self.input.settings;
        let now = self.now();
        let mut cp = r.canary.clone().unwrap_or(CanaryProgress {
            step: 0,
            weight: 0,
            step_started_at: None,
            analysis: None,
            window_started_at: None,
        });
        let k = cp.step as usize;
        let total = s.steps.len();
        let st = &s.steps[k];
        let partial = s.strategy == Strategy::Partial;
        let want = if partial {
            s.partial_instances.clamp(1, s.instances)
        } else {
            canary_instances(s.instances, st.weight)
        };
        // Old instances that crashed or never served go; serving ones stay.
        let idle_old: Vec<String> = self
            .inst
            .values()
            .filter(|i| i.release != target && i.desired == Desired::Run && !i.serving())
            .filter(|i| i.health != Health::Starting && i.health != Health::Pending)
            .map(|i| i.id.clone())
            .collect();
        for id in idle_old {
            self.retire(&id);
        }
        let mut new_run: Vec<&Instance> = self
            .inst
            .values()
            .filter(|i| i.release == target && i.desired == Desired::Run)
            .collect();
        new_run.sort_by_key(|i| (i.serving(), std::cmp::Reverse(i.created_at)));
        let extra: Vec<String> = new_run
            .iter()
            .take(new_run.len().saturating_sub(want as usize))
            .map(|i| i.id.clone())
            .collect();
        let running = new_run.len() as u32 - extra.len() as u32;
        for id in extra {
            self.retire(&id);
        }
        // Partial by node label: the new release only on those nodes.
        let only = if partial {
            &s.partial_nodes
        } else {
            &BTreeMap::new()
        };
        self.place_on(target, want.saturating_sub(running), only);
        let ready = self.serving_of(target);
        self.note_progress(r, ready);
        let head = if partial {
            let segment = if !s.partial_nodes.is_empty() {
                format!("users of proxies with {}", format_labels(&s.partial_nodes))
            } else if s.partial_users.is_empty() {
                format!("{}% of users", st.weight)
            } else {
                format!("{} listed user(s)", s.partial_users.len())
            };
            format!(
                "partial {} → {target}: {segment} on {target}",
                r.from.as_deref().unwrap_or("nothing")
            )
        } else {
            format!(
                "canary {} → {target}: step {}/{total} ({}% of users)",
                r.from.as_deref().unwrap_or("nothing"),
                k + 1,
                st.weight
            )
        };
        let no_node = !only.is_empty()
            && !self
                .input
                .nodes
                .iter()
                .any(|n| n.ready && labels_match(only, &n.labels));
        if ready < want && no_node {
            r.message = format!(
                "{head}: no ready node has {}; waiting for one",
                format_labels(only)
            );
            r.canary = Some(cp);
            return Step::Continue;
        }
        if ready < want {
            r.message = format!(
                "{head}: waiting for {}/{want} instance(s) of {target} to become healthy",
                want - ready
            );
            r.canary = Some(cp);
            return Step::Continue;
        }
        let started = *cp.step_started_at.get_or_insert(now);
        cp.weight = st.weight;
        // Holding on purpose is progress: the progress deadline is for
        // instances that do not come up.
        r.progress_at = now;
        let elapsed = now.saturating_sub(started);
        // The analysis window: from when its measuring began (a server
        // restart begins it again), never before the step.
        let measured = now.saturating_sub(cp.window_started_at.unwrap_or(started).max(started));
        let (analysis_ok, note) = match (&s.analysis, self.input.verdict) {
            (None, _) => (true, String::new()),
            (Some(_), Some(Verdict::Fail(why))) => {
                return Step::Failed(format!(
                    "canary analysis failed at step {}/{total} ({}% of users): {why}",
                    k + 1,
                    st.weight
                ));
            }
            (Some(a), Some(Verdict::Pass(text))) => (measured >= a.interval_ms, text.clone()),
            (Some(a), v) => {
                let text = v
                    .map(|v| v.text().to_string())
                    .unwrap_or_else(|| "waiting for the first figures".into());
                if measured > a.deadline_ms {
                    return Step::Failed(format!(
                        "canary analysis at step {}/{total} was still {text} after {}",
                        k + 1,
                        format_ms(a.deadline_ms)
                    ));
                }
                (false, text)
            }
        };
        cp.analysis = (!note.is_empty()).then(|| note.clone());
        let pause_left = st.pause_ms.saturating_sub(elapsed);
        if pause_left == 0 && analysis_ok {
            r.message = format!("{head}: passed");
            cp.step += 1;
            cp.step_started_at = None;
            cp.analysis = None;
            cp.window_started_at = None;
        } else {
            let mut waits = Vec::new();
            if partial {
                waits.push(format!(
                    "held until `drover promote {}` (or rollback)",
                    r.app
                ));
            } else if pause_left > 0 {
                waits.push(format!("pause, {} left", format_ms(pause_left)));
            }
            if !note.is_empty() {
                waits.push(format!("analysis {note}"));
            }
            r.message = format!("{head}: {}", waits.join("; "));
        }
        r.canary = Some(cp);
        Step::Continue
    }

    /// Blue/green before and during the bake: a full new set beside the old
    /// one, switched all at once. None once the bake is over (the old set then
    /// leaves by the rolling rules).
    fn blue_green_step(&mut self, r: &mut Rollout, target: &str) -> Option<Step> {
        let s = self.input.settings;
        let n = s.instances;
        let now = self.now();
        let mut bg = r.blue_green.clone().unwrap_or_default();
        let from = r.from.clone().unwrap_or_default();
        let ready = self.serving_of(target);
        if let Some(at) = bg.switched_at {
            let left = s.bake_ms.saturating_sub(now.saturating_sub(at));
            r.blue_green = Some(bg);
            if left == 0 {
                return None;
            }
            r.progress_at = now;
            r.step = ready;
            r.message = format!(
                "blue/green {from} → {target}: all users on {target}; {from} stays warm for a rollback flip, {} left",
                format_ms(left)
            );
            return Some(Step::Continue);
        }
        self.place(target, n.saturating_sub(self.running_of(target)));
        self.note_progress(r, ready);
        let head = format!("blue/green {from} → {target}: {ready}/{n} ready");
        if ready < n {
            r.message = format!("{head}, reachable only by preview");
            r.blue_green = Some(bg);
            return Some(Step::Continue);
        }
        // Ready and waiting on purpose: not a lack of progress.
        r.progress_at = now;
        let check = match self.input.verdict {
            Some(Verdict::Fail(why)) if !bg.promoted => {
                return Some(Step::Failed(format!(
                    "the preview check of {target} failed: {why}"
                )));
            }
            Some(Verdict::Inconclusive(text)) => Some(text.clone()),
            Some(_) => None,
            // A check is configured but has not run on the ready set yet.
            None if s.preview_check.is_some() => Some("waiting for the preview check".into()),
            None => None,
        };
        if bg.promoted || (s.auto_promote && check.is_none()) {
            bg.switched_at = Some(now);
            r.message = format!("blue/green {from} → {target}: switched all users to {target}");
        } else if !s.auto_promote {
            r.message = format!(
                "{head}, reachable by preview; waiting for `drover promote {}` to switch",
                r.app
            );
        } else {
            r.message = format!("{head}; preview check: {}", check.unwrap_or_default());
        }
        r.blue_green = Some(bg);
        Some(Step::Continue)
    }

    fn place(&mut self, release: &str, count: u32) {
        self.place_on(release, count, &BTreeMap::new());
    }

    /// Places `count` instances of `release` on the least loaded ready nodes
    /// that have every label of `only`.
    fn place_on(&mut self, release: &str, count: u32, only: &BTreeMap<String, String>) {
        if count == 0 {
            return;
        }
        let ready: Vec<&Node> = self
            .input
            .nodes
            .iter()
            .filter(|n| n.ready && labels_match(only, &n.labels))
            .collect();
        if ready.is_empty() {
            return;
        }
        let mut load: BTreeMap<&str, u32> = ready.iter().map(|n| (n.name.as_str(), 0)).collect();
        for i in self.inst.values().filter(|i| i.alive()) {
            if let Some(c) = load.get_mut(i.node.as_str()) {
                *c += 1;
            }
        }
        let mut placed_here: Vec<(String, String)> = Vec::new();
        for _ in 0..count {
            let (node, _) = load
                .iter()
                .min_by_key(|(name, c)| (**c, *name))
                .map(|(n, c)| (*n, *c))
                .expect("non-empty");
            let node = node.to_string();
            *load.get_mut(node.as_str()).expect("present") += 1;
            placed_here.push((release.to_string(), node));
        }
        for (release, node) in placed_here {
            self.actions.push(Action::Place {
                release: release.clone(),
                node: node.clone(),
            });
            self.placed.push((release, node));
        }
    }

    /// The status line: what the rollout waits for right now.
    fn waiting_for(&self, r: &Rollout, target: &str, ready: u32, n: u32) -> String {
        let s = self.input.settings;
        let head = match (&r.from, r.reverting) {
            (_, true) => format!("rolling back to {target}: {ready}/{n} ready"),
            (Some(f), false) => format!("{} {f} → {target}: {ready}/{n} ready", s.strategy),
            (None, false) => format!("{} {target}: {ready}/{n} ready", s.strategy),
        };
        let mut waits: Vec<String> = Vec::new();
        let starting: Vec<&Instance> = self
            .inst
            .values()
            .filter(|i| {
                i.release == target && i.desired == Desired::Run && i.health != Health::Healthy
            })
            .collect();
        for i in starting.iter().take(2) {
            let left = s
                .health_deadline_ms
                .saturating_sub(self.now().saturating_sub(i.created_at));
            waits.push(format!(
                "waiting for {} on {} to become healthy ({}; last check: {}; {} left)",
                i.id,
                i.node,
                health_word(i.health),
                i.last_check.as_deref().unwrap_or("none yet"),
                format_ms(left)
            ));
        }
        let draining: Vec<&Instance> = self
            .inst
            .values()
            .filter(|i| matches!(i.desired, Desired::Drain { .. }))
            .collect();
        if !draining.is_empty() {
            let names: Vec<String> = draining
                .iter()
                .map(|i| format!("{} on {}", i.id, i.node))
                .collect();
            waits.push(format!("draining {}", names.join(", ")));
        }
        let stopping: Vec<String> = self
            .inst
            .values()
            .filter(|i| i.desired == Desired::Stop)
            .map(|i| format!("{} on {}", i.id, i.node))
            .collect();
        if !stopping.is_empty() {
            waits.push(format!("waiting for {} to stop", stopping.join(", ")));
        }
        if !self.input.nodes.iter().any(|n| n.ready) {
            waits.push("no ready node to place instances on".into());
        }
        if waits.is_empty() {
            head
        } else {
            format!("{head}; {}", waits.join("; "))
        }
    }

    fn finish(self, rollout: Option<(&Rollout, Rollout)>) -> Plan {
        let mut actions = self.housekeeping;
        actions.extend(self.actions);
        Plan {
            actions,
            rollout: rollout.and_then(|(old, new)| (*old != new).then_some(new)),
        }
    }
}

/// New instances for a canary step of `weight`%: at least one (for a
/// weight above 0), at most all.
pub fn canary_instances(instances: u32, weight: u32) -> u32 {
    if weight == 0 {
        return 0;
    }
    (instances * weight).div_ceil(100).clamp(1, instances)
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Pending => "not reported yet",
        Health::Starting => "starting",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Failed => "failed",
        Health::Stopped => "stopped",
    }
}

#[cfg(test)]
pub(crate) mod tests;
