//! Bad input (SCENARIOS 16, 18 and 19): a stored record that no longer
//! parses — as after an upgrade that changed its format — marks only that
//! app as in error, the server, the other apps and their deploys go on;
//! huge, slow and malformed request bodies and slow headers are refused or
//! cut off without tying the server up; hostile refs and branch names are
//! refused before git runs, and commit messages are data, never run by a
//! shell nor printed raw to a terminal.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `head` (and then `body` pieces, `pause` apart) on a new connection
/// to `addr`; returns what the server answered (its status, 0 if it closed
/// the connection without one) and how long it took to answer or close.
fn raw(addr: &str, head: &str, body: &[&[u8]], pause: Duration) -> (u16, String, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let began = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    for piece in body {
        std::thread::sleep(pause);
        // The server may have answered and closed already.
        if s.write_all(piece).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let took = began.elapsed();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text, took)
}

fn post_head(c: &Cluster, path: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nConnection: close\r\n{extra}\r\n",
        c.api_addr, c.admin_token
    )
}

#[test]
fn huge_slow_and_malformed_requests_are_cut_off_and_nothing_is_stored() {
    let _g = serial();
    let c = Cluster::start_with(1, "0", &["--header-timeout", "2s", "--body-timeout", "2s"]);
    let repo = Repo::create(c.dir.path(), &spec("web", 1, "30s"), &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    let apps_before = c.api_get("/v1/apps").unwrap();

    // A body declared larger than the 1 MiB cap: 413 from the headers alone,
    // before any of it is sent.
    let (status, text, took) = raw(
        &c.api_addr,
        &post_head(&c, "/v1/apps", "Content-Length: 50000000\r\n"),
        &[],
        Duration::ZERO,
    );
    eprintln!("declared 50 MB: {status} after {took:?}");
    assert_eq!(status, 413, "{text}");

    // The same without a length (chunked): cut at the cap, 413.
    let chunk = format!("100000\r\n{}\r\n", "a".repeat(0x100000));
    let (status, text, _) = raw(
        &c.api_addr,
        &post_head(&c, "/v1/apps", "Transfer-Encoding: chunked\r\n"),
        &[chunk.as_bytes(), chunk.as_bytes(), b"0\r\n\r\n"],
        Duration::ZERO,
    );
    assert_eq!(status, 413, "{text}");

    // Malformed chunked encoding: refused, nothing stored.
    let (status, text, _) = raw(
        &c.api_addr,
        &post_head(&c, "/v1/apps", "Transfer-Encoding: chunked\r\n"),
        &[b"zz\r\n{}\r\n0\r\n\r\n"],
        Duration::ZERO,
    );
    assert!(status == 400 || status == 0, "{text}");

    // A body that stops coming: the request fails once the body timeout
    // passes, instead of holding the connection.
    let (status, text, took) = raw(
        &c.api_addr,
        &post_head(&c, "/v1/apps/web/deploy", "Content-Length: 100\r\n"),
        &[b"{\"ref\":", b""],
        Duration::from_millis(10),
    );
    eprintln!("stalled body: {status} after {took:?}");
    assert!((400..500).contains(&status), "{text}");
    assert!(
        took < Duration::from_secs(25),
        "cut off by the 2 s body timeout, not the client's: {took:?}"
    );

    // Slow headers (slowloris): the connection is closed.
    let (status, text, took) = raw(
        &c.api_addr,
        "POST /v1/apps HTTP/1.1\r\nHost: x\r\n",
        &[b"X-Slow: 1\r\n"],
        Duration::from_millis(500),
    );
    eprintln!("slow headers: {status} after {took:?}");
    assert!(status == 0 || status == 408, "{text}");
    assert!(
        took < Duration::from_secs(25),
        "cut off by the 2 s header timeout: {took:?}"
    );

    // A webhook delivery over its 256 KiB cap: 413 before the signature is
    // even checked; no run.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    let (status, text, _) = raw(
        &c.api_addr,
        &format!(
            "POST /v1/hooks/web HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            big.len()
        ),
        &[big.as_bytes()],
        Duration::ZERO,
    );
    assert_eq!(status, 413, "{text}");

    // Nothing was stored, no run was made, and the server goes on serving.
    assert_eq!(c.api_get("/v1/apps").unwrap(), apps_before);
    assert!(c.runs("web").is_empty(), "{:?}", c.runs("web"));
    c.cli_ok(&["deploy", "web", "--wait"]);
}

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
