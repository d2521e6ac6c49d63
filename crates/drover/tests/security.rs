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
    assert_eq!(post_json_as(&c, &viewer, "/v1/agent/register", "{}").0, 403);
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
    // Agents hold certificates, not tokens.
    assert_eq!(tokens.as_array().unwrap().len(), 4, "{list}");

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

/// An HTTPS request to `addr` for the name `host`, trusting only
/// `ca_pem`, as the holder of `identity` (certificate and key, PEM; "" for
/// none): a POST of JSON `post`, else a GET. The status and body, or why
/// the connection failed.
fn https(
    addr: &str,
    host: &str,
    identity: &str,
    ca_pem: &str,
    post: Option<&str>,
    path: &str,
) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
            .resolve(host, addr.parse().unwrap());
        if !identity.is_empty() {
            b = b.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
        }
        let http = b.build().unwrap();
        let port = addr.rsplit(':').next().unwrap();
        let url = format!("https://{host}:{port}{path}");
        let req = match post {
            Some(body) => http
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            None => http.get(url),
        };
        let resp = req.send().await.map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s += &format!(": {x}");
                src = x.source();
            }
            s
        })?;
        let code = resp.status().as_u16();
        Ok((code, resp.text().await.unwrap_or_default()))
    })
}

/// A call to the cluster's agent port as the holder of `identity`.
fn agent_call(
    c: &Cluster,
    identity: &str,
    ca_pem: &str,
    post: Option<&str>,
    path: &str,
) -> Result<(u16, String), String> {
    https(&c.agent_addr, "server.drover", identity, ca_pem, post, path)
}

/// An HTTPS GET with no client certificate.
fn https_get(addr: &str, host: &str, ca_pem: &str, path: &str) -> Result<(u16, String), String> {
    https(addr, host, "", ca_pem, None, path)
}

/// Node `i`'s saved identity: (certificate + key PEM, CA PEM, serial as
/// its file says it; the file must be mode 0600).
fn identity(c: &Cluster, i: u32) -> (String, String, u64) {
    use std::os::unix::fs::PermissionsExt;
    let p = c.agent_dir(i).join(drover_agent::IDENTITY_FILE);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    (
        s("cert_pem") + &s("key_pem"),
        s("ca_pem"),
        v["not_after_ms"].as_u64().unwrap(),
    )
}

/// A certificate for `node` signed by `issuer` (a CA key and certificate),
/// valid from `from` to `to` seconds from now; its PEM with its key.
fn cert_for(node: &str, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, from: i64, to: i64) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, node);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    let at = |s: i64| {
        let t = if s >= 0 {
            now + Duration::from_secs(s as u64)
        } else {
            now - Duration::from_secs((-s) as u64)
        };
        rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
    };
    p.not_before = at(from);
    p.not_after = at(to);
    p.signed_by(&key, issuer).unwrap().pem() + &key.serialize_pem()
}

/// A key (PEM) and a CSR for it (PEM as a JSON string), for a node
/// registering by hand.
fn csr(node: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, node);
    let csr = serde_json::to_string(&p.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
    (key.serialize_pem(), csr)
}

