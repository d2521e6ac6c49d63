//! Secrets end to end (SCENARIOS 14 and 25): set through the CLI from stdin,
//! sealed at rest under a key kept apart from the database, delivered only
//! to the instances of their app, part of each release (a rollback restores
//! them), and never in status, events, logs, the database or a process
//! listing.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const ONE: &str = "hunter2-first-Zq81";
const TWO: &str = "hunter2-second-Xv44";

/// `drover secrets set APP NAME` with `value` on stdin, as `token`.
fn set_secret(
    c: &Cluster,
    token: &str,
    app: &str,
    name: &str,
    value: &str,
) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["secrets", "set", app, name])
        .env("DROVER_SERVER", &c.api)
        .env("DROVER_TOKEN", token)
        .env("DROVER_TOKEN_FILE", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{value}").unwrap();
    child.wait_with_output().unwrap()
}

/// What an instance of `app` sees in its environment variable `name`.
fn seen(c: &Cluster, app: &str, name: &str) -> String {
    let (_, body) = raw_get(
        &c.proxy_addr,
        &format!("{app}.localhost"),
        &format!("/env/{name}"),
    )
    .unwrap();
    body.trim().to_string()
}

fn wait_seen(c: &Cluster, app: &str, name: &str, want: &str) {
    c.wait_until(
        &format!("{app} sees {name} = {want}"),
        Duration::from_secs(20),
        |c| (0..6).all(|_| seen(c, app, name) == want),
    );
}

#[test]
fn secrets_reach_only_their_app_are_restored_by_rollback_and_never_leak() {
    let _g = serial();
    let c = Cluster::start(2);
    let web = Repo::create(
        &c.dir.path().join("web"),
        &spec("web", 2, "30s"),
        &Behavior::ok("v1"),
    );
    let api = Repo::create(
        &c.dir.path().join("api"),
        &spec("api", 1, "30s"),
        &Behavior::ok("v1"),
    );
    c.cli_ok(&["apps", "add", &web.path.to_string_lossy()]);
    c.cli_ok(&["apps", "add", &api.path.to_string_lossy()]);

    // A viewer cannot set one; bad names are refused with what to do.
    let viewer = c.cli_ok(&["tokens", "create", "--name", "v", "--role", "viewer"]);
    let out = set_secret(&c, viewer.trim(), "web", "DB_PASSWORD", ONE);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has role viewer; this needs deployer"),
        "{out:?}"
    );
    let out = set_secret(&c, &c.admin_token, "web", "db-password", ONE);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a secret name"));
    let out = set_secret(&c, &c.admin_token, "web", "PORT", ONE);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set by drover itself"));

    let out = set_secret(&c, &c.admin_token, "web", "DB_PASSWORD", ONE);
    assert!(out.status.success(), "{out:?}");
    c.cli_ok(&["deploy", "web", "--wait"]);
    c.cli_ok(&["deploy", "api", "--wait"]);
    wait_seen(&c, "web", "DB_PASSWORD", ONE);
    // Another app's instances do not get it.
    assert_eq!(seen(&c, "api", "DB_PASSWORD"), "<unset>");

    // A new value goes out with the next release; a rollback restores the
    // release's own value.
    let out = set_secret(&c, &c.admin_token, "web", "DB_PASSWORD", TWO);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(seen(&c, "web", "DB_PASSWORD"), ONE, "r1 keeps its secrets");
    web.commit(&spec("web", 2, "30s"), &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "web", "--wait"]);
    wait_seen(&c, "web", "DB_PASSWORD", TWO);
    c.cli_ok(&["rollback", "web", "--wait"]);
    wait_seen(&c, "web", "DB_PASSWORD", ONE);
    assert_eq!(c.status("web")["live_release"], "r1");

    // Listed by name only; unset leaves releases alone.
    let list = c.cli_ok(&["secrets", "list", "web"]);
    assert!(
        list.contains("DB_PASSWORD") && !list.contains("hunter2"),
        "{list}"
    );

    // Nowhere else: status, events, releases, every role's log, the
    // database files, the process list.
    let mut places = vec![
        ("status", c.cli_ok(&["status", "web", "--json"])),
        ("events", c.api_get("/v1/events").unwrap().to_string()),
        (
            "releases",
            c.api_get("/v1/apps/web/releases").unwrap().to_string(),
        ),
        ("logs", c.logs()),
    ];
    for entry in walk(c.dir.path()) {
        let name = entry.to_string_lossy().to_string();
        let is_db = name.contains("drover.db");
        let is_log = name.ends_with(".log");
        if is_db || is_log {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            places.push((
                if is_db { "database" } else { "a log file" },
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    places.push((
        "process list",
        String::from_utf8_lossy(&ps.stdout).into_owned(),
    ));
    for (place, text) in &places {
        assert!(
            !text.contains("hunter2"),
            "a secret value appears in {place}"
        );
    }
    let key = c.dir.path().join("server/secrets.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    println!(
        "secrets: checked {} places, none holds a value; web sees its own, api none; rollback restored r1's",
        places.len()
    );

    let out = c.cli_ok(&["secrets", "unset", "web", "DB_PASSWORD"]);
    assert!(out.contains("removed"), "{out}");
    let out = c.cli(&["secrets", "unset", "web", "DB_PASSWORD"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no secret DB_PASSWORD"));
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
