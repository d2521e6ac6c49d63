//! Tokens and roles end to end: deny by default, a role check before every
//! handler, hashed tokens with expiry and revocation, bootstrap tokens only
//! their owner can read, secrets never in logs.

mod common;

use common::*;
use std::time::Duration;

/// The status code and body of a GET on the API with `token` ("": none).
fn get_as(c: &Cluster, token: &str, path: &str) -> (u16, String) {
    let auth = match token {
        "" => String::new(),
        t => format!("Authorization: Bearer {t}\r\n"),
    };
    let (head, body) = raw_get_with(&c.api_addr, &c.api_addr, path, &auth).unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body)
}

/// A POST to the API with `token` ("": none); (status code, head, body).
fn post_as(
    c: &Cluster,
    token: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let auth = match token {
        "" => String::new(),
        t => format!("Authorization: Bearer {t}\r\n"),
    };
    let mut s = std::net::TcpStream::connect(&c.api_addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

/// A form POST to the API without a token.
fn post_form(c: &Cluster, path: &str, body: &str) -> (u16, String, String) {
    post_as(c, "", path, "application/x-www-form-urlencoded", body)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tokens_and_roles_decide_who_may_do_what() {
    let _g = serial();
    let c = Cluster::start(1);
    let repo = Repo::create(c.dir.path(), &spec("web", 1, "30s"), &Behavior::ok("v1"));

    // The bootstrap tokens: only their owner can read the files.
    for f in ["admin-token", "join-token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.dir.path().join("server").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // No token: refused, and told what to do.
    let out = c.cli_as("", &["apps", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no token") && stderr(&out).contains("DROVER_TOKEN"),
        "{}",
        stderr(&out)
    );
    let (code, _) = get_as(&c, "", "/v1/apps");
    assert_eq!(code, 401);
    let (code, body) = get_as(&c, "drv_000000000000_nonsense", "/v1/apps");
    assert_eq!(code, 401, "{body}");
    // Health and the signed webhooks need none.
    assert_eq!(get_as(&c, "", "/v1/health").0, 200);

    let make = |name: &str, role: &str, extra: &[&str]| -> String {
        let mut args = vec!["tokens", "create", "--name", name, "--role", role];
        args.extend(extra);
        c.cli_ok(&args).trim().to_string()
    };
    let viewer = make("dash", "viewer", &[]);
    let deployer = make("ci", "deployer", &["--expires", "30d"]);

    // An admin registers the app; a deployer may not.
    let path = repo.path.to_string_lossy().to_string();
    let out = c.cli_as(&deployer, &["apps", "add", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("has role deployer; this needs admin"),
        "{}",
        stderr(&out)
    );
    c.cli_ok(&["apps", "add", &path]);

    // A viewer reads but cannot deploy; nothing is built.
    let out = c.cli_as(&viewer, &["status", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.cli_as(&viewer, &["deploy", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("has role viewer; this needs deployer"),
        "{}",
        stderr(&out)
    );
    assert!(c.runs("web").is_empty(), "a refused deploy starts no run");
    // A viewer cannot make tokens either.
    let out = c.cli_as(
        &viewer,
        &["tokens", "create", "--name", "x", "--role", "admin"],
    );
    assert!(
        stderr(&out).contains("this needs admin"),
        "{}",
        stderr(&out)
    );

    // A deployer deploys.
    let out = c.cli_as(&deployer, &["deploy", "web", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The agents' and proxies' endpoints take only node tokens.
    assert_eq!(get_as(&c, &c.admin_token, "/v1/routes").0, 403);
    assert_eq!(
        get_as(&c, &viewer, "/v1/agent/assignments?node=node-1").0,
        403
    );
    assert_eq!(get_as(&c, &c.join_token, "/v1/routes").0, 200);
    // …and the join token nothing else.
    assert_eq!(get_as(&c, &c.join_token, "/v1/apps").0, 403);

    // Listing shows ids, names and roles, never a secret.
    let list = c.cli_ok(&["tokens", "list", "--json"]);
    for t in [&viewer, &deployer, &c.admin_token, &c.join_token] {
        let secret = t.rsplit('_').next().unwrap();
        assert!(!list.contains(secret), "a secret is listed: {list}");
    }
    let tokens: serde_json::Value = serde_json::from_str(&list).unwrap();
    let (creds, others): (Vec<_>, Vec<_>) = tokens
        .as_array()
        .unwrap()
        .iter()
        .partition(|t| t["name"].as_str().unwrap().starts_with("node:"));
    assert_eq!(others.len(), 4, "{list}");
    assert_eq!(
        creds.len() as u32,
        c.nodes,
        "one credential per node: {list}"
    );

    // Revoked: refused from then on.
    let viewer_id = viewer.split('_').nth(1).unwrap();
    c.cli_ok(&["tokens", "revoke", viewer_id]);
    let out = c.cli_as(&viewer, &["status", "web"]);
    assert!(stderr(&out).contains("was revoked"), "{}", stderr(&out));

    // Expired: refused.
    let short = make("short", "viewer", &["--expires", "1s"]);
    c.wait_until("the short token expires", Duration::from_secs(10), |c| {
        stderr(&c.cli_as(&short, &["status", "web"])).contains("has expired")
    });

    // The last admin token cannot be revoked (nobody could manage drover).
    let admin_id = c.admin_token.split('_').nth(1).unwrap().to_string();
    let out = c.cli(&["tokens", "revoke", &admin_id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("last usable admin token"),
        "{}",
        stderr(&out)
    );

    // No secret in any log.
    let logs = c.logs();
    for t in [&viewer, &deployer, &short, &c.admin_token, &c.join_token] {
        let secret = t.rsplit('_').next().unwrap();
        assert!(!logs.contains(secret), "a token secret is in the logs");
    }
    // The dashboard's sign-in: a token becomes an HttpOnly, SameSite=Strict
    // cookie that the API accepts; a join token or a bad one is refused.
    let (code, head, _) = post_form(&c, "/login", &format!("token={deployer}"));
    assert_eq!(code, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let (h, _) = raw_get_with(
        &c.api_addr,
        "x",
        "/v1/apps",
        &format!("Cookie: {}\r\n", cookie.split(';').next().unwrap()),
    )
    .unwrap();
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(
        post_form(&c, "/login", &format!("token={}", c.join_token)).0,
        403
    );
    let (code, _, body) = post_form(&c, "/login", "token=%3Cscript%3E");
    assert_eq!(code, 401);
    assert!(
        !body.contains("<script>"),
        "the refusal page escapes what it shows"
    );

    // Who did what is recorded: token changes, and every call that may
    // change something, allowed or refused, with its outcome.
    let events = c.api_get("/v1/events?limit=1000").unwrap().to_string();
    assert!(events.contains("revoked by bootstrap-admin"), "{events}");
    let deployer_id = deployer.split('_').nth(1).unwrap();
    for line in [
        format!("ci (deployer, token {deployer_id}) POST /v1/apps/web/deploy → 200 OK"),
        format!("ci (deployer, token {deployer_id}) POST /v1/apps → refused: role too low"),
        format!(
            "dash (viewer, token {viewer_id}) POST /v1/apps/web/deploy → refused: role too low"
        ),
    ] {
        assert!(events.contains(&line), "{line} not in {events}");
    }
    let out = c.cli_ok(&["events", "--app", "web"]);
    assert!(out.contains("audit ci (deployer"), "{out}");
}

/// POSTs JSON to the API with `token`; the status code and body.
fn post_json_as(c: &Cluster, token: &str, path: &str, body: &str) -> (u16, String) {
    let (code, _, body) = post_as(c, token, path, "application/json", body);
    (code, body)
}

/// Scenario 24, first part (without certificates yet): each agent gets a
/// credential of its own when it registers with the join token; from then
/// on it reads only its own assignments (which carry its apps' secrets),
/// the join token reads none, and no second agent can take a live node's
/// name.
#[test]
fn an_agent_reads_only_its_own_assignments_with_the_credential_it_registered_with() {
    let _g = serial();
    let c = Cluster::start(2);
    let cred = |i: u32| {
        let p = c.agent_dir(i).join(drover_agent::NODE_CREDENTIAL_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::read_to_string(p).unwrap().trim().to_string()
    };
    let (one, two) = (cred(1), cred(2));
    assert_ne!(one, two);
    let own = get_as(&c, &one, "/v1/agent/assignments?node=node-1&wait_ms=0");
    assert_eq!(own.0, 200, "{}", own.1);
    let (code, body) = get_as(&c, &one, "/v1/agent/assignments?node=node-2&wait_ms=0");
    assert_eq!(code, 403);
    assert!(
        body.contains("belongs to node node-1; it cannot act for node node-2"),
        "{body}"
    );
    let (code, body) = get_as(
        &c,
        &c.join_token,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    );
    assert_eq!(code, 403);
    assert!(body.contains("may only register agents"), "{body}");
    // Reports for another node are refused too.
    let report = r#"{"node":"node-2","instances":[]}"#;
    assert_eq!(post_json_as(&c, &one, "/v1/agent/report", report).0, 403);
    // A second agent claiming node-1 with the join token: refused while
    // node-1's agent is alive.
    let claim = r#"{"node":"node-1","labels":{}}"#;
    let (code, body) = post_json_as(&c, &c.join_token, "/v1/agent/register", claim);
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("a second agent cannot take its name"),
        "{body}"
    );
    // A new node registers with the join token and gets its credential.
    let fresh = r#"{"node":"node-9","labels":{}}"#;
    let (code, body) = post_json_as(&c, &c.join_token, "/v1/agent/register", fresh);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let nine = v["node_token"].as_str().unwrap().to_string();
    assert_eq!(
        get_as(&c, &nine, "/v1/agent/assignments?node=node-9&wait_ms=0").0,
        200
    );
    assert_eq!(
        get_as(&c, &nine, "/v1/agent/assignments?node=node-1&wait_ms=0").0,
        403
    );
    // Credentials are listed (never their secrets) and revocable.
    let list = c.cli_ok(&["tokens", "list"]);
    assert!(
        list.contains("node:node-1") && !list.contains(&one[20..]),
        "{list}"
    );
}
