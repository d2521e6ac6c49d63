//! High availability: two servers on one PostgreSQL database (started by
//! the test from Debian's packages) sharing the data dir; agents and the
//! proxy are given both. The leader is killed in the middle of a rolling
//! rollout under load, then the next leader is paused (a leader that
//! believes it still leads) and resumed.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The CLI against server-b (the follower at first).
fn via_b(c: &Cluster, args: &[&str]) -> String {
    let out = cli_with(&c.apis[1], &c.admin_token, args);
    assert!(
        out.status.success(),
        "drover {args:?} through server-b failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn leader_of(c: &Cluster, i: usize) -> Value {
    c.leader_seen_by(i).unwrap_or_default()
}

/// Waits until server `i` leads and runs its term; returns how long that took.
fn wait_leading(c: &Cluster, i: usize, name: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    c.wait_until(&format!("{name} leads"), timeout, |c| {
        let l = leader_of(c, i);
        l["leading"] == true && l["leader"] == name
    });
    t.elapsed()
}

/// (r2 instances routed, all instances) of web.
fn progress(c: &Cluster, release: &str) -> (usize, usize) {
    let st = c.status("web");
    let inst = st["instances"].as_array().cloned().unwrap_or_default();
    let routed = inst
        .iter()
        .filter(|i| i["release"] == release && i["routed"] == true)
        .count();
    (routed, inst.len())
}

#[test]
fn the_follower_takes_over_a_rollout_when_the_leader_dies_and_a_paused_leader_is_fenced() {
    let _g = serial();
    let mut c = Cluster::start_ha(2);
    let b = c.apis[1].clone();

    // server-b follows and knows who leads.
    let l = leader_of(&c, 1);
    assert_eq!(l["server"], "server-b", "{l}");
    assert_eq!(l["role"], "follower", "{l}");
    assert_eq!(l["leader"], "server-a", "{l}");
    let epoch_a = l["epoch"].as_u64().unwrap();

    // Changes sent to the follower are forwarded to the leader; reads are
    // its own (its long polls follow the database's index).
    let spec4 = spec("web", 4, "60s");
    let repo = Repo::create(c.dir.path(), &spec4, &Behavior::ok("v1"));
    via_b(&c, &["apps", "add", &repo.path.to_string_lossy()]);
    via_b(&c, &["deploy", "web", "--wait"]);
    c.wait_until("v1 through the proxy", Duration::from_secs(15), |c| {
        get_version(&c.proxy_url(), "web.localhost").as_deref() == Ok("v1")
    });

    // A slow rolling rollout (each new instance takes 1 s to start), under
    // load; the leader dies once the first new instance serves.
    repo.commit(
        &spec4,
        &Behavior {
            start_delay_ms: 1000,
            ..Behavior::ok("v2")
        },
    );
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(90));
    via_b(&c, &["deploy", "web"]);
    c.wait_until(
        "the first r2 instance serves",
        Duration::from_secs(30),
        |c| progress(c, "r2").0 >= 1,
    );
    let st = c.status("web");
    let rollout_id = st["rollout"]["id"].clone();
    assert_eq!(st["rollout"]["to"], "r2", "{st:#}");
    assert_ne!(st["rollout"]["state"], "succeeded", "too late: {st:#}");
    let (routed_at_kill, _) = progress(&c, "r2");
    let killed = Instant::now();
    c.server.kill9();

    // server-b takes over and the same rollout goes on.
    let took_over = wait_leading(&c, 1, "server-b", Duration::from_secs(15));
    let l = leader_of(&c, 1);
    let epoch_b = l["epoch"].as_u64().unwrap();
    assert!(epoch_b > epoch_a, "a new leader has a new epoch: {l}");
    let c_b = |path: &str| -> Value {
        let body = http_get_auth(&b, path, Some(&c.admin_token))
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", c.logs()));
        serde_json::from_str(&body).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let moving_again = loop {
        let st = c_b("/v1/apps/web/status");
        let routed = st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["release"] == "r2" && i["routed"] == true)
            .count();
        if routed > routed_at_kill || st["live_release"] == "r2" {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not move after the leader died: {st:#}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = c_b("/v1/apps/web/status");
        if st["rollout"]["state"] == "succeeded" {
            break st;
        }
        assert!(
            Instant::now() < deadline && st["rollout"]["state"] != "failed",
            "the rollout did not complete under server-b: {st:#}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(300));
    let stats = load.finish();
    figures(&format!(
        "leader killed mid-rollout: server-b led {:.2} s later (epoch {epoch_a} -> {epoch_b}), the rollout moved again {:.2} s after the kill; load {} requests, {} failed, by version {:?}",
        took_over.as_secs_f64(),
        moving_again.as_secs_f64(),
        stats.sent,
        stats.failed,
        stats.by_version
    ));
    // The same rollout finished: no second rollout, no duplicated or lost
    // instance.
    assert_eq!(st["rollout"]["id"], rollout_id, "{st:#}");
    assert_eq!(st["live_release"], "r2", "{st:#}");
    let inst = st["instances"].as_array().unwrap();
    let mut ids: Vec<&str> = inst.iter().map(|i| i["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four instances, no more: {st:#}");
    assert!(
        inst.iter()
            .all(|i| i["release"] == "r2" && i["routed"] == true),
        "{st:#}"
    );
    let events = c_b("/v1/events?app=web&limit=200");
    let count = |kind: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["message"].as_str().unwrap_or("").contains("r2"))
            .count()
    };
    assert_eq!(count("rollout.started"), 1, "{events:#}");
    assert_eq!(count("rollout.succeeded"), 1, "{events:#}");
    stats.assert_clean(&["v1", "v2"], &c.logs());

    // server-a comes back as a follower.
    c.server = c.spawn_server(0);
    c.wait_until("server-a follows", Duration::from_secs(15), |c| {
        let l = leader_of(c, 0);
        l["role"] == "follower" && l["leader"] == "server-b"
    });

    // A leader that stops answering (paused: it still believes it leads)
    // loses its lock when its database session times out; server-a takes
    // over with a new epoch, and server-b, resumed, steps down.
    let pid_b = c.standby.as_ref().unwrap().child.id().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid_b])
        .status()
        .unwrap();
    assert!(stop.success());
    let took_over = wait_leading(&c, 0, "server-a", Duration::from_secs(20));
    let epoch_a2 = leader_of(&c, 0)["epoch"].as_u64().unwrap();
    assert!(epoch_a2 > epoch_b);
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid_b])
        .status()
        .unwrap();
    assert!(cont.success());
    c.wait_until(
        "server-b steps down once resumed",
        Duration::from_secs(15),
        |c| {
            let l = leader_of(c, 1);
            l["role"] != "leader" && l["leading"] == false && l["leader"] == "server-a"
        },
    );
    figures(&format!(
        "leader paused: server-a led {:.2} s later (lease 5 s; epoch {epoch_b} -> {epoch_a2})",
        took_over.as_secs_f64()
    ));

    // The cluster goes on under server-a, through either server.
    repo.commit(&spec4, &Behavior::ok("v3"));
    via_b(&c, &["deploy", "web", "--wait"]);
    c.wait_until("v3 through the proxy", Duration::from_secs(15), |c| {
        get_version(&c.proxy_url(), "web.localhost").as_deref() == Ok("v3")
    });
    let st = c.status("web");
    assert_eq!(st["live_release"], "r3", "{st:#}");
    assert_eq!(st["instances"].as_array().unwrap().len(), 4, "{st:#}");
}
