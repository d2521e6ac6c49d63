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

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api::{ProxyReport, Route, RoutesResponse, Upstream, LATENCY_BUCKETS_MS};
use serde_json::Value;
use tokio::sync::watch;

// ------------------------------------------------------- control plane ----

#[derive(Clone)]
struct ControlPlane {
    routes: watch::Sender<RoutesResponse>,
    reports: Arc<Mutex<Vec<ProxyReport>>>,
}

async fn routes_handler(
    State(cp): State<ControlPlane>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<RoutesResponse> {
    let index: u64 = q.get("index").and_then(|v| v.parse().ok()).unwrap_or(0);
    let wait_ms: u64 = q.get("wait_ms").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut rx = cp.routes.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms.min(30_000));
    loop {
        if rx.borrow_and_update().index > index {
            break;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => break,
        }
    }
    let current = rx.borrow().clone();
    Json(current)
}

async fn report_handler(State(cp): State<ControlPlane>, Json(report): Json<ProxyReport>) {
    cp.reports.lock().unwrap().push(report);
}

impl ControlPlane {
    fn set(&self, routes: RoutesResponse) {
        self.routes.send_replace(routes);
    }

    fn latest(&self) -> Option<ProxyReport> {
        self.reports.lock().unwrap().last().cloned()
    }

    /// Waits (bounded) for a report satisfying `pred`.
    async fn wait_report(&self, what: &str, pred: impl Fn(&ProxyReport) -> bool) -> ProxyReport {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(r) = self.latest() {
                if pred(&r) {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a report with {what}; latest: {:?}",
                self.latest()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ------------------------------------------------------------ backends ----

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    addr
}

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

// --------------------------------------------------------------- proxy ----

/// The proxy child process; killed on drop, its log shown if the test failed.
struct ProxyProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("DROVER_E2E_LOG").is_some() {
            let mut s = String::new();
            if let Ok(mut f) = std::fs::File::open(&self.log) {
                let _ = f.read_to_string(&mut s);
            }
            eprintln!("---- proxy log ----\n{s}\n-------------------");
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start_proxy(listen: SocketAddr, server: SocketAddr) -> ProxyProcess {
    let log = std::env::temp_dir().join(format!("drover-proxy-e2e-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_drover-proxy-dev"))
        .args(["--listen", &listen.to_string()])
        .args(["--server", &format!("http://{server}")])
        .args(["--name", &format!("e2e-{}", std::process::id())])
        .args(["--threads", "2", "--grace", "1"])
        .env("RUST_LOG", "info,drover_proxy=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn drover-proxy-dev");
    ProxyProcess { child, log }
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn send(
    client: &reqwest::Client,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> Reply {
    let url = format!("http://{proxy}{path}");
    let req = match method {
        "POST" => client.post(&url).body("payload"),
        _ => client.get(&url),
    };
    let resp = req
        .header("host", host)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

// ---------------------------------------------------------------- test ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_end_to_end() {
    let a = serve(backend("a")).await;
    let b = serve(backend("b")).await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let (routes, _) = watch::channel(table(
        1,
        vec![upstream("a-1", "r1", a), upstream("b-1", "r1", b)],
    ));
    let cp = ControlPlane {
        routes,
        reports: Arc::new(Mutex::new(Vec::new())),
    };
    let cp_addr = serve(
        Router::new()
            .route("/v1/routes", get(routes_handler))
            .route("/v1/proxy/report", post(report_handler))
            .with_state(cp.clone()),
    )
    .await;

    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _proxy = start_proxy(listen, cp_addr);
    let client = reqwest::Client::builder().build().unwrap();

    // The proxy reports table 1, then accepts connections.
    cp.wait_report("applied_index 1", |r| r.applied_index == 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "proxy never listened on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. Round robin over both backends, with drover's headers.
    let mut seen = HashMap::new();
    for _ in 0..10 {
        let r = send(&client, listen, "GET", "Hello.Localhost:80", "/").await;
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
    let r = send(&client, listen, "GET", "unknown.localhost", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "drover: no route for host unknown.localhost\n");
    let r = send(&client, listen, "GET", "empty.localhost", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "drover: no healthy instance of empty\n");

    // 3. Removing b from the table takes effect.
    cp.set(table(2, vec![upstream("a-1", "r1", a)]));
    cp.wait_report("applied_index 2", |r| r.applied_index == 2)
        .await;
    for _ in 0..6 {
        let r = send(&client, listen, "GET", "hello.localhost", "/").await;
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
        let r = send(&client, listen, method, "hello.localhost", "/").await;
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
    assert_eq!(report.proxy, format!("e2e-{}", std::process::id()));

    // The report is plain JSON on the wire as well.
    let v: Value = serde_json::to_value(&report).unwrap();
    assert!(v["stats"].is_array());
}
