//! Continuous deployment end to end: commits found by polling and by signed
//! webhooks become runs (checkout → build → test → pack → release → deploy),
//! tests gate releases, older commits never replace newer releases, and a
//! failing `[release]` command moves nothing.

mod common;

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::Duration;

const TESTS: &str = r#"
[test]
command = "if grep -q broken behavior.json; then echo 'test_version ... FAILED: version is broken'; exit 1; fi; echo 'all tests passed'"
"#;

fn with_tests(instances: u32) -> String {
    format!("{}{TESTS}", spec("web", instances, "30s"))
}

fn add(c: &Cluster, repo: &Repo) -> String {
    let out = c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    let secret = out
        .split("secret ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the webhook secret is shown once");
    secret.to_string()
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

fn payload(commit: &str) -> String {
    format!(
        r#"{{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000","after":"{commit}","repository":{{"name":"web"}}}}"#
    )
}

/// POSTs a push payload to the API at `api_addr`; returns the status code.
fn post_hook(
    api_addr: &str,
    commit: &str,
    delivery: &str,
    signature: Option<(&str, String)>,
) -> u16 {
    use std::io::{Read, Write};
    let body = payload(commit);
    let mut s = std::net::TcpStream::connect(api_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sig = signature
        .map(|(h, v)| format!("{h}: {v}\r\n"))
        .unwrap_or_default();
    write!(s, "POST /v1/hooks/web HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: {delivery}\r\n{sig}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn push_hook(c: &Cluster, commit: &str, delivery: &str, signature: Option<(&str, String)>) -> u16 {
    post_hook(&c.api_addr, commit, delivery, signature)
}

fn signed(secret: &str, commit: &str) -> (&'static str, String) {
    let body = format!(
        r#"{{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000","after":"{commit}","repository":{{"name":"web"}}}}"#
    );
    ("X-Hub-Signature-256", sign(secret, body.as_bytes()))
}

fn all_answer(c: &Cluster, version: &str) -> bool {
    (0..6).all(|_| {
        get_version(&c.proxy_url(), "web.localhost")
            .map(|v| v == version)
            .unwrap_or(false)
    })
}

#[test]
fn a_commit_to_the_tracked_branch_goes_live_with_no_command_typed() {
    let _g = serial();
    let c = Cluster::start_polling(3, "300ms");
    let repo = Repo::create(c.dir.path(), &with_tests(3), &Behavior::ok("v1"));
    add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    repo.commit(&with_tests(3), &Behavior::ok("v2"));
    c.wait_until(
        "v2 live everywhere, nothing typed",
        Duration::from_secs(60),
        |c| {
            let st = c.status("web");
            st["live_release"] == "r2"
                && st["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|i| i["release"] == "r2")
                && all_answer(c, "v2")
        },
    );
    // The run ends once it saw its rollout succeed (it polls the rollout).
    c.wait_until("the run succeeded", Duration::from_secs(10), |c| {
        c.runs("web")[0]["state"] == "succeeded"
    });
    let r = c.runs("web");
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_eq!(r[0]["trigger"], "poll");
    assert_eq!(r[0]["state"], "succeeded");
    assert_eq!(r[0]["release"], "r2");
    let steps: Vec<&str> = r[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["checkout", "build", "test", "pack", "deploy"]);
    assert!(r[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "succeeded" && s["duration_ms"].is_u64()));
    let table = c.cli_ok(&["runs", "web"]);
    assert!(
        table.contains("poll") && table.contains("test ok"),
        "{table}"
    );
    let log = c.cli_ok(&["logs", "web", "--run", &r[0]["id"].to_string()]);
    assert!(log.contains("all tests passed"), "{log}");
}

#[test]
fn a_commit_whose_tests_fail_makes_no_release_and_status_shows_the_failing_step() {
    let _g = serial();
    let c = Cluster::start(2);
    let repo = Repo::create(c.dir.path(), &with_tests(2), &Behavior::ok("v1"));
    add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    repo.commit(&with_tests(2), &Behavior::ok("broken"));
    let out = c.cli(&["deploy", "web", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tests failed, no release"), "{stderr}");
    let st = c.status("web");
    assert_eq!(st["live_release"], "r1");
    assert_eq!(st["last_run"]["state"], "failed");
    let failed: Vec<_> = st["last_run"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["name"], "test");
    assert!(failed[0]["log_tail"]
        .as_str()
        .unwrap()
        .contains("test_version ... FAILED"));
    let text = c.cli_ok(&["status", "web"]);
    assert!(
        text.contains("failed at step test") && text.contains("test_version ... FAILED"),
        "{text}"
    );
    assert_eq!(
        c.api_get("/v1/apps/web/releases")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "no release"
    );
    assert!(all_answer(&c, "v1"));
}

#[test]
fn webhooks_need_a_valid_sha256_signature_and_a_delivery_runs_once() {
    let _g = serial();
    let c = Cluster::start(2);
    let repo = Repo::create(c.dir.path(), &spec("web", 2, "30s"), &Behavior::ok("v1"));
    let secret = add(&c, &repo);
    let commit = repo.commit(&spec("web", 2, "30s"), &Behavior::ok("v2"));
    assert_eq!(
        push_hook(&c, &commit, "d-1", None),
        401,
        "missing signature"
    );
    assert_eq!(
        push_hook(&c, &commit, "d-1", Some(signed("wrong secret", &commit))),
        401,
        "wrong signature"
    );
    assert_eq!(
        push_hook(
            &c,
            &commit,
            "d-1",
            Some((
                "X-Hub-Signature",
                "sha1=0123456789abcdef0123456789abcdef01234567".into()
            ))
        ),
        401,
        "SHA-1 only"
    );
    let (h, v) = signed(&secret, &commit);
    assert_eq!(
        push_hook(&c, &commit, "d-1", Some((h, v[..30].to_string()))),
        401,
        "truncated"
    );
    assert!(c.runs("web").is_empty(), "no side effect");

    // The same delivery twice at the same moment: one run.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (api_addr, secret, commit) = (c.api_addr.clone(), secret.clone(), commit.clone());
            std::thread::spawn(move || {
                let fake = FakeCluster { api_addr };
                fake.push(&commit, "d-2", &secret)
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.contains(&202), "{codes:?}");
    c.wait_until(
        "v2 live through the webhook",
        Duration::from_secs(60),
        |c| c.status("web")["live_release"] == "r1" && all_answer(c, "v2"),
    );
    let r = c.runs("web");
    assert_eq!(r.len(), 1, "exactly one run: {r:#?}");
    assert_eq!(r[0]["trigger"], "webhook");
}

/// Just enough of a cluster to send a signed push from another thread.
struct FakeCluster {
    api_addr: String,
}

impl FakeCluster {
    fn push(&self, commit: &str, delivery: &str, secret: &str) -> u16 {
        post_hook(
            &self.api_addr,
            commit,
            delivery,
            Some(signed(secret, commit)),
        )
    }
}

#[test]
fn of_two_commits_100ms_apart_only_the_newer_ends_up_live_and_an_older_push_never_replaces_it() {
    let _g = serial();
    let c = Cluster::start(2);
    let repo = Repo::create(c.dir.path(), &spec("web", 2, "30s"), &Behavior::ok("v1"));
    let secret = add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let older = repo.commit(&spec("web", 2, "30s"), &Behavior::ok("v2"));
    let newer = repo.commit(&spec("web", 2, "30s"), &Behavior::ok("v3"));
    let hook = FakeCluster {
        api_addr: c.api_addr.clone(),
    };
    assert_eq!(hook.push(&older, "o-1", &secret), 202);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(hook.push(&newer, "n-1", &secret), 202);
    c.wait_until("v3 live", Duration::from_secs(60), |c| {
        all_answer(c, "v3") && c.status("web")["rollout"]["state"] == "succeeded"
    });
    c.wait_until("runs settled", Duration::from_secs(30), |c| {
        c.runs("web")
            .iter()
            .all(|r| r["state"] != "queued" && r["state"] != "running")
    });
    // The older push arrives again, late (a new delivery): it must not win.
    assert_eq!(
        hook.push(&older, "o-2", &secret),
        200,
        "same commit already has a run"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(all_answer(&c, "v3"));
    let live = c.status("web")["live_release"]
        .as_str()
        .unwrap()
        .to_string();
    let releases = c.api_get("/v1/apps/web/releases").unwrap();
    let live_commit = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == live.as_str())
        .unwrap()["commit"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(live_commit, newer);
    let r = c.runs("web");
    let older_run = r.iter().find(|r| r["commit"] == older.as_str()).unwrap();
    assert!(
        older_run["state"] == "superseded" || older_run["state"] == "succeeded",
        "{older_run:#}"
    );
    // Whatever the older run did, no release of it came after the newer one's.
    let newest_release = &releases.as_array().unwrap()[0];
    assert_eq!(newest_release["commit"], newer.as_str(), "{releases:#}");
}

#[test]
fn a_failing_release_command_leaves_the_previous_release_serving() {
    let _g = serial();
    let c = Cluster::start(2);
    let migrate = |cmd: &str| {
        format!(
            "{}\n[release]\ncommand = \"{cmd}\"\n",
            spec("web", 2, "30s")
        )
    };
    let repo = Repo::create(
        c.dir.path(),
        &migrate("echo migrated to v1 >> /dev/null"),
        &Behavior::ok("v1"),
    );
    add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    repo.commit(
        &migrate("echo 'migration 0042 failed: column exists' && exit 3"),
        &Behavior::ok("v2"),
    );
    let out = c.cli(&["deploy", "web", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("[release] command of r2 failed")
            && stderr.contains("migration 0042 failed"),
        "{stderr}"
    );
    let st = c.status("web");
    assert_eq!(st["live_release"], "r1");
    assert_eq!(st["rollout"]["to"], "r1", "no rollout to r2 was started");
    assert!(all_answer(&c, "v1"));
    let rels = c.api_get("/v1/apps/web/releases").unwrap();
    assert_eq!(rels[0]["name"], "r2");
    assert_eq!(rels[0]["status"], "failed");
    let out = c.cli(&["rollback", "web", "--to", "r2"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a failed release cannot be deployed"
    );
}

#[test]
fn old_artifacts_are_pruned_but_never_the_live_release_or_the_rollback_target() {
    let _g = serial();
    let c = Cluster::start_with(1, "0", &["--keep-releases", "1"]);
    let repo = Repo::create(c.dir.path(), &spec("web", 1, "30s"), &Behavior::ok("v1"));
    add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    for v in ["v2", "v3", "v4"] {
        repo.commit(&spec("web", 1, "30s"), &Behavior::ok(v));
        c.cli_ok(&["deploy", "web", "--wait"]);
    }
    let status_of = |c: &Cluster, name: &str| {
        c.api_get("/v1/apps/web/releases")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Retention runs right after the rollout ends, which `--wait` may beat.
    c.wait_until("retention ran", Duration::from_secs(10), |c| {
        status_of(c, "r2") == "pruned"
    });
    let status = |name: &str| status_of(&c, name);
    assert_eq!(status("r1"), "pruned");
    assert_eq!(status("r2"), "pruned");
    assert_eq!(status("r3"), "ok", "the rollback target is kept");
    assert_eq!(status("r4"), "ok", "the live release is kept");
    let artifacts = std::fs::read_dir(c.dir.path().join("server/artifacts"))
        .unwrap()
        .count();
    assert_eq!(artifacts, 2, "only r3's and r4's artifacts remain");
    let out = c.cli(&["rollback", "web", "--to", "r1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pruned"));
    c.cli_ok(&["rollback", "web", "--wait"]);
    assert!(all_answer(&c, "v3"));
}

#[test]
fn a_running_build_is_cancelled_with_its_processes_and_nothing_is_released() {
    let _g = serial();
    let c = Cluster::start_polling(1, "300ms");
    let repo = Repo::create(c.dir.path(), &spec("web", 1, "30s"), &Behavior::ok("v1"));
    add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);

    // A build that would take a minute, leaving the pid of its child.
    let pidfile = c.dir.path().join("build-child.pid");
    let slow = spec("web", 1, "30s").replace(
        "command = \"python3 -c 'import json; json.load(open(\\\"behavior.json\\\"))'\"",
        &format!(
            "command = \"sleep 60 & echo $! > {}; wait\"",
            pidfile.display()
        ),
    );
    assert_ne!(
        slow,
        spec("web", 1, "30s"),
        "the build command was replaced"
    );
    repo.commit(&slow, &Behavior::ok("v2"));
    c.wait_until("the slow build runs", Duration::from_secs(30), |_| {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty())
    });
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let run = c.runs("web")[0].clone();
    assert_eq!(run["state"], "running");
    let id = run["id"].to_string();

    let out = c.cli(&["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    let run = c.runs("web")[0].clone();
    assert_eq!(run["state"], "cancelled", "{run:#}");
    let build = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "build")
        .unwrap();
    assert_eq!(build["state"], "cancelled");
    // The build's child process is gone (or a zombie awaiting its reaper).
    c.wait_until(
        "the build's child is killed",
        Duration::from_secs(5),
        |_| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        },
    );
    let releases = c.api_get("/v1/apps/web/releases").unwrap();
    assert_eq!(releases.as_array().unwrap().len(), 1, "no release made");
    assert_eq!(c.status("web")["live_release"], "r1");
    assert!(all_answer(&c, "v1"));

    let again = c.cli(&["cancel", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("is cancelled"));
}

/// POSTs `body` to `path` on the API at `api_addr` with `token`; the status.
fn post_api(api_addr: &str, token: &str, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Scenario 22: a deploy triggered from a webhook, the CLI and the API at
/// the same moment: the builds take turns under the app's deploy lock
/// (never two at once), every trigger is answered, and each run ends. The
/// lock dies with its holder: with a build holding it, the server is
/// SIGKILLed; the restarted server marks that run failed and the next
/// deploy goes ahead at once instead of waiting for the dead one.
#[test]
fn deploys_from_a_webhook_the_cli_and_the_api_at_once_take_turns_and_a_dead_holders_lock_is_gone() {
    let _g = serial();
    let mut c = Cluster::start(1);
    let log = c.dir.path().join("builds.log");
    let slow = c.dir.path().join("slow");
    // Each build writes when it starts and ends; with `slow` there, it
    // hangs for a minute.
    let build = format!(
        "echo start >> {log}; if [ -e {slow} ]; then sleep 60; fi; sleep 0.3; echo end >> {log}; ",
        log = log.display(),
        slow = slow.display()
    );
    let with_build = |s: String| {
        s.replace(
            "command = \"python3 -c",
            &format!("command = \"{build}python3 -c"),
        )
    };
    let repo = Repo::create(
        c.dir.path(),
        &with_build(spec("web", 1, "30s")),
        &Behavior::ok("v1"),
    );
    let secret = add(&c, &repo);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let commit = repo.commit(&with_build(spec("web", 1, "30s")), &Behavior::ok("v2"));
    std::fs::write(&log, "").unwrap();

    // Three triggers at once.
    let (api, admin) = (c.api_addr.clone(), c.admin_token.clone());
    let (cm, sec) = (commit.clone(), secret.clone());
    let hook = std::thread::spawn(move || FakeCluster { api_addr: api }.push(&cm, "d-22", &sec));
    let api = c.api_addr.clone();
    let by_api = std::thread::spawn(move || post_api(&api, &admin, "/v1/apps/web/deploy", "{}"));
    let by_cli = c.cli(&["deploy", "web"]);
    assert!(
        by_cli.status.success(),
        "{}",
        String::from_utf8_lossy(&by_cli.stderr)
    );
    assert_eq!(hook.join().unwrap(), 202);
    let code = by_api.join().unwrap();
    assert!((200..300).contains(&code), "API deploy answered {code}");
    c.wait_until("the three runs ended", Duration::from_secs(90), |c| {
        let runs = c.runs("web");
        runs.len() == 4
            && runs.iter().all(|r| {
                ["succeeded", "failed", "superseded", "cancelled"]
                    .contains(&r["state"].as_str().unwrap_or(""))
            })
    });
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        ["start", "end", "start", "end", "start", "end"],
        "builds overlapped, or not all three built"
    );
    for r in &c.runs("web")[..3] {
        assert!(
            ["succeeded", "superseded"].contains(&r["state"].as_str().unwrap()),
            "{r:#}"
        );
    }
    c.wait_until("v2 live", Duration::from_secs(30), |c| all_answer(c, "v2"));

    // A build holds the lock when the server dies.
    std::fs::write(&slow, "").unwrap();
    repo.commit(&with_build(spec("web", 1, "30s")), &Behavior::ok("v3"));
    std::fs::write(&log, "").unwrap();
    // (A deploy answers once its rollout started: this one never does.)
    let (api, admin) = (c.api_addr.clone(), c.admin_token.clone());
    let held = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| post_api(&api, &admin, "/v1/apps/web/deploy", "{}"));
    });
    c.wait_until(
        "a slow build holding the lock",
        Duration::from_secs(30),
        |_| std::fs::read_to_string(&log).unwrap() == "start\n",
    );
    c.server.kill9();
    held.join().unwrap();
    std::fs::remove_file(&slow).unwrap();
    c.restart_server();
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The new build ran start to end while the dead one's (still asleep
    // for a minute) had not ended: nothing waited for it.
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "start\nstart\nend\n"
    );
    // `--wait` follows the rollout; the run records its deploy step's end
    // just after, when the pipeline sees the rollout finish.
    c.wait_until(
        "the new run recorded as succeeded",
        Duration::from_secs(30),
        |c| c.runs("web")[0]["state"] == "succeeded",
    );
    let runs = c.runs("web");
    let killed = &runs[1];
    assert_eq!(killed["state"], "failed", "{killed:#}");
    assert_eq!(runs[0]["state"], "succeeded", "{:#}", runs[0]);
}
