//! Faults on separate hosts (../shared/SCENARIOS.md, "Faults"): the server,
//! three agents and the proxy each in its own container on private Docker
//! networks (see `common/docker.rs`), driven from this process through the
//! CLI and the API, with load through the proxy. Each test prints its
//! figures.

mod common;

use common::docker::DockerCluster;
use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn deploy_v1(c: &DockerCluster, app: &str, instances: u32) -> Repo {
    let repo = c.repo(app, &spec(app, instances, "30s"), &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", app, "--wait"]);
    c.wait_until(
        "v1 answers through the proxy",
        Duration::from_secs(15),
        |c| get_version(&c.proxy_url(), &format!("{app}.localhost")).is_ok_and(|v| v == "v1"),
    );
    repo
}

fn instances(st: &Value) -> Vec<Value> {
    st["instances"].as_array().cloned().unwrap_or_default()
}

/// Scenario 5: a node cut off from the control plane keeps serving until
/// its lease runs out; then it is marked lost, its instances leave routing
/// and are replaced on the other nodes; once healed, its stale copy stops
/// and no duplicate remains.
#[test]
fn scenario_05_a_node_cut_off_is_replaced_after_its_lease_and_its_stale_copy_stops_on_heal() {
    let _g = serial();
    let c = DockerCluster::start(3);
    deploy_v1(&c, "web", 3);
    let st = c.status("web");
    let on2 = instances(&st)
        .into_iter()
        .find(|i| i["node"] == "node-2")
        .unwrap_or_else(|| panic!("an instance on node-2: {st:#}"));
    let stale_id = on2["id"].as_str().unwrap().to_string();
    let stale_addr = on2["address"].as_str().unwrap().to_string();
    let stale_port = stale_addr.rsplit(':').next().unwrap().to_string();
    // Node-2's ports are its own (22000-22999): the answer's port tells.
    let from_node2 = |body: &str| body.contains(&format!("port={stale_port}"));

    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    c.cut_off(c.agent(2));
    let cut_at = Instant::now();
    let seen_ago = c.node("node-2")["last_seen_ms_ago"].as_u64().unwrap();
    let lease_expires =
        cut_at + Duration::from_millis(10_000) - Duration::from_millis(seen_ago.min(10_000));

    // Probe the proxy (new connection per request) for node-2's copy: it
    // keeps being answered until the lease runs out, then not any more.
    let mut last_from_node2: Option<Instant> = None;
    let mut after_cut = 0;
    while Instant::now() < lease_expires + Duration::from_secs(6) {
        if let Ok((_, body)) = raw_get(&c.proxy_addr, "web.localhost", "/") {
            if from_node2(&body) {
                last_from_node2 = Some(Instant::now());
                after_cut += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        after_cut > 0,
        "node-2's copy ({stale_addr}) kept serving while its lease held"
    );
    // Signed: negative when its last answer came before the estimated
    // expiry (the estimate is within a report interval, 1 s).
    let removed_after_lease_ms = last_from_node2.map_or(0, |t| {
        if t >= lease_expires {
            (t - lease_expires).as_millis() as i64
        } else {
            -((lease_expires - t).as_millis() as i64)
        }
    });
    // The lost node's instance was replaced on a ready node.
    c.wait_until(
        "3 healthy routed instances on node-1 and node-3",
        Duration::from_secs(30),
        |c| {
            let st = c.status("web");
            instances(&st)
                .iter()
                .filter(|i| i["node"] != "node-2" && i["routed"] == true && i["state"] == "healthy")
                .count()
                == 3
        },
    );
    let replaced_at = cut_at.elapsed();
    let n2 = c.node("node-2");
    assert_eq!(n2["ready"], false, "{n2:#}\n{}", c.logs());
    // Cut off, node-2's copy still runs there (nothing told it to stop).
    let running_there = c
        .sh(c.agent(2), "pgrep -f 'python3 [a]pp.py' || true")
        .unwrap();
    assert!(
        !running_there.is_empty(),
        "node-2's copy keeps running while cut off"
    );
    let events = c.api_get("/v1/events").unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "node.lost"
                && e["message"].as_str().unwrap().contains("node node-2 lost")),
        "a node.lost event: {events:#}"
    );

    c.heal(c.agent(2));
    let healed_at = Instant::now();
    c.wait_until("node-2 ready again", Duration::from_secs(30), |c| {
        c.node("node-2")["ready"] == true
    });
    c.wait_until(
        "the stale copy stopped on node-2 and forgotten",
        Duration::from_secs(30),
        |c| {
            let gone = c
                .sh(c.agent(2), "pgrep -f 'python3 [a]pp.py' || true")
                .is_ok_and(|o| o.is_empty());
            gone && !instances(&c.status("web"))
                .iter()
                .any(|i| i["id"] == stale_id.as_str())
        },
    );
    let stale_gone = healed_at.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let st = c.status("web");
    let inst = instances(&st);
    figures(&format!(
        "scenario 5 (node cut off): {} requests sent, {} failed; node-2's copy answered {after_cut} probes after the cut; \
         last answered {} ms after its lease expired (goal < 3000 ms); 1 instance replaced, all 3 serving again {} ms after the cut (checked after the probe window); \
         stale copy stopped {} ms after the heal; {} instances at the end",
        stats.sent,
        stats.failed,
        removed_after_lease_ms,
        replaced_at.as_millis(),
        stale_gone.as_millis(),
        inst.len()
    ));
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
    assert!(
        removed_after_lease_ms < 3000,
        "node-2's copy was still routed {removed_after_lease_ms} ms after its lease expired"
    );
    assert_eq!(inst.len(), 3, "no duplicates remain: {st:#}");
    assert!(
        inst.iter().all(|i| i["release"] == "r1"
            && i["state"] == "healthy"
            && i["routed"] == true
            && i["node"] != "node-2"),
        "{st:#}"
    );
}

/// Scenario 2: the agent of a node is SIGKILLed ten times while its apps
/// serve; they keep serving, are never restarted, and each new agent
/// re-adopts them.
#[test]
fn scenario_02_an_agent_killed_ten_times_leaves_its_apps_serving_and_readopts_them() {
    let _g = serial();
    let c = DockerCluster::start(3);
    deploy_v1(&c, "web", 3);
    let before = c.pids("web");
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(180));
    let started = Instant::now();
    for round in 1..=10 {
        c.kill_role(c.agent(1), "agent");
        std::thread::sleep(Duration::from_millis(300));
        c.start_agent(1);
        // The new agent has reported (its report carries the adopted pids).
        c.wait_reporting(1, &format!("round {round}: node-1 reports again"));
    }
    let killed_for = started.elapsed();
    c.wait_until("all healthy", Duration::from_secs(20), |c| {
        instances(&c.status("web"))
            .iter()
            .all(|i| i["state"] == "healthy" && i["routed"] == true)
    });
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let after = c.pids("web");
    let agents_log = std::fs::read_to_string(c.agent(1).dir.join("logs/agent.log")).unwrap();
    let adopted = agents_log.matches("re-adopting running instance").count();
    figures(&format!(
        "scenario 2 (agent killed 10 times in {} ms): {} requests sent, {} failed; {adopted} re-adoptions logged; \
         0 instances replaced; restarts {:?}",
        killed_for.as_millis(),
        stats.sent,
        stats.failed,
        after.iter().map(|a| a.2).collect::<Vec<_>>()
    ));
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
    assert_eq!(after, before, "same instances, same pids, no restarts");
    assert!(adopted >= 10, "every new agent re-adopted: {adopted}");
}

