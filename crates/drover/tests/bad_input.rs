//! Bad input (SCENARIOS 16 and 19): a stored record that no longer parses —
//! as after an upgrade that changed its format — marks only that app as in
//! error, the server, the other apps and their deploys go on; hostile refs
//! and branch names are refused before git runs, and commit messages are
//! data, never run by a shell nor printed raw to a terminal.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn a_stored_record_that_no_longer_parses_marks_only_that_app_as_in_error() {
    let _g = serial();
    let c = Cluster::start(1);
    let web = Repo::create(
        &c.dir.path().join("web"),
        &spec("web", 1, "30s"),
        &Behavior::ok("v1"),
    );
    let api = Repo::create(
        &c.dir.path().join("api"),
        &spec("api", 1, "30s"),
        &Behavior::ok("v1"),
    );
    for r in [&web, &api] {
        c.cli_ok(&["apps", "add", &r.path.to_string_lossy()]);
    }
    c.cli_ok(&["deploy", "web", "--wait"]);
    c.cli_ok(&["deploy", "api", "--wait"]);

    // web's release and registration specs in a format this server cannot read.
    let db = c.dir.path().join("server/drover.db");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3; d = sqlite3.connect({:?}); \
             d.execute(\"UPDATE releases SET spec = '{{\\\"format\\\": 99, \\\"app\\\": ' WHERE app = 'web'\"); \
             d.execute(\"UPDATE apps SET spec = '[]' WHERE name = 'web'\"); d.commit()",
            db.to_string_lossy()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The listing names web's problem and still shows api.
    let list = c.cli_ok(&["apps", "list"]);
    assert!(
        list.contains("ERROR") && list.contains("web is in error"),
        "{list}"
    );
    assert!(list.contains("api.localhost"), "{list}");
    // web's own commands say what is wrong; nothing crashes.
    let out = c.cli(&["status", "web"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("does not parse"), "{err}");
    // The other app deploys, and serves, as before.
    api.commit(&spec("api", 1, "30s"), &Behavior::ok("v2"));
    c.cli_ok(&["deploy", "api", "--wait"]);
    c.wait_until("api v2 answers", Duration::from_secs(10), |c| {
        get_version(&c.proxy_url(), "api.localhost").is_ok_and(|v| v == "v2")
    });
    // web's instance was left alone: it still runs and serves.
    assert_eq!(get_version(&c.proxy_url(), "web.localhost").unwrap(), "v1");
    let st = c.api_get("/v1/nodes").unwrap();
    assert_eq!(st[0]["instances"], 2, "{st:#}");
    // The dashboard shows both, web as in error.
    let page = http_get_auth(&c.api, "/", Some(&c.admin_token)).unwrap();
    assert!(page.contains("app-error") && page.contains("api"), "{page}");
    assert!(http_get(&c.api, "/v1/health").is_ok());
    println!(
        "stored record in a foreign format: web listed as in error ({err:?}); api deployed v2"
    );
}

/// SCENARIOS 19: branch names and refs with `$(…)`, `;`, a leading `-`,
/// newlines or terminal escapes are refused with what is wrong before any
/// git runs, and nothing is ever run by a shell: a commit whose message is
/// `$(touch …)` deploys and runs nothing.
#[test]
fn hostile_refs_are_refused_and_commit_messages_never_reach_a_shell() {
    let _g = serial();
    let c = Cluster::start(1);
    let canary = c.dir.path().join("pwned");
    let touch = format!("touch {}", canary.display());
    let web = Repo::create(
        &c.dir.path().join("web"),
        &spec("web", 1, "30s"),
        &Behavior::ok("v1"),
    );
    let path = web.path.to_string_lossy().to_string();
    let hostile = [
        format!("$({touch})"),
        format!("main;{touch}"),
        "-c core.pager=sh".to_string(),
        format!("main\n{touch}"),
        "\u{1b}[2Jmain".to_string(),
        "main..other".to_string(),
    ];
    for b in &hostile {
        let out = c.cli(&["apps", "add", &path, &format!("--branch={b}")]);
        assert_eq!(out.status.code(), Some(2), "branch {b:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("ref") || err.contains("branch"),
            "branch {b:?}: {err}"
        );
        assert!(
            !err.contains('\u{1b}'),
            "a raw escape reached the terminal: {err:?}"
        );
    }
    assert_eq!(
        c.api_get("/v1/apps").unwrap(),
        serde_json::json!([]),
        "nothing stored"
    );
    c.cli_ok(&["apps", "add", &path]);
    for r in &hostile {
        let out = c.cli(&["deploy", "web", &format!("--ref={r}")]);
        assert_eq!(out.status.code(), Some(2), "ref {r:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !err.contains('\u{1b}'),
            "a raw escape reached the terminal: {err:?}"
        );
    }
    assert!(c.runs("web").is_empty(), "no run was created");
    // A commit message is data: deployed, never evaluated.
    std::fs::write(web.path.join("note.txt"), "x").unwrap();
    git(&web.path, &["add", "-A"]);
    git(
        &web.path,
        &[
            "commit",
            "--quiet",
            "-m",
            &format!("$({touch}); `{touch}`\n\u{1b}[31mred"),
        ],
    );
    c.cli_ok(&["deploy", "web", "--wait"]);
    assert!(!canary.exists(), "a commit message was run by a shell");
    println!(
        "{} hostile branch names and refs refused; a hostile commit message deployed as data",
        hostile.len()
    );
}
