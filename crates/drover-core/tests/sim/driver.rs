//! One seeded run: a storm (deploys, operator actions and faults), then calm
//! (faults stop, the operator only resumes and promotes what waits for it)
//! until the latest rollout has ended and the cluster settled.
//!
//! Each step advances the fake clock by 100–800 ms, moves the world
//! (agents, processes, the proxy, traffic), injects faults, lets the
//! operator act, then runs one engine tick. Every persisted step may be the
//! last before the server dies; the engine's memory is then lost and it
//! resumes, after a downtime, from the store alone.

use super::check::{self, Track};
use super::engine::{self, Control, Mem, RollbackOp, Write};
use super::rng::Rng;
use super::scenario::{Class, Scenario};
use super::world::{backoff, Link, Obs, PState, Rec, Store, World};
use drover_core::planner::{plan, Action};
use drover_core::{Desired, Millis, Rollout, RolloutState, Strategy};
use std::collections::{BTreeMap, BTreeSet};

/// The fake clock starts here (any time far from 0 will do).
pub const START: Millis = 1_000_000_000;

/// What an operator asks.
#[derive(Debug, Clone)]
enum Op {
    Deploy(String),
    Control(Control),
    Rollback,
}

/// Figures of one run, summed over seeds for the test's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub steps: u64,
    pub plans: u64,
    pub rollouts: u64,
    pub server_restarts: u64,
    pub crashes_mid_write: u64,
    pub faults: u64,
    pub commands: u64,
    pub succeeded: u64,
    pub rolled_back: u64,
    pub failed: u64,
    pub aborted: u64,
    /// Plans of a canary/blue-green split phase that did not start clean
    /// and went over max(2n, n + surge) (allowed, counted).
    pub over_bound: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.plans += o.plans;
        self.rollouts += o.rollouts;
        self.server_restarts += o.server_restarts;
        self.crashes_mid_write += o.crashes_mid_write;
        self.faults += o.faults;
        self.commands += o.commands;
        self.succeeded += o.succeeded;
        self.rolled_back += o.rolled_back;
        self.failed += o.failed;
        self.aborted += o.aborted;
        self.over_bound += o.over_bound;
    }
}

pub struct Sim<'a> {
    sc: &'a Scenario,
    rng: Rng,
    now: Millis,
    world: World,
    mem: Mem,
    /// The server is down until then (dead when > now).
    down_until: Millis,
    storm: bool,
    track: Track,
    pub stats: Stats,
    /// Every event, when tracing (replays and failure reports).
    pub trace: Option<Vec<String>>,
    /// Rollouts an operator promoted (they may pass steps analysis did not).
    forced: BTreeSet<i64>,
    /// A deploy whose command died with the server before its rollout was
    /// written: the operator asks again.
    lost_deploy: Option<String>,
    /// The next release to deploy.
    next: usize,
    /// Clean seeds: what served when each rollout phase (id, reverting) began.
    phase_serving: BTreeMap<(i64, bool), u32>,
}

/// Adds a line to the trace, formatted only when tracing (the format may
/// borrow the simulation, hence the two steps).
macro_rules! trace {
    ($sim:expr, $($fmt:tt)*) => {
        if $sim.trace.is_some() {
            let line = format!("{:>9.1}s  {}", ($sim.now - START) as f64 / 1000.0, format!($($fmt)*));
            if let Some(t) = $sim.trace.as_mut() {
                t.push(line);
            }
        }
    };
}