/// App processes running on each node (what max_surge bounds), summed.
fn app_processes(c: &DockerCluster) -> usize {
    c.agents
        .iter()
        .map(|h| {
            c.sh(h, "pgrep -f 'python3 [a]pp.py' | wc -l")
                .ok()
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Scenario 1: the control plane SIGKILLed at every persisted step of a
/// rolling rollout (3 instances, max_surge 1): each time the restarted
/// server resumes the same rollout from where it stood, the instance bound
/// holds throughout, no request fails, and there is exactly one rollout.
#[test]
fn scenario_01_the_server_killed_at_every_persisted_step_resumes_the_same_rollout() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let mut slow = Behavior::ok("v2");
    slow.start_delay_ms = 1000;
    repo.commit(&spec("web", 3, "60s"), &slow);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(240));
    c.cli_ok(&["deploy", "web"]);
    let first = c.status("web")["rollout"].clone();
    let id = first["id"].as_i64().unwrap();
    // A step: the rollout's step and every instance's (id, desired state,
    // routing) as stored. Each new one is killed at.
    let signature = |st: &Value| -> String {
        let mut parts: Vec<String> = instances(st)
            .iter()
            .map(|i| format!("{}:{}:{}", i["id"], i["state"], i["routed"]))
            .collect();
        parts.sort();
        format!("{} {}", st["rollout"]["step"], parts.join(","))
    };
    // The instance bound is sampled by a thread of its own, all along, so
    // that the loop below looks at the rollout every 50 ms: a step that lasts
    // less than one `docker exec` per node is not missed.
    let stop = AtomicBool::new(false);
    let max_procs = AtomicUsize::new(0);
    let mut kills = 0u32;
    std::thread::scope(|scope| {
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                max_procs.fetch_max(app_processes(&c), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut last_sig = String::new();
        let mut last_step = 0u64;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            assert!(
                Instant::now() < deadline,
                "the rollout did not finish\n{}",
                c.logs()
            );
            let st = c.status("web");
            assert_eq!(
                st["rollout"]["id"].as_i64(),
                Some(id),
                "the same rollout: {st:#}"
            );
            let step = st["rollout"]["step"].as_u64().unwrap_or(0);
            assert!(
                step >= last_step,
                "resumed from its step ({last_step}): {st:#}"
            );
            last_step = step;
            let procs = max_procs.load(Ordering::SeqCst);
            assert!(
                procs <= 4,
                "more than instances + max_surge processes: {procs}\n{st:#}"
            );
            if st["rollout"]["state"] == "succeeded" {
                break;
            }
            let sig = signature(&st);
            if sig != last_sig {
                last_sig = sig;
                c.kill_role(&c.server, "server");
                c.start_server();
                kills += 1;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let max_procs = max_procs.into_inner();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let events = c.api_get("/v1/events?app=web").unwrap();
    let started = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rollout.started")
        .count();
    figures(&format!(
        "scenario 1 (server killed at every step): {kills} kills, {kills} resumptions of rollout {id}; \
         {} requests sent, {} failed; at most {max_procs} app processes (bound 4)",
        stats.sent, stats.failed
    ));
    assert!(kills >= 6, "killed at each step: {kills}");
    assert!(
        max_procs <= 4,
        "more than instances + max_surge processes: {max_procs}"
    );
    assert_eq!(started, 2, "exactly one rollout per deploy: {events:#}");
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
    let st = c.status("web");
    assert_eq!(st["live_release"], "r2");
    let inst = instances(&st);
    assert_eq!(inst.len(), 3, "{st:#}");
    assert!(inst
        .iter()
        .all(|i| i["release"] == "r2" && i["state"] == "healthy"));
}

/// A spec whose app exits 0.3 s after it starts, every time.
fn crashing_spec(name: &str, deadline: &str) -> String {
    spec(name, 3, deadline).replace(
        "command = \"exec python3 app.py\"",
        "command = \"exec python3 -c 'import time; time.sleep(0.3); raise SystemExit(3)'\"",
    )
}

/// Scenarios 7 and 3: a release that crash-loops stops the rollout at its
/// first batch (one new instance beside the three old ones), fails at its
/// deadline and rolls back while the old instances keep serving. Meanwhile
/// the agent running the crash-looping instance is killed and restarted:
/// the restart count only grows and the backoff holds.
#[test]
fn scenario_07_and_03_a_crash_looping_release_rolls_back_and_an_agent_restart_keeps_its_backoff() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let v1_pids = c.pids("web");
    repo.commit(&crashing_spec("web", "25s"), &Behavior::ok("v2"));
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(180));
    let started = Instant::now();
    c.cli_ok(&["deploy", "web"]);
    let r2 = |st: &Value| -> Vec<Value> {
        instances(st)
            .into_iter()
            .filter(|i| i["release"] == "r2")
            .collect()
    };
    c.wait_until(
        "the r2 instance restarted 3 times",
        Duration::from_secs(30),
        |c| {
            r2(&c.status("web"))
                .first()
                .is_some_and(|i| i["restarts"].as_u64().unwrap_or(0) >= 3)
        },
    );
    let st = c.status("web");
    let new = r2(&st);
    assert_eq!(new.len(), 1, "the rollout stops at its first batch: {st:#}");
    let node: u32 = new[0]["node"].as_str().unwrap()["node-".len()..]
        .parse()
        .unwrap();
    let before_kill = new[0]["restarts"].as_u64().unwrap();
    c.kill_role(c.agent(node), "agent");
    std::thread::sleep(Duration::from_millis(500));
    c.start_agent(node);
    let agent_back = Instant::now();
    // Restarts only grow, carried over by the new agent; with a streak of
    // ≥ 3 the next start waits ≥ 4 s, so within 3 s of the new agent at most
    // one more restart happens (without backoff it would be ten), and
    // within 12 s at least one does.
    let mut seen = vec![before_kill];
    let mut at_3s = before_kill;
    let mut max_ready_r2 = 0;
    while agent_back.elapsed() < Duration::from_secs(12) {
        let st = c.status("web");
        if let Some(i) = r2(&st).first() {
            let n = i["restarts"].as_u64().unwrap_or(0);
            seen.push(n);
            if agent_back.elapsed() < Duration::from_secs(3) {
                at_3s = n;
            }
        }
        max_ready_r2 = max_ready_r2.max(r2(&st).len());
        if seen.last() > Some(&before_kill) && agent_back.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_until("rolled back", Duration::from_secs(60), |c| {
        c.status("web")["rollout"]["state"] == "rolled_back"
    });
    let failed_after = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let st = c.status("web");
    figures(&format!(
        "scenario 7 (crash-looping release): rolled back {} ms after the deploy ({}); {} requests sent, {} failed; \
         scenario 3 (agent killed while its app crash-loops): {before_kill} restarts before the kill, {at_3s} within 3 s of the new agent, {} at the end",
        failed_after.as_millis(),
        st["rollout"]["message"],
        stats.sent,
        stats.failed,
        seen.last().unwrap()
    ));
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the restart count only grows: {seen:?}"
    );
    assert!(
        at_3s - before_kill <= 1,
        "the backoff holds across the agent restart: {seen:?}"
    );
    assert!(
        *seen.last().unwrap() > before_kill,
        "the new agent goes on restarting it, counting on: {seen:?}"
    );
    assert_eq!(max_ready_r2, 1, "never more than the first batch");
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
    assert_eq!(stats.by_version.keys().collect::<Vec<_>>(), ["v1"]);
    assert_eq!(st["live_release"], "r1");
    assert!(
        st["rollout"]["message"]
            .as_str()
            .unwrap()
            .contains("was not healthy within 25s"),
        "{st:#}"
    );
    assert_eq!(
        c.pids("web"),
        v1_pids,
        "the old instances stayed throughout"
    );
}

/// Scenario 4: the agent's state file truncated, zeroed or deleted while it
/// is down. Each time the agent starts (it never hangs), logs one clear
/// line about its state file, finds its running app by its environment and
/// re-adopts it as the control plane still assigns it: same process, no
/// duplicate, no failed request.
#[test]
fn scenario_04_a_damaged_or_lost_agent_state_file_is_survived_and_the_apps_readopted() {
    let _g = serial();
    let c = DockerCluster::start(3);
    deploy_v1(&c, "web", 3);
    let on1 = |c: &DockerCluster| -> Vec<(String, u64)> {
        instances(&c.status("web"))
            .iter()
            .filter(|i| i["node"] == "node-1")
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_string(),
                    i["pid"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let before = on1(&c);
    assert_eq!(before.len(), 1, "one instance on node-1");
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(180));
    let log_path = c.agent(1).dir.join("logs/agent.log");
    let f = "/data/agent/agent-state.json";
    let mut seen_figures = Vec::new();
    for (damage, cmd, expect) in [
        (
            "truncated",
            format!("head -c 17 {f} > {f}.t && mv {f}.t {f}"),
            "agent state file",
        ),
        (
            "zeroed",
            format!("n=$(wc -c < {f}); head -c $n /dev/zero > {f}.t && mv {f}.t {f}"),
            "zero bytes",
        ),
        ("deleted", format!("rm {f}"), "no agent state file"),
    ] {
        c.kill_role(c.agent(1), "agent");
        c.sh(c.agent(1), &cmd).unwrap();
        let log_from = std::fs::metadata(&log_path).unwrap().len() as usize;
        let started = Instant::now();
        c.start_agent(1);
        c.wait_reporting(1, &format!("{damage}: node-1 reports again"));
        let reporting = started.elapsed();
        // Registering already counts as being seen; the instance is the
        // agent's again once its assignments arrived.
        c.wait_until(
            &format!("{damage}: node-1's agent re-adopted its instance"),
            Duration::from_secs(20),
            |_| {
                std::fs::read_to_string(&log_path).unwrap()[log_from..]
                    .contains("re-adopting running instance found without a state record")
            },
        );
        c.wait_until(
            &format!("{damage}: node-1's instance healthy and routed"),
            Duration::from_secs(20),
            |c| {
                instances(&c.status("web")).iter().any(|i| {
                    i["node"] == "node-1" && i["state"] == "healthy" && i["routed"] == true
                })
            },
        );
        assert_eq!(on1(&c), before, "{damage}: the same instance and process");
        let procs = c
            .sh(c.agent(1), "pgrep -f 'python3 [a]pp.py' | wc -l")
            .unwrap();
        assert_eq!(procs.trim(), "1", "{damage}: no duplicate on node-1");
        let log = std::fs::read_to_string(&log_path).unwrap();
        let new = &log[log_from..];
        let about_state: Vec<&str> = new.lines().filter(|l| l.contains("state file")).collect();
        assert_eq!(
            about_state.len(),
            1,
            "{damage}: one line about the state file:\n{new}"
        );
        assert!(
            about_state[0].contains(expect),
            "{damage}: it says what is wrong: {}",
            about_state[0]
        );
        assert!(
            new.contains("re-adopting running instance found without a state record"),
            "{damage}: {new}"
        );
        seen_figures.push(format!(
            "{damage}: reporting after {} ms",
            reporting.as_millis()
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    figures(&format!(
        "scenario 4 (agent state file damaged): {}; {} requests sent, {} failed; 0 instances replaced",
        seen_figures.join(", "),
        stats.sent,
        stats.failed
    ));
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
}

/// Scenario 8: an app that takes 90 s to become healthy, with a 120 s
/// health deadline, rolls out (all three new instances at once) while the
/// old ones serve; nothing fails.
#[test]
fn scenario_08_a_slow_starting_release_healthy_after_90s_succeeds_within_its_120s_deadline() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let mut slow = Behavior::ok("v2");
    slow.start_delay_ms = 90_000;
    repo.commit(
        &spec("web", 3, "120s").replace("max_surge = 1", "max_surge = 3"),
        &slow,
    );
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(200));
    let started = Instant::now();
    let out = c.cli(&["deploy", "web", "--wait"]);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let st = c.status("web");
    figures(&format!(
        "scenario 8 (healthy after 90 s, deadline 120 s): live after {} ms; {} requests sent, {} failed, by version {:?}",
        took.as_millis(),
        stats.sent,
        stats.failed,
        stats.by_version
    ));
    assert!(
        out.status.success(),
        "{}\n{st:#}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    assert!(took >= Duration::from_secs(90), "{took:?}");
    assert_eq!(st["live_release"], "r2");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(stats.by_version.contains_key("v2"));
}

/// Scenario 9: health checks that flap. Above the thresholds (2 passes, 2
/// failures with healthy_after = unhealthy_after = 3) an instance is never
/// healthy: the canary is never routed nor promoted and the rollout fails
/// at its deadline. Below them (3 passes, 1 failure) an instance, once
/// healthy, stays routed: routing never follows the flapping.
#[test]
fn scenario_09_a_flapping_health_check_is_never_promoted_and_routing_does_not_flap() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let sp = spec("web", 3, "8s")
        .replace("healthy_after = 1", "healthy_after = 3")
        .replace("unhealthy_after = 2", "unhealthy_after = 3")
        .replace(
            "strategy = \"rolling\"",
            "strategy = \"canary\"\nsteps = [{ weight = 34, pause = \"2s\" }]",
        );
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    // Routing of the new release's instances, sampled every 50 ms: how
    // many were ever routed, and how often one left routing again.
    let watch = |c: &DockerCluster, release: &str, until: &dyn Fn(&Value) -> bool| {
        let mut last: std::collections::BTreeMap<String, bool> = Default::default();
        let mut ever: std::collections::BTreeSet<String> = Default::default();
        let mut unroutes = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "{}", c.logs());
            let st = c.status("web");
            for i in instances(&st).iter().filter(|i| i["release"] == release) {
                let id = i["id"].as_str().unwrap().to_string();
                let routed = i["routed"] == true;
                if routed {
                    ever.insert(id.clone());
                }
                if last.insert(id, routed).is_some_and(|was| was && !routed) {
                    unroutes += 1;
                }
            }
            if until(&st) {
                return (ever.len(), unroutes, st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let flapping = Behavior {
        health_flap: Some((2, 2)),
        ..Behavior::ok("v2")
    };
    repo.commit(&sp, &flapping);
    c.cli_ok(&["deploy", "web"]);
    let (ever, _, st) = watch(&c, "r2", &|st| {
        st["rollout"]["state"] == "rolled_back" || st["rollout"]["state"] == "failed"
    });
    assert_eq!(st["rollout"]["state"], "rolled_back", "{st:#}");
    assert_eq!(ever, 0, "a flapping canary is never routed");
    let message = st["rollout"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("was not healthy within 8s"), "{message}");

    let mostly_ok = Behavior {
        health_flap: Some((3, 1)),
        ..Behavior::ok("v3")
    };
    repo.commit(&sp.replace("\"8s\"", "\"30s\""), &mostly_ok);
    c.cli_ok(&["deploy", "web"]);
    let (routed3, unroutes3, st) = watch(&c, "r3", &|st| st["rollout"]["state"] == "succeeded");
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    figures(&format!(
        "scenario 9 (flapping health): 2 up / 2 down: never routed, rolled back ({message}); \
         3 up / 1 down: promoted, {routed3} instances routed, {unroutes3} left routing again; {} requests sent, {} failed",
        stats.sent, stats.failed
    ));
    assert_eq!(
        unroutes3, 0,
        "once healthy, routing ignores single failures: {st:#}"
    );
    assert_eq!(routed3, 3);
    assert_eq!(st["live_release"], "r3");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert_eq!(
        stats.by_version.get("v2"),
        None,
        "no user reached the flapping release: {:?}",
        stats.by_version
    );
}

/// Scenario 12: the artifact of a new release cannot be had — truncated,
/// one byte changed (checksum mismatch), or gone (404) on the server — and
/// the deploy fails with the cause before any old instance stops; then the
/// server is down for a few seconds just as the agents are to download a
/// release: they retry and the rollout succeeds.
#[test]
fn scenario_12_a_failing_artifact_download_fails_the_deploy_before_any_old_instance_stops() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let v1 = c.pids("web");
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(240));
    // The app's own [release] command (run on the server once the artifact
    // is packed, before any rollout) damages the newest artifact.
    let newest = "f=$(ls -t /data/server/artifacts/*.tar.zst | head -1)";
    let mut seen_figures = Vec::new();
    for (n, (damage, cmd, cause)) in [
        (
            "truncated",
            format!("{newest}; truncate -s 100 $f"),
            "size mismatch",
        ),
        (
            "checksum mismatch",
            format!("{newest}; printf X | dd of=$f bs=1 seek=60 conv=notrunc 2>/dev/null"),
            "sha256 mismatch",
        ),
        ("gone (404)", format!("{newest}; rm $f"), "404 Not Found"),
    ]
    .into_iter()
    .enumerate()
    {
        let version = format!("v{}", n + 2);
        let sp = spec("web", 3, "10s")
            .replace("[run]", &format!("[release]\ncommand = \"{cmd}\"\n\n[run]"));
        repo.commit(&sp, &Behavior::ok(&version));
        let out = c.cli(&["deploy", "web", "--wait"]);
        let st = c.status("web");
        let message = st["rollout"]["message"].as_str().unwrap_or("").to_string();
        assert!(!out.status.success(), "{damage}: the deploy fails\n{st:#}");
        assert_eq!(st["rollout"]["state"], "rolled_back", "{damage}: {st:#}");
        assert!(
            message.contains(cause),
            "{damage}: the cause is named: {message}\n{}",
            c.logs()
        );
        assert_eq!(c.pids("web"), v1, "{damage}: no old instance stopped");
        seen_figures.push(format!("{damage}: \"{message}\""));
    }

    // The server down while the agents are to download: each agent is
    // stopped (SIGSTOP: its apps go on), the rollout is created (the
    // assignment long poll's answer waits in the stopped agent's socket),
    // the server is killed, the agents continue and find it gone.
    repo.commit(&spec("web", 3, "60s"), &Behavior::ok("v9"));
    let pause = |sig: &str| {
        for h in &c.agents {
            c.sh(h, &format!("kill -{sig} $(cat /data/agent.pid)"))
                .unwrap();
        }
    };
    pause("STOP");
    c.cli_ok(&["deploy", "web"]);
    c.wait_until(
        "an instance of the new release placed",
        Duration::from_secs(30),
        |c| {
            instances(&c.status("web"))
                .iter()
                .any(|i| i["release"] != "r1")
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    c.kill_role(&c.server, "server");
    pause("CONT");
    std::thread::sleep(Duration::from_secs(3));
    c.start_server();
    c.wait_until("the rollout succeeded", Duration::from_secs(90), |c| {
        c.status("web")["rollout"]["state"] == "succeeded"
    });
    let retries: usize = c.in_agent_logs("artifact download failed; retrying");
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    figures(&format!(
        "scenario 12 (artifact download fails): {}; server down 3 s during the download: {retries} retries, then live; \
         {} requests sent, {} failed, by version {:?}",
        seen_figures.join("; "),
        stats.sent,
        stats.failed,
        stats.by_version
    ));
    assert!(retries >= 1, "the download was retried\n{}", c.logs());
    assert_eq!(c.status("web")["live_release"], "r5");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(
        stats.by_version.keys().all(|v| v == "v1" || v == "v9"),
        "{:?}",
        stats.by_version
    );
}

/// Scenario 10: continuous load — keep-alive, a new connection per request,
/// and slow requests in flight — through 20 cycles of deploy (a canary held
/// at 50%), promote and rollback: no request fails. Every stopped instance
/// was retired (out of routing, drained) before its stop (SIGTERM).
#[test]
fn scenario_10_twenty_deploy_canary_promote_rollback_cycles_under_load_lose_no_request() {
    let _g = serial();
    let c = DockerCluster::start(3);
    let sp = spec("web", 2, "30s").replace(
        "strategy = \"rolling\"",
        "strategy = \"canary\"\nsteps = [{ weight = 50, pause = \"1h\" }]",
    );
    let repo = c.repo("web", &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(600));
    let started = Instant::now();
    let cycles = 20;
    // Each rollback goes back to r1, the release live before each deploy.
    let live = 1u64;
    for k in 1..=cycles {
        let next = k + 1;
        let version = format!("v{}", k + 1);
        repo.commit(&sp, &Behavior::ok(&version));
        c.cli_ok(&["deploy", "web"]);
        let new = format!("r{next}");
        c.wait_until(
            &format!("cycle {k}: the canary {new} takes 50%"),
            Duration::from_secs(60),
            |c| c.status("web")["traffic"][&new] == 50,
        );
        c.cli_ok(&["promote", "web", "--full"]);
        c.wait_until(
            &format!("cycle {k}: {new} live"),
            Duration::from_secs(60),
            |c| {
                let st = c.status("web");
                st["live_release"] == new.as_str() && st["rollout"]["state"] == "succeeded"
            },
        );
        c.cli_ok(&["rollback", "web", "--wait"]);
        let back = format!("r{live}");
        assert_eq!(c.status("web")["live_release"], back.as_str(), "cycle {k}");
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    // Retired before stopped, for every instance the server stopped.
    let server_log = std::fs::read_to_string(c.server.dir.join("logs/server.log")).unwrap();
    let mut retired = std::collections::BTreeSet::new();
    let mut stops = 0;
    for line in server_log.lines() {
        if let Some(id) = line.split("action=retire ").nth(1) {
            retired.insert(id.trim().to_string());
        }
        if let Some(id) = line.split("action=stop ").nth(1) {
            stops += 1;
            assert!(
                retired.contains(id.trim()),
                "{id} was stopped without being retired first"
            );
        }
    }
    let sigterms: usize = c.in_agent_logs("SIGTERM to the process group");
    figures(&format!(
        "scenario 10 ({cycles} deploy/canary/promote/rollback cycles in {} s): {} requests sent \
         (keep-alive, new connections, slow), {} failed; {stops} instances retired, drained, then stopped; \
         {sigterms} SIGTERMs; answers by version: {} versions",
        took.as_secs(),
        stats.sent,
        stats.failed,
        stats.by_version.len()
    ));
    assert_eq!(stats.failed, 0, "{:?}\n{}", stats.failures, c.logs());
    assert!(stops >= 2 * cycles as usize * 2, "{stops} stops");
    assert!(
        stats.by_version.len() > cycles as usize,
        "{:?}",
        stats.by_version
    );
}

/// Scenario 13: random operations for a minute — deploys (new versions,
/// 2 to 4 instances), rollbacks, pauses and resumes, agents and the server
/// SIGKILLed and restarted — then one last deploy: the cluster converges to
/// exactly that (its release live on its instance count, all healthy and
/// routed, nothing else left), and no request failed. The seed is printed;
/// DROVER_CLUSTER_SEED=N replays the same operations.
#[test]
fn scenario_13_random_operations_converge_to_the_last_requested_state() {
    let _g = serial();
    let seed: u64 = std::env::var("DROVER_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        });
    figures(&format!(
        "scenario 13: seed {seed} (DROVER_CLUSTER_SEED={seed} replays it)"
    ));
    // xorshift: deterministic per seed, no dependency.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let c = DockerCluster::start(3);
    let repo = deploy_v1(&c, "web", 3);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(300));
    let started = Instant::now();
    let mut ops: Vec<String> = Vec::new();
    let mut version = 1;
    while started.elapsed() < Duration::from_secs(60) {
        let op = match rand(10) {
            0..=2 => {
                version += 1;
                let n = 2 + rand(3) as u32;
                repo.commit(
                    &spec("web", n, "30s"),
                    &Behavior::ok(&format!("v{version}")),
                );
                let ok = c.cli(&["deploy", "web"]).status.success();
                format!(
                    "deploy v{version}×{n}{}",
                    if ok { "" } else { " (refused)" }
                )
            }
            3 => {
                let ok = c.cli(&["rollback", "web"]).status.success();
                format!("rollback{}", if ok { "" } else { " (refused)" })
            }
            4 => {
                let ok = c.cli(&["pause", "web"]).status.success();
                format!("pause{}", if ok { "" } else { " (nothing to pause)" })
            }
            5 => {
                let ok = c.cli(&["resume", "web"]).status.success();
                format!("resume{}", if ok { "" } else { " (nothing paused)" })
            }
            6..=7 => {
                let i = 1 + rand(3) as u32;
                c.kill_role(c.agent(i), "agent");
                std::thread::sleep(Duration::from_millis(rand(1500)));
                c.start_agent(i);
                format!("kill agent node-{i}")
            }
            _ => {
                c.kill_role(&c.server, "server");
                std::thread::sleep(Duration::from_millis(rand(1500)));
                c.start_server();
                "kill server".to_string()
            }
        };
        ops.push(op);
        std::thread::sleep(Duration::from_millis(200 + rand(2000)));
    }
    // The last request: resume whatever is paused, then one more version.
    let _ = c.cli(&["resume", "web"]);
    version += 1;
    let n = 2 + rand(3) as u32;
    repo.commit(
        &spec("web", n, "30s"),
        &Behavior::ok(&format!("v{version}")),
    );
    c.cli_ok(&["deploy", "web"]);
    ops.push(format!("last: deploy v{version}×{n}"));
    let newest = || -> String {
        let rel = c.api_get("/v1/apps/web/releases").unwrap();
        rel.as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str()?.strip_prefix('r')?.parse::<u64>().ok())
            .max()
            .map(|n| format!("r{n}"))
            .unwrap()
    };
    let last = newest();
    let converge = Instant::now();
    c.wait_until(
        &format!("convergence to {last} × {n} after {ops:?}"),
        Duration::from_secs(120),
        |c| {
            let st = c.status("web");
            let inst = instances(&st);
            st["live_release"] == last.as_str()
                && st["rollout"]["state"] == "succeeded"
                && inst.len() == n as usize
                && inst.iter().all(|i| {
                    i["release"] == last.as_str() && i["state"] == "healthy" && i["routed"] == true
                })
        },
    );
    let converged_in = converge.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = load.finish();
    let procs = app_processes(&c);
    figures(&format!(
        "scenario 13 (seed {seed}): {} operations: {}; converged to {last} × {n} in {} ms; \
         {} requests sent, {} failed; {procs} app processes at the end",
        ops.len(),
        ops.join(", "),
        converged_in.as_millis(),
        stats.sent,
        stats.failed
    ));
    assert_eq!(procs, n as usize, "no stray process");
    assert_eq!(
        get_version(&c.proxy_url(), "web.localhost").unwrap(),
        format!("v{version}")
    );
    assert_eq!(
        stats.failed,
        0,
        "seed {seed}: {:?}\n{}",
        stats.failures,
        c.logs()
    );
}
