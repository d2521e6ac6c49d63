//! End-to-end: server, agents and proxy as real processes on 127.0.0.1 with
//! the process driver, driven through the CLI, with load through the proxy.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn deploy_first(c: &Cluster, repo: &Repo, app: &str) {
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", app, "--wait"]);
    c.wait_until(
        "r1 answers through the proxy",
        Duration::from_secs(10),
        |c| {
            get_version(&c.proxy_url(), &format!("{app}.localhost"))
                .map(|v| v == "v1")
                .unwrap_or(false)
        },
    );
}

/// Instances with a live process (what max_surge bounds) and serving ones.
fn counts(st: &serde_json::Value) -> (usize, usize) {
    let inst = st["instances"].as_array().unwrap();
    let running = inst
        .iter()
        .filter(|i| !matches!(i["state"].as_str(), Some("stopped") | Some("pending")))
        .count();
    let serving = inst.iter().filter(|i| i["routed"] == true).count();
    (running, serving)
}

#[test]
fn a_rolling_deploy_under_load_loses_no_request_and_holds_the_instance_bounds() {
    let _g = serial();
    let c = Cluster::start(3);
    let repo = Repo::create(c.dir.path(), &spec("web", 3, "30s"), &Behavior::ok("v1"));
    deploy_first(&c, &repo, "web");

    repo.commit(&spec("web", 3, "30s"), &Behavior::ok("v2"));
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    // Watch the bounds while the deploy runs in the background.
    let mut deploy = std::process::Command::new(BIN)
        .args(["deploy", "web", "--wait"])
        .env("DROVER_SERVER", &c.api)
        .env("DROVER_TOKEN", &c.admin_token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut observations = 0;
    let (mut max_running, mut min_serving) = (0, usize::MAX);
    let deadline = Instant::now() + Duration::from_secs(90);
    while deploy.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "deploy did not finish\n{}",
            c.logs()
        );
        let st = c.status("web");
        let (running, serving) = counts(&st);
        max_running = max_running.max(running);
        min_serving = min_serving.min(serving);
        assert!(
            running <= 4,
            "more than instances+max_surge running: {st:#}"
        );
        assert!(
            serving >= 3,
            "fewer than instances-max_unavailable serving: {st:#}"
        );
        observations += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let out = deploy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    std::thread::sleep(Duration::from_millis(300));
    let stats = load.finish();
    println!("rolling deploy under load: {} requests sent, {} failed, by version {:?}; {observations} observations, max running {max_running}, min serving {min_serving}", stats.sent, stats.failed, stats.by_version);
    stats.assert_clean(&["v1", "v2"], &c.logs());
    assert!(stats.by_version.get("v2").copied().unwrap_or(0) > 0);
    for _ in 0..30 {
        assert_eq!(get_version(&c.proxy_url(), "web.localhost").unwrap(), "v2");
    }
    let st = c.status("web");
    assert_eq!(st["live_release"], "r2");
    assert_eq!(st["rollout"]["state"], "succeeded");
    assert_eq!(st["traffic"], serde_json::json!({"r2": 100}));
    assert_eq!(
        st["instances"].as_array().unwrap().len(),
        3,
        "old instances are gone: {st:#}"
    );
}

