//! Canary deployments end to end, load through the proxy: a bad canary is
//! rolled back by analysis of the proxies' own figures, a good one goes
//! through every step, users stick to one release inside a step, and too
//! little traffic never passes.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn canary_spec(steps: &str, analysis: &str) -> String {
    let s = spec("web", 3, "30s")
        .replace("strategy = \"rolling\"", "strategy = \"canary\"")
        .replace(
            "host = \"web.localhost\"",
            "host = \"web.localhost\"\nuser_key = \"header:x-user\"",
        );
    let mut s = format!("{s}steps = [{steps}]\n");
    if !analysis.is_empty() {
        s.push_str(&format!("\n[deploy.analysis]\n{analysis}"));
    }
    s
}

fn start(spec: &str) -> (Cluster, Repo) {
    let c = Cluster::start(3);
    let repo = Repo::create(c.dir.path(), spec, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    // A first deploy has nothing to compare with: it rolls out directly.
    c.cli_ok(&["deploy", "web", "--wait"]);
    (c, repo)
}

fn releases_running(c: &Cluster) -> Vec<String> {
    let mut r: Vec<String> = c.status("web")["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["release"].as_str().unwrap().to_string())
        .collect();
    r.sort();
    r
}

#[test]
fn a_canary_answering_5_percent_errors_is_rolled_back_by_analysis() {
    let _g = serial();
    let analysis =
        "max_error_rate = 0.01\nmin_requests = 60\ninterval = \"1s\"\ndeadline = \"60s\"\n";
    let sp = canary_spec(
        r#"{ weight = 20, pause = "30s" }, { weight = 50, pause = "30s" }"#,
        analysis,
    );
    let (c, repo) = start(&sp);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    repo.commit(
        &sp,
        &Behavior {
            fail_every: 20,
            ..Behavior::ok("v2")
        },
    );
    let began = Instant::now();
    let out = c.cli(&["deploy", "web", "--wait"]);
    let took = began.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the rollout must fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.status("web");
    let r = &st["rollout"];
    assert_eq!(r["state"], "rolled_back", "{st:#}");
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("canary analysis failed at step 1/2 (20% of users)")
            && failure.contains("is above the threshold 1.00%"),
        "{failure}"
    );
    assert_eq!(st["live_release"], "r1");
    c.wait_until("only r1 runs", Duration::from_secs(30), |c| {
        releases_running(c) == ["r1", "r1", "r1"]
    });
    let stats = load.finish();
    let errors_500 = stats.status_500;
    let v2_ok = stats.by_version.get("v2").copied().unwrap_or(0);
    let rate = stats.sent as f64 / took.as_secs_f64().max(1.0);
    // The analysis decides once `min_requests` reached the canary; until
    // traffic is back on r1 (a proxy report ≤ 250 ms, an engine tick, a
    // routing long poll) some more arrive: allow 2 s of its 20% share.
    let canary_allowed = 60.0 + 0.2 * rate * 2.0;
    let allowed = (canary_allowed * 0.05).ceil() as u64 + 2;
    println!(
        "bad canary: {} requests sent ({rate:.0}/s over {took:?}), {} failed for users ({errors_500} answered 500 by r2), {v2_ok} answered by r2 fine; allowed by weight 20% and the analysis window: {allowed}",
        stats.sent, stats.failed
    );
    assert_eq!(
        stats.failed, errors_500,
        "only the canary's own 500s: {:?}",
        stats.failures
    );
    assert!(stats.failed <= allowed, "{} > {allowed}", stats.failed);
    assert!(stats.failed > 0, "the canary did get traffic");
    let shown = c.cli_ok(&["status", "web"]);
    assert!(shown.contains("above the threshold 1.00%"), "{shown}");
}

#[test]
fn a_healthy_canary_goes_through_every_step_and_the_old_instances_are_gone() {
    let _g = serial();
    let analysis =
        "max_error_rate = 0.01\nmin_requests = 10\ninterval = \"500ms\"\ndeadline = \"30s\"\n";
    let sp = canary_spec(
        r#"{ weight = 34, pause = "1s" }, { weight = 67, pause = "1s" }"#,
        analysis,
    );
    let (c, repo) = start(&sp);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    repo.commit(&sp, &Behavior::ok("v2"));
    // Watch the steps go by.
    let out = std::thread::scope(|s| {
        let seen = s.spawn(|| {
            let mut steps = std::collections::BTreeSet::new();
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until {
                let st = c.status("web");
                if let Some(w) = st["rollout"]["weight"].as_u64() {
                    steps.insert(w);
                }
                if st["rollout"]["state"] == "succeeded" && st["rollout"]["to"] == "r2" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            steps
        });
        let out = c.cli(&["deploy", "web", "--wait"]);
        (out, seen.join().unwrap())
    });
    let (out, weights) = out;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        weights.contains(&34) && weights.contains(&67),
        "both steps were applied: {weights:?}"
    );
    let stats = load.finish();
    println!(
        "healthy canary: {} requests, {} failed, by version {:?}",
        stats.sent, stats.failed, stats.by_version
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(stats.by_version.get("v2").copied().unwrap_or(0) > 0);
    let st = c.status("web");
    assert_eq!(st["live_release"], "r2");
    c.wait_until("the old instances are gone", Duration::from_secs(30), |c| {
        releases_running(c) == ["r2", "r2", "r2"]
    });
}

#[test]
fn inside_a_step_each_user_sticks_to_one_release_and_the_split_follows_the_weight() {
    let _g = serial();
    let sp = canary_spec(r#"{ weight = 30, pause = "10m" }"#, "");
    let (c, repo) = start(&sp);
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("the 30% step applies", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["weight"] == 30
    });
    let mut to_new = 0;
    for u in 0..200 {
        let key = format!("user-{u}");
        let answers: Vec<String> = (0..3)
            .map(|_| {
                let (head, body) = raw_get_with(
                    &c.proxy_addr,
                    "web.localhost",
                    "/",
                    &format!("x-user: {key}\r\n"),
                )
                .unwrap();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                body.split_whitespace().next().unwrap().to_string()
            })
            .collect();
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{key} was answered by both releases: {answers:?}"
        );
        let expected = if drover_api::split_bucket(&key) < 300 {
            "v2"
        } else {
            "v1"
        };
        assert_eq!(answers[0], expected, "{key}");
        to_new += usize::from(answers[0] == "v2");
    }
    println!("stickiness: 200 users × 3 requests, {to_new} users on the canary (weight 30%)");
    assert!((30..=90).contains(&to_new), "{to_new} of 200 users");

    // The dry run of this rollout: its step, its pause, the nodes.
    let plan: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["plan", "web", "--json"])).unwrap();
    assert_eq!(
        (plan["from"].as_str(), plan["to"].as_str()),
        (Some("r1"), Some("r2"))
    );
    assert_eq!(plan["outcome"], "succeeded");
    assert!(
        plan["duration_ms"].as_u64().unwrap() >= 600_000,
        "the 10 min pause"
    );
    let steps = plan["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["traffic"]["r2"] == 30), "{plan:#}");
    let changes: Vec<&str> = steps
        .iter()
        .flat_map(|s| s["changes"].as_array().unwrap())
        .map(|c| c.as_str().unwrap())
        .collect();
    // One r2 instance runs already (the canary); the rest replace r1.
    assert_eq!(
        changes
            .iter()
            .filter(|c| c.starts_with("start r2 on node-"))
            .count(),
        2,
        "{changes:?}"
    );
    assert_eq!(
        changes
            .iter()
            .filter(|c| c.starts_with("stop r1 ("))
            .count(),
        3,
        "{changes:?}"
    );
    let shown = c.cli_ok(&["plan", "web"]);
    assert!(shown.contains("r1 → r2 (canary)"), "{shown}");
}

#[test]
fn a_canary_with_too_little_traffic_never_passes_and_fails_at_its_deadline() {
    let _g = serial();
    let analysis =
        "max_error_rate = 0.01\nmin_requests = 50\ninterval = \"500ms\"\ndeadline = \"3s\"\n";
    let sp = canary_spec(r#"{ weight = 50, pause = "0s" }"#, analysis);
    let (c, repo) = start(&sp);
    repo.commit(&sp, &Behavior::ok("v2"));
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let st = c.status("web");
    let failure = st["rollout"]["failure"].as_str().unwrap();
    assert!(
        failure.contains("was still inconclusive") && failure.contains("after 3s"),
        "{failure}"
    );
    assert_eq!(st["live_release"], "r1");
    c.wait_until("only r1 runs", Duration::from_secs(30), |c| {
        releases_running(c) == ["r1", "r1", "r1"]
    });
}

#[test]
fn operators_pause_resume_abort_and_promote_a_canary() {
    let _g = serial();
    let sp = canary_spec(
        r#"{ weight = 20, pause = "10m" }, { weight = 60, pause = "10m" }"#,
        "",
    );
    let (c, repo) = start(&sp);
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("the 20% step applies", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["weight"] == 20
    });
    c.cli_ok(&["pause", "web"]);
    assert_eq!(c.status("web")["rollout"]["state"], "paused");
    assert_eq!(
        c.cli(&["pause", "web"]).status.code(),
        Some(1),
        "paused already"
    );
    c.cli_ok(&["resume", "web"]);
    assert_eq!(c.status("web")["rollout"]["state"], "progressing");
    c.cli_ok(&["promote", "web"]);
    c.wait_until("the 60% step applies", Duration::from_secs(30), |c| {
        let r = &c.status("web")["rollout"];
        r["weight"] == 60 && r["canary_step"] == "2/2"
    });
    c.cli_ok(&["abort", "web"]);
    c.wait_until("back on r1 only", Duration::from_secs(30), |c| {
        let st = c.status("web");
        st["rollout"]["state"] == "rolled_back" && releases_running(c) == ["r1", "r1", "r1"]
    });
    assert!(c.status("web")["rollout"]["failure"]
        .as_str()
        .unwrap()
        .contains("aborted by the operator"));
    assert_eq!(c.status("web")["live_release"], "r1");

    repo.commit(&sp, &Behavior::ok("v3"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("the 20% step applies", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["weight"] == 20
    });
    c.cli_ok(&["promote", "web", "--full"]);
    c.wait_until("r3 everywhere", Duration::from_secs(60), |c| {
        c.status("web")["live_release"] == "r3" && releases_running(c) == ["r3", "r3", "r3"]
    });
    let events = c.cli_ok(&["events", "--app", "web"]);
    for kind in [
        "rollout.paused",
        "rollout.resumed",
        "rollout.promoted",
        "rollout.aborted",
    ] {
        assert!(events.contains(kind), "{kind} missing:\n{events}");
    }
}

#[test]
fn a_deploy_that_supersedes_a_canary_takes_its_users_back_at_once() {
    let _g = serial();
    let sp = canary_spec(r#"{ weight = 50, pause = "10m" }"#, "");
    let (c, repo) = start(&sp);
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("the 50% step applies", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["weight"] == 50
    });
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));
    // v3 supersedes the held canary of v2: v2 leaves routing as the new
    // rollout starts, before v3 is even built into instances.
    repo.commit(&sp, &Behavior::ok("v3"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("r2 is gone", Duration::from_secs(60), |c| {
        let st = c.status("web");
        st["rollout"]["to"] == "r3" && !releases_running(c).contains(&"r2".to_string())
    });
    let st = c.status("web");
    assert!(
        st["traffic"].get("r2").is_none(),
        "no user is sent to the superseded canary: {st:#}"
    );
    c.wait_until("r3's step applies", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["weight"] == 50
    });
    // Requests sent from here on reach only r1 and r3.
    let before = load.stats.lock().unwrap().by_version.get("v2").copied();
    std::thread::sleep(Duration::from_secs(2));
    let after = load.stats.lock().unwrap().by_version.get("v2").copied();
    let stats = load.finish();
    eprintln!(
        "superseded canary: {} requests, {} failed, by version {:?}",
        stats.sent, stats.failed, stats.by_version
    );
    assert_eq!(before, after, "r2 got requests after it left");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(
        stats.by_version.contains_key("v3"),
        "{:?}",
        stats.by_version
    );
    let events = c.cli_ok(&["events", "--app", "web"]);
    assert!(events.contains("superseded by a rollout to r3"), "{events}");
}

/// A partial deployment of 3 instances with `segment` in `[deploy.partial]`.
fn partial_spec(segment: &str) -> String {
    spec("web", 3, "30s")
        .replace("strategy = \"rolling\"", "strategy = \"partial\"")
        .replace(
            "host = \"web.localhost\"",
            "host = \"web.localhost\"\nuser_key = \"header:x-user\"",
        )
        + &format!("\n[deploy.partial]\n{segment}\n")
}

#[test]
fn a_partial_deployment_serves_exactly_the_listed_users_until_promoted() {
    let _g = serial();
    let sp = partial_spec("users = [\"user-3\", \"user-17\", \"user-420\"]");
    let (c, repo) = start(&sp);
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until(
        "the segment is served by r2",
        Duration::from_secs(30),
        |c| {
            let r = &c.status("web")["rollout"];
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("held until"))
        },
    );
    let mut on_new = Vec::new();
    for u in 0..1000 {
        let key = format!("user-{u}");
        let (head, body) = raw_get_with(
            &c.proxy_addr,
            "web.localhost",
            "/",
            &format!("x-user: {key}\r\n"),
        )
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        if body.starts_with("v2 ") {
            on_new.push(key);
        }
    }
    println!("partial: 1000 users, on the new release: {on_new:?}");
    assert_eq!(on_new, ["user-3", "user-17", "user-420"]);
    assert_eq!(
        releases_running(&c),
        ["r1", "r1", "r1", "r2"],
        "one instance serves the segment"
    );
    // It holds there; promote takes it to everyone.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.status("web")["rollout"]["state"], "progressing");
    c.cli_ok(&["promote", "web"]);
    c.wait_until("r2 everywhere", Duration::from_secs(60), |c| {
        c.status("web")["live_release"] == "r2" && releases_running(c) == ["r2", "r2", "r2"]
    });
}

