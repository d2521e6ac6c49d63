//! The simulated cluster: what the store holds (all that survives a server
//! restart), the agents and the processes they run, and the proxy.
//!
//! The store mirrors drover-store's tables for one deployment (app "app",
//! no environment): instance records with their last observation, the
//! rollouts, the live and previous release, node heartbeats, the proxy's
//! drain report and the global index. Agents and the proxy talk to the
//! store only while the server is up and they are connected.

use super::rng::Rng;
use super::scenario::{Quality, Scenario, Traffic};
use drover_core::{Desired, Millis, Rollout};
use std::collections::BTreeMap;

/// drover-server's `NODE_LEASE_MS`: a node without a heartbeat this long is not ready.
pub const NODE_LEASE_MS: Millis = 10_000;
/// drover-server's `PROXY_FRESH_MS`: a proxy silent this long is not waited for.
pub const PROXY_FRESH_MS: Millis = 10_000;

/// What an agent last reported of an instance (drover-api's `InstanceState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obs {
    Preparing,
    Starting,
    Healthy,
    Unhealthy,
    Crashed,
    Stopping,
    Failed,
    Stopped,
}

/// An instance record (drover-store's `InstanceRecord`).
#[derive(Debug, Clone)]
pub struct Rec {
    pub id: String,
    pub release: String,
    pub node: String,
    pub desired: Desired,
    /// The index at which it left routing (set by a retire).
    pub drain_index: Option<u64>,
    pub routed: bool,
    pub created_at: Millis,
    pub observed: Option<Obs>,
}

/// Everything persisted.
#[derive(Debug, Clone, Default)]
pub struct Store {
    /// Every rollout of the deployment, oldest first; the last is the latest.
    pub rollouts: Vec<Rollout>,
    pub live: Option<String>,
    /// The default rollback target (the live release before the current one).
    pub prev: Option<String>,
    pub instances: BTreeMap<String, Rec>,
    /// Last heartbeat per node.
    pub node_seen: BTreeMap<String, Millis>,
    /// The proxy's last report: when, and the oldest routing table it still uses.
    pub proxy_seen: Millis,
    pub proxy_oldest: u64,
    /// The global index (agents and proxies long-poll it).
    pub index: u64,
    /// For instance ids (the server draws random ones; sequential here).
    pub next_instance: u64,
}

impl Store {
    pub fn latest(&self) -> Option<&Rollout> {
        self.rollouts.last()
    }

    /// The latest rollout if it is not final.
    pub fn active(&self) -> Option<&Rollout> {
        self.latest().filter(|r| !r.state.is_final())
    }

    pub fn node_ready(&self, node: &str, now: Millis) -> bool {
        self.node_seen
            .get(node)
            .is_some_and(|seen| now.saturating_sub(*seen) < NODE_LEASE_MS)
    }

    /// What the proxy would route to (drover-server's `view::serves`):
    /// routed, running, on a ready node, last reported healthy.
    pub fn serves(&self, rec: &Rec, now: Millis) -> bool {
        rec.desired == Desired::Run
            && rec.routed
            && self.node_ready(&rec.node, now)
            && rec.observed == Some(Obs::Healthy)
    }
}

/// A process an agent runs for an instance.
#[derive(Debug, Clone)]
pub struct Proc {
    pub release: String,
    pub state: PState,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PState {
    /// Started; healthy at `healthy_at`, or crashing at `crash_at`.
    Starting {
        healthy_at: Option<Millis>,
        crash_at: Option<Millis>,
    },
    Healthy,
    /// Failing health checks until `until` (a flap).
    Unhealthy {
        until: Millis,
    },
    /// Exited; the agent restarts it at `restart_at` (backoff).
    Crashed {
        restart_at: Millis,
    },
    /// SIGTERM sent; gone at `done_at` (SIGKILL by the stop timeout).
    Stopping {
        done_at: Millis,
    },
    Stopped,
    /// Cannot run (bad artifact).
    Failed,
}

impl PState {
    pub fn running(self) -> bool {
        !matches!(self, PState::Stopped | PState::Failed)
    }
}

/// How an agent's node is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Cut off from the control plane until then; its processes keep running.
    Cut {
        until: Millis,
    },
    /// The host is down until then; its processes are gone.
    Down {
        until: Millis,
    },
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub node: String,
    pub link: Link,
    /// The assignments it last fetched: id → (release, desired).
    pub known: BTreeMap<String, (String, Desired)>,
    pub procs: BTreeMap<String, Proc>,
}