#[test]
fn a_release_that_never_becomes_healthy_fails_at_its_deadline_and_rolls_back() {
    let _g = serial();
    let c = Cluster::start(3);
    let repo = Repo::create(c.dir.path(), &spec("web", 3, "4s"), &Behavior::ok("v1"));
    deploy_first(&c, &repo, "web");
    let mut bad = Behavior::ok("v2");
    bad.health_status = 503;
    repo.commit(&spec("web", 3, "4s"), &bad);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(60));
    let out = c.cli(&["deploy", "web", "--wait"]);
    let stats = load.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a rolled-back deploy exits 1: {stderr}"
    );
    assert!(stderr.contains("rolled_back"), "{stderr}");
    println!(
        "failed deploy under load: {} sent, {} failed",
        stats.sent, stats.failed
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert_eq!(
        stats.by_version.keys().collect::<Vec<_>>(),
        ["v1"],
        "r2 never served"
    );

    let st = c.status("web");
    assert_eq!(st["live_release"], "r1");
    assert_eq!(st["rollout"]["state"], "rolled_back");
    let failure = st["rollout"]["failure"].as_str().unwrap();
    // Names the instance, the check and its last response.
    assert!(failure.contains("instance web-r2-"), "{failure}");
    assert!(failure.contains("GET /healthz → 503"), "{failure}");
    assert!(failure.contains("not healthy within 4s"), "{failure}");
    let text = c.cli_ok(&["status", "web"]);
    assert!(
        text.contains("rolled_back") && text.contains("GET /healthz → 503"),
        "{text}"
    );
    c.wait_until("r2 instances removed", Duration::from_secs(20), |c| {
        c.status("web")["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == "r1")
    });
}

#[test]
fn the_server_killed_mid_rollout_resumes_from_its_persisted_step() {
    let _g = serial();
    let mut c = Cluster::start(3);
    let repo = Repo::create(c.dir.path(), &spec("web", 3, "30s"), &Behavior::ok("v1"));
    deploy_first(&c, &repo, "web");
    let mut slow = Behavior::ok("v2");
    slow.start_delay_ms = 1500;
    repo.commit(&spec("web", 3, "30s"), &slow);
    let d: serde_json::Value = serde_json::from_str(&{
        let out = c.cli(&["deploy", "web"]);
        assert!(out.status.success());
        // `deploy` without --wait returns once the rollout exists.
        let st = c.status("web");
        st["rollout"].to_string()
    })
    .unwrap();
    let rollout_id = d["id"].as_i64().unwrap();
    c.wait_until("one r2 instance serving", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["step"].as_u64().unwrap_or(0) >= 1
    });
    let step_before = c.status("web")["rollout"]["step"].as_u64().unwrap();
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(90));
    c.server.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    c.restart_server();
    let st = c.status("web");
    assert_eq!(
        st["rollout"]["id"].as_i64(),
        Some(rollout_id),
        "the same rollout, not a new one"
    );
    assert!(
        st["rollout"]["step"].as_u64().unwrap() >= step_before,
        "resumed from its step: {st:#}"
    );
    c.wait_until("rollout succeeded", Duration::from_secs(60), |c| {
        c.status("web")["rollout"]["state"] == "succeeded"
    });
    let stats = load.finish();
    println!(
        "server restart mid-rollout: {} sent, {} failed",
        stats.sent, stats.failed
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    let st = c.status("web");
    assert_eq!(st["rollout"]["id"].as_i64(), Some(rollout_id));
    assert_eq!(st["live_release"], "r2");
    let inst = st["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 3, "{st:#}");
    assert!(inst
        .iter()
        .all(|i| i["release"] == "r2" && i["state"] == "healthy"));
    let events = c.api_get("/v1/events?app=web").unwrap();
    let started = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rollout.started")
        .count();
    assert_eq!(started, 2, "exactly one rollout per deploy: {events:#}");
}

#[test]
fn an_agent_killed_and_restarted_keeps_its_instances_and_their_pids() {
    let _g = serial();
    let mut c = Cluster::start(3);
    let repo = Repo::create(c.dir.path(), &spec("web", 3, "30s"), &Behavior::ok("v1"));
    deploy_first(&c, &repo, "web");
    let before = c.pids("web");
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(60));
    c.agents[0].kill9();
    std::thread::sleep(Duration::from_secs(2));
    let agent = c.spawn_agent(1);
    c.agents[0] = agent;
    std::thread::sleep(Duration::from_secs(3));
    let stats = load.finish();
    println!(
        "agent restart: {} sent, {} failed",
        stats.sent, stats.failed
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    c.wait_until("all healthy again", Duration::from_secs(15), |c| {
        c.status("web")["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "healthy")
    });
    assert_eq!(
        c.pids("web"),
        before,
        "same instances, same pids, no restarts"
    );
}

#[test]
fn a_malformed_drover_toml_is_refused_with_file_line_and_field_and_nothing_is_stored() {
    let _g = serial();
    let c = Cluster::start(1);
    let bad = spec("web", 3, "30s").replace("max_surge = 1", "max_surge = 0");
    let repo = Repo::create(c.dir.path(), &bad, &Behavior::ok("v1"));
    let out = c.cli(&["apps", "add", &repo.path.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("drover.toml:25:"),
        "file and line: {stderr}"
    );
    assert!(stderr.contains("deploy.max_surge"), "field: {stderr}");
    let apps = c.api_get("/v1/apps").unwrap();
    assert_eq!(apps, serde_json::json!([]), "nothing stored");

    let typo = spec("web", 3, "30s").replace("instances = 3", "instances = \"three\"");
    repo.commit(&typo, &Behavior::ok("v1"));
    let out = c.cli(&["apps", "add", &repo.path.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("drover.toml:10:"), "{stderr}");
    assert_eq!(c.api_get("/v1/apps").unwrap(), serde_json::json!([]));
}

#[test]
fn rollback_restores_the_earlier_release_with_its_artifact_and_config() {
    let _g = serial();
    let c = Cluster::start(2);
    let with_color = |color: &str| {
        spec("web", 2, "30s").replace(
            "stop_timeout = \"3s\"",
            &format!("stop_timeout = \"3s\"\nenv = {{ COLOR = \"{color}\" }}"),
        )
    };
    let repo = Repo::create(c.dir.path(), &with_color("blue"), &Behavior::ok("v1"));
    deploy_first(&c, &repo, "web");
    // Instance output reaches the server and `drover logs`.
    c.wait_until("instance logs shipped", Duration::from_secs(15), |c| {
        let out = c.cli(&["logs", "web"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter(|l| l.starts_with("[web-r1-") && l.contains("started v1 on port"))
            .count()
            == 2
    });
    let build = c.cli_ok(&["logs", "web", "--build"]);
    assert!(build.contains("==> build:"), "{build}");
    repo.commit(&with_color("green"), &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web", "--wait"]);
    let body = |c: &Cluster| raw_get(&c.proxy_addr, "web.localhost", "/").unwrap().1;
    assert!(
        body(&c).starts_with("v2 ") && body(&c).contains("color=green"),
        "{}",
        body(&c)
    );

    // No version id needed: rollback goes to the previous live release.
    c.cli_ok(&["rollback", "web", "--wait"]);
    let st = c.status("web");
    assert_eq!(st["live_release"], "r1");
    for _ in 0..10 {
        let b = body(&c);
        assert!(
            b.starts_with("v1 ") && b.contains("color=blue"),
            "artifact and config of r1: {b}"
        );
    }
    let releases = c.cli_ok(&["releases", "web"]);
    assert!(
        releases.contains("r1") && releases.contains("r2"),
        "{releases}"
    );
    // Bad input to rollback is refused with exit code 2.
    let out = c.cli(&["rollback", "web", "--to", "r99"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_first_deploy_that_never_becomes_healthy_fails_and_leaves_nothing_running() {
    let _g = serial();
    let c = Cluster::start(2);
    let mut bad = Behavior::ok("v1");
    bad.health_status = 503;
    let repo = Repo::create(c.dir.path(), &spec("web", 2, "3s"), &bad);
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.status("web");
    assert_eq!(st["rollout"]["state"], "failed", "{st:#}");
    assert!(st["live_release"].is_null());
    c.wait_until(
        "failed instances stopped and forgotten",
        Duration::from_secs(20),
        |c| c.status("web")["instances"].as_array().unwrap().is_empty(),
    );
    let (head, body) = raw_get(&c.proxy_addr, "web.localhost", "/").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 404"),
        "no live release, no route: {head} {body}"
    );
}
