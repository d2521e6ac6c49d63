//! The rollout engine.
//!
//! *Architecture Invariant*: this task is the only writer of rollouts and of
//! instance placement/routing. API handlers ask it through [`EngineHandle`]
//! (start a rollout) and it answers between ticks, so a rollout record is
//! never written by two parties at once.
//!
//! Every tick (100 ms, or sooner when poked) it runs, per deployment (an
//! app's environment; "" for an app without `[environments]`): load the
//! latest rollout, the instances with their last observations, the nodes
//! the environment's selector allows and the proxies' drain progress →
//! `drover_core::planner::plan` → apply the actions in one store transaction
//! (bumping the index that agents and proxies long-poll) → persist the
//! rollout's progress.

use crate::api::ApiErr;
use crate::{now_ms, Server, PROXY_FRESH_MS};
use crate::{traffic, view};
use drover_api::LATENCY_BUCKETS_MS;
use drover_core::analysis::{self, Verdict, Window};
use drover_core::planner::{plan, Action, PlanInput};
use drover_core::spec::AppSpec;
use drover_core::{Desired, Rollout, RolloutState, Strategy};
use drover_store::{DeploymentRecord, InstanceChange, InstanceRecord, NodeRecord, Store};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

pub enum Command {
    /// Start moving `app`'s environment `env` to `to` (a release name),
    /// superseding an active rollout there.
    StartRollout {
        app: String,
        env: String,
        to: String,
        start: Start,
        reply: oneshot::Sender<Result<Rollout, ApiErr>>,
    },
    Control {
        app: String,
        env: String,
        control: Control,
        reply: oneshot::Sender<Result<Rollout, ApiErr>>,
    },
}

/// An operator's say over an active rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Hold where it is (no step advances, nothing new starts).
    Pause,
    Resume,
    /// Back to the release it started from, as after a failure.
    Abort,
    /// Canary: the next step now (or, `full`, past the last step).
    Promote {
        full: bool,
    },
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    poke: Arc<Notify>,
}

pub struct EngineRx {
    rx: mpsc::Receiver<Command>,
    poke: Arc<Notify>,
}

pub fn channel() -> (EngineHandle, EngineRx) {
    let (tx, rx) = mpsc::channel(64);
    let poke = Arc::new(Notify::new());
    (
        EngineHandle {
            tx,
            poke: poke.clone(),
        },
        EngineRx { rx, poke },
    )
}

impl EngineHandle {
    pub async fn start_rollout(
        &self,
        app: &str,
        env: &str,
        to: &str,
        start: Start,
    ) -> Result<Rollout, ApiErr> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::StartRollout {
                app: app.into(),
                env: env.into(),
                to: to.into(),
                start,
                reply,
            })
            .await
            .map_err(|_| ApiErr::Unavailable("the rollout engine is shutting down".into()))?;
        rx.await
            .map_err(|_| ApiErr::Unavailable("the rollout engine stopped".into()))?
    }

    /// Pauses, resumes, aborts or promotes the active rollout of (app, env).
    pub async fn control(&self, app: &str, env: &str, control: Control) -> Result<Rollout, ApiErr> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Control {
                app: app.into(),
                env: env.into(),
                control,
                reply,
            })
            .await
            .map_err(|_| ApiErr::Unavailable("the rollout engine is shutting down".into()))?;
        rx.await
            .map_err(|_| ApiErr::Unavailable("the rollout engine stopped".into()))?
    }

    /// Asks for a tick soon (an observation changed).
    pub fn poke(&self) {
        self.poke.notify_one();
    }
}

/// Why a rollout starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A pipeline run delivers its release; the reason names the run.
    Run(String),
    /// `drover rollback`: straight back, without canary steps or a wait for
    /// a blue/green promotion.
    Rollback,
}

impl Start {
    /// For events and messages.
    pub fn reason(&self) -> &str {
        match self {
            Start::Run(r) => r,
            Start::Rollback => "rollback",
        }
    }
}

