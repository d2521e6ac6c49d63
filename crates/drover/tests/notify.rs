//! Rollout notifications, `drover watch` and the control plane's rollout
//! metrics, end to end: `[[notify]]` webhooks receive a signed body on
//! start, step, success, rollback; a failed attempt is retried with the same
//! delivery id; an event filter holds; a missing signing secret is named;
//! `drover watch` shows the canary step and split and exits with the
//! outcome; `/metrics` carries the rollout state, step and run durations.

mod common;

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "notify-key-Hq71";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    /// What it answered.
    status: u16,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A webhook receiver on 127.0.0.1: answers 503 to its first request, 204
/// to the others, and keeps them all.
fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            let path = first.split(' ').nth(1).unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.trim_end().split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len.min(1 << 20)];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let mut all = g.lock().unwrap();
            let status = if all.is_empty() { 503 } else { 204 };
            all.push(Got {
                path,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                status,
            });
            drop(all);
            let mut s = s;
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (addr, got)
}

fn signed_by(key: &str, body: &str) -> String {
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    m.update(body.as_bytes());
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

fn set_secret(c: &Cluster, name: &str, value: &str) {
    let mut child = Command::new(BIN)
        .args(["secrets", "set", "web", name])
        .env("DROVER_SERVER", &c.api)
        .env("DROVER_TOKEN", &c.admin_token)
        .env("DROVER_TOKEN_FILE", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{value}").unwrap();
    assert!(child.wait().unwrap().success());
}

/// The events (deduplicated by delivery id, in event time order) the
/// receiver got at `path` for rollouts to `release`.
fn events_for(got: &[Got], path: &str, release: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut ev: Vec<(u64, String)> = got
        .iter()
        .filter(|g| g.path == path && g.status == 204)
        .map(|g| g.json())
        .filter(|b| b["rollout"]["to"] == release)
        .filter(|b| seen.insert(b["id"].as_str().unwrap().to_string()))
        .map(|b| {
            (
                b["at"].as_u64().unwrap(),
                b["event"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("rollout.")
                    .to_string(),
            )
        })
        .collect();
    ev.sort();
    ev.into_iter().map(|(_, e)| e).collect()
}

#[test]
fn webhooks_are_signed_retried_and_filtered_and_watch_follows_a_canary() {
    let _g = serial();
    let (hook, got) = receiver();
    let c = Cluster::start(2);
    let sp = spec("web", 2, "6s").replace("strategy = \"rolling\"", "strategy = \"canary\"")
        + &format!(
            "steps = [{{ weight = 50, pause = \"3s\" }}]\n\n\
             [[notify]]\nurl = \"http://{hook}/hook\"\nsecret = \"NOTIFY_KEY\"\n\n\
             [[notify]]\nurl = \"http://{hook}/rollbacks?token=t0k3n\"\nsecret = \"NOTIFY_KEY\"\nevents = [\"rolled_back\"]\n\n\
             [[notify]]\nurl = \"http://{hook}/unset\"\nsecret = \"OTHER_KEY\"\nevents = [\"started\"]\n"
        );
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    set_secret(&c, "NOTIFY_KEY", KEY);
    c.cli_ok(&["deploy", "web", "--wait"]);

    // r2: a canary with one 50% step, watched.
    repo.commit(&sp, &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web"]);
    c.wait_until(
        "the rollout to r2 is under way",
        Duration::from_secs(60),
        |c| {
            let st = c.status("web");
            st["rollout"]["to"] == "r2" && st["rollout"]["state"] == "progressing"
        },
    );
    let watch = Command::new(BIN)
        .args(["watch", "web"])
        .env("DROVER_SERVER", &c.api)
        .env("DROVER_TOKEN", &c.admin_token)
        .env("DROVER_TOKEN_FILE", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = watch.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    eprintln!("drover watch web:\n{shown}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("step 1/1") && shown.contains("traffic r2 50% r1 50%"),
        "watch shows the step and the split: {shown}"
    );
    assert!(
        shown
            .lines()
            .last()
            .unwrap()
            .contains("r1 → r2 canary succeeded"),
        "{shown}"
    );

    // r3: never healthy, rolled back.
    repo.commit(
        &sp,
        &Behavior {
            health_status: 503,
            ..Behavior::ok("v3")
        },
    );
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let arrived = |got: &[Got]| {
        events_for(got, "/hook", "r3").ends_with(&["rolled_back".to_string()])
            && !events_for(got, "/rollbacks?token=t0k3n", "r3").is_empty()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !arrived(&got.lock().unwrap()) {
        let summary: Vec<String> = got
            .lock()
            .unwrap()
            .iter()
            .map(|g| {
                format!(
                    "{} {} {} {} {}",
                    g.path,
                    g.status,
                    g.json()["event"],
                    g.json()["rollout"]["to"],
                    g.json()["at"]
                )
            })
            .collect();
        assert!(
            std::time::Instant::now() < deadline,
            "the rolled_back webhooks did not arrive; got:\n{}",
            summary.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = got.lock().unwrap().clone();

    // Every request is signed with the secret's value, names its event and
    // delivery id, and carries the rollout.
    for g in &got {
        assert_eq!(
            g.header("x-drover-signature-256"),
            Some(signed_by(KEY, &g.body).as_str()),
            "{g:?}"
        );
        let b = g.json();
        assert_eq!(g.header("x-drover-event"), b["event"].as_str(), "{g:?}");
        assert_eq!(g.header("x-drover-delivery"), b["id"].as_str(), "{g:?}");
        assert_eq!(g.header("content-type"), Some("application/json"));
        assert_eq!(b["app"], "web");
        assert_eq!(b["rollout"]["strategy"], "canary");
    }
    // The first attempt was answered 503: the same delivery came again.
    assert_eq!(got[0].status, 503);
    let again = got[1..]
        .iter()
        .filter(|g| g.header("x-drover-delivery") == got[0].header("x-drover-delivery"))
        .count();
    assert_eq!(again, 1, "retried once with the same id: {got:#?}");

    assert_eq!(
        events_for(&got, "/hook", "r2"),
        ["started", "step", "succeeded"]
    );
    let step = got
        .iter()
        .map(Got::json)
        .find(|b| b["event"] == "rollout.step")
        .unwrap();
    assert_eq!(
        (
            &step["rollout"]["weight"],
            &step["rollout"]["step"],
            &step["rollout"]["steps"]
        ),
        (&Value::from(50), &Value::from(0), &Value::from(1))
    );
    // An automatic rollback is the same rollout (to r3) moving back.
    assert_eq!(
        events_for(&got, "/hook", "r3"),
        ["started", "rolling_back", "rolled_back"]
    );
    // The filtered hook got only rolled_back; the hook whose secret is not
    // set got nothing.
    let filtered: Vec<Value> = got
        .iter()
        .filter(|g| g.path.starts_with("/rollbacks"))
        .map(Got::json)
        .collect();
    assert_eq!(filtered.len(), 1, "{filtered:#?}");
    assert_eq!(filtered[0]["event"], "rollout.rolled_back");
    assert!(got.iter().all(|g| g.path != "/unset"));

    // `drover notifications` names the missing secret and what to do, and
    // never shows a URL's path or query.
    let listed = c.cli_ok(&["notifications", "web"]);
    assert!(
        listed.contains(
            "secret OTHER_KEY is not set for web; set it with `drover secrets set web OTHER_KEY`"
        ),
        "{listed}"
    );
    assert!(
        !listed.contains("t0k3n") && !listed.contains("/rollbacks"),
        "{listed}"
    );
    assert!(listed.contains("delivered after 2 attempt(s)"), "{listed}");
    assert!(!c.logs().contains("t0k3n"), "webhook URLs stay out of logs");

    // The control plane's metrics: rollout state, steps, durations, runs.
    let m = http_get_auth(&c.api, "/metrics", Some(&c.admin_token)).unwrap();
    for want in [
        "drover_rollout_state{app=\"web\",env=\"\",release=\"r3\",state=\"rolled_back\"} 1",
        "drover_rollout_state{app=\"web\",env=\"\",release=\"r3\",state=\"progressing\"} 0",
        "drover_rollout_duration_seconds_count{app=\"web\",env=\"\",strategy=\"canary\",outcome=\"succeeded\"} 2",
        "drover_rollout_duration_seconds_count{app=\"web\",env=\"\",strategy=\"canary\",outcome=\"rolled_back\"} 1",
        "drover_pipeline_run_duration_seconds_count{app=\"web\",outcome=\"succeeded\"} 2",
        "drover_notify_deliveries_total{app=\"web\",outcome=\"retrying\"}",
        "drover_instances{app=\"web\",env=\"\",release=\"r2\",state=\"healthy\"} 2",
        "drover_nodes{state=\"ready\"} 2",
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let steps: u64 = m
        .lines()
        .find(|l| {
            l.starts_with(
                "drover_rollout_step_duration_seconds_count{app=\"web\",env=\"\",strategy=\"canary\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(steps >= 2, "steps of r2 were observed: {m}");
}
