//! Service discovery end to end: the HTTP watch API and DNS (asked with
//! Debian's `dig`) follow the instances as a canary comes and goes.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// `dig @127.0.0.1 -p PORT +short NAME TYPE`, one line per record, sorted.
fn dig(dns_port: u16, name: &str, qtype: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns_port.to_string(),
            "+short",
            "+tries=1",
            "+time=2",
            name,
            qtype,
        ])
        .output()
        .expect("dig (Debian's bind9-dnsutils; .ci/run installs it)");
    assert!(
        out.status.success(),
        "dig {name} {qtype}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The `dig` status of a query (NOERROR, NXDOMAIN, …).
fn dig_status(dns_port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns_port.to_string(),
            "+tries=1",
            name,
            "A",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string()
}

/// The ports of a set in a discovery answer, sorted.
fn ports(d: &Value, set: &str) -> Vec<String> {
    let mut v: Vec<String> = d[set]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["address"]
                .as_str()
                .unwrap()
                .rsplit_once(':')
                .unwrap()
                .1
                .to_string()
        })
        .collect();
    v.sort();
    v
}

/// The ports in SRV answers (`1 1 PORT target.`), sorted.
fn srv_ports(lines: &[String]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn the_watch_api_and_dns_follow_a_canary_as_it_comes_and_goes() {
    let _g = serial();
    let dns_port = free_port();
    let dns_addr = format!("127.0.0.1:{dns_port}");
    let c = Cluster::start_with(2, "0", &["--dns-addr", &dns_addr]);
    let sp = spec("web", 2, "30s").replace("strategy = \"rolling\"", "strategy = \"canary\"")
        + "steps = [{ weight = 50, pause = \"10m\" }]\n";
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);

    let d = c.api_get("/v1/discovery/web").unwrap();
    assert_eq!(d["live_release"], "r1");
    assert_eq!(d["stable"].as_array().unwrap().len(), 2, "{d:#}");
    assert!(d["canary"].as_array().unwrap().is_empty());
    let stable_r1 = ports(&d, "stable");
    assert_eq!(dig(dns_port, "web.service.drover", "A"), ["127.0.0.1"]);
    assert_eq!(
        srv_ports(&dig(dns_port, "web.service.drover", "SRV")),
        stable_r1
    );
    assert!(dig(dns_port, "canary.web.service.drover", "SRV").is_empty());
    assert_eq!(dig_status(dns_port, "shop.service.drover"), "NXDOMAIN");
    // An SRV target resolves to its instance's address.
    let target = dig(dns_port, "web.service.drover", "SRV")[0]
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    assert_eq!(dig(dns_port, &target, "A"), ["127.0.0.1"]);

    // A blocking query waits for a change: the canary's start.
    let index = d["index"].as_u64().unwrap();
    let (api, token) = (c.api.clone(), c.admin_token.clone());
    let watcher = std::thread::spawn(move || {
        let started = Instant::now();
        let mut index = index;
        // Changes come one index at a time; follow them until a canary shows.
        loop {
            let body = http_get_auth(
                &api,
                &format!("/v1/discovery/web?index={index}&wait_ms=20000"),
                Some(&token),
            )
            .unwrap();
            let d: Value = serde_json::from_str(&body).unwrap();
            let next = d["index"].as_u64().unwrap();
            assert!(next > index || started.elapsed() >= Duration::from_secs(19));
            index = next;
            if !d["canary"].as_array().unwrap().is_empty() {
                return (started.elapsed(), d);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no canary seen"
            );
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !watcher.is_finished(),
        "the query blocks while nothing changes"
    );
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    let (waited, seen) = watcher.join().unwrap();
    println!("discovery: the blocking query answered the canary after {waited:?}");
    assert_eq!(seen["canary"][0]["release"], "r2", "{seen:#}");
    c.wait_until("the canary step serves", Duration::from_secs(30), |c| {
        let d = c.api_get("/v1/discovery/web").unwrap();
        !d["canary"].as_array().unwrap().is_empty() && ports(&d, "stable") == stable_r1
    });
    let d = c.api_get("/v1/discovery/web").unwrap();
    let canary = ports(&d, "canary");
    assert_eq!(
        srv_ports(&dig(dns_port, "canary.web.service.drover", "SRV")),
        canary
    );
    assert_eq!(
        srv_ports(&dig(dns_port, "stable.web.service.drover", "SRV")),
        stable_r1
    );

    // Promoted to the end: the new instances are the stable set, no canary.
    c.cli_ok(&["promote", "web", "--full"]);
    c.wait_until("r2 is live everywhere", Duration::from_secs(60), |c| {
        let d = c.api_get("/v1/discovery/web").unwrap();
        d["live_release"] == "r2"
            && d["canary"].as_array().unwrap().is_empty()
            && d["stable"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["release"] == "r2")
            && d["stable"].as_array().unwrap().len() == 2
    });
    let d = c.api_get("/v1/discovery/web").unwrap();
    c.wait_until("DNS follows", Duration::from_secs(5), |_| {
        srv_ports(&dig(dns_port, "web.service.drover", "SRV")) == ports(&d, "stable")
            && dig(dns_port, "canary.web.service.drover", "SRV").is_empty()
    });

    // Bad input: an unknown environment or app is said at once, not after
    // the wait.
    let auth = format!("Authorization: Bearer {}\r\n", c.admin_token);
    let addr = c.api.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let (head, body) = raw_get_with(
        &addr,
        &addr,
        "/v1/discovery/web?env=staging&index=1000000",
        &auth,
    )
    .unwrap();
    assert!(
        head.starts_with("HTTP/1.1 400")
            && body.contains("has no environment")
            && body.contains("staging"),
        "{head}\n{body}"
    );
    let (head, _) = raw_get_with(&addr, &addr, "/v1/discovery/shop?index=1000000", &auth).unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