/// Runs the engine until `term` (the leader's term) ends.
pub async fn run(server: Arc<Server>, rx: &mut EngineRx, term: CancellationToken) {
    let mut engine = Engine {
        server: server.clone(),
        specs: HashMap::new(),
        errors: HashMap::new(),
        windows: HashMap::new(),
        queries: Arc::default(),
        prom: crate::prom::client(),
        checks: Arc::default(),
        was_ready: HashMap::new(),
        node_cache: None,
        steps: HashMap::new(),
    };
    let mut last_poked = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.cancelled() => break,
            cmd = rx.rx.recv() => match cmd {
                Some(Command::StartRollout { app, env, to, start, reply }) => {
                    let res = engine.start_rollout(&app, &env, &to, &start).await;
                    let _ = reply.send(res);
                    engine.tick_all().await;
                }
                Some(Command::Control { app, env, control, reply }) => {
                    let res = engine.control(&app, &env, control).await;
                    let _ = reply.send(res);
                    engine.tick_all().await;
                }
                None => break,
            },
            _ = ticker.tick() => engine.tick_all().await,
            _ = rx.poke.notified() => {
                // Pokes come with every batch of agents' reports: at most
                // one tick per MIN_POKE_GAP for them (a poke meanwhile is
                // kept and served after the gap), so thousands of agents do
                // not keep the engine ticking back to back.
                let since = last_poked.elapsed();
                if since < MIN_POKE_GAP {
                    tokio::time::sleep(MIN_POKE_GAP - since).await;
                }
                last_poked = std::time::Instant::now();
                engine.tick_all().await
            }
        }
    }
}

/// How old the engine's copy of the nodes may be (see `Engine::nodes`).
const NODES_FRESH_MS: u64 = 500;
/// How old the engine's copy of the nodes may be when a node registered
/// since: a new node is planned with within about this long.
const NODES_REGISTERED_MS: u64 = 100;

/// The shortest time between two ticks caused by pokes.
const MIN_POKE_GAP: Duration = Duration::from_millis(20);

/// What every app's plan of one tick shares.
struct Cluster {
    now: u64,
    nodes: Arc<Vec<NodeRecord>>,
    ready: std::collections::BTreeMap<String, bool>,
    /// The lowest routing-table index still in use on any live proxy
    /// (None: no live proxy, nothing to wait for).
    drain_floor: Option<u64>,
}

struct Engine {
    server: Arc<Server>,
    /// Release specs as they apply in an environment, by (app, env, release).
    specs: HashMap<(String, String, String), Arc<AppSpec>>,
    /// Last error per deployment, logged once until it changes.
    errors: HashMap<(String, String), String>,
    /// Canary analysis: per deployment, the step being judged (rollout id,
    /// step index, its start) and the traffic total of the new release when
    /// the engine first saw it — the window's baseline.
    windows: HashMap<(String, String), (StepId, Window, u64)>,
    /// Canary analysis by Prometheus queries, per deployment.
    queries: Arc<std::sync::Mutex<HashMap<(String, String), QueryRun>>>,
    prom: reqwest::Client,
    /// Blue/green pre-promotion checks by rollout id: None while running.
    checks: Arc<std::sync::Mutex<HashMap<i64, Option<Verdict>>>>,
    /// Each node's readiness at the last tick (to record lost / back).
    was_ready: HashMap<String, bool>,
    /// The nodes as last read, and when (ms).
    node_cache: Option<(u64, Arc<Vec<NodeRecord>>)>,
    /// The step each active rollout is in and when the engine saw it begin
    /// (for `drover_rollout_step_duration_seconds`), by rollout id.
    steps: HashMap<i64, (StepKey, u64)>,
}

/// Where a rollout is: (reverting, instances step, canary step, switched).
type StepKey = (bool, u32, Option<u32>, Option<bool>);

fn step_key(r: &Rollout) -> StepKey {
    (
        r.reverting,
        r.step,
        r.canary.as_ref().map(|c| c.step),
        r.blue_green.as_ref().map(|b| b.switched_at.is_some()),
    )
}

/// A canary step: (rollout id, step index, when it started).
type StepId = (i64, u32, u64);

/// The Prometheus queries of one canary step: asked once the step has run
/// one analysis `interval`, then again every `interval`, one round at a time.
struct QueryRun {
    step: StepId,
    asked_at: u64,
    running: bool,
    /// The last round's verdict (None: no round finished yet).
    verdict: Option<Verdict>,
}

impl Engine {
    fn store(&self) -> &dyn Store {
        &*self.server.store
    }

