//! Supervision against real processes: start with PORT and log capture,
//! graceful stop escalating to SIGKILL, restart with backoff, re-adoption
//! by pid + start time, health thresholds, strays.

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drover_agent::process;
use drover_agent::state;
use drover_api::{DesiredState, InstanceState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_port_env_own_group_and_log_capture() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment(
        "hello-r1-aaa",
        "echo \"port=$PORT app=$DROVER_APP rel=$DROVER_RELEASE inst=$DROVER_INSTANCE foo=$FOO cwd=$(pwd)\"; echo oops >&2; exec sleep 30",
    );
    a.run.env.insert("FOO".into(), "bar".into());
    let rel = prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30100, 30199), None);
    sup.reconcile(std::slice::from_ref(&a));
    let r = wait_for(10, "instance started", || {
        report(&sup, "hello-r1-aaa").filter(|r| r.pid.is_some())
    })
    .await;
    assert_eq!(r.state, InstanceState::Starting);
    let pid = r.pid.unwrap();
    let addr = r.address.clone().unwrap();
    let port: u16 = addr.strip_prefix("127.0.0.1:").unwrap().parse().unwrap();
    assert!((30100..=30199).contains(&port));
    // Own process group.
    let st = process::read_stat(pid).unwrap();
    assert_eq!(st.pgrp as u32, pid);
    let log = dir.path().join("logs/hello-r1-aaa.log");
    let text = wait_for(5, "log lines", || {
        let t = std::fs::read_to_string(&log).ok()?;
        t.contains("oops").then_some(t)
    })
    .await;
    assert!(
        text.contains(&format!(
            "port={port} app=hello rel=r1 inst=hello-r1-aaa foo=bar cwd={}",
            rel.display()
        )),
        "{text}"
    );
    // The state file records pid, start time, port (it is written just
    // after the in-memory state changes, so wait for it).
    let rec = wait_for(5, "state file with the pid", || {
        let st = state::load(&state::state_path(dir.path()));
        st.state
            .instances
            .get("hello-r1-aaa")
            .filter(|r| r.pid == Some(pid))
            .cloned()
    })
    .await;
    assert_eq!(rec.pid, Some(pid));
    assert_eq!(rec.port, Some(port));
    assert!(rec.start_time.is_some());
    kill_group(pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sigterm_then_sigkill_after_timeout() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment("hello-r1-stop", "trap '' TERM; sleep 60 & wait; sleep 60");
    a.run.stop_timeout_ms = 400;
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30200, 30299), None);
    sup.reconcile(std::slice::from_ref(&a));
    let pid = wait_for(10, "started", || report(&sup, "hello-r1-stop")?.pid).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // let the trap install
    assert!(process::group_exists(pid));
    a.desired = DesiredState::Stop;
    let t0 = Instant::now();
    sup.reconcile(std::slice::from_ref(&a));
    wait_for(5, "stopping", || {
        let r = report(&sup, "hello-r1-stop")?;
        matches!(r.state, InstanceState::Stopping | InstanceState::Stopped).then_some(())
    })
    .await;
    wait_for(10, "stopped", || {
        (report(&sup, "hello-r1-stop")?.state == InstanceState::Stopped).then_some(())
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "stopped before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The whole group is gone, the child sleep included.
    wait_for(2, "group gone", || {
        (!process::group_exists(pid)).then_some(())
    })
    .await;
    let r = report(&sup, "hello-r1-stop").unwrap();
    assert_eq!(r.pid, None);
    assert_eq!(r.address, None);
    // Still listed while assigned; stays stopped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        report(&sup, "hello-r1-stop").unwrap().state,
        InstanceState::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_is_quick_when_the_app_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment("hello-r1-quick", "exec sleep 60");
    a.run.stop_timeout_ms = 10_000;
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30300, 30399), None);
    sup.reconcile(std::slice::from_ref(&a));
    let pid = wait_for(10, "started", || report(&sup, "hello-r1-quick")?.pid).await;
    a.desired = DesiredState::Stop;
    let t0 = Instant::now();
    sup.reconcile(std::slice::from_ref(&a));
    wait_for(5, "stopped", || {
        (report(&sup, "hello-r1-quick")?.state == InstanceState::Stopped).then_some(())
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!pid_exists(pid));
    assert_eq!(report(&sup, "hello-r1-quick").unwrap().restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restarts_with_growing_backoff() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = assignment("hello-r1-crash", "echo run; exit 3");
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30400, 30499), None);
    let t0 = Instant::now();
    sup.reconcile(std::slice::from_ref(&a));
    let r = wait_for(10, "crashed", || {
        report(&sup, "hello-r1-crash").filter(|r| r.state == InstanceState::Crashed)
    })
    .await;
    let msg = r.message.unwrap();
    assert!(
        msg.contains("before restart #1") && msg.contains("exit status 3"),
        "{msg}"
    );
    assert!(msg.starts_with("waiting 500ms"), "{msg}");
    // 0.5 s + 1 s of backoff before the second restart.
    wait_for(10, "two restarts", || {
        (report(&sup, "hello-r1-crash")?.restarts >= 2).then_some(())
    })
    .await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    // The third crash: its message, not the second's (the restart count
    // moves when a restart begins, before the new process has run).
    let r = wait_for(10, "crashed again", || {
        report(&sup, "hello-r1-crash").filter(|r| {
            r.state == InstanceState::Crashed
                && r.restarts >= 2
                && r.message.as_deref().is_some_and(|m| m.contains("#3"))
        })
    })
    .await;
    assert!(
        r.message
            .as_deref()
            .unwrap()
            .contains("waiting 2s before restart #3"),
        "{:?}",
        r.message
    );
    // Persisted: restart count and backoff step survive a new supervisor.
    drop(sup);
    let st = state::load(&state::state_path(dir.path()));
    let rec = &st.state.instances["hello-r1-crash"];
    assert!(rec.restarts >= 2);
    assert!(rec.crash_streak >= 3);
    let sup = supervisor(dir.path(), (30400, 30499), None);
    let r = report(&sup, "hello-r1-crash").unwrap();
    assert!(r.restarts >= 2);
    let log = std::fs::read_to_string(dir.path().join("logs/hello-r1-crash.log")).unwrap();
    assert!(log.lines().filter(|l| *l == "run").count() >= 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readopts_by_pid_and_start_time_and_detects_exit() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = assignment("hello-r1-adopt", "exec sleep 30");
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30500, 30599), None);
    sup.reconcile(std::slice::from_ref(&a));
    let first = wait_for(10, "started", || {
        report(&sup, "hello-r1-adopt").filter(|r| r.pid.is_some())
    })
    .await;
    let pid = first.pid.unwrap();
    sup.detach().await;
    assert!(pid_exists(pid), "detach must not stop the app");

    // A new supervisor on the same data dir adopts the same process.
    let sup = supervisor(dir.path(), (30500, 30599), None);
    let r = report(&sup, "hello-r1-adopt").unwrap();
    assert_eq!(r.pid, Some(pid));
    assert_eq!(r.address, first.address);
    assert_eq!(r.restarts, 0);
    assert!(matches!(r.state, InstanceState::Starting), "{r:?}");
    // The server's list (same assignment) changes nothing.
    sup.reconcile(std::slice::from_ref(&a));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = report(&sup, "hello-r1-adopt").unwrap();
    assert_eq!(r.pid, Some(pid));
    assert_eq!(r.restarts, 0);

    // The adopted process dies: noticed by polling, restarted.
    kill_group(pid);
    let r = wait_for(10, "restarted after adopted exit", || {
        report(&sup, "hello-r1-adopt").filter(|r| r.pid.is_some() && r.pid != Some(pid))
    })
    .await;
    assert_eq!(r.restarts, 1);
    kill_group(r.pid.unwrap());
    drop(sup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_with_other_start_time_is_not_adopted_nor_signalled() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = assignment("hello-r1-reuse", "exec sleep 30");
    prepare_release(dir.path(), &a);
    // An unrelated live process whose pid the state file claims, with a
    // different start time (as after pid reuse).
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let other_pid = other.id();
    let real_start = process::start_time(other_pid).unwrap();
    let mut rec = state::InstanceRecord::new(a.clone());
    rec.pid = Some(other_pid);
    rec.start_time = Some(real_start + 12345);
    rec.port = Some(30650);
    rec.release_dir = Some(dir.path().join("releases"));
    let mut st = state::AgentState {
        version: state::VERSION,
        ..Default::default()
    };
    st.instances.insert(a.instance.clone(), rec);
    state::save(&state::state_path(dir.path()), &st).unwrap();

    let sup = supervisor(dir.path(), (30600, 30699), None);
    let r = report(&sup, "hello-r1-reuse").unwrap();
    assert_ne!(r.pid, Some(other_pid));
    // Treated as exited while the agent was away: restarted after backoff.
    let r = wait_for(10, "restarted", || {
        report(&sup, "hello-r1-reuse").filter(|r| r.pid.is_some())
    })
    .await;
    assert_ne!(r.pid, Some(other_pid));
    assert_eq!(r.restarts, 1);
    // The unrelated process was never signalled.
    assert!(other.try_wait().unwrap().is_none());
    // Stop it via the assignment: the unrelated process still survives.
    let mut stop = a.clone();
    stop.desired = DesiredState::Stop;
    stop.run.stop_timeout_ms = 500;
    sup.reconcile(&[stop]);
    wait_for(10, "stopped", || {
        (report(&sup, "hello-r1-reuse")?.state == InstanceState::Stopped).then_some(())
    })
    .await;
    assert!(other.try_wait().unwrap().is_none());
    let _ = other.kill();
    let _ = other.wait();
}

