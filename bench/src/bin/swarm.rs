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
//! Registers them all (64 at a time), then heartbeats for SECONDS (each
//! agent at its own phase of the interval) and prints one JSON line:
//! agents, registered, register_s, reports, report_errors, p50_ms, p90_ms,
//! p99_ms, max_ms, polls, poll_errors.
#![forbid(unsafe_code)]

use drover_agent::client::ControlClient;
use drover_api::{AgentReport, DesiredState, InstanceReport, InstanceState, RegisterRequest};
use drover_bench::percentile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Stats {
    /// Report round trips, µs.
    latencies: Mutex<Vec<u64>>,
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
                                .push(t.elapsed().as_micros() as u64),
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
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        measuring.store(false, Ordering::Relaxed);
        end.notify_waiters();
        for t in tasks {
            let _ = t.await;
        }
        let mut lat = std::mem::take(&mut *stats.latencies.lock().unwrap());
        lat.sort_unstable();
        let ms = |p: f64| percentile(&lat, p) as f64 / 1000.0;
        for e in stats.first_errors.lock().unwrap().iter() {
            eprintln!("swarm: {e}");
        }
        println!(
            "{{\"agents\":{agents},\"registered\":{registered},\"register_s\":{register_s:.1},\"reports\":{},\"report_errors\":{},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2},\"polls\":{},\"poll_errors\":{}}}",
            lat.len(),
            stats.report_errors.load(Ordering::Relaxed),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
            stats.polls.load(Ordering::Relaxed),
            stats.poll_errors.load(Ordering::Relaxed),
        );
    });
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