#[test]
fn a_partial_deployment_by_node_label_runs_on_those_nodes_and_serves_the_users_of_those_proxies() {
    let _g = serial();
    let sp = partial_spec("nodes = { region = \"eu\" }");
    let c = Cluster::start_labeled("0", &[&["region=eu"], &["region=us"], &["region=us"]]);
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    // The cluster's proxy has no labels; this one is the EU edge.
    let (_eu, eu_addr) = c.spawn_proxy("proxy-eu", &["region=eu"], &[]);
    c.wait_until("the EU proxy serves", Duration::from_secs(30), |_| {
        raw_get(&eu_addr, "web.localhost", "/").is_ok_and(|(h, _)| h.starts_with("HTTP/1.1 200"))
    });
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until(
        "the EU segment is served by r2",
        Duration::from_secs(30),
        |c| {
            let m = c.status("web")["rollout"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            m.contains("users of proxies with region=eu") && m.contains("held until")
        },
    );
    let st = c.status("web");
    let new_nodes: Vec<&str> = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["release"] == "r2")
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        new_nodes,
        ["node-1"],
        "r2 runs only on the region=eu node: {st:#}"
    );
    // 1,000 users, half entering through each proxy.
    let mut seen: std::collections::BTreeMap<(&str, String), u32> = Default::default();
    for u in 0..1000 {
        let (proxy, addr) = match u % 2 {
            0 => ("eu", eu_addr.as_str()),
            _ => ("other", c.proxy_addr.as_str()),
        };
        let (head, body) =
            raw_get_with(addr, "web.localhost", "/", &format!("x-user: user-{u}\r\n")).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let version = body.split_whitespace().next().unwrap_or("").to_string();
        *seen.entry((proxy, version)).or_default() += 1;
    }
    println!("partial by node label: (proxy, version) → requests: {seen:?}");
    let expected: std::collections::BTreeMap<(&str, String), u32> = [
        (("eu", "v2".to_string()), 500),
        (("other", "v1".to_string()), 500),
    ]
    .into();
    assert_eq!(seen, expected);
    // Rolled back, the EU users are back on r1 and r2 is gone.
    c.cli_ok(&["rollback", "web", "--wait"]);
    c.wait_until("only r1 runs", Duration::from_secs(30), |c| {
        releases_running(c) == ["r1", "r1", "r1"]
    });
    let (_, body) = raw_get_with(&eu_addr, "web.localhost", "/", "x-user: user-0\r\n").unwrap();
    assert!(body.starts_with("v1 "), "{body}");
}