/// The proxy: the routing table it serves and the older ones that requests
/// still hold.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    /// Cut off from the control plane until then.
    pub cut_until: Millis,
    /// The index of the table it serves.
    pub applied: u64,
    /// Older tables still held by in-flight requests: (index, until).
    pub held: Vec<(u64, Millis)>,
}

impl Proxy {
    pub fn oldest_live(&self) -> u64 {
        self.held
            .iter()
            .map(|(i, _)| *i)
            .fold(self.applied, u64::min)
    }
}

/// The whole simulated cluster.
pub struct World {
    pub store: Store,
    pub agents: Vec<Agent>,
    pub proxy: Proxy,
    /// Cumulative (requests, errors) per release, as the proxies count them.
    pub traffic: BTreeMap<String, (u64, u64)>,
}

impl World {
    pub fn new(sc: &Scenario, now: Millis) -> World {
        let mut store = Store {
            proxy_seen: now,
            ..Store::default()
        };
        for n in &sc.nodes {
            store.node_seen.insert(n.name.clone(), now);
        }
        World {
            store,
            agents: sc
                .nodes
                .iter()
                .map(|n| Agent {
                    node: n.name.clone(),
                    link: Link::Up,
                    known: BTreeMap::new(),
                    procs: BTreeMap::new(),
                })
                .collect(),
            proxy: Proxy::default(),
            traffic: BTreeMap::new(),
        }
    }

    /// Advances agents, processes, the proxy and traffic to `now`, `dt`
    /// after the last step. `server_up`: whether anything can reach the store.
    /// `storm`: faults are on (health flaps).
    pub fn advance(
        &mut self,
        sc: &Scenario,
        rng: &mut Rng,
        now: Millis,
        dt: Millis,
        server_up: bool,
        storm: bool,
    ) {
        for a in &mut self.agents {
            match a.link {
                Link::Down { until } if now >= until => a.link = Link::Up,
                Link::Cut { until } if now >= until => a.link = Link::Up,
                _ => {}
            }
            if matches!(a.link, Link::Down { .. }) {
                continue;
            }
            let connected = a.link == Link::Up && server_up;
            if connected {
                self.store.node_seen.insert(a.node.clone(), now);
                // The long poll answers soon after a change, not always at once.
                if rng.chance(800) {
                    a.known = self
                        .store
                        .instances
                        .values()
                        .filter(|r| r.node == a.node)
                        .map(|r| (r.id.clone(), (r.release.clone(), r.desired)))
                        .collect();
                }
            }
            converge(a, sc, rng, now);
            for p in a.procs.values_mut() {
                advance_proc(p, sc, rng, now, storm);
            }
            if connected && rng.chance(700) {
                report(a, &mut self.store);
            }
        }

        // The proxy long-polls the index and reports its drain progress.
        let p = &mut self.proxy;
        p.held.retain(|(_, until)| *until > now);
        if server_up && now >= p.cut_until {
            if p.applied < self.store.index && rng.chance(800) {
                // Requests in flight keep the old table a while (long requests
                // may outlive the drain timeout).
                let hold = if rng.chance(100) {
                    rng.range(5_000, 12_000)
                } else {
                    rng.range(0, 3_000)
                };
                p.held.push((p.applied, now + hold));
                p.applied = self.store.index;
            }
            self.store.proxy_seen = now;
            self.store.proxy_oldest = p.oldest_live();
        }

        // Canary traffic: the split the latest rollout asks for, to its new
        // release while some instance of it serves.
        if let Some(r) = self.store.active() {
            let settings = &sc.release(&r.to).settings;
            if let Some((release, weight)) = drover_core::share::rollout_split(r, settings) {
                let serving = self
                    .store
                    .instances
                    .values()
                    .any(|i| i.release == release && self.store.serves(i, now));
                if weight > 0 && serving {
                    let rate = match sc.release(&release).traffic {
                        Traffic::Good | Traffic::Bad => 5_000,
                        Traffic::Quiet => 1,
                    };
                    let requests = rate * dt * u64::from(weight) / 100_000;
                    let errors = match sc.release(&release).traffic {
                        Traffic::Bad => requests / 5,
                        _ => 0,
                    };
                    let t = self.traffic.entry(release).or_default();
                    t.0 += requests;
                    t.1 += errors;
                }
            }
        }
    }
}

