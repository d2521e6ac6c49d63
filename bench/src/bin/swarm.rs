//! Simulated agents for the scale benchmark (`bench/agents.sh`): AGENTS
//! agents in one process, each a real `drover_agent::client::ControlClient`
//! — it registers with the join token and a CSR, then, over mutual TLS,
//! reports (its heartbeat) every INTERVAL_MS and long-polls its
//! assignments, as an agent does — but runs no apps.
//!
//! `swarm SERVER_URL JOIN_TOKEN_FILE AGENTS INTERVAL_MS SECONDS [--prefix P] [--instances]`
//!
//! `--instances`: each agent plays its assignments — an instance to run is
//! reported healthy at once (at a made-up address), one to stop stopped —
//! and reports right after its assignments change, as an agent does: the
//! server's rollouts go as fast as orchestration alone allows
//! (`bench/rollout.sh`).
//!
//! Registers them all (64 at a time), then heartbeats for one interval
//! (settling: the registrations' backlog drains) and SECONDS more (each
//! agent at its own phase of the interval), and prints one JSON line:
//! agents, registered, register_s, reports, report_errors, p50_ms, p90_ms,
//! p99_ms, max_ms (those over the SECONDS, the steady state),
//! settling_p99_ms, settling_max_ms (the first interval), polls,
//! poll_errors.
//!
//! With `SWARM_TIMELINE=FILE` it also writes the reports' timeline, one
//! line per 100 ms of the heartbeat phase: `ms count p99_ms max_ms` (to see
//! whether slow reports come together, and how often).
#![forbid(unsafe_code)]