    /// Records `rollout.<event>` of `r` in the event log and queues its
    /// webhook deliveries; `target` is the spec of the rollout's target.
    async fn rollout_event(
        &self,
        r: &Rollout,
        target: &AppSpec,
        event: &str,
        message: &str,
        now: u64,
    ) -> Result<(), ApiErr> {
        self.store()
            .add_event(Some(&r.app), &format!("rollout.{event}"), message, now)
            .await?;
        if drover_core::spec::NOTIFY_EVENTS.contains(&event) {
            crate::notify::enqueue(&self.server, r, target, event, message, now).await;
        }
        Ok(())
    }

    /// Observes the duration of a step `old` → `new` left, and of the
    /// whole rollout when it ended.
    fn observe_steps(&mut self, old: &Rollout, new: &Rollout, spec: &AppSpec, now: u64) {
        let strategy = spec.deploy.strategy.to_string();
        let key = step_key(new);
        match self.steps.get(&new.id) {
            Some((k, _)) if *k == key && !new.state.is_final() => {}
            Some((_, began)) => {
                let ms = now.saturating_sub(*began);
                self.server.observed.step(new, &strategy, ms);
                self.steps.insert(new.id, (key, now));
            }
            // First seen (or after a restart): measure from here.
            None => {
                self.steps.insert(new.id, (key, now));
            }
        }
        if new.state.is_final() && !old.state.is_final() {
            self.steps.remove(&new.id);
            self.server
                .observed
                .rollout(new, &strategy, now.saturating_sub(new.started_at));
        }
    }

    /// The spec of `release` as it applies in `env` (overrides applied).
    async fn spec(&mut self, app: &str, env: &str, release: &str) -> Result<Arc<AppSpec>, ApiErr> {
        let key = (app.to_string(), env.to_string(), release.to_string());
        if let Some(s) = self.specs.get(&key) {
            return Ok(s.clone());
        }
        let n = view::parse_release_name(release).ok_or_else(|| {
            ApiErr::BadInput(format!("{release:?} is not a release name such as r3"))
        })?;
        let rec = self.store().get_release(app, n).await?;
        let spec = view::release_spec(&rec).map_err(ApiErr::Internal)?;
        let spec = Arc::new(spec.for_env(env).ok_or_else(|| {
            ApiErr::BadInput(format!(
                "{release} of {app} has no environment {env:?}; its drover.toml defines {}",
                view::env_list(&spec)
            ))
        })?);
        self.specs.insert(key, spec.clone());
        Ok(spec)
    }

    async fn start_rollout(
        &mut self,
        app: &str,
        env: &str,
        to: &str,
        start: &Start,
    ) -> Result<Rollout, ApiErr> {
        let reason = start.reason();
        let now = now_ms();
        self.store().get_app(app).await?;
        let spec = self.spec(app, env, to).await?;
        self.store().ensure_deployment(app, env).await?;
        let live = self
            .store()
            .get_deployment(app, env)
            .await?
            .and_then(|d| d.live_release);
        if let Some(mut active) = self
            .store()
            .latest_rollout(app, env)
            .await?
            .filter(|r| !r.state.is_final())
        {
            active.state = RolloutState::Aborted;
            active.message = format!("superseded by a rollout to {to} ({reason})");
            self.store().update_rollout(&active, now).await?;
            let target = self
                .spec(app, env, &active.to)
                .await
                .unwrap_or(spec.clone());
            self.steps.remove(&active.id);
            self.server.observed.rollout(
                &active,
                &target.deploy.strategy.to_string(),
                now.saturating_sub(active.started_at),
            );
            self.rollout_event(
                &active,
                &target,
                "aborted",
                &format!("{}{}", view::env_tag(env), active.message),
                now,
            )
            .await?;
        }
        let mut r = Rollout {
            message: format!("{} rollout to {to} queued", spec.deploy.strategy),
            ..Rollout::new(app, env, live, to, now)
        };
        // An operator's rollback goes back at once, as Kamal's does and as
        // Argo Rollouts' does within its rollback window: no canary steps
        // (nor their analysis) and no wait for a blue/green promotion; the
        // rolling rules (surge, unavailability, health) still hold.
        if *start == Start::Rollback {
            let steps = spec.deploy.steps.len() as u32;
            if steps > 0 {
                r.canary = Some(drover_core::CanaryProgress {
                    step: steps,
                    weight: 0,
                    step_started_at: None,
                    analysis: None,
                    window_started_at: None,
                });
            }
            if spec.deploy.strategy == Strategy::BlueGreen {
                r.blue_green = Some(drover_core::BlueGreenProgress {
                    promoted: true,
                    switched_at: None,
                });
            }
            r.message = format!("rollback to {to} queued (no canary steps, no promotion wait)");
        }
        let r = self.store().create_rollout(&r, now).await?;
        self.steps.insert(r.id, (step_key(&r), now));
        let from = r.from.clone().unwrap_or_else(|| "nothing".into());
        self.rollout_event(
            &r,
            &spec,
            "started",
            &format!(
                "rollout {} {from} → {to}{} ({}, {reason})",
                r.id,
                view::in_env(env),
                spec.deploy.strategy
            ),
            now,
        )
        .await?;
        tracing::info!(app, env, rollout.id = r.id, from = %from, to, "rollout started");
        let index = self.store().bump_index().await?;
        self.server.index.send_replace(index);
        Ok(r)
    }

