//! The dashboard served by a real server on 127.0.0.1: pages need a token
//! (a browser without one is sent to /login), answer HTML with a strict
//! content security policy, unknown things get an escaped error page, a
//! page's event stream sends its parts and ends when its token is revoked,
//! and an open stream does not hold up the server's graceful shutdown.

use drover_server::{run, ServerConfig};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads the stream until `needle` arrived (deadline 30 s); everything read.
async fn read_until(resp: &mut reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(until, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within 30s; got {seen:?}"))
            .unwrap();
        match chunk {
            Some(c) => seen.push_str(&String::from_utf8_lossy(&c)),
            None => panic!("the stream ended before {needle:?}; got {seen:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_render_streams_send_parts_and_an_open_stream_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(run(
        ServerConfig {
            agent_addr: "127.0.0.1:0".parse().unwrap(),
            agent_cert_ttl: Duration::from_secs(3600),
            poll_interval: Duration::ZERO,
            ..ServerConfig::new(addr.parse().unwrap(), dir.path().join("server"))
        },
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/v1/health")).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < until,
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let admin = std::fs::read_to_string(dir.path().join("server").join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let get = |path: &str, token: &str| {
        http.get(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .send()
    };

    // Without a token: a page sends the browser to sign in; a stream is refused.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let r = http
        .get(format!("{base}/ui/events/nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{base}/ui/dash.js")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the script is public");

    let r = get("/", &admin).await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let body = r.text().await.unwrap();
    assert!(body.contains("No apps yet"), "{body}");
    assert!(
        body.contains("bootstrap-admin (admin)"),
        "who is signed in: {body}"
    );
    assert!(
        body.contains(r#"data-stream="/ui/events/overview""#),
        "{body}"
    );
    for path in ["/ui/dash.js", "/ui/dash.css", "/nodes"] {
        let r = get(path, &admin).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = get("/apps/%3Cb%3Enope", &admin).await.unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("&#60;b&#62;nope") && !body.contains("<b>nope"),
        "{body}"
    );

    // A page's stream, for a viewer: its parts first.
    let created: serde_json::Value = http
        .post(format!("{base}/v1/tokens"))
        .header("authorization", format!("Bearer {admin}"))
        .json(&serde_json::json!({"name": "dash", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (viewer, viewer_id) = (
        created["token"].as_str().unwrap().to_string(),
        created["id"].as_str().unwrap().to_string(),
    );
    let mut revoked = get("/ui/events/nodes", &viewer).await.unwrap();
    let first = read_until(&mut revoked, "\n\n").await;
    assert!(first.starts_with("event: parts\n"), "{first}");
    // Revoked, its stream says so and ends.
    let r = http
        .post(format!("{base}/v1/tokens/{viewer_id}/revoke"))
        .header("authorization", format!("Bearer {admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = read_until(&mut revoked, "was revoked").await;
    assert!(last.contains("event: failure"), "{last}");
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = revoked.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream of a revoked token did not end");

    let mut stream = get("/ui/events/nodes", &admin).await.unwrap();
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let first = read_until(&mut stream, "\n\n").await;
    assert!(
        first.starts_with("event: parts\ndata: {\"nodes\":"),
        "{first}"
    );
    assert!(first.contains("No nodes yet"), "{first}");
    let mut gone = get("/ui/events/apps/nope", &admin).await.unwrap();
    let failure = read_until(&mut gone, "\n\n").await;
    assert!(failure.starts_with("event: failure\n"), "{failure}");

    // Shutdown with the stream still open: the server stops and the
    // stream ends.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("graceful shutdown waited on an open event stream")
        .unwrap()
        .unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream did not end at shutdown");
}
