//! Supervision of instances: one task per instance converges it to its
//! assignment (prepare the release, start, watch, health-check, restart
//! with backoff, stop gracefully), and keeps the shared book of what runs
//! (persisted to the state file, reported to the server).
//!
//! Apps outlive the supervisor: [`Supervisor::detach`] (and drop) end the
//! tasks without touching the processes; [`Supervisor::start`] re-adopts
//! processes from the state file by pid + start time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_api::{
    Assignment, DesiredState, HealthReport, HealthSpec, InstanceReport, InstanceState,
};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

use crate::artifacts::{is_safe_name, ArtifactStore};
use crate::health::{self, HealthTracker, Probe};
use crate::logs;
use crate::ports;
use crate::process::{self, SpawnSpec};
use crate::state::{self, AgentState, InstanceRecord};

/// First restart delay; doubles per consecutive crash.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Healthy this long after a start → the backoff starts over.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Retry of a failed preparation/start that may succeed later.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);
/// How often an adopted process (not our child) is checked.
pub const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// Wait for exit after SIGKILL before giving up on it.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(10);

/// Delay before the restart that follows `streak` consecutive crashes
/// (0 → 500 ms, 1 → 1 s, 2 → 2 s, … capped at 30 s).
/// What an app should listen on (its `HOST`): loopback when the proxies
/// reach it there (one machine), every interface when the agent advertises
/// another address (proxies on other hosts); health checks use 127.0.0.1.
pub fn bind_host(advertise_host: &str) -> &'static str {
    let loopback = advertise_host == "localhost"
        || advertise_host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

pub fn restart_backoff(streak: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << streak.min(16))
        .min(BACKOFF_MAX)
}

