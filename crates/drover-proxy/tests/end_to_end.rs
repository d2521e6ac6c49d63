//! End-to-end test of the proxy as a real process: a stand-in control plane
//! (serving `/v1/routes` as a blocking query and collecting
//! `/v1/proxy/report`), two real backends and a dead address, all on
//! 127.0.0.1, and the `drover-proxy-dev` binary in between.
//!
//! Checks: round robin across backends, response headers, x-forwarded-for,
//! 404 for unknown hosts, 503 for a route without instances, table updates
//! taking effect, connect failures retried onto a live instance with zero
//! failed requests, drain tracking (`oldest_live_index` held back by an
//! in-flight request), and per-release stats in the reports.

mod common;

for_each_engine!(proxy_end_to_end);

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use common::{free_port, proxy_name, send, serve, Harness};
use drover_api::{Route, RoutesResponse, Upstream, LATENCY_BUCKETS_MS};
use serde_json::Value;

// ------------------------------------------------------------ backends ----

fn backend(name: &'static str) -> Router {
    Router::new()
        .route(
            "/",
            get(move |headers: HeaderMap| async move {
                let xff = headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                ([("x-seen-forwarded-for", xff)], name)
            })
            .post(move || async move { name }),
        )
        .route(
            "/slow",
            get(move || async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                name
            }),
        )
}

fn upstream(instance: &str, release: &str, addr: SocketAddr) -> Upstream {
    Upstream {
        instance: instance.into(),
        release: release.into(),
        address: addr.to_string(),
        weight: 1,
    }
}

fn table(index: u64, hello: Vec<Upstream>) -> RoutesResponse {
    RoutesResponse {
        index,
        routes: vec![
            Route {
                app: "hello".into(),
                env: String::new(),
                host: "hello.localhost".into(),
                upstreams: hello,
                split: None,
            },
            Route {
                app: "empty".into(),
                env: String::new(),
                host: "Empty.Localhost".into(),
                upstreams: vec![],
                split: None,
            },
        ],
    }
}

// ---------------------------------------------------------------- test ----

async fn proxy_end_to_end(engine: &str) {
    let a = serve(backend("a")).await;
    let b = serve(backend("b")).await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let harness = Harness::start(
        engine,
        "e2e",
        table(1, vec![upstream("a-1", "r1", a), upstream("b-1", "r1", b)]),
    )
    .await;
    // The proxy reported table 1 and accepts connections.
    let (cp, listen, client) = (&harness.cp, harness.listen, &harness.client);

    // 1. Round robin over both backends, with drover's headers.
    let mut seen = HashMap::new();
    for _ in 0..10 {
        let r = send(client, listen, "GET", "Hello.Localhost:80", "/").await;
        assert_eq!(r.status, 200, "body: {}", r.body);
        assert_eq!(r.headers["x-drover-release"], "r1");
        let instance = r.headers["x-drover-instance"].to_str().unwrap().to_string();
        assert_eq!(instance, format!("{}-1", r.body));
        assert!(
            r.headers["x-seen-forwarded-for"]
                .to_str()
                .unwrap()
                .contains("127.0.0.1"),
            "x-forwarded-for not set"
        );
        *seen.entry(r.body).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "round robin: {seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "round robin: {seen:?}");

    // 2. Unknown host → 404; known host without instances → 503.
    let r = send(client, listen, "GET", "unknown.localhost", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "drover: no route for host unknown.localhost\n");
    let r = send(client, listen, "GET", "empty.localhost", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "drover: no healthy instance of empty\n");

    // 3. Removing b from the table takes effect.
    cp.set(table(2, vec![upstream("a-1", "r1", a)]));
    cp.wait_report("applied_index 2", |r| r.applied_index == 2)
        .await;
    for _ in 0..6 {
        let r = send(client, listen, "GET", "hello.localhost", "/").await;
        assert_eq!((r.status, r.body.as_str()), (200, "a"));
    }

    // 4. A dead instance in the table: connect failures are retried on the
    //    live one, for GET and POST alike — zero failed requests.
    cp.set(table(
        3,
        vec![upstream("dead-1", "r2", dead), upstream("a-1", "r1", a)],
    ));
    cp.wait_report("applied_index 3", |r| r.applied_index == 3)
        .await;
    for i in 0..20 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = send(client, listen, method, "hello.localhost", "/").await;
        assert_eq!((r.status, r.body.as_str()), (200, "a"), "{method} #{i}");
        assert_eq!(r.headers["x-drover-instance"], "a-1");
    }

    // 5. Drain tracking: a request admitted under table 3 keeps
    //    oldest_live_index at 3 after table 4 is applied, until it ends.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, listen, "GET", "hello.localhost", "/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cp.set(table(
        4,
        vec![upstream("a-1", "r1", a), upstream("b-1", "r1", b)],
    ));
    let r = cp
        .wait_report("applied_index 4", |r| r.applied_index == 4)
        .await;
    assert_eq!(
        r.oldest_live_index, 3,
        "in-flight request must hold table 3"
    );
    let slow = slow.await.unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (200, "a"));
    cp.wait_report("oldest_live_index 4", |r| r.oldest_live_index == 4)
        .await;

    // 6. Stats: every proxied request counted under its release, no errors,
    //    histogram consistent. 10 + 6 + 20 + 1 proxied requests in all, all
    //    answered by r1 instances; r2 (the dead instance) served nothing.
    let report = cp
        .wait_report("stats for 37 requests", |r| {
            r.stats
                .iter()
                .any(|s| s.app == "hello" && s.release == "r1" && s.requests == 37)
        })
        .await;
    let r1 = report
        .stats
        .iter()
        .find(|s| s.app == "hello" && s.release == "r1")
        .unwrap();
    assert_eq!(r1.errors, 0);
    assert_eq!(r1.latency_buckets.len(), LATENCY_BUCKETS_MS.len() + 1);
    assert_eq!(r1.latency_buckets.iter().sum::<u64>(), 37);
    // The slow request landed in the (1000, 2000] ms bucket.
    let slow_bucket = LATENCY_BUCKETS_MS
        .iter()
        .position(|&b| b == 2000.0)
        .unwrap();
    assert!(
        r1.latency_buckets[slow_bucket] >= 1,
        "{:?}",
        r1.latency_buckets
    );
    if let Some(r2) = report.stats.iter().find(|s| s.release == "r2") {
        assert_eq!(r2.requests, 0);
    }
    assert_eq!(report.proxy, proxy_name(&format!("e2e-{engine}")));

    // The report is plain JSON on the wire as well.
    let v: Value = serde_json::to_value(&report).unwrap();
    assert!(v["stats"].is_array());
}