    async fn control(&mut self, app: &str, env: &str, control: Control) -> Result<Rollout, ApiErr> {
        let now = now_ms();
        let Some(mut r) = self
            .store()
            .latest_rollout(app, env)
            .await?
            .filter(|r| !r.state.is_final())
        else {
            return Err(ApiErr::Conflict(format!(
                "{app} has no rollout in progress{}",
                view::in_env(env)
            )));
        };
        let spec = self.spec(app, env, &r.to).await?;
        let what = match control {
            Control::Pause => {
                if r.state == RolloutState::Paused {
                    return Err(ApiErr::Conflict(format!(
                        "rollout {} is paused already",
                        r.id
                    )));
                }
                r.state = RolloutState::Paused;
                r.message = format!("paused by the operator: {}", r.message);
                "pause"
            }
            Control::Resume => {
                if r.state != RolloutState::Paused {
                    return Err(ApiErr::Conflict(format!("rollout {} is not paused", r.id)));
                }
                r.state = RolloutState::Progressing;
                r.progress_at = now;
                "resume"
            }
            Control::Abort => {
                if r.reverting {
                    return Err(ApiErr::Conflict(format!(
                        "rollout {} is rolling back already",
                        r.id
                    )));
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
                "abort"
            }
            Control::Promote { .. } if r.blue_green.is_some() => {
                let bg = r.blue_green.as_mut().expect("checked");
                if bg.switched_at.is_some() || bg.promoted || r.reverting {
                    return Err(ApiErr::Conflict(format!(
                        "rollout {} switched already; nothing to promote",
                        r.id
                    )));
                }
                bg.promoted = true;
                r.progress_at = now;
                "promote"
            }
            Control::Promote { full } => {
                let total = spec.deploy.steps.len() as u32;
                let cp = r.canary.as_mut().filter(|c| c.step < total && !r.reverting);
                let Some(cp) = cp else {
                    return Err(ApiErr::Conflict(format!(
                        "rollout {} has no canary step to promote (it is {})",
                        r.id, r.state
                    )));
                };
                cp.step = if full { total } else { cp.step + 1 };
                cp.step_started_at = None;
                cp.analysis = None;
                cp.window_started_at = None;
                r.progress_at = now;
                if full {
                    "promote --full"
                } else {
                    "promote"
                }
            }
        };
        self.store().update_rollout(&r, now).await?;
        let msg = format!(
            "{}`drover {what}` on rollout {}: {}",
            view::env_tag(env),
            r.id,
            r.message
        );
        let event = match control {
            Control::Pause => "paused",
            Control::Resume => "resumed",
            Control::Abort => "aborted",
            Control::Promote { .. } => "promoted",
        };
        self.rollout_event(&r, &spec, event, &msg, now).await?;
        tracing::info!(app, env, rollout.id = r.id, what, "operator control");
        // Routing follows the rollout's state and split.
        let index = self.store().bump_index().await?;
        self.server.index.send_replace(index);
        Ok(r)
    }

    async fn tick_all(&mut self) {
        let now = now_ms();
        // Cluster-wide observations, read once per tick for every app.
        let cluster = async {
            let deployments = self.store().list_deployments().await?;
            let nodes = self.nodes(now).await?;
            let proxies = self.store().list_proxies().await?;
            Ok::<_, drover_store::StoreError>((deployments, nodes, proxies))
        };
        let (deployments, node_records, proxies) = match cluster.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read deployments, nodes and proxies");
                return;
            }
        };
        let ready = view::nodes_ready(&node_records, now);
        self.note_node_changes(&node_records, &ready, now).await;
        self.server
            .node_count
            .store(node_records.len(), std::sync::atomic::Ordering::Relaxed);
        let cluster = Cluster {
            now,
            nodes: node_records,
            ready,
            drain_floor: proxies
                .iter()
                .filter(|p| now.saturating_sub(p.last_seen) < PROXY_FRESH_MS)
                .map(|p| p.oldest_live_index)
                .min(),
        };
        // An app's instances, read once per tick for all its environments
        // (each environment plans only its own).
        let mut instances: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        for d in deployments {
            let key = (d.app.clone(), d.env.clone());
            if !instances.contains_key(&d.app) {
                match self.store().list_instances(&d.app).await {
                    Ok(list) => {
                        instances.insert(d.app.clone(), list);
                    }
                    Err(e) => {
                        tracing::warn!(app = %d.app, error = %e, "cannot read instances");
                        continue;
                    }
                }
            }
            match self.tick_deployment(&d, &instances[&d.app], &cluster).await {
                Ok(()) => {
                    self.errors.remove(&key);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.errors.get(&key) != Some(&msg) {
                        tracing::error!(app = %d.app, env = %d.env, error = %msg, "cannot plan this deployment; others are unaffected");
                        self.errors.insert(key, msg);
                    }
                }
            }
        }
    }

    /// The nodes, read again when the copy is [`NODES_FRESH_MS`] old, or
    /// [`NODES_REGISTERED_MS`] old and a node registered since: with
    /// thousands of nodes, reading them all at every tick was most of the
    /// server's work (and with a read per registration, registering
    /// thousands of agents was quadratic); a lease is 10 s or more, so a
    /// copy this fresh tells readiness as well.
    async fn nodes(&mut self, now: u64) -> Result<Arc<Vec<NodeRecord>>, drover_store::StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let registered = self.server.nodes_changed.load(Relaxed);
        if let Some((at, nodes)) = &self.node_cache {
            let age = now.saturating_sub(*at);
            let fresh = if registered {
                NODES_REGISTERED_MS
            } else {
                NODES_FRESH_MS
            };
            if age < fresh {
                // A registration seen here is read at a later tick (the
                // engine ticks at least every second).
                return Ok(nodes.clone());
            }
        }
        self.server.nodes_changed.store(false, Relaxed);
        let nodes = Arc::new(self.store().list_nodes().await?);
        self.node_cache = Some((now, nodes.clone()));
        Ok(nodes)
    }

    /// Records a node that lost its lease (its instances leave routing and
    /// are replaced on ready nodes by the planner) and one that came back.
    async fn note_node_changes(
        &mut self,
        nodes: &[drover_store::NodeRecord],
        ready: &BTreeMap<String, bool>,
        now: u64,
    ) {
        for n in nodes {
            let is = ready.get(&n.name).copied().unwrap_or(false);
            let was = match self.was_ready.get_mut(&n.name) {
                Some(w) => std::mem::replace(w, is),
                None => {
                    self.was_ready.insert(n.name.clone(), is);
                    continue;
                }
            };
            let msg = match (was, is) {
                (true, false) => format!(
                    "node {} lost: no heartbeat for {} ms; its instances leave routing and are replaced on ready nodes",
                    n.name,
                    now.saturating_sub(n.last_seen)
                ),
                (false, true) => format!(
                    "node {} is back; instances replaced meanwhile are stopped there",
                    n.name
                ),
                _ => continue,
            };
            tracing::warn!(node = %n.name, "{msg}");
            let kind = if is { "node.back" } else { "node.lost" };
            if let Err(e) = self.store().add_event(None, kind, &msg, now).await {
                tracing::warn!(error = %e, "cannot record a node event");
            }
        }
    }

    /// The analysis of the active canary step of (app, env) so far, judged
    /// on the proxies' figures for the new release since the engine began
    /// measuring the step, and when that was (after a server restart it
    /// measures again: the planner counts the analysis deadline from then).
    fn canary_verdict(
        &mut self,
        app: &str,
        env: &str,
        active: Option<&Rollout>,
        spec: &AppSpec,
    ) -> Option<(Verdict, u64)> {
        let key = (app.to_string(), env.to_string());
        let (r, analysis) = match (active, &spec.deploy.analysis) {
            (Some(r), Some(a)) if !r.reverting => (r, a),
            _ => {
                self.windows.remove(&key);
                self.queries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                return None;
            }
        };
        let cp = r.canary.as_ref()?;
        let started = cp.step_started_at?;
        let step = (r.id, cp.step, started);
        let total = self
            .server
            .traffic
            .lock()
            .map(|t| t.total(app, env, &r.to))
            .unwrap_or_default();
        let (base, since) = match self.windows.get(&key) {
            Some((s, base, since)) if *s == step => (base.clone(), *since),
            _ => {
                // Never before the step began (it may have begun this tick).
                let since = now_ms().max(started);
                self.windows.insert(key, (step, total.clone(), since));
                (total.clone(), since)
            }
        };
        let window = traffic::since(&total, &base);
        let mut parts = Vec::new();
        if analysis.builtin {
            parts.push(analysis::judge(&window, analysis, &LATENCY_BUCKETS_MS));
        }
        if !analysis.queries.is_empty() {
            parts.push(self.query_verdict(r, step, since, analysis));
        }
        analysis::combine(parts).map(|v| (v, since))
    }

    /// The Prometheus part of a canary step's analysis: the last round of
    /// queries, a new round started in its own task when one is due.
    fn query_verdict(
        &mut self,
        r: &Rollout,
        step: StepId,
        since: u64,
        a: &drover_core::AnalysisSettings,
    ) -> Verdict {
        let now = now_ms();
        let elapsed = now.saturating_sub(since);
        if elapsed < a.interval_ms {
            return Verdict::Inconclusive(format!(
                "Prometheus is asked once the step has run {}",
                drover_core::duration::format_ms(a.interval_ms)
            ));
        }
        let key = (r.app.clone(), r.env.clone());
        let mut runs = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        let run = runs
            .entry(key.clone())
            .and_modify(|q| {
                if q.step != step {
                    *q = QueryRun {
                        step,
                        asked_at: 0,
                        running: false,
                        verdict: None,
                    };
                }
            })
            .or_insert(QueryRun {
                step,
                asked_at: 0,
                running: false,
                verdict: None,
            });
        let due = run.verdict.is_none() || now.saturating_sub(run.asked_at) >= a.interval_ms;
        if due && !run.running {
            run.running = true;
            run.asked_at = now;
            let base = a.prometheus.clone().unwrap_or_default();
            let vars = (
                r.app.clone(),
                r.env.clone(),
                r.to.clone(),
                r.from.clone().unwrap_or_default(),
            );
            let (queries, client) = (a.queries.clone(), self.prom.clone());
            let (results, engine) = (self.queries.clone(), self.server.engine.clone());
            tokio::spawn(async move {
                let mut verdicts = Vec::new();
                for q in &queries {
                    let promql = analysis::render_query(
                        &q.query,
                        &analysis::QueryVars {
                            app: &vars.0,
                            env: &vars.1,
                            release: &vars.2,
                            stable: &vars.3,
                            window_ms: now_ms().saturating_sub(since),
                        },
                    );
                    let outcome = crate::prom::query(&client, &base, &promql).await;
                    tracing::debug!(query = %q.name, promql = %promql, ?outcome, "canary analysis query");
                    verdicts.push(analysis::judge_query(q, &outcome));
                }
                let verdict = analysis::combine(verdicts);
                let mut runs = results.lock().unwrap_or_else(|p| p.into_inner());
                // A round of a step that has ended is dropped.
                if let Some(run) = runs.get_mut(&key).filter(|q| q.step == step) {
                    run.running = false;
                    run.verdict = verdict;
                }
                drop(runs);
                engine.poke();
            });
        }
        run.verdict.clone().unwrap_or_else(|| {
            Verdict::Inconclusive(format!(
                "asking Prometheus at {}",
                a.prometheus.as_deref().unwrap_or("")
            ))
        })
    }

    /// Blue/green: the pre-promotion check of a ready new set — a GET of
    /// `preview_check` on every new instance, each must answer 2xx. Runs
    /// once per rollout, in its own task (the engine does not wait on it).
    fn preview_verdict(
        &mut self,
        active: Option<&Rollout>,
        spec: &AppSpec,
        records: &[InstanceRecord],
        ready: &std::collections::BTreeMap<String, bool>,
    ) -> Option<Verdict> {
        let r = active.filter(|r| !r.reverting && r.from.is_some())?;
        let path = spec.deploy.preview_check.clone()?;
        if r.blue_green
            .as_ref()
            .is_some_and(|b| b.switched_at.is_some())
        {
            return None;
        }
        let addrs: Vec<String> = records
            .iter()
            .filter(|i| i.release == r.to)
            .filter_map(|i| view::serves(i, ready.get(&i.node).copied().unwrap_or(false)))
            .collect();
        if (addrs.len() as u32) < spec.deploy.instances {
            return None;
        }
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        match checks.get(&r.id) {
            Some(Some(v)) => return Some(v.clone()),
            Some(None) => {}
            None => {
                checks.insert(r.id, None);
                let (id, results, engine) = (r.id, self.checks.clone(), self.server.engine.clone());
                tokio::spawn(async move {
                    let v = preview_check(&addrs, &path).await;
                    tracing::info!(rollout.id = id, verdict = ?v, "blue/green preview check");
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, Some(v));
                    engine.poke();
                });
            }
        }
        Some(Verdict::Inconclusive(format!(
            "running GET {} on the new set",
            spec.deploy.preview_check.as_deref().unwrap_or("")
        )))
    }

    async fn tick_deployment(
        &mut self,
        dep: &DeploymentRecord,
        app_instances: &[InstanceRecord],
        cluster: &Cluster,
    ) -> Result<(), ApiErr> {
        let now = cluster.now;
        let app = dep.app.as_str();
        let env = dep.env.as_str();
        let rollout = self.store().latest_rollout(app, env).await?;
        let active = rollout.as_ref().filter(|r| !r.state.is_final());
        let settings_release = match active {
            Some(r) if r.reverting => r.from.clone().unwrap_or_else(|| r.to.clone()),
            Some(r) => r.to.clone(),
            // No active rollout: the live release's settings; after a failed
            // first deploy, the failed release's (housekeeping must still
            // stop and forget its instances).
            None => match (&dep.live_release, &rollout) {
                (Some(l), _) => l.clone(),
                (None, Some(r)) => r.to.clone(),
                (None, None) => return Ok(()),
            },
        };
        let spec = self.spec(app, env, &settings_release).await?;
        let records: Vec<InstanceRecord> = app_instances
            .iter()
            .filter(|r| r.env == env)
            .cloned()
            .collect();
        // Out of routing on every live proxy with no request in flight that
        // could still reach it, or past the drain timeout.
        let drained = |rec: &InstanceRecord| -> bool {
            let Desired::Drain { since } = rec.desired else {
                return false;
            };
            now.saturating_sub(since) >= spec.deploy.drain_timeout_ms
                || cluster
                    .drain_floor
                    .is_none_or(|floor| floor >= rec.drain_index.unwrap_or(u64::MAX))
        };
        let instances: Vec<_> = records
            .iter()
            .map(|r| {
                view::to_core(
                    r,
                    cluster.ready.get(&r.node).copied().unwrap_or(false),
                    drained(r),
                )
            })
            .collect();
        // The nodes this environment may run on: every label of its selector.
        let nodes = view::env_nodes(&spec, env, &cluster.nodes, &cluster.ready);
        let (verdict, window_since) = match spec.deploy.strategy {
            Strategy::BlueGreen => (
                self.preview_verdict(active, &spec, &records, &cluster.ready),
                None,
            ),
            _ => match self.canary_verdict(app, env, active, &spec) {
                Some((v, since)) => (Some(v), Some(since)),
                None => (None, None),
            },
        };
        // The planner counts the analysis deadline from when measuring began.
        let mut rollout = rollout;
        if let (Some(since), Some(cp)) = (
            window_since,
            rollout.as_mut().and_then(|r| r.canary.as_mut()),
        ) {
            cp.window_started_at = Some(since);
        }
        let p = plan(&PlanInput {
            settings: &spec.deploy,
            rollout: rollout.as_ref(),
            live: dep.live_release.as_deref(),
            instances: &instances,
            nodes: &nodes,
            now,
            verdict: verdict.as_ref(),
        });

        let mut changes = Vec::new();
        for a in &p.actions {
            changes.push(match a {
                Action::Place { release, node } => InstanceChange::Insert(InstanceRecord {
                    id: match env {
                        "" => format!("{app}-{release}-{:06x}", rand::random::<u32>() & 0xff_ffff),
                        _ => format!(
                            "{app}-{env}-{release}-{:06x}",
                            rand::random::<u32>() & 0xff_ffff
                        ),
                    },
                    app: app.to_string(),
                    env: env.to_string(),
                    release: release.clone(),
                    node: node.clone(),
                    desired: Desired::Run,
                    drain_index: None,
                    routed: false,
                    created_at: now,
                    observed: None,
                    observed_at: None,
                }),
                Action::Route { instance } => InstanceChange::SetRouted {
                    id: instance.clone(),
                    routed: true,
                },
                Action::Unroute { instance } => InstanceChange::SetRouted {
                    id: instance.clone(),
                    routed: false,
                },
                Action::Retire { instance } => InstanceChange::Drain {
                    id: instance.clone(),
                    since: now,
                },
                Action::Stop { instance } => InstanceChange::Stop {
                    id: instance.clone(),
                },
                Action::Forget { instance } => InstanceChange::Delete {
                    id: instance.clone(),
                },
            });
            tracing::debug!(app, env, action = %a, "apply");
        }
        if !changes.is_empty() {
            let index = self.store().apply_instance_changes(&changes).await?;
            self.server.index.send_replace(index);
        }
        if let Some(new) = p.rollout {
            let old = rollout.as_ref().expect("an update implies a rollout");
            // Success and the new live release: one transaction.
            if new.state == RolloutState::Succeeded && old.state != RolloutState::Succeeded {
                self.store().complete_rollout(&new, now).await?;
            } else {
                self.store().update_rollout(&new, now).await?;
            }
            let split = |r: &Rollout| {
                (
                    r.reverting,
                    r.canary.as_ref().map(|c| (c.step, c.weight)),
                    r.blue_green.as_ref().map(|b| b.switched_at.is_some()),
                )
            };
            if new.state != old.state || split(&new) != split(old) {
                // Routing follows the rollout's target, the live release and the canary split.
                let index = self.store().bump_index().await?;
                self.server.index.send_replace(index);
            }
            if new.state.is_final() && !old.state.is_final() {
                self.checks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&new.id);
                if let Err(e) =
                    crate::retention::prune(&self.server, app, self.server.keep_releases).await
                {
                    tracing::warn!(app, error = %e, "artifact retention failed");
                }
            }
            self.observe_steps(old, &new, &spec, now);
            let target = self.spec(app, env, &new.to).await?;
            if new.state != old.state || new.reverting != old.reverting {
                let event = if new.reverting && !old.reverting && !new.state.is_final() {
                    "rolling_back".to_string()
                } else {
                    new.state.as_str().to_string()
                };
                self.rollout_event(
                    &new,
                    &target,
                    &event,
                    &format!("{}{}", view::env_tag(env), new.message),
                    now,
                )
                .await?;
                tracing::info!(app, env, rollout.id = new.id, state = %new.state, message = %new.message, "rollout state changed");
            }
            if !new.reverting && !new.state.is_final() {
                // A canary step reached (its weight applied) or a blue/green switch.
                let reached = |r: &Rollout| {
                    r.canary
                        .as_ref()
                        .and_then(|c| c.step_started_at.map(|_| c.step))
                };
                let switched = |r: &Rollout| {
                    r.blue_green
                        .as_ref()
                        .is_some_and(|b| b.switched_at.is_some())
                };
                let steps = target.deploy.steps.len();
                if let Some(step) = reached(&new).filter(|s| Some(*s) != reached(old)) {
                    let weight = new.canary.as_ref().map(|c| c.weight).unwrap_or(0);
                    let msg = format!(
                        "{}rollout {}: step {}/{steps}, {weight}% of users on {}",
                        view::env_tag(env),
                        new.id,
                        step + 1,
                        new.to
                    );
                    self.rollout_event(&new, &target, "step", &msg, now).await?;
                }
                if switched(&new) && !switched(old) {
                    let msg = format!(
                        "{}rollout {}: all users switched to {}",
                        view::env_tag(env),
                        new.id,
                        new.to
                    );
                    self.rollout_event(&new, &target, "switched", &msg, now)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// GET `path` on every address (5 s each); all must answer 2xx.
async fn preview_check(addrs: &[String], path: &str) -> Verdict {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for addr in addrs {
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .await;
        let status = match got {
            Err(_) => return Verdict::Fail(format!("GET {path} on {addr} timed out after 5s")),
            Ok(Err(e)) => return Verdict::Fail(format!("GET {path} on {addr}: {e}")),
            Ok(Ok(head)) => head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0),
        };
        if !(200..300).contains(&status) {
            return Verdict::Fail(format!("GET {path} on {addr} answered {status}"));
        }
    }
    Verdict::Pass(format!(
        "GET {path} answered 2xx on all {} new instance(s)",
        addrs.len()
    ))
}