/// Scenario 24: agents get certificates from the server's own CA when they
/// register with the join token, and every later call is mutual TLS on the
/// agent port. A certificate from another CA, an expired one, one the
/// server never issued, a revoked one, or one for another node is refused;
/// an agent reads only its own assignments (which carry its apps' secrets);
/// a live node's name cannot be taken; certificates are renewed before
/// they expire, with the nodes serving throughout.
#[test]
fn agents_talk_mutual_tls_with_certificates_from_the_cluster_ca_and_act_only_for_their_node() {
    let _g = serial();
    // Short-lived certificates: renewed every 13 s.
    let mut c = Cluster::start_with(2, "0", &["--agent-cert-ttl", "20s"]);
    let (one, ca, one_expiry) = identity(&c, 1);
    let (two, _, _) = identity(&c, 2);
    assert_ne!(one, two);
    assert_eq!(
        ca,
        std::fs::read_to_string(c.dir.path().join("server/ca/ca.pem")).unwrap()
    );

    // Its own assignments, and nothing of another node's.
    let own = agent_call(
        &c,
        &one,
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    );
    assert_eq!(own.as_ref().map(|r| r.0), Ok(200), "{own:?}");
    let (code, body) = agent_call(
        &c,
        &one,
        &ca,
        None,
        "/v1/agent/assignments?node=node-2&wait_ms=0",
    )
    .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("this certificate is node node-1's; it cannot act for node node-2"),
        "{body}"
    );
    let report = r#"{"node":"node-2","instances":[]}"#;
    assert_eq!(
        agent_call(&c, &one, &ca, Some(report), "/v1/agent/report").map(|r| r.0),
        Ok(403)
    );
    // The agent port takes no one without a certificate, the API port has
    // no agent calls but registration, and the join token only registers.
    let none = agent_call(
        &c,
        "",
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    );
    assert!(none.is_err(), "{none:?}");
    assert_eq!(
        get_as(
            &c,
            &c.join_token,
            "/v1/agent/assignments?node=node-1&wait_ms=0"
        )
        .0,
        404
    );

    // Another CA's certificate for node-1: refused in the handshake.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::default();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    other
        .distinguished_name
        .push(rcgen::DnType::CommonName, "drover cluster CA");
    let other = rcgen::Issuer::new(other, other_key);
    let forged = cert_for("node-1", &other, -60, 3600);
    let err = agent_call(
        &c,
        &forged,
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    )
    .unwrap_err();
    assert!(!err.is_empty());
    // The real CA (read from the server's data dir), but expired: refused.
    let ca_key = std::fs::read_to_string(c.dir.path().join("server/ca/ca.key")).unwrap();
    let real =
        rcgen::Issuer::from_ca_cert_pem(&ca, rcgen::KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let expired = cert_for("node-1", &real, -7200, -3600);
    let refused = agent_call(
        &c,
        &expired,
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    );
    assert!(refused.is_err(), "{refused:?}");
    // The real CA and valid, but not issued by the server (a stolen CA key
    // alone cannot mint identities): 401.
    let minted = cert_for("node-1", &real, -60, 3600);
    let (code, body) = agent_call(
        &c,
        &minted,
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    )
    .unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("is not one this server issued"), "{body}");
    let log = std::fs::read_to_string(c.dir.path().join("logs/server.log")).unwrap();
    assert!(log.contains("refused an agent connection"), "{log}");

    // Registering with the join token needs a CSR; the answer's CA is
    // vouched for by the join token.
    let (code, body) = post_json_as(
        &c,
        &c.join_token,
        "/v1/agent/register",
        r#"{"node":"node-9","labels":{}}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("needs a certificate signing request"),
        "{body}"
    );
    let (nine_key, nine_csr) = csr("node-9");
    let fresh = format!(r#"{{"node":"node-9","labels":{{}},"csr":{nine_csr}}}"#);
    let (code, body) = post_json_as(&c, &c.join_token, "/v1/agent/register", &fresh);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ca"].as_str(), Some(ca.as_str()));
    assert_eq!(
        v["ca_mac"].as_str(),
        Some(drover_api::ca_mac(&c.join_token, &ca).as_str())
    );
    let nine = v["cert"].as_str().unwrap().to_string() + &nine_key;
    let path9 = "/v1/agent/assignments?node=node-9&wait_ms=0";
    assert_eq!(
        agent_call(&c, &nine, &ca, None, path9).map(|r| r.0),
        Ok(200)
    );
    // A second agent claiming live node-1 with the join token: refused.
    let claim = format!(
        r#"{{"node":"node-1","labels":{{}},"csr":{}}}"#,
        csr("node-1").1
    );
    let (code, body) = post_json_as(&c, &c.join_token, "/v1/agent/register", &claim);
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("a second agent cannot take its name"),
        "{body}"
    );

    // node-9 never reports: once its lease is out its name may be taken
    // again with the join token (a machine replaced), and its first
    // certificate is revoked.
    c.wait_until("node-9's lease out", Duration::from_secs(30), |c| {
        let nodes = c.api_get("/v1/nodes").unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "node-9" && n["ready"] == false)
    });
    let (code, body) = post_json_as(&c, &c.join_token, "/v1/agent/register", &fresh);
    assert_eq!(code, 200, "{body}");
    let (code, body) = agent_call(&c, &nine, &ca, None, path9).unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("was revoked"), "{body}");

    // Renewal: node-1's certificate is replaced before it expires, twice;
    // the first one is refused after that; both nodes stay ready.
    let mut seen = vec![one.clone()];
    c.wait_until(
        "node-1's certificate renewed twice",
        Duration::from_secs(45),
        |c| {
            let (now, _, _) = identity(c, 1);
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            seen.len() >= 3
        },
    );
    let (_, _, expiry) = identity(&c, 1);
    assert!(expiry > one_expiry);
    let old = agent_call(
        &c,
        &one,
        &ca,
        None,
        "/v1/agent/assignments?node=node-1&wait_ms=0",
    );
    assert!(
        old.as_ref().map_or(true, |(code, _)| *code == 401),
        "the first certificate still works: {old:?}"
    );

    let ready = c.api_get("/v1/nodes").unwrap();
    let ready = ready.as_array().unwrap();
    for n in ["node-1", "node-2"] {
        assert!(
            ready.iter().any(|v| v["name"] == n && v["ready"] == true),
            "{n} not ready after renewals: {ready:?}\n{}",
            c.logs()
        );
    }
    // An agent whose saved certificate the server refuses (here: from
    // another CA) registers again with the join token by itself.
    c.agents[1].kill9();
    let file = c.agent_dir(2).join(drover_agent::IDENTITY_FILE);
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let (forged_cert, forged_key) = forged.split_at(forged.find("-----BEGIN PRIVATE KEY").unwrap());
    saved["cert_pem"] = forged_cert.into();
    saved["key_pem"] = forged_key.into();
    std::fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();
    c.agents[1] = c.spawn_agent(2);
    c.wait_until(
        "node-2 back with a certificate of the cluster CA",
        Duration::from_secs(30),
        |c| {
            // Dropped while it registers again: not there for a moment.
            let Some(v) = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            else {
                return false;
            };
            let nodes = c.api_get("/v1/nodes").unwrap();
            v["ca_pem"] == ca.as_str()
                && v["cert_pem"] != forged_cert
                && nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["name"] == "node-2" && n["ready"] == true)
        },
    );
}