/// The agent converges its processes to the assignments it knows: starts
/// what should run, stops what should stop, forgets what was deleted.
fn converge(a: &mut Agent, sc: &Scenario, rng: &mut Rng, now: Millis) {
    for (id, (release, desired)) in &a.known {
        match (desired, a.procs.get_mut(id)) {
            (Desired::Run, None) => {
                let state = start(sc.release(release).quality, sc, release, rng, now);
                a.procs.insert(
                    id.clone(),
                    Proc {
                        release: release.clone(),
                        state,
                        restarts: 0,
                    },
                );
            }
            (Desired::Stop, Some(p)) => match p.state {
                PState::Stopping { .. } | PState::Stopped => {}
                PState::Failed => p.state = PState::Stopped,
                _ => {
                    let stop = sc.release(release).settings.stop_timeout_ms;
                    p.state = PState::Stopping {
                        done_at: now + rng.range(50, stop),
                    };
                }
            },
            _ => {}
        }
    }
    // Deleted records: their processes stopped long ago (a stray still
    // running would be stopped; none should exist).
    let known = &a.known;
    a.procs
        .retain(|id, p| known.contains_key(id) || p.state.running());
    for (id, p) in a.procs.iter_mut() {
        if !known.contains_key(id) && !matches!(p.state, PState::Stopping { .. }) {
            p.state = PState::Stopping { done_at: now };
        }
    }
}

/// A fresh start of an instance of `release`.
fn start(q: Quality, sc: &Scenario, release: &str, rng: &mut Rng, now: Millis) -> PState {
    let deadline = sc.release(release).settings.health_deadline_ms;
    match q {
        Quality::Good | Quality::Flaky => PState::Starting {
            healthy_at: Some(now + rng.range(300, 3_000)),
            crash_at: None,
        },
        Quality::Slow => PState::Starting {
            healthy_at: Some(now + rng.range(deadline / 2, deadline * 3 / 2)),
            crash_at: None,
        },
        Quality::CrashLoop => PState::Starting {
            healthy_at: None,
            crash_at: Some(now + rng.range(300, 2_000)),
        },
        Quality::BadArtifact => PState::Failed,
    }
}

fn advance_proc(p: &mut Proc, sc: &Scenario, rng: &mut Rng, now: Millis, storm: bool) {
    let quality = sc.release(&p.release).quality;
    p.state = match p.state {
        PState::Starting {
            crash_at: Some(t), ..
        } if now >= t => PState::Crashed {
            restart_at: now + backoff(p.restarts),
        },
        PState::Starting {
            healthy_at: Some(t),
            ..
        } if now >= t => PState::Healthy,
        PState::Healthy if storm && quality == Quality::Flaky && rng.chance(sc.faults.flap) => {
            PState::Unhealthy {
                until: now + rng.range(500, 4_000),
            }
        }
        PState::Unhealthy { until } if now >= until => PState::Healthy,
        PState::Crashed { restart_at } if now >= restart_at => {
            p.restarts += 1;
            start(quality, sc, &p.release, rng, now)
        }
        PState::Stopping { done_at } if now >= done_at => PState::Stopped,
        s => s,
    };
}

/// The agent's crash backoff: 1 s, 2 s, 4 s, … at most 8 s.
pub fn backoff(restarts: u32) -> Millis {
    1_000 << restarts.min(3)
}

/// One report: the state of every instance the agent knows.
fn report(a: &Agent, store: &mut Store) {
    for (id, (_, desired)) in &a.known {
        let Some(rec) = store.instances.get_mut(id) else {
            continue;
        };
        rec.observed = Some(match a.procs.get(id).map(|p| p.state) {
            Some(PState::Starting { .. }) => Obs::Starting,
            Some(PState::Healthy) => Obs::Healthy,
            Some(PState::Unhealthy { .. }) => Obs::Unhealthy,
            Some(PState::Crashed { .. }) => Obs::Crashed,
            Some(PState::Stopping { .. }) => Obs::Stopping,
            Some(PState::Stopped) => Obs::Stopped,
            Some(PState::Failed) => Obs::Failed,
            // Not started: about to be (run), or not running (drain, stop).
            None if *desired == Desired::Run => Obs::Preparing,
            None => Obs::Stopped,
        });
    }
}