impl<'a> Sim<'a> {
    pub fn new(sc: &'a Scenario, tracing: bool) -> Sim<'a> {
        Sim {
            sc,
            rng: Rng::new(sc.seed ^ 0xD0_7E55_0000_0002),
            now: START,
            world: World::new(sc, START),
            mem: Mem::default(),
            down_until: 0,
            storm: true,
            track: Track::default(),
            stats: Stats::default(),
            trace: tracing.then(Vec::new),
            forced: BTreeSet::new(),
            lost_deploy: None,
            next: 0,
            phase_serving: BTreeMap::new(),
        }
    }

    /// The whole run; Err names the broken invariant.
    pub fn run(&mut self) -> Result<(), String> {
        trace!(self, "scenario {}", self.sc);
        if !self.sc.first_deploy {
            self.r1_live();
        }
        let storm_end = self.now + self.sc.storm_ms;
        while self.now < storm_end {
            self.step()?;
        }
        self.calm()?;
        for r in &self.world.store.rollouts {
            match r.state {
                RolloutState::Succeeded => self.stats.succeeded += 1,
                RolloutState::RolledBack => self.stats.rolled_back += 1,
                RolloutState::Failed => self.stats.failed += 1,
                RolloutState::Aborted => self.stats.aborted += 1,
                _ => {}
            }
        }
        self.stats.rollouts += self.world.store.rollouts.len() as u64;
        Ok(())
    }

    /// r1 live on n healthy routed instances, as a succeeded first rollout
    /// left it.
    fn r1_live(&mut self) {
        let r1 = &self.sc.releases[0];
        let nodes: Vec<String> = self
            .sc
            .nodes
            .iter()
            .filter(|n| self.sc.selector.iter().all(|l| n.labels.contains(l)))
            .map(|n| n.name.clone())
            .collect();
        let store = &mut self.world.store;
        for k in 0..r1.settings.instances as usize {
            store.next_instance += 1;
            let id = format!("i{:03}-r1", store.next_instance);
            let node = nodes[k % nodes.len()].clone();
            store.instances.insert(
                id.clone(),
                Rec {
                    id: id.clone(),
                    release: "r1".into(),
                    node: node.clone(),
                    desired: Desired::Run,
                    drain_index: None,
                    routed: true,
                    created_at: self.now,
                    observed: Some(Obs::Healthy),
                },
            );
            let agent = self
                .world
                .agents
                .iter_mut()
                .find(|a| a.node == node)
                .expect("agent");
            agent.known.insert(id.clone(), ("r1".into(), Desired::Run));
            agent.procs.insert(
                id,
                super::world::Proc {
                    release: "r1".into(),
                    state: PState::Healthy,
                    restarts: 0,
                },
            );
        }
        store.live = Some("r1".into());
        store.rollouts.push(Rollout {
            id: 1,
            state: RolloutState::Succeeded,
            message: "r1 is live".into(),
            ..Rollout::new("app", "", None, "r1", self.now)
        });
        self.next = 1;
    }

    fn server_up(&self) -> bool {
        self.now >= self.down_until
    }

    fn step(&mut self) -> Result<(), String> {
        self.stats.steps += 1;
        let dt = self.rng.range(100, 800);
        let was_down = !self.server_up();
        self.now += dt;
        if was_down && self.server_up() {
            trace!(self, "server is back (engine memory empty)");
        }
        let before = self.trace.as_ref().map(|_| self.observations());
        let up = self.server_up();
        self.world
            .advance(self.sc, &mut self.rng, self.now, dt, up, self.storm);
        if let Some(before) = before {
            let after = self.observations();
            let changes: Vec<String> = after
                .iter()
                .filter(|a| !before.contains(a))
                .map(|(id, o, ready)| {
                    format!("{id}={o:?}{}", if *ready { "" } else { "(node not ready)" })
                })
                .collect();
            if !changes.is_empty() {
                trace!(self, "observed {}", changes.join(" "));
            }
        }
        self.check_state("world step")?;
        if self.storm {
            self.faults();
            self.check_state("faults")?;
        }
        if !self.server_up() {
            return Ok(());
        }
        if let Some(op) = self.choose_op() {
            if !self.command(op)? {
                return Ok(());
            }
        }
        self.tick()
    }

    /// (instance, observation, node ready) of every record, for the trace.
    fn observations(&self) -> Vec<(String, Option<Obs>, bool)> {
        let store = &self.world.store;
        store
            .instances
            .values()
            .map(|r| {
                (
                    r.id.clone(),
                    r.observed,
                    store.node_ready(&r.node, self.now),
                )
            })
            .collect()
    }

    fn check_state(&mut self, after: &str) -> Result<(), String> {
        check::state(&self.world, &mut self.track)
            .map_err(|e| format!("state invariant after {after}: {e}"))?;
        if self.sc.class == Class::Clean {
            self.check_capacity()
                .map_err(|e| format!("capacity invariant after {after}: {e}"))?;
        }
        Ok(())
    }

    /// Clean seeds (nothing crashes, no node is lost): what the proxy really
    /// routes to never drops below the floor of the settings in force, or
    /// below what served when this phase of the rollout began if that was
    /// less — the planner's floor, end to end, through the engine's writes
    /// and the server's deaths between them.
    fn check_capacity(&mut self) -> Result<(), String> {
        let store = &self.world.store;
        let Some(r) = store.active() else {
            return Ok(());
        };
        let release = match (&r.from, r.reverting) {
            (Some(from), true) => from,
            (None, _) => return Ok(()),
            (_, false) => &r.to,
        };
        let s = &self.sc.release(release).settings;
        if s.strategy == Strategy::Recreate {
            return Ok(());
        }
        let serving = store
            .instances
            .values()
            .filter(|i| store.serves(i, self.now))
            .count() as u32;
        let at_start = *self
            .phase_serving
            .entry((r.id, r.reverting))
            .or_insert(serving);
        let floor = s.instances.saturating_sub(s.max_unavailable).min(at_start);
        if serving < floor {
            return Err(format!(
                "{serving} instance(s) serve during rollout {} ({}), below the floor {floor}",
                r.id, r.message
            ));
        }
        Ok(())
    }

    fn faults(&mut self) {
        let f = self.sc.faults.clone();
        let now = self.now;
        if self.rng.chance(f.crash) {
            let running: Vec<(usize, String)> = self
                .world
                .agents
                .iter()
                .enumerate()
                .flat_map(|(k, a)| {
                    a.procs
                        .iter()
                        .filter(|(_, p)| p.state == PState::Healthy)
                        .map(move |(id, _)| (k, id.clone()))
                })
                .collect();
            if !running.is_empty() {
                let (k, id) = self.rng.pick(&running).clone();
                let p = self.world.agents[k].procs.get_mut(&id).expect("running");
                p.state = PState::Crashed {
                    restart_at: now + backoff(p.restarts),
                };
                p.restarts += 1;
                self.stats.faults += 1;
                trace!(self, "FAULT {id} crashes");
            }
        }
        if self.rng.chance(f.partition) {
            let k = self.rng.below(self.world.agents.len() as u64) as usize;
            if self.world.agents[k].link == Link::Up {
                let until = now + self.rng.range(2_000, 40_000);
                self.world.agents[k].link = Link::Cut { until };
                self.stats.faults += 1;
                trace!(
                    self,
                    "FAULT {} cut off from the control plane for {} ms",
                    self.world.agents[k].node,
                    until - now
                );
            }
        }
        if self.rng.chance(f.host_down) {
            let k = self.rng.below(self.world.agents.len() as u64) as usize;
            if self.world.agents[k].link == Link::Up {
                let until = now + self.rng.range(5_000, 40_000);
                let a = &mut self.world.agents[k];
                a.link = Link::Down { until };
                a.procs.clear();
                self.stats.faults += 1;
                trace!(
                    self,
                    "FAULT host {} dies (its processes are gone), back in {} ms",
                    self.world.agents[k].node,
                    until - now
                );
            }
        }
        if self.rng.chance(f.proxy_cut) {
            self.world.proxy.cut_until = now + self.rng.range(2_000, 20_000);
            self.stats.faults += 1;
            trace!(self, "FAULT the proxy loses the control plane");
        }
        if self.server_up() && self.rng.chance(f.server_crash) {
            self.crash_server("between ticks");
        }
    }

    /// The server dies: its memory is gone; it is back after a downtime
    /// (now and then longer than the node lease and the proxy freshness).
    fn crash_server(&mut self, when: &str) {
        self.mem = Mem::default();
        let down = if self.sc.class == Class::Chaos && self.rng.chance(50) {
            self.rng.range(10_000, 30_000)
        } else {
            self.rng.range(300, 5_000)
        };
        self.down_until = self.now + down;
        self.stats.server_restarts += 1;
        trace!(self, "CRASH server dies {when}; down for {down} ms");
    }

    /// What the operator asks now, if anything.
    fn choose_op(&mut self) -> Option<Op> {
        let store = &self.world.store;
        let active = store.active().cloned();
        let next = self.sc.releases.get(self.next).map(|r| r.name.clone());
        // A deploy lost with a dying server is asked again.
        if let Some(d) = self.lost_deploy.clone() {
            if self.rng.chance(300) {
                return Some(Op::Deploy(d));
            }
        }
        // The finisher: what waits for an operator on purpose gets its
        // promotion (always in clean seeds, in calm for all).
        if let Some(r) = &active {
            if self.sc.class == Class::Clean || !self.storm {
                if r.state == RolloutState::Paused {
                    return Some(Op::Control(Control::Resume));
                }
                if self.waits_for_promotion(r) && self.rng.chance(300) {
                    return Some(Op::Control(Control::Promote { full: false }));
                }
            }
        }
        if !self.storm {
            return None;
        }
        let o = self.sc.operator.clone();
        // The next release: soon after the last rollout ended, or over the
        // active one.
        if let Some(next) = next {
            let chance = match &active {
                None if self.lost_deploy.is_none() => Some(150),
                None => None,
                Some(_) => Some(o.supersede),
            };
            if chance.is_some_and(|c| self.rng.chance(c)) {
                return Some(Op::Deploy(next));
            }
        }
        if let Some(r) = &active {
            if r.state != RolloutState::Paused && self.rng.chance(o.pause) {
                return Some(Op::Control(Control::Pause));
            }
            if r.state == RolloutState::Paused && self.rng.chance(o.resume) {
                return Some(Op::Control(Control::Resume));
            }
            if self.rng.chance(o.abort) {
                return Some(Op::Control(Control::Abort));
            }
            if self.rng.chance(o.promote) {
                let full = self.rng.chance(300);
                return Some(Op::Control(Control::Promote { full }));
            }
        }
        if self.rng.chance(o.rollback) {
            return Some(Op::Rollback);
        }
        None
    }

    /// A partial held at its segment, or a blue/green set ready and waiting
    /// for `drover promote`.
    fn waits_for_promotion(&self, r: &Rollout) -> bool {
        let s = &self.sc.release(&r.to).settings;
        if r.reverting || r.from.is_none() {
            return false;
        }
        match s.strategy {
            Strategy::Partial => r
                .canary
                .as_ref()
                .is_some_and(|c| c.step == 0 && c.step_started_at.is_some()),
            Strategy::BlueGreen => {
                let store = &self.world.store;
                let ready = store
                    .instances
                    .values()
                    .filter(|i| i.release == r.to && store.serves(i, self.now))
                    .count() as u32;
                !s.auto_promote
                    && r.blue_green
                        .as_ref()
                        .is_some_and(|b| b.switched_at.is_none() && !b.promoted)
                    && ready >= s.instances
            }
            _ => false,
        }
    }

    /// Handles an operator's command as the engine does (then a tick).
    /// False when the server died on it.
    fn command(&mut self, op: Op) -> Result<bool, String> {
        self.stats.commands += 1;
        let store = &self.world.store;
        let (writes, deploy) = match &op {
            Op::Deploy(to) => (engine::start_rollout(store, to, self.now), Some(to.clone())),
            Op::Control(c) => match engine::control(self.sc, store, *c, self.now) {
                Ok(w) => (w, None),
                Err(e) => {
                    trace!(self, "operator {op:?}: refused: {e}");
                    return Ok(true);
                }
            },
            Op::Rollback => match engine::rollback(store) {
                Ok(RollbackOp::Abort) => {
                    match engine::control(self.sc, store, Control::Abort, self.now) {
                        Ok(w) => (w, None),
                        Err(e) => {
                            trace!(self, "operator rollback: refused: {e}");
                            return Ok(true);
                        }
                    }
                }
                Ok(RollbackOp::To(to)) => (engine::start_rollout(store, &to, self.now), Some(to)),
                Err(e) => {
                    trace!(self, "operator rollback: refused: {e}");
                    return Ok(true);
                }
            },
        };
        trace!(self, "operator {op:?}");
        let is_next = matches!(&op, Op::Deploy(to) if self.sc.releases.get(self.next).is_some_and(|r| &r.name == to));
        let created_before = self.world.store.rollouts.len();
        let (applied, total) = self.persist(writes)?;
        if let Some(to) = deploy {
            let created = self.world.store.rollouts.len() > created_before;
            let was_lost = self.lost_deploy.as_ref() == Some(&to);
            if is_next {
                self.next += 1;
            }
            if created && was_lost {
                self.lost_deploy = None;
            } else if !created && (is_next || was_lost) {
                // Never written: the command failed; the operator asks again.
                self.lost_deploy = Some(to);
            }
        }
        if let Op::Control(Control::Promote { .. }) = op {
            if applied > 0 {
                if let Some(r) = self.world.store.latest() {
                    self.forced.insert(r.id);
                }
            }
        }
        if applied < total {
            return Ok(false);
        }
        // The engine ticks right after a command.
        self.tick()?;
        Ok(self.server_up())
    }

    /// One engine tick: plan from the store, check the plan, persist it.
    fn tick(&mut self) -> Result<(), String> {
        let Some(input) = engine::input(
            self.sc,
            &self.world.store,
            &self.world.traffic,
            &mut self.mem,
            self.now,
        ) else {
            return Ok(());
        };
        self.stats.plans += 1;
        let p = plan(&input.plan_input());
        let notes = match check::plan(&input, &p) {
            Ok(notes) => notes,
            Err(e) => return Err(format!(
                "plan invariant: {e}\n  settings: {:?}\n  rollout: {:?}\n  verdict: {:?}\n  nodes: {:?}\n  instances:\n{}\n  actions: {}\n  new rollout: {:?}",
                input.settings,
                input.rollout,
                input.verdict,
                input.nodes,
                input
                    .instances
                    .iter()
                    .map(|i| format!("    {} {} on {} {:?} {:?} routed={} drained={} created={}", i.id, i.release, i.node, i.desired, i.health, i.routed, i.drained, i.created_at))
                    .collect::<Vec<_>>()
                    .join("\n"),
                p.actions.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                p.rollout
            )),
        };
        if notes.over_bound {
            self.stats.over_bound += 1;
            trace!(self, "NOTE: more alive than max(2n, n + surge) in a split phase that did not start clean");
        }
        if !p.actions.is_empty() {
            trace!(
                self,
                "plan: {}",
                p.actions
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(r) = &p.rollout {
            let old = input.rollout.as_ref().expect("an update implies a rollout");
            if r.state != old.state || r.reverting != old.reverting || r.message != old.message {
                trace!(
                    self,
                    "rollout {} {}{}: {}",
                    r.id,
                    r.state,
                    if r.reverting { " (reverting)" } else { "" },
                    r.message
                );
            }
        }
        let writes = engine::tick_writes(input.rollout.as_ref(), &p);
        let (applied, total) = self.persist(writes)?;
        if applied == total {
            if let Some(r) = p.rollout.filter(|r| r.state.is_final()) {
                self.mem.checks.remove(&r.id);
            }
        }
        Ok(())
    }

    /// Applies writes in order; the server may die before any of them
    /// (during the storm). Returns (applied, total).
    fn persist(&mut self, writes: Vec<Write>) -> Result<(usize, usize), String> {
        let total = writes.len();
        let crash_at = (self.storm && total > 0 && self.rng.chance(self.sc.faults.crash_mid_write))
            .then(|| self.rng.below(total as u64) as usize);
        for (k, w) in writes.into_iter().enumerate() {
            if crash_at == Some(k) {
                self.stats.crashes_mid_write += 1;
                self.crash_server(&format!("after {k} of {total} persisted steps"));
                return Ok((k, total));
            }
            let what = format!("{w:?}");
            self.apply(w);
            self.check_state(&what)?;
        }
        Ok((total, total))
    }

    /// One write to the store (drover-store's semantics).
    fn apply(&mut self, w: Write) {
        let now = self.now;
        let store = &mut self.world.store;
        match w {
            Write::Act(a) => {
                store.index += 1;
                match a {
                    Action::Place { release, node } => {
                        store.next_instance += 1;
                        let id = format!("i{:03}-{release}", store.next_instance);
                        store.instances.insert(
                            id.clone(),
                            Rec {
                                id,
                                release,
                                node,
                                desired: Desired::Run,
                                drain_index: None,
                                routed: false,
                                created_at: now,
                                observed: None,
                            },
                        );
                    }
                    Action::Route { instance } => {
                        if let Some(i) = store.instances.get_mut(&instance) {
                            i.routed = true;
                        }
                    }
                    Action::Unroute { instance } => {
                        if let Some(i) = store.instances.get_mut(&instance) {
                            i.routed = false;
                        }
                    }
                    Action::Retire { instance } => {
                        let index = store.index;
                        if let Some(i) = store.instances.get_mut(&instance) {
                            i.routed = false;
                            i.desired = Desired::Drain { since: now };
                            i.drain_index = Some(index);
                        }
                    }
                    Action::Stop { instance } => {
                        if let Some(i) = store.instances.get_mut(&instance) {
                            i.routed = false;
                            i.desired = Desired::Stop;
                        }
                    }
                    Action::Forget { instance } => {
                        store.instances.remove(&instance);
                    }
                }
            }
            Write::UpdateRollout(r) => update_rollout(store, r),
            Write::SetLiveAndRollout(to, r) => {
                set_live(store, to);
                update_rollout(store, r);
            }
            Write::CreateRollout(mut r) => {
                r.id = store.rollouts.len() as i64 + 1;
                store.rollouts.push(r);
            }
            Write::BumpIndex => store.index += 1,
        }
    }

    /// Faults stop, lost nodes come back; the latest rollout must end and
    /// the cluster settle within bounds the settings imply.
    fn calm(&mut self) -> Result<(), String> {
        self.storm = false;
        trace!(
            self,
            "CALM: faults stop, every node and the proxy reconnect"
        );
        for a in &mut self.world.agents {
            if let Link::Down { .. } = a.link {
                a.procs.clear();
            }
            a.link = Link::Up;
        }
        self.world.proxy.cut_until = 0;
        let bound = self.calm_bound();
        let deadline = self.now.max(self.down_until) + bound;
        while !(self.world.store.active().is_none() && self.lost_deploy.is_none()) {
            if self.now > deadline {
                let r = self.world.store.latest().cloned();
                return Err(format!(
                    "liveness: the latest rollout has not ended {bound} ms after the faults stopped: {r:?}"
                ));
            }
            self.step()?;
        }
        let settle = self.now + 120_000;
        while !check::settled(&self.world, self.now) {
            if self.now > settle {
                let recs: Vec<String> = self
                    .world
                    .store
                    .instances
                    .values()
                    .map(|i| {
                        format!(
                            "{} {:?} routed={} {:?}",
                            i.id, i.desired, i.routed, i.observed
                        )
                    })
                    .collect();
                return Err(format!(
                    "liveness: the cluster did not settle after rollout {:?} ended: {recs:?}",
                    self.world.store.latest().map(|r| (r.id, r.state))
                ));
            }
            self.step()?;
        }
        trace!(self, "settled: {}", self.summary());
        check::outcome(self.sc, &self.world, &self.forced, self.now)
    }

    /// How long an ending may take once calm: both directions of a rollout
    /// of the slowest release, each stalling at most a progress deadline
    /// per instance, plus canary steps and the bake.
    fn calm_bound(&self) -> Millis {
        let per_release = self
            .sc
            .releases
            .iter()
            .map(|r| {
                let s = &r.settings;
                let steps: Millis = s
                    .steps
                    .iter()
                    .map(|st| {
                        st.pause_ms.min(60_000) + s.analysis.as_ref().map_or(0, |a| a.deadline_ms)
                    })
                    .sum();
                (u64::from(s.instances) + 2) * s.progress_deadline_ms() + steps + s.bake_ms
            })
            .max()
            .unwrap_or(0);
        2 * per_release + 60_000
    }

    /// The records, one line, for the trace.
    fn summary(&self) -> String {
        let store = &self.world.store;
        let recs: Vec<String> = store
            .instances
            .values()
            .map(|i| {
                format!(
                    "{}@{} {:?}{} {:?}",
                    i.id,
                    i.node,
                    i.desired,
                    if i.routed { " routed" } else { "" },
                    i.observed
                )
            })
            .collect();
        format!(
            "live {:?}, latest {:?}; {}",
            store.live,
            store.latest().map(|r| (r.id, r.state)),
            recs.join("; ")
        )
    }
}

/// drover-store's `complete_rollout`: the previous live release becomes the
/// default rollback target.
fn set_live(store: &mut Store, to: String) {
    if store.live.as_ref().is_some_and(|l| *l != to) {
        store.prev = store.live.clone();
    }
    store.live = Some(to);
}

fn update_rollout(store: &mut Store, r: Rollout) {
    let slot = store
        .rollouts
        .iter_mut()
        .find(|x| x.id == r.id)
        .expect("an update of a stored rollout");
    *slot = r;
}
