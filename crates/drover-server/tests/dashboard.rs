//! The dashboard served by a real server on 127.0.0.1: pages answer HTML
//! with a strict content security policy, unknown things get an escaped
//! error page, a page's event stream sends its parts, and an open stream
//! does not hold up the server's graceful shutdown.

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
            addr: addr.parse().unwrap(),
            data_dir: dir.path().join("server"),
            poll_interval: Duration::ZERO,
            keep_releases: 10,
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

    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let body = r.text().await.unwrap();
    assert!(body.contains("No apps yet"), "{body}");
    assert!(
        body.contains(r#"data-stream="/ui/events/overview""#),
        "{body}"
    );
    for path in ["/ui/dash.js", "/ui/dash.css", "/nodes"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = http
        .get(format!("{base}/apps/%3Cb%3Enope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("&#60;b&#62;nope") && !body.contains("<b>nope"),
        "{body}"
    );

    // A page's stream: its parts first.
    let mut stream = http
        .get(format!("{base}/ui/events/nodes"))
        .send()
        .await
        .unwrap();
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
    let mut gone = http
        .get(format!("{base}/ui/events/apps/nope"))
        .send()
        .await
        .unwrap();
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