use std::os::unix::process::CommandExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_thresholds_against_a_real_http_server() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment("hello-r1-health", "exec sleep 30");
    a.health.healthy_after = 2;
    a.health.unhealthy_after = 3;
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30700, 30799), None);
    sup.reconcile(std::slice::from_ref(&a));
    let r = wait_for(10, "started", || {
        report(&sup, "hello-r1-health").filter(|r| r.pid.is_some())
    })
    .await;
    let pid = r.pid.unwrap();
    let port: u16 = r
        .address
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Nothing listens yet (the app is `sleep`): connection refused.
    let r = wait_for(5, "refused probe", || {
        report(&sup, "hello-r1-health").filter(|r| r.health.last_response.is_some())
    })
    .await;
    assert_eq!(r.state, InstanceState::Starting);
    assert_eq!(
        r.health.last_response.as_deref(),
        Some("GET /healthz → connection refused")
    );
    // Stand in for the app on its port, with a status we can flip.
    let status = Arc::new(AtomicU16::new(200));
    let s2 = status.clone();
    let _srv = serve(
        port,
        Arc::new(move |req: &Req| {
            if req.path == "/healthz" {
                let st = s2.load(Ordering::SeqCst);
                Resp::new(st, if st == 200 { "ok" } else { "db down\nreally" })
            } else {
                Resp::new(404, "")
            }
        }),
    )
    .await;
    let r = wait_for(5, "healthy", || {
        report(&sup, "hello-r1-health").filter(|r| r.state == InstanceState::Healthy)
    })
    .await;
    assert!(r.health.consecutive_ok >= 2);
    assert_eq!(
        r.health.last_response.as_deref(),
        Some("GET /healthz → 200")
    );

    status.store(503, Ordering::SeqCst);
    let r = wait_for(5, "unhealthy", || {
        report(&sup, "hello-r1-health").filter(|r| r.state == InstanceState::Unhealthy)
    })
    .await;
    assert!(r.health.consecutive_fail >= 3);
    assert_eq!(
        r.health.last_response.as_deref(),
        Some("GET /healthz → 503 \"db down really\"")
    );

    status.store(200, Ordering::SeqCst);
    wait_for(5, "healthy again", || {
        report(&sup, "hello-r1-health").filter(|r| r.state == InstanceState::Healthy)
    })
    .await;
    // The verdict is persisted for re-adoption.
    wait_for(5, "healthy verdict in the state file", || {
        let st = state::load(&state::state_path(dir.path()));
        (st.state.instances.get("hello-r1-health")?.health == Some(InstanceState::Healthy))
            .then_some(())
    })
    .await;
    kill_group(pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_health_endpoint_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment("hello-r1-slow", "exec sleep 30");
    a.health.timeout_ms = 100;
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30800, 30899), None);
    sup.reconcile(std::slice::from_ref(&a));
    let r = wait_for(10, "started", || {
        report(&sup, "hello-r1-slow").filter(|r| r.pid.is_some())
    })
    .await;
    let port: u16 = r
        .address
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Accepts connections but never answers.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            if let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        }
    });
    let r = wait_for(5, "timeout probe", || {
        report(&sup, "hello-r1-slow").filter(|r| {
            r.health
                .last_response
                .as_deref()
                .is_some_and(|l| l.contains("timed out"))
        })
    })
    .await;
    assert_eq!(
        r.health.last_response.as_deref(),
        Some("GET /healthz → timed out after 100 ms")
    );
    hold.abort();
    kill_group(r.pid.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_instances_are_stopped_and_forgotten() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = assignment("hello-r1-stray", "exec sleep 30");
    let b = assignment("hello-r1-keep", "exec sleep 30");
    prepare_release(dir.path(), &a);
    let sup = supervisor(dir.path(), (30900, 30999), None);
    sup.reconcile(&[a.clone(), b.clone()]);
    let pa = wait_for(10, "a started", || report(&sup, "hello-r1-stray")?.pid).await;
    let pb = wait_for(10, "b started", || report(&sup, "hello-r1-keep")?.pid).await;
    sup.reconcile(std::slice::from_ref(&b));
    wait_for(10, "stray forgotten", || {
        report(&sup, "hello-r1-stray").is_none().then_some(())
    })
    .await;
    assert!(!pid_exists(pa));
    assert_eq!(report(&sup, "hello-r1-keep").unwrap().pid, Some(pb));
    let st = wait_for(5, "stray gone from the state file", || {
        let st = state::load(&state::state_path(dir.path()));
        (!st.state.instances.contains_key("hello-r1-stray")).then_some(st)
    })
    .await;
    assert!(st.state.instances.contains_key("hello-r1-keep"));
    kill_group(pb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_state_file_lost_an_agent_readopts_its_instances_from_proc_and_stops_the_rest() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let keep = assignment("hello-r1-keep", "exec sleep 30");
    let gone = assignment("hello-r1-gone", "exec sleep 30");
    prepare_release(dir.path(), &keep);
    prepare_release(dir.path(), &gone);
    let sup = supervisor(dir.path(), (30700, 30799), None);
    sup.reconcile(&[keep.clone(), gone.clone()]);
    let started = |sup: &drover_agent::supervisor::Supervisor, id: &str| {
        report(sup, id).and_then(|r| r.pid.map(|p| (p, r.address)))
    };
    let (keep_pid, keep_addr) =
        wait_for(10, "keep started", || started(&sup, "hello-r1-keep")).await;
    let (gone_pid, _) = wait_for(10, "gone started", || started(&sup, "hello-r1-gone")).await;
    sup.detach().await;
    std::fs::remove_file(state::state_path(dir.path())).unwrap();

    // Nothing in the state file, yet both are found as this agent's own.
    let sup = supervisor(dir.path(), (30700, 30799), None);
    assert!(sup.load_problem().unwrap().contains("no agent state file"));
    assert!(report(&sup, "hello-r1-keep").is_none());
    // The control plane still assigns one of them: adopted, same process
    // and address; the other is no longer assigned: stopped.
    sup.reconcile(std::slice::from_ref(&keep));
    let (pid, addr) = wait_for(10, "keep adopted", || started(&sup, "hello-r1-keep")).await;
    assert_eq!((pid, addr), (keep_pid, keep_addr));
    wait_for(10, "the unassigned one stopped", || {
        (!pid_exists(gone_pid)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(report(&sup, "hello-r1-keep").unwrap().pid, Some(keep_pid));
    assert!(pid_exists(keep_pid));
    // Another agent's data dir: its processes are not ours.
    let other = tempfile::tempdir().unwrap();
    let canon = std::fs::canonicalize(other.path()).unwrap();
    assert!(process::find_orphans(&canon.to_string_lossy()).is_empty());
    let mine = std::fs::canonicalize(dir.path()).unwrap();
    let found = process::find_orphans(&mine.to_string_lossy());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].instance.as_str(), found[0].pid),
        ("hello-r1-keep", keep_pid)
    );
    kill_group(keep_pid);
    drop(sup);
}