/// `500ms`, `2s`, `1.5s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Where and how the supervisor works.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub data_dir: PathBuf,
    /// Host part of reported addresses.
    pub advertise_host: String,
    /// Inclusive port range for instances.
    pub port_range: (u16, u16),
    /// How often logs are checked for rotation.
    pub log_check_interval: Duration,
    /// Rotate logs larger than this.
    pub max_log_bytes: u64,
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf, advertise_host: String, port_range: (u16, u16)) -> Self {
        SupervisorConfig {
            data_dir,
            advertise_host,
            port_range,
            log_check_interval: Duration::from_secs(10),
            max_log_bytes: logs::MAX_LOG_BYTES,
        }
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runtime status of one instance (not persisted).
#[derive(Debug, Clone)]
struct Status {
    state: InstanceState,
    health: HealthReport,
    message: Option<String>,
}

#[derive(Debug)]
struct Entry {
    rec: InstanceRecord,
    status: Status,
}

#[derive(Debug)]
struct Book {
    port_cursor: u16,
    instances: BTreeMap<String, Entry>,
}

struct Slot {
    tx: watch::Sender<Option<Assignment>>,
    handle: JoinHandle<()>,
}

struct Shared {
    cfg: SupervisorConfig,
    artifacts: Arc<ArtifactStore>,
    probe_client: reqwest::Client,
    book: Mutex<Book>,
    /// Lock order: tasks → book; save_lock → book.
    tasks: Mutex<HashMap<String, Slot>>,
    save_lock: Mutex<()>,
    save_failing: AtomicBool,
    changed: watch::Sender<u64>,
    /// The data dir, canonical: every instance process carries it
    /// ([`process::AGENT_DIR_ENV`]).
    agent_dir: String,
    /// Instance processes of this agent that its state file did not list
    /// (it was lost or damaged), found at start: adopted by the first
    /// reconcile if still assigned to run, stopped otherwise.
    orphans: Mutex<Option<HashMap<String, process::Orphan>>>,
    /// The local Docker Engine, connected when a container is first wanted
    /// (a node without containers never needs one).
    docker: tokio::sync::Mutex<Option<drover_docker::Docker>>,
    /// One load or pull per image at a time (instances of one release
    /// start together).
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    /// The Docker Engine, connecting on first use (and again after a
    /// failure).
    async fn docker(&self) -> Result<drover_docker::Docker, String> {
        let mut d = self.docker.lock().await;
        if let Some(d) = d.as_ref() {
            return Ok(d.clone());
        }
        let c = drover_docker::connect().await?;
        *d = Some(c.clone());
        Ok(c)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("book poisoned")
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Writes the state file (serialized under the save lock so writes
    /// land in order). Failures are logged once per streak.
    fn persist(&self) {
        let _g = self.save_lock.lock().expect("save lock poisoned");
        let snapshot = {
            let b = self.book();
            AgentState {
                version: state::VERSION,
                port_cursor: Some(b.port_cursor),
                instances: b
                    .instances
                    .iter()
                    .map(|(k, e)| (k.clone(), e.rec.clone()))
                    .collect(),
            }
        };
        let path = state::state_path(&self.cfg.data_dir);
        match state::save(&path, &snapshot) {
            Ok(()) => {
                if self.save_failing.swap(false, Ordering::Relaxed) {
                    info!(path = %path.display(), "agent state file written again");
                }
            }
            Err(e) => {
                if !self.save_failing.swap(true, Ordering::Relaxed) {
                    error!(path = %path.display(), error = %e,
                        "cannot write agent state file (apps keep running; will retry)");
                }
            }
        }
    }

    /// Applies `f` to the instance's entry (if still known) and notifies.
    fn update<R>(&self, id: &str, notify: bool, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let r = {
            let mut b = self.book();
            b.instances.get_mut(id).map(f)
        };
        if notify {
            self.bump();
        }
        r
    }

    fn allocate_port(&self) -> Option<u16> {
        let mut b = self.book();
        let in_use: HashSet<u16> = b.instances.values().filter_map(|e| e.rec.port).collect();
        let mut cursor = b.port_cursor;
        let port = ports::pick_port(self.cfg.port_range, &mut cursor, &in_use)?;
        b.port_cursor = cursor;
        Some(port)
    }
}

/// What an instance runs from, once fetched.
enum Prepared {
    /// The unpacked release directory (process driver).
    Dir(PathBuf),
    /// The engine, which has the image (docker driver).
    Image(drover_docker::Docker),
}

/// How an instance task begins.
enum Initial {
    Fresh,
    Adopt {
        pid: u32,
        start: u64,
    },
    /// A container was recorded: adopted if it still runs.
    AdoptContainer {
        id: String,
    },
    CrashedWhileAway,
}

/// The instances of this node and their tasks.
pub struct Supervisor {
    shared: Arc<Shared>,
    load_problem: Option<String>,
    _log_task: AbortOnDrop,
    _sweep_task: AbortOnDrop,
}

impl Supervisor {
    /// Loads the state file, re-adopts live processes, starts the tasks.
    /// Must be called inside a tokio runtime.
    pub fn start(cfg: SupervisorConfig, artifacts: Arc<ArtifactStore>) -> anyhow::Result<Self> {
        for sub in ["artifacts", "releases", "logs"] {
            std::fs::create_dir_all(cfg.data_dir.join(sub))?;
        }
        let loaded = state::load(&state::state_path(&cfg.data_dir));
        if let Some(p) = &loaded.problem {
            if loaded.corrupt {
                error!("{p}");
            } else {
                warn!("{p}");
            }
        }
        let agent_dir = std::fs::canonicalize(&cfg.data_dir)?
            .to_string_lossy()
            .into_owned();
        let orphans: HashMap<String, process::Orphan> = process::find_orphans(&agent_dir)
            .into_iter()
            .filter(|o| !loaded.state.instances.contains_key(&o.instance))
            .map(|o| (o.instance.clone(), o))
            .collect();
        if !orphans.is_empty() {
            warn!(
                count = orphans.len(),
                "found running instances of this agent without a record (lost or damaged \
                 state): each is re-adopted if the control plane still assigns it, stopped \
                 otherwise"
            );
        }
        let mut instances = BTreeMap::new();
        let mut initial = Vec::new();
        for (id, mut rec) in loaded.state.instances {
            let alive = match (rec.pid, rec.start_time) {
                (Some(pid), Some(st)) => process::is_alive(pid, st).then_some((pid, st)),
                _ => None,
            };
            let run = rec.assignment.desired == DesiredState::Run;
            let how = if let Some(cid) = rec.container.clone() {
                Initial::AdoptContainer { id: cid }
            } else if let Some((pid, start)) = alive {
                info!(instance = %id, app = %rec.assignment.app, release = %rec.assignment.release,
                    pid, "re-adopting running instance");
                Initial::Adopt { pid, start }
            } else if rec.pid.is_some() && run {
                Initial::CrashedWhileAway
            } else {
                Initial::Fresh
            };
            if alive.is_none() {
                if rec.pid.is_some() {
                    info!(instance = %id, pid = rec.pid, "recorded process is gone (or its pid was reused)");
                }
                rec.pid = None;
                rec.start_time = None;
            }
            let state = match how {
                Initial::Adopt { .. } | Initial::AdoptContainer { .. } => {
                    HealthTracker::new(rec.health.unwrap_or(InstanceState::Starting)).state
                }
                Initial::CrashedWhileAway => InstanceState::Crashed,
                Initial::Fresh if run => InstanceState::Preparing,
                Initial::Fresh => InstanceState::Stopped,
            };
            let assignment = rec.assignment.clone();
            instances.insert(
                id.clone(),
                Entry {
                    rec,
                    status: Status {
                        state,
                        health: HealthReport::default(),
                        message: None,
                    },
                },
            );
            initial.push((assignment, how));
        }
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            book: Mutex::new(Book {
                port_cursor: loaded.state.port_cursor.unwrap_or(cfg.port_range.0),
                instances,
            }),
            cfg,
            artifacts,
            probe_client: health::probe_client(),
            tasks: Mutex::new(HashMap::new()),
            save_lock: Mutex::new(()),
            save_failing: AtomicBool::new(false),
            changed,
            agent_dir,
            orphans: Mutex::new(Some(orphans)),
            docker: tokio::sync::Mutex::new(None),
            image_locks: Mutex::new(HashMap::new()),
        });
        shared.persist();
        {
            let mut tasks = shared.tasks.lock().expect("tasks poisoned");
            for (a, how) in initial {
                let slot = spawn_instance(&shared, a.clone(), how);
                tasks.insert(a.instance.clone(), slot);
            }
        }
        let log_task = {
            let dir = logs::logs_dir(&shared.cfg.data_dir);
            let every = shared.cfg.log_check_interval;
            let max = shared.cfg.max_log_bytes;
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let dir = dir.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        logs::rotate_all(&dir, max, logs::KEEP)
                    })
                    .await;
                }
            }))
        };
        let sweep_task = {
            let shared = shared.clone();
            AbortOnDrop(tokio::spawn(async move {
                tokio::time::sleep(STRAY_SWEEP_FIRST).await;
                loop {
                    sweep_strays(&shared).await;
                    tokio::time::sleep(STRAY_SWEEP_EVERY).await;
                }
            }))
        };
        Ok(Supervisor {
            shared,
            load_problem: loaded.problem,
            _log_task: log_task,
            _sweep_task: sweep_task,
        })
    }

    /// What was wrong with the state file at start, if anything.
    pub fn load_problem(&self) -> Option<&str> {
        self.load_problem.as_deref()
    }

    /// Converges to `assignments` (the server's complete list for this
    /// node): new ones start, changed ones are updated, and instances not
    /// listed any more are stopped and forgotten.
    pub fn reconcile(&self, assignments: &[Assignment]) {
        self.reconcile_keeping(assignments, &[]);
    }

    /// [`Self::reconcile`], leaving the instances listed in `unchanged`
    /// (which the server cannot describe right now) as they are.
    pub fn reconcile_keeping(&self, assignments: &[Assignment], unchanged: &[String]) {
        let mut dirty = false;
        let mut orphans = self
            .shared
            .orphans
            .lock()
            .expect("orphans poisoned")
            .take()
            .unwrap_or_default();
        {
            let mut tasks = self.shared.tasks.lock().expect("tasks poisoned");
            let mut seen: HashSet<String> = unchanged.iter().cloned().collect();
            for a in assignments {
                seen.insert(a.instance.clone());
                if tasks
                    .get(&a.instance)
                    .is_some_and(|s| s.handle.is_finished())
                {
                    tasks.remove(&a.instance);
                }
                if let Some(slot) = tasks.get(&a.instance) {
                    let changed = slot.tx.send_if_modified(|cur| {
                        if cur.as_ref() != Some(a) {
                            *cur = Some(a.clone());
                            true
                        } else {
                            false
                        }
                    });
                    if changed {
                        self.shared
                            .update(&a.instance, false, |e| e.rec.assignment = a.clone());
                        dirty = true;
                    }
                } else {
                    let mut how = Initial::Fresh;
                    {
                        let mut b = self.shared.book();
                        let entry =
                            b.instances
                                .entry(a.instance.clone())
                                .or_insert_with(|| Entry {
                                    rec: InstanceRecord::new(a.clone()),
                                    status: Status {
                                        state: InstanceState::Preparing,
                                        health: HealthReport::default(),
                                        message: None,
                                    },
                                });
                        entry.rec.assignment = a.clone();
                        if a.desired == DesiredState::Run {
                            if let Some(o) = orphans.remove(&a.instance) {
                                info!(instance = %a.instance, pid = o.pid, port = o.port,
                                    "re-adopting running instance found without a state record");
                                entry.rec.pid = Some(o.pid);
                                entry.rec.start_time = Some(o.start);
                                entry.rec.port = Some(o.port);
                                how = Initial::Adopt {
                                    pid: o.pid,
                                    start: o.start,
                                };
                            }
                        }
                    }
                    let slot = spawn_instance(&self.shared, a.clone(), how);
                    tasks.insert(a.instance.clone(), slot);
                    dirty = true;
                }
            }
            for (id, slot) in tasks.iter() {
                if !seen.contains(id) {
                    slot.tx.send_if_modified(|cur| cur.take().is_some());
                }
            }
        }
        // Found running but no longer assigned to run here: stopped.
        for o in orphans
            .into_values()
            .filter(|o| !unchanged.contains(&o.instance))
        {
            warn!(instance = %o.instance, pid = o.pid,
                "stopping a running instance found without a state record: not assigned to run here");
            process::signal_group(o.pid, o.start, Signal::SIGTERM);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    process::signal_group(o.pid, o.start, Signal::SIGKILL);
                });
            }
        }
        if dirty {
            self.shared.persist();
            self.shared.bump();
        }
    }

    /// One report per known instance.
    pub fn reports(&self) -> Vec<InstanceReport> {
        let b = self.shared.book();
        b.instances
            .values()
            .map(|e| InstanceReport {
                instance: e.rec.instance.clone(),
                state: e.status.state,
                pid: e.rec.pid,
                // Something runs (a process or a container) on a known port.
                address: match e.rec.port {
                    Some(port) if e.rec.pid.is_some() || e.rec.container.is_some() => {
                        Some(format!("{}:{port}", self.shared.cfg.advertise_host))
                    }
                    _ => None,
                },
                restarts: e.rec.restarts,
                health: e.status.health.clone(),
                message: e.status.message.clone(),
            })
            .collect()
    }

    /// (app, release, instance, state, restarts) of every known instance,
    /// for `/metrics`.
    pub fn metric_rows(&self) -> Vec<(String, String, String, InstanceState, u32)> {
        let b = self.shared.book();
        b.instances
            .values()
            .map(|e| {
                (
                    e.rec.assignment.app.clone(),
                    e.rec.assignment.release.clone(),
                    e.rec.instance.clone(),
                    e.status.state,
                    e.rec.restarts,
                )
            })
            .collect()
    }

    /// Ticks whenever an instance changes state (for prompt reports).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Ends all tasks without stopping any process, and writes the state.
    pub async fn detach(self) {
        let slots: Vec<Slot> = {
            let mut tasks = self.shared.tasks.lock().expect("tasks poisoned");
            tasks.drain().map(|(_, s)| s).collect()
        };
        for s in &slots {
            s.handle.abort();
        }
        for s in slots {
            let _ = s.handle.await;
        }
        self.shared.persist();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(tasks) = self.shared.tasks.lock() {
            for s in tasks.values() {
                s.handle.abort();
            }
        }
    }
}

