//! Blue/green end to end, load through the proxy: the preview reaches only
//! the new set before the switch, the switch moves every user at once, and a
//! rollback inside the bake window is a flip back to the warm old set — both
//! without losing a request.

mod common;

use common::*;
use std::time::Duration;

fn bg_spec() -> String {
    let s = spec("web", 2, "30s").replace("strategy = \"rolling\"", "strategy = \"blue_green\"");
    format!("{s}auto_promote = false\nbake = \"10m\"\n")
}

fn answer(c: &Cluster, host: &str, headers: &str) -> String {
    let (head, body) = raw_get_with(&c.proxy_addr, host, "/", headers).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head} {body}");
    body.split_whitespace().next().unwrap().to_string()
}

/// (release, pid) of every instance, sorted.
fn instances(c: &Cluster) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = c.status("web")["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["release"].as_str().unwrap().to_string(),
                i["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn blue_green_previews_switches_and_flips_back_inside_the_bake_losing_nothing() {
    let _g = serial();
    let c = Cluster::start(2);
    let repo = Repo::create(c.dir.path(), &bg_spec(), &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));

    repo.commit(&bg_spec(), &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until("the new set is ready", Duration::from_secs(30), |c| {
        let r = &c.status("web")["rollout"];
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("waiting for `drover promote web`"))
    });
    let st = c.status("web");
    assert_eq!(st["rollout"]["preview"], "preview.web.localhost");
    let old = instances(&c);
    assert_eq!(old.iter().filter(|(r, _)| r == "r1").count(), 2);
    assert_eq!(old.iter().filter(|(r, _)| r == "r2").count(), 2);
    for _ in 0..10 {
        assert_eq!(answer(&c, "preview.web.localhost", ""), "v2");
        assert_eq!(answer(&c, "web.localhost", "x-drover-preview: 1\r\n"), "v2");
        assert_eq!(answer(&c, "web.localhost", ""), "v1", "users stay on v1");
    }

    // The switch: every user at once.
    c.cli_ok(&["promote", "web"]);
    c.wait_until("all users on v2", Duration::from_secs(10), |c| {
        (0..10).all(|_| answer(c, "web.localhost", "") == "v2")
    });
    let st = c.status("web");
    assert_eq!(st["rollout"]["state"], "progressing", "baking");
    assert!(
        st["rollout"]["message"]
            .as_str()
            .unwrap()
            .contains("stays warm"),
        "{st:#}"
    );
    assert_eq!(instances(&c), old, "the switch starts and stops nothing");
    std::thread::sleep(Duration::from_secs(1));

    // A rollback inside the bake: a flip back to the warm set.
    c.cli_ok(&["rollback", "web"]);
    c.wait_until("all users back on v1", Duration::from_secs(10), |c| {
        (0..10).all(|_| answer(c, "web.localhost", "") == "v1")
    });
    c.wait_until("the new set is gone", Duration::from_secs(30), |c| {
        c.status("web")["rollout"]["state"] == "rolled_back"
            && instances(c).iter().all(|(r, _)| r == "r1")
    });
    let r1_before: Vec<_> = old.iter().filter(|(r, _)| r == "r1").cloned().collect();
    assert_eq!(
        instances(&c),
        r1_before,
        "the very same r1 processes serve again"
    );
    let stats = load.finish();
    println!(
        "blue/green: {} requests through switch and flip back, {} failed, by version {:?}",
        stats.sent, stats.failed, stats.by_version
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(stats.by_version.get("v2").copied().unwrap_or(0) > 0);
}

#[test]
fn a_failing_pre_promotion_check_stops_the_switch_and_a_passing_one_switches_by_itself() {
    let _g = serial();
    let sp = spec("web", 2, "30s").replace("strategy = \"rolling\"", "strategy = \"blue_green\"")
        + "bake = \"1s\"\npreview_check = \"/ready\"\n";
    let c = Cluster::start(2);
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(120));

    repo.commit(
        &sp,
        &Behavior {
            ready_status: 503,
            ..Behavior::ok("v2")
        },
    );
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the check must stop it");
    let st = c.status("web");
    let failure = st["rollout"]["failure"].as_str().unwrap();
    assert!(
        failure.contains("the preview check of r2 failed") && failure.contains("answered 503"),
        "{failure}"
    );
    assert_eq!(st["live_release"], "r1");

    repo.commit(&sp, &Behavior::ok("v3"));
    c.cli_ok(&["deploy", "web", "--wait"]);
    c.wait_until("v3 for everyone", Duration::from_secs(10), |c| {
        (0..10).all(|_| answer(c, "web.localhost", "") == "v3")
    });
    let stats = load.finish();
    println!(
        "blue/green with a preview check: {} requests, {} failed, by version {:?}",
        stats.sent, stats.failed, stats.by_version
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(!stats.by_version.contains_key("v2"), "no user ever saw v2");
    assert!(instances(&c).iter().all(|(r, _)| r == "r3"));
}