use drover_agent::client::ControlClient;
use drover_api::{AgentReport, DesiredState, InstanceReport, InstanceState, RegisterRequest};
use drover_bench::percentile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Stats {
    /// Report round trips: (when the report was sent, ms into the
    /// heartbeat phase; how long it took, µs).
    latencies: Mutex<Vec<(u64, u64)>>,
    report_errors: AtomicU64,
    polls: AtomicU64,
    poll_errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, e: String) {
        let mut v = self.first_errors.lock().unwrap();
        if v.len() < 5 {
            v.push(e);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!(
            "usage: swarm SERVER_URL JOIN_TOKEN_FILE AGENTS INTERVAL_MS SECONDS [--prefix P]"
        );
        std::process::exit(2);
    }
    let server = args[1].clone();
    let join = std::fs::read_to_string(&args[2])
        .expect("JOIN_TOKEN_FILE")
        .trim()
        .to_string();
    let agents: usize = args[3].parse().expect("AGENTS");
    let interval = Duration::from_millis(args[4].parse().expect("INTERVAL_MS"));
    let secs: u64 = args[5].parse().expect("SECONDS");
    let prefix = args
        .iter()
        .position(|a| a == "--prefix")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| "sim".into());
    let simulate = args.iter().any(|a| a == "--instances");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stats = Arc::new(Stats::default());
        // Registration, 64 at a time; each agent starts heartbeating and
        // polling as soon as it is registered (as an agent does). Figures
        // count from the moment all are registered.
        let started = Instant::now();
        let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let registered = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let end = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..agents {
            let (server, join, gate, stats) =
                (server.clone(), join.clone(), gate.clone(), stats.clone());
            let (measuring, registered, end) = (measuring.clone(), registered.clone(), end.clone());
            let node = format!("{prefix}-{i:05}");
            tasks.push(tokio::spawn(async move {
                let client = {
                    let _permit = gate.acquire_owned().await.unwrap();
                    let client = ControlClient::new(&server, Some(&join)).ok()?;
                    let req = RegisterRequest {
                        node: node.clone(),
                        labels: Default::default(),
                        csr: None,
                    };
                    let mut ok = false;
                    for _ in 0..5 {
                        match client.register(&req).await {
                            Ok(_) => {
                                ok = true;
                                break;
                            }
                            Err(e) => {
                                stats.error(format!("register {node}: {e}"));
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                    if !ok {
                        return None;
                    }
                    Arc::new(client)
                };
                registered.fetch_add(1, Ordering::Relaxed);
                // The instances this agent plays (--instances), and a wake-up
                // for a report when they change.
                let held: Arc<Mutex<Vec<InstanceReport>>> = Arc::default();
                let changed = Arc::new(tokio::sync::Notify::new());
                let (h, ch) = (held.clone(), changed.clone());
                let (c, n, s, m) = (client.clone(), node.clone(), stats.clone(), measuring.clone());
                let beats = tokio::spawn(async move {
                    // Each agent at its own phase of the interval.
                    let phase = interval.mul_f64((i % 1000) as f64 / 1000.0);
                    let mut next = tokio::time::Instant::now() + phase;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => next += interval,
                            _ = ch.notified() => {}
                        }
                        let t = Instant::now();
                        let sent_ms = t.duration_since(started).as_millis() as u64;
                        let report = AgentReport {
                            node: n.clone(),
                            instances: h.lock().unwrap().clone(),
                        };
                        let r = c.report(&report).await;
                        if !m.load(Ordering::Relaxed) {
                            continue;
                        }
                        match r {
                            Ok(_) => s
                                .latencies
                                .lock()
                                .unwrap()
                                .push((sent_ms, t.elapsed().as_micros() as u64)),
                            Err(e) => {
                                s.report_errors.fetch_add(1, Ordering::Relaxed);
                                s.error(format!("report {n}: {e}"));
                            }
                        }
                    }
                });
                let (s, m) = (stats.clone(), measuring.clone());
                let polls = tokio::spawn(async move {
                    let mut index = 0u64;
                    loop {
                        let r = client.assignments(&node, index, 30_000).await;
                        let counted = m.load(Ordering::Relaxed);
                        match r {
                            Ok(a) => {
                                if counted {
                                    s.polls.fetch_add(1, Ordering::Relaxed);
                                }
                                index = a.index;
                                if simulate {
                                    *held.lock().unwrap() = play(&a.assignments);
                                    changed.notify_one();
                                }
                            }
                            Err(e) => {
                                if counted {
                                    s.poll_errors.fetch_add(1, Ordering::Relaxed);
                                    s.error(format!("assignments {node}: {e}"));
                                }
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                end.notified().await;
                beats.abort();
                polls.abort();
                Some(())
            }));
        }
        while (registered.load(Ordering::Relaxed) as usize) < agents
            && tasks.iter().any(|t| !t.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let registered = registered.load(Ordering::Relaxed) as usize;
        let register_s = started.elapsed().as_secs_f64();
        eprintln!(
            "swarm: {registered} of {agents} agents registered in {register_s:.1}s; heartbeating every {interval:?} for {secs}s"
        );
        let phase_ms = started.elapsed().as_millis() as u64;
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(interval + Duration::from_secs(secs)).await;
        measuring.store(false, Ordering::Relaxed);
        end.notify_waiters();
        for t in tasks {
            let _ = t.await;
        }
        let timed = std::mem::take(&mut *stats.latencies.lock().unwrap());
        if let Ok(path) = std::env::var("SWARM_TIMELINE") {
            std::fs::write(&path, timeline(&timed, phase_ms)).expect("SWARM_TIMELINE");
        }
        let steady_from = phase_ms + interval.as_millis() as u64;
        let (mut lat, mut settling): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
        for &(at, us) in &timed {
            if at >= steady_from { &mut lat } else { &mut settling }.push(us);
        }
        lat.sort_unstable();
        settling.sort_unstable();
        let ms = |p: f64| percentile(&lat, p) as f64 / 1000.0;
        for e in stats.first_errors.lock().unwrap().iter() {
            eprintln!("swarm: {e}");
        }
        println!(
            "{{\"agents\":{agents},\"registered\":{registered},\"register_s\":{register_s:.1},\"reports\":{},\"report_errors\":{},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2},\"settling_p99_ms\":{:.2},\"settling_max_ms\":{:.2},\"polls\":{},\"poll_errors\":{}}}",
            lat.len(),
            stats.report_errors.load(Ordering::Relaxed),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
            percentile(&settling, 0.99) as f64 / 1000.0,
            settling.last().copied().unwrap_or(0) as f64 / 1000.0,
            stats.polls.load(Ordering::Relaxed),
            stats.poll_errors.load(Ordering::Relaxed),
        );
    });
}

/// One line per 100 ms of the heartbeat phase: `ms count p99_ms max_ms`.
fn timeline(timed: &[(u64, u64)], phase_ms: u64) -> String {
    let mut buckets: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(at, us) in timed {
        let ms = at.saturating_sub(phase_ms) / 100 * 100;
        buckets.entry(ms).or_default().push(us);
    }
    let mut out = String::new();
    for (ms, mut v) in buckets {
        v.sort_unstable();
        out += &format!(
            "{ms} {} {:.1} {:.1}\n",
            v.len(),
            percentile(&v, 0.99) as f64 / 1000.0,
            *v.last().unwrap() as f64 / 1000.0
        );
    }
    out
}

/// What an agent would report of `assignments` once it carried them out
/// (at once: no app to start or stop).
fn play(assignments: &[drover_api::Assignment]) -> Vec<InstanceReport> {
    assignments
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let run = a.desired == DesiredState::Run;
            InstanceReport {
                instance: a.instance.clone(),
                state: if run {
                    InstanceState::Healthy
                } else {
                    InstanceState::Stopped
                },
                pid: None,
                address: run.then(|| format!("127.0.0.1:{}", 20_000 + i)),
                restarts: 0,
                health: drover_api::HealthReport {
                    consecutive_ok: u32::from(run),
                    ..Default::default()
                },
                message: None,
            }
        })
        .collect()
}