fn spawn_instance(shared: &Arc<Shared>, a: Assignment, how: Initial) -> Slot {
    let (tx, rx) = watch::channel(Some(a.clone()));
    let span =
        tracing::info_span!("instance", instance = %a.instance, app = %a.app, release = %a.release);
    let task = InstanceTask {
        shared: shared.clone(),
        id: a.instance.clone(),
        rx,
        running: None,
        pending_restart: None,
        retry_at: None,
    };
    let handle = tokio::spawn(task.run(how).instrument(span));
    Slot { tx, handle }
}

/// The process (or container) of a running instance.
enum Proc {
    Child {
        child: tokio::process::Child,
        pid: u32,
        start: u64,
    },
    Adopted {
        pid: u32,
        start: u64,
    },
    /// A container of the docker driver (started or adopted), with the task
    /// copying its output to the instance's log file.
    Container {
        id: String,
        docker: drover_docker::Docker,
        _logs: AbortOnDrop,
    },
}

impl Proc {
    /// Pid and start time of a process; `None` for a container.
    fn ids(&self) -> Option<(u32, u64)> {
        match self {
            Proc::Child { pid, start, .. } | Proc::Adopted { pid, start } => Some((*pid, *start)),
            Proc::Container { .. } => None,
        }
    }

    /// Waits for the group leader (or the container) to exit; describes
    /// how. Cancel-safe.
    async fn wait_exit(&mut self) -> String {
        if let Proc::Child { child, .. } = self {
            match child.wait().await {
                Ok(status) => return process::describe_exit(status),
                Err(e) => warn!(error = %e, "cannot wait for child; polling /proc instead"),
            }
        }
        let (pid, start) = match self {
            Proc::Container { id, docker, .. } => {
                return drover_docker::wait_exit(docker, id).await;
            }
            Proc::Child { pid, start, .. } | Proc::Adopted { pid, start } => (*pid, *start),
        };
        loop {
            if !process::is_alive(pid, start) {
                return "exited (status unknown: the process was adopted)".to_string();
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }
}

struct Running {
    proc: Proc,
    tracker: HealthTracker,
    health_rx: mpsc::Receiver<Probe>,
    _health_task: AbortOnDrop,
    healthy_since: Option<Instant>,
}

enum Step {
    /// Re-read the assignment and go on.
    Again,
    /// The supervisor is going away.
    Exit,
}

struct InstanceTask {
    shared: Arc<Shared>,
    id: String,
    rx: watch::Receiver<Option<Assignment>>,
    running: Option<Running>,
    /// Restart after a crash, not before.
    pending_restart: Option<Instant>,
    /// Retry a failed preparation/start, not before.
    retry_at: Option<Instant>,
}

impl InstanceTask {
    async fn run(mut self, how: Initial) {
        match how {
            Initial::Fresh => {}
            Initial::Adopt { pid, start } => self.adopt(pid, start),
            Initial::AdoptContainer { id } => self.adopt_container(id).await,
            Initial::CrashedWhileAway => {
                self.crashed("exited while the agent was down".to_string(), None)
            }
        }
        loop {
            let want = self.rx.borrow_and_update().clone();
            let step = match want {
                None => {
                    if let Some(r) = self.running.take() {
                        let timeout = self.recorded_stop_timeout();
                        self.stop(r, timeout).await;
                    }
                    if self.try_forget() {
                        return;
                    }
                    Step::Again
                }
                Some(a) if a.desired == DesiredState::Stop => {
                    self.pending_restart = None;
                    self.retry_at = None;
                    if let Some(r) = self.running.take() {
                        self.stop(r, a.run.stop_timeout_ms).await;
                    }
                    self.shared.update(&self.id, true, |e| {
                        if e.status.state != InstanceState::Stopped {
                            e.status = Status {
                                state: InstanceState::Stopped,
                                health: HealthReport::default(),
                                message: None,
                            };
                        }
                    });
                    self.wait_change().await
                }
                Some(a) => {
                    if self.running.is_none() {
                        match self.bring_up(&a).await {
                            Ok(r) => {
                                self.running = Some(r);
                                Step::Again
                            }
                            Err(step) => step,
                        }
                    } else {
                        self.watch(&a.health).await
                    }
                }
            };
            if let Step::Exit = step {
                return;
            }
        }
    }

    async fn wait_change(&mut self) -> Step {
        match self.rx.changed().await {
            Ok(()) => Step::Again,
            Err(_) => Step::Exit,
        }
    }

    /// Sleeps until `at` unless the assignment changes first.
    async fn sleep_until(&mut self, at: Instant) -> Option<Step> {
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => None,
            r = self.rx.changed() => Some(if r.is_ok() { Step::Again } else { Step::Exit }),
        }
    }

    fn recorded_stop_timeout(&self) -> u64 {
        self.shared
            .book()
            .instances
            .get(&self.id)
            .map(|e| e.rec.assignment.run.stop_timeout_ms)
            .unwrap_or(10_000)
    }

    fn fail(&mut self, message: String, retry: bool) {
        warn!(error = %message, "instance cannot run");
        self.retry_at = retry.then(|| Instant::now() + RETRY_FAILED_AFTER);
        let message = if retry {
            format!(
                "{message} (retrying in {})",
                fmt_duration(RETRY_FAILED_AFTER)
            )
        } else {
            message
        };
        self.shared.update(&self.id, true, |e| {
            e.status = Status {
                state: InstanceState::Failed,
                health: HealthReport::default(),
                message: Some(message),
            };
        });
    }

    /// Backoff / retry wait, then prepare the release and start.
    async fn bring_up(&mut self, a: &Assignment) -> Result<Running, Step> {
        let mut is_restart = false;
        if let Some(at) = self.pending_restart {
            if let Some(step) = self.sleep_until(at).await {
                return Err(step);
            }
            self.pending_restart = None;
            is_restart = true;
        }
        if let Some(at) = self.retry_at {
            if let Some(step) = self.sleep_until(at).await {
                return Err(step);
            }
            self.retry_at = None;
        }
        if !is_safe_name(&a.instance) {
            self.fail(
                format!("instance id {:?} is not a safe file name", a.instance),
                false,
            );
            return Err(self.wait_change().await);
        }
        let prepared = tokio::select! {
            r = Self::prepare(self.shared.clone(), self.id.clone(), a) => r,
            r = self.rx.changed() => return Err(if r.is_ok() { Step::Again } else { Step::Exit }),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err((msg, retry)) => {
                self.fail(msg, retry);
                return Err(if retry {
                    Step::Again
                } else {
                    self.wait_change().await
                });
            }
        };
        if is_restart {
            self.shared.update(&self.id, false, |e| {
                e.rec.restarts = e.rec.restarts.saturating_add(1)
            });
        }
        let started = match prepared {
            Prepared::Dir(dir) => self.start(a, dir),
            Prepared::Image(docker) => {
                let image = a.image.clone().unwrap_or_default();
                self.start_container(a, &image, docker).await
            }
        };
        started.map_err(|msg| {
            self.fail(msg, true);
            Step::Again
        })
    }

    /// What an instance runs from, fetched: the unpacked release (process
    /// driver) or the engine holding the image (docker driver). Errors say
    /// whether to retry.
    async fn prepare(
        shared: Arc<Shared>,
        id: String,
        a: &Assignment,
    ) -> Result<Prepared, (String, bool)> {
        if let Some(image) = &a.image {
            return Self::prepare_image(shared, id, a, image)
                .await
                .map(Prepared::Image);
        }
        let needs_fetch = !crate::artifacts::release_dir(
            &shared.cfg.data_dir,
            &a.app,
            &a.release,
            &a.artifact.sha256.to_ascii_lowercase(),
        )
        .is_dir();
        if needs_fetch {
            shared.update(&id, true, |e| {
                e.status.state = InstanceState::Preparing;
                e.status.message = Some(format!(
                    "fetching artifact {}",
                    &a.artifact.sha256[..12.min(a.artifact.sha256.len())]
                ));
            });
        }
        let short = a.artifact.sha256[..12.min(a.artifact.sha256.len())].to_string();
        let (sh, iid) = (shared.clone(), id);
        let retrying = move |why: String| {
            sh.update(&iid, true, |e| {
                e.status.message = Some(format!("fetching artifact {short}: {why}"));
            });
        };
        shared
            .artifacts
            .ensure_release_reporting(a, &retrying)
            .await
            .map(Prepared::Dir)
            .map_err(|e| {
                let retry = e.is_retryable();
                (e.to_string(), retry)
            })
    }

    /// The engine, with `image` in it. Errors say whether to retry.
    async fn prepare_image(
        shared: Arc<Shared>,
        id: String,
        a: &Assignment,
        image: &str,
    ) -> Result<drover_docker::Docker, (String, bool)> {
        let docker = shared.docker().await.map_err(|e| {
            (
                format!("release {} is a container image, but {e}", a.release),
                true,
            )
        })?;
        let lock = shared
            .image_locks
            .lock()
            .expect("image locks poisoned")
            .entry(image.to_string())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        if drover_docker::has_image(&docker, image)
            .await
            .map_err(|e| (e, true))?
        {
            return Ok(docker);
        }
        if let Some(reference) = &a.image_ref {
            shared.update(&id, true, |e| {
                e.status.state = InstanceState::Preparing;
                e.status.message = Some(format!("pulling image {reference}"));
            });
            let login = a.registry_auth.as_ref().map(|l| drover_docker::Login {
                username: l.username.clone(),
                password: l.password.clone(),
            });
            drover_docker::pull_image(&docker, reference, image, login.as_ref())
                .await
                .map_err(|e| (e, true))?;
            info!(image, reference = %reference, "image pulled from the registry");
            return Ok(docker);
        }
        let short = a.artifact.sha256[..12.min(a.artifact.sha256.len())].to_string();
        shared.update(&id, true, |e| {
            e.status.state = InstanceState::Preparing;
            e.status.message = Some(format!("fetching image archive {short}"));
        });
        let (sh, iid) = (shared.clone(), id.clone());
        let retrying = move |why: String| {
            sh.update(&iid, true, |e| {
                e.status.message = Some(format!("fetching image archive {short}: {why}"));
            });
        };
        let archive = shared
            .artifacts
            .ensure_image_archive(a, &retrying)
            .await
            .map_err(|e| {
                let retry = e.is_retryable();
                (e.to_string(), retry)
            })?;
        shared.update(&id, true, |e| {
            e.status.message = Some(format!("loading image {image}"));
        });
        drover_docker::load_image(&docker, &archive, image)
            .await
            .map_err(|e| (e, true))?;
        info!(image, "image loaded into the Docker Engine");
        Ok(docker)
    }

    async fn start_container(
        &mut self,
        a: &Assignment,
        image: &str,
        docker: drover_docker::Docker,
    ) -> Result<Running, String> {
        let (port, log_path, mut log, restarts) = self.start_parts(a)?;
        // The port is taken in the book before the await below.
        self.shared
            .update(&self.id, false, |e| e.rec.port = Some(port));
        let name = drover_docker::container_name(&a.instance);
        let _ = logs::agent_line(
            &mut log,
            &format!(
                "starting container {name} (release {}, image {image}, port {port}, restarts {restarts})",
                a.release
            ),
        );
        let mut env: Vec<String> = a.run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend([
            format!("PORT={port}"),
            "HOST=0.0.0.0".to_string(),
            format!("DROVER_APP={}", a.app),
            format!("DROVER_RELEASE={}", a.release),
            format!("DROVER_INSTANCE={}", a.instance),
        ]);
        let spec = drover_docker::ContainerSpec {
            name: name.clone(),
            image: image.to_string(),
            command: a.run.command.clone(),
            env,
            labels: HashMap::from([
                (
                    drover_docker::LABEL_AGENT.to_string(),
                    self.shared.agent_dir.clone(),
                ),
                (
                    drover_docker::LABEL_INSTANCE.to_string(),
                    a.instance.clone(),
                ),
                (drover_docker::LABEL_APP.to_string(), a.app.clone()),
                (drover_docker::LABEL_RELEASE.to_string(), a.release.clone()),
            ]),
            port,
            host_ip: bind_host(&self.shared.cfg.advertise_host).to_string(),
            memory_bytes: a.run.memory_bytes,
            cpus: a.run.cpus,
        };
        let cid = match drover_docker::run_container(&docker, &spec).await {
            Ok(id) => id,
            Err(e) => {
                self.shared.update(&self.id, false, |e| e.rec.port = None);
                let _ = logs::agent_line(&mut log, &e);
                return Err(e);
            }
        };
        info!(container = %&cid[..12.min(cid.len())], port, "container started");
        self.started(None, Some(cid.clone()), port, None);
        let proc = container_proc(&docker, &cid, log_path, 0);
        Ok(self.running(proc, port, InstanceState::Starting, &a.health))
    }

    /// Takes over the recorded container if it still runs; otherwise the
    /// instance crashed while the agent was away (or was stopped).
    async fn adopt_container(&mut self, cid: String) {
        let running = match self.shared.docker().await {
            Ok(d) => match drover_docker::is_running(&d, &cid).await {
                Ok(Some(true)) => Some(d),
                Ok(_) => {
                    let _ = drover_docker::remove(&d, &cid).await;
                    None
                }
                Err(e) => {
                    warn!(error = %e, "cannot inspect the recorded container; starting a new one");
                    None
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot reach the Docker Engine to adopt the recorded container");
                None
            }
        };
        let Some(docker) = running else {
            let run = self.shared.update(&self.id, true, |e| {
                e.rec.container = None;
                e.rec.port = None;
                e.rec.health = None;
                e.rec.assignment.desired == DesiredState::Run
            });
            self.shared.persist();
            if run == Some(true) {
                self.crashed(
                    "container exited while the agent was down".to_string(),
                    None,
                );
            } else {
                self.shared.update(&self.id, true, |e| {
                    e.status.state = InstanceState::Stopped;
                });
            }
            return;
        };
        let log_path = logs::log_path(&self.shared.cfg.data_dir, &self.id);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i32)
            .unwrap_or(0);
        let what = format!("adopted container {cid:.12}");
        let id = self.id.clone();
        self.take_over(&what, move |port| {
            info!(container = %&cid[..12.min(cid.len())], port, "re-adopting running container");
            if let Ok(mut log) = logs::open_log(&log_path) {
                let _ = logs::agent_line(
                    &mut log,
                    &format!(
                        "re-adopted container {cid:.12}; its output while the agent was down is in `docker logs {}`",
                        drover_docker::container_name(&id)
                    ),
                );
            }
            container_proc(&docker, &cid, log_path, now)
        });
    }

    /// What every start needs: a free port, the instance's log (opened for
    /// appending) and its restart count so far.
    fn start_parts(&self, a: &Assignment) -> Result<(u16, PathBuf, std::fs::File, u32), String> {
        let port = self
            .shared
            .allocate_port()
            .ok_or_else(|| format!("no free port in {:?}", self.shared.cfg.port_range))?;
        let log_path = logs::log_path(&self.shared.cfg.data_dir, &a.instance);
        let log = logs::open_log(&log_path)
            .map_err(|e| format!("cannot open log {}: {e}", log_path.display()))?;
        let restarts = self
            .shared
            .book()
            .instances
            .get(&self.id)
            .map(|e| e.rec.restarts)
            .unwrap_or(0);
        Ok((port, log_path, log, restarts))
    }

    fn start(&mut self, a: &Assignment, dir: PathBuf) -> Result<Running, String> {
        let (port, _, mut log, restarts) = self.start_parts(a)?;
        let _ = logs::agent_line(
            &mut log,
            &format!(
                "starting {} (release {}, port {port}, restarts {restarts})",
                a.instance, a.release
            ),
        );
        let spawned = process::spawn(&SpawnSpec {
            command: &a.run.command,
            dir: &dir,
            env: &a.run.env,
            port,
            host: bind_host(&self.shared.cfg.advertise_host),
            agent_dir: &self.shared.agent_dir,
            app: &a.app,
            release: &a.release,
            instance: &a.instance,
            log: &log,
        })
        .map_err(|e| format!("cannot start `sh -c` in {}: {e}", dir.display()))?;
        let (pid, start) = (spawned.pid, spawned.start_time);
        info!(pid, port, "instance started");
        self.started(Some((pid, start)), None, port, Some(dir.clone()));
        Ok(self.running(
            Proc::Child {
                child: spawned.child,
                pid,
                start,
            },
            port,
            InstanceState::Starting,
            &a.health,
        ))
    }

    fn running(&self, proc: Proc, port: u16, state: InstanceState, spec: &HealthSpec) -> Running {
        let (tx, rx) = mpsc::channel(4);
        let client = self.shared.probe_client.clone();
        let spec = spec.clone();
        let task = tokio::spawn(async move {
            let every = Duration::from_millis(spec.interval_ms.max(20));
            loop {
                tokio::time::sleep(every).await;
                let p = health::probe(&client, port, &spec).await;
                if tx.send(p).await.is_err() {
                    break;
                }
            }
        });
        let tracker = HealthTracker::new(state);
        Running {
            healthy_since: (tracker.state == InstanceState::Healthy).then(Instant::now),
            proc,
            tracker,
            health_rx: rx,
            _health_task: AbortOnDrop(task),
        }
    }

    fn adopt(&mut self, pid: u32, start: u64) {
        let what = format!("adopted process {pid}");
        self.take_over(&what, |_| Proc::Adopted { pid, start });
    }

    /// Runs an adopted process or container (`make` builds it once the
    /// record's port is known): health checks resume from the recorded
    /// verdict. Without a recorded port there is nothing to check: logged.
    fn take_over(&mut self, what: &str, make: impl FnOnce(u16) -> Proc) {
        let Some((port, health, spec)) = self.shared.book().instances.get(&self.id).map(|e| {
            (
                e.rec.port,
                e.rec.health.unwrap_or(InstanceState::Starting),
                e.rec.assignment.health.clone(),
            )
        }) else {
            return;
        };
        let Some(port) = port else {
            warn!("{what} has no recorded port; health checks cannot run");
            return;
        };
        let r = self.running(make(port), port, health, &spec);
        let state = r.tracker.state;
        self.shared
            .update(&self.id, true, |e| e.status.state = state);
        self.running = Some(r);
    }

    /// The leader exited while it should run: clean up its group, schedule
    /// the restart after the backoff.
    fn crashed(&mut self, how: String, r: Option<Running>) {
        let healthy_long = r
            .as_ref()
            .and_then(|r| r.healthy_since)
            .is_some_and(|t| t.elapsed() >= BACKOFF_RESET_AFTER);
        if let Some((pid, start)) = r.as_ref().and_then(|r| r.proc.ids()) {
            // Leftover members of its group would hold the port.
            process::signal_group(pid, start, Signal::SIGKILL);
        }
        // A container that exited stays (for `docker logs`) until the
        // restart replaces it under the same name.
        let id = self.id.clone();
        let info = self.shared.update(&id, true, |e| {
            if healthy_long {
                e.rec.crash_streak = 0;
            }
            let delay = restart_backoff(e.rec.crash_streak);
            e.rec.crash_streak = e.rec.crash_streak.saturating_add(1);
            e.rec.pid = None;
            e.rec.start_time = None;
            e.rec.health = None;
            e.rec.container = None;
            let message = format!(
                "waiting {} before restart #{} ({how})",
                fmt_duration(delay),
                e.rec.restarts.saturating_add(1)
            );
            e.status = Status {
                state: InstanceState::Crashed,
                health: HealthReport {
                    last_response: e.status.health.last_response.take(),
                    ..HealthReport::default()
                },
                message: Some(message.clone()),
            };
            (delay, message)
        });
        self.shared.persist();
        if let Some((delay, message)) = info {
            warn!("instance exited: {message}");
            self.pending_restart = Some(Instant::now() + delay);
        }
    }

    /// Watches the running process: exit, health results, assignment change.
    async fn watch(&mut self, spec: &HealthSpec) -> Step {
        let Some(r) = self.running.as_mut() else {
            return Step::Again;
        };
        loop {
            tokio::select! {
                how = r.proc.wait_exit() => {
                    let r = self.running.take();
                    self.crashed(how, r);
                    return Step::Again;
                }
                Some(p) = r.health_rx.recv() => {
                    on_probe(&self.shared, &self.id, r, &p, spec);
                }
                res = self.rx.changed() => {
                    return if res.is_ok() { Step::Again } else { Step::Exit };
                }
            }
        }
    }

    /// SIGTERM to the group, wait up to `timeout_ms` for the whole group to
    /// go, then SIGKILL.
    async fn stop(&mut self, mut r: Running, timeout_ms: u64) {
        let timeout = Duration::from_millis(timeout_ms);
        let Some((pid, start)) = r.proc.ids() else {
            self.stop_container(r, timeout).await;
            return;
        };
        self.shared.update(&self.id, true, |e| {
            e.status.state = InstanceState::Stopping;
            e.status.message = Some(format!(
                "SIGTERM sent, waiting up to {} before SIGKILL",
                fmt_duration(timeout)
            ));
        });
        info!(pid, "stopping: SIGTERM to the process group");
        let sent = process::signal_group(pid, start, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        let exited = sent
            && tokio::time::timeout_at(deadline, r.proc.wait_exit())
                .await
                .is_ok();
        let mut group_gone = exited;
        if exited {
            while process::group_exists(pid) {
                if tokio::time::Instant::now() >= deadline {
                    group_gone = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        if sent && !group_gone {
            warn!(pid, timeout = %fmt_duration(timeout), "still running after the stop timeout: SIGKILL to the process group");
            process::signal_group(pid, start, Signal::SIGKILL);
            if !exited
                && tokio::time::timeout(AFTER_KILL_WAIT, r.proc.wait_exit())
                    .await
                    .is_err()
            {
                error!(pid, "process did not exit after SIGKILL");
            }
        }
        drop(r);
        self.stopped();
        info!(pid, "instance stopped");
    }

    /// Records what now runs for the instance (a process: pid and start
    /// time; or a container), starting.
    fn started(
        &self,
        process: Option<(u32, u64)>,
        container: Option<String>,
        port: u16,
        dir: Option<PathBuf>,
    ) {
        self.shared.update(&self.id, true, |e| {
            e.rec.pid = process.map(|p| p.0);
            e.rec.start_time = process.map(|p| p.1);
            e.rec.container = container;
            e.rec.port = Some(port);
            e.rec.release_dir = dir;
            e.rec.health = Some(InstanceState::Starting);
            e.status = Status {
                state: InstanceState::Starting,
                health: HealthReport::default(),
                message: None,
            };
        });
        self.shared.persist();
    }

    /// Records that nothing runs for the instance any more.
    fn stopped(&self) {
        self.shared.update(&self.id, true, |e| {
            e.rec.pid = None;
            e.rec.start_time = None;
            e.rec.container = None;
            e.rec.health = None;
            e.status = Status {
                state: InstanceState::Stopped,
                health: HealthReport::default(),
                message: None,
            };
        });
        self.shared.persist();
    }

    /// `docker stop` (the image's stop signal, SIGKILL after `timeout`),
    /// then the container is removed.
    async fn stop_container(&mut self, r: Running, timeout: Duration) {
        let Proc::Container { id, docker, .. } = &r.proc else {
            return;
        };
        let (id, docker) = (id.clone(), docker.clone());
        self.shared.update(&self.id, true, |e| {
            e.status.state = InstanceState::Stopping;
            e.status.message = Some(format!(
                "docker stop sent, waiting up to {} before SIGKILL",
                fmt_duration(timeout)
            ));
        });
        info!(container = %&id[..12.min(id.len())], "stopping: docker stop");
        let secs = timeout.as_millis().div_ceil(1000).min(i32::MAX as u128) as i32;
        if let Err(e) = drover_docker::stop_and_remove(&docker, &id, secs).await {
            // It is retried by the stray sweep once forgotten.
            error!(error = %e, "cannot stop the container");
        }
        drop(r);
        self.stopped();
        info!("instance stopped");
    }

    /// Forgets the instance unless it was listed again meanwhile.
    fn try_forget(&mut self) -> bool {
        {
            let mut tasks = self.shared.tasks.lock().expect("tasks poisoned");
            if self.rx.borrow().is_some() {
                return false;
            }
            tasks.remove(&self.id);
            self.shared.book().instances.remove(&self.id);
        }
        info!("instance forgotten (no longer assigned)");
        self.shared.persist();
        self.shared.bump();
        true
    }
}

/// A running container with a task appending its output (from `since`,
/// unix seconds; 0: all of it) to the instance's log file.
fn container_proc(docker: &drover_docker::Docker, id: &str, log_path: PathBuf, since: i32) -> Proc {
    let (d, cid) = (docker.clone(), id.to_string());
    let logs = tokio::spawn(async move {
        use futures::StreamExt;
        use std::io::Write;
        let mut stream = std::pin::pin!(drover_docker::follow_logs(&d, &cid, since));
        while let Some(chunk) = stream.next().await {
            let Ok(bytes) = chunk else { break };
            // Opened per chunk: rotation (copy-truncate) keeps working, and
            // a full disk does not stop the container.
            if let Ok(mut f) = logs::open_log(&log_path) {
                let _ = f.write_all(&bytes);
            }
        }
    });
    Proc::Container {
        id: id.to_string(),
        docker: docker.clone(),
        _logs: AbortOnDrop(logs),
    }
}

/// First sweep for stray containers after the supervisor starts, then how
/// often.
const STRAY_SWEEP_FIRST: Duration = Duration::from_secs(2);
const STRAY_SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Removes containers labelled as this agent's whose instance it does not
/// know (left by a lost state file, an interrupted stop, or made by hand).
/// Skipped quietly when no Docker Engine is reachable.
async fn sweep_strays(shared: &Arc<Shared>) {
    let docker = {
        let connected = shared.docker.lock().await.clone();
        match connected {
            Some(d) => d,
            None => match drover_docker::connect().await {
                Ok(d) => d,
                Err(_) => return,
            },
        }
    };
    let Ok(list) = drover_docker::list_agent_containers(&docker, &shared.agent_dir).await else {
        return;
    };
    for c in list {
        let known = shared
            .book()
            .instances
            .get(&c.instance)
            .map(|e| e.rec.container.clone());
        let stray = match known {
            None => true,
            // Another container of a known instance that has exited (a
            // crash's leftover is replaced at restart; this one is older).
            Some(cur) => cur.as_deref() != Some(c.id.as_str()) && !c.running,
        };
        if stray {
            warn!(container = %&c.id[..12.min(c.id.len())], instance = %c.instance,
                "removing a stray container with this agent's labels: no such instance here");
            if let Err(e) = drover_docker::remove(&docker, &c.id).await {
                warn!(error = %e, "cannot remove stray container");
            }
        }
    }
}

fn on_probe(shared: &Shared, id: &str, r: &mut Running, p: &Probe, spec: &HealthSpec) {
    let change = r.tracker.record(p, spec);
    if let Some(s) = change {
        r.healthy_since = (s == InstanceState::Healthy).then(Instant::now);
        info!(state = ?s, last_response = %p.description, "health changed");
    }
    let healthy_long = r.tracker.state == InstanceState::Healthy
        && r.healthy_since
            .is_some_and(|t| t.elapsed() >= BACKOFF_RESET_AFTER);
    let state = r.tracker.state;
    let report = r.tracker.report();
    let persist = shared
        .update(id, change.is_some(), |e| {
            e.status.state = state;
            e.status.message = (state == InstanceState::Unhealthy)
                .then(|| format!("health check failing: {}", p.description));
            e.status.health = report;
            let mut persist = false;
            if change.is_some() {
                e.rec.health = Some(state);
                persist = true;
            }
            if healthy_long && e.rec.crash_streak > 0 {
                e.rec.crash_streak = 0;
                persist = true;
            }
            persist
        })
        .unwrap_or(false);
    if persist {
        shared.persist();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let ms: Vec<u128> = (0..9).map(|n| restart_backoff(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(restart_backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
    }
}