/// Scenario 26: strings of a spec are never evaluated by the server — not
/// as a shell, not as a template: an instance sees its environment values
/// byte for byte, and nothing they name runs. A health check goes only to
/// a path of the instance itself and a notification only over http(s):
/// a spec that points either elsewhere is refused at submit with
/// file:line and field, and nothing is stored. A viewer can change neither
/// (no app, deploy or secret calls).
#[test]
fn spec_strings_are_never_evaluated_and_checks_cannot_be_pointed_elsewhere() {
    let _g = serial();
    let c = Cluster::start(1);
    let pwned = c.dir.path().join("pwned");
    let p = pwned.display();
    let hostile = [
        ("SUBST", format!("$(touch {p}-subst)")),
        ("BACKTICK", format!("`touch {p}-backtick`")),
        ("VAR", "${HOME}$PATH".to_string()),
        (
            "TEMPLATE",
            "{{ secrets.KEY }}{% if 1 %}x{% endif %}".to_string(),
        ),
        ("SEMI", format!("a; touch {p}-semi")),
    ];
    let env: String = hostile
        .iter()
        .map(|(k, v)| format!("{k} = {}\n", serde_json::to_string(v).unwrap()))
        .collect();
    let good = spec("web", 1, "30s").replace("[health]", &format!("[run.env]\n{env}\n[health]"));
    // Pointed elsewhere: refused at submit, nothing stored.
    let elsewhere = good.replace(
        "path = \"/healthz\"",
        "path = \"http://169.254.169.254/latest/meta-data\"",
    );
    let repo = Repo::create(c.dir.path(), &elsewhere, &Behavior::ok("v1"));
    let out = c.cli(&["apps", "add", &repo.path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("health.path") && err.contains("absolute URL path"),
        "{err}"
    );
    let hook = format!("{good}\n[[notify]]\nurl = \"file:///etc/passwd\"\nsecret = \"KEY\"\n");
    repo.commit(&hook, &Behavior::ok("v1"));
    let out = c.cli(&["apps", "add", &repo.path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("notify") && err.contains("http"), "{err}");
    assert_eq!(c.api_get("/v1/apps").unwrap(), serde_json::json!([]));

    // The hostile values run as they are.
    repo.commit(&good, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    for (k, v) in &hostile {
        let (_, body) = raw_get(&c.proxy_addr, "web.localhost", &format!("/env/{k}")).unwrap();
        assert_eq!(body.trim(), v.as_str(), "{k} was changed on its way");
    }
    for suffix in ["subst", "backtick", "semi"] {
        assert!(
            !c.dir.path().join(format!("pwned-{suffix}")).exists(),
            "a spec string ran: {suffix}"
        );
    }

    // A viewer can point nothing anywhere.
    let viewer = c
        .cli_ok(&["tokens", "create", "--name", "look", "--role", "viewer"])
        .trim()
        .to_string();
    for args in [
        vec!["apps", "add", &*repo.path.to_string_lossy()],
        vec!["deploy", "web"],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let out = c.cli_as(&viewer, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("has role viewer"), "{}", stderr(&out));
    }
    let (code, body) = post_json_as(
        &c,
        &viewer,
        "/v1/apps/web/secrets",
        r#"{"name":"KEY","value":"x"}"#,
    );
    assert_eq!(code, 403, "{body}");
}

/// TLS listeners: given an operator's certificate, the API (`drover server
/// --tls-cert/--tls-key`) and the proxy (`drover proxy --tls-cert/
/// --tls-key`) serve HTTPS only. The CLI, agents and proxies trust a private
/// CA through DROVER_CA_CERT, and a deploy goes through end to end; a CLI
/// that does not trust it is refused with what to do.
#[test]
fn the_api_and_the_proxy_serve_https_with_a_given_certificate() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("logs")).unwrap();
    // A private CA and a certificate for 127.0.0.1 and the app's host.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ops CA");
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["web.localhost".to_string(), "localhost".to_string()])
            .unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (ca_file, cert_file, key_file) = (d.join("ca.pem"), d.join("tls.pem"), d.join("tls.key"));
    std::fs::write(&ca_file, &ca_pem).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let (cert_s, key_s, ca_s) = (
        cert_file.to_string_lossy().into_owned(),
        key_file.to_string_lossy().into_owned(),
        ca_file.to_string_lossy().into_owned(),
    );

    let api_addr = format!("127.0.0.1:{}", free_port());
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let proxy_addr = format!("127.0.0.1:{}", free_port());
    let api = format!("https://{api_addr}");
    let data = d.join("server").to_string_lossy().into_owned();
    let _server = spawn_role_env(
        d,
        "server",
        &[
            "server",
            "--addr",
            &api_addr,
            "--agent-addr",
            &agent_addr,
            "--data-dir",
            &data,
            "--poll-interval",
            "0",
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
        ],
        &[],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while https_get(&api_addr, "127.0.0.1", &ca_pem, "/v1/health").map(|r| r.0) != Ok(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "no HTTPS health answer: {}",
            tail_logs(vec![d.join("logs/server.log")])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Plain HTTP on the API port gets no HTTP answer.
    assert!(http_get(&format!("http://{api_addr}"), "/v1/health").is_err());
    let read = |f: &str| {
        std::fs::read_to_string(d.join("server").join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let (admin, join) = (read("admin-token"), read("join-token"));
    let env = [
        ("DROVER_JOIN_TOKEN", join.as_str()),
        ("DROVER_CA_CERT", ca_s.as_str()),
    ];
    let agent_dir = d.join("agent-1").to_string_lossy().into_owned();
    let _agent = spawn_role_env(
        d,
        "agent-1",
        &[
            "agent",
            "--server",
            &api,
            "--name",
            "node-1",
            "--data-dir",
            &agent_dir,
            "--ports",
            "29900-29999",
        ],
        &env,
    );
    let _proxy = spawn_role_env(
        d,
        "proxy",
        &[
            "proxy",
            "--server",
            &api,
            "--listen",
            &proxy_addr,
            "--name",
            "proxy-1",
            "--grace",
            "1",
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
        ],
        &env,
    );
    let cli = |ca: bool, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(args)
            .env("DROVER_SERVER", &api)
            .env("DROVER_TOKEN", &admin)
            .env("DROVER_TOKEN_FILE", "/nonexistent")
            .env_remove("DROVER_CA_CERT")
            .stdin(std::process::Stdio::null());
        if ca {
            cmd.env("DROVER_CA_CERT", &ca_s);
        }
        cmd.output().unwrap()
    };
    let logs = || {
        tail_logs(
            ["server", "agent-1", "proxy"]
                .iter()
                .map(|r| d.join(format!("logs/{r}.log")))
                .collect(),
        )
    };
    let repo = Repo::create(d, &spec("web", 1, "30s"), &Behavior::ok("v1"));
    let out = cli(true, &["apps", "add", &repo.path.to_string_lossy()]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), logs());
    let out = cli(true, &["deploy", "web", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), logs());

    // Users reach the app over HTTPS through the proxy.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match https_get(&proxy_addr, "web.localhost", &ca_pem, "/") {
            Ok((200, body)) if body.starts_with("v1") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no HTTPS answer from the proxy: {other:?}\n{}",
                logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without the CA the CLI is refused, and told what to do.
    let out = cli(false, &["status", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("set DROVER_CA_CERT"),
        "{}",
        stderr(&out)
    );
    drover_agent::stop_recorded_apps(&d.join("agent-1"), Duration::ZERO);
}
