//! Shared harness of the proxy's end-to-end tests: a stand-in control plane
//! (serving `/v1/routes` as a blocking query and collecting
//! `/v1/proxy/report`), helpers to run axum backends on 127.0.0.1, the
//! `drover-proxy-dev` binary as a child process, and a small HTTP client.
//!
//! Each test binary uses a different part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api::{ProxyReport, RoutesResponse};
use tokio::sync::watch;

// ------------------------------------------------------- control plane ----

#[derive(Clone)]
pub struct ControlPlane {
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
    /// Starts serving `routes` on 127.0.0.1; returns the plane and its address.
    pub async fn start(routes: RoutesResponse) -> (ControlPlane, SocketAddr) {
        let (routes, _) = watch::channel(routes);
        let cp = ControlPlane {
            routes,
            reports: Arc::new(Mutex::new(Vec::new())),
        };
        let addr = serve(
            Router::new()
                .route("/v1/routes", get(routes_handler))
                .route("/v1/proxy/report", post(report_handler))
                .with_state(cp.clone()),
        )
        .await;
        (cp, addr)
    }

    pub fn set(&self, routes: RoutesResponse) {
        self.routes.send_replace(routes);
    }

    pub fn latest(&self) -> Option<ProxyReport> {
        self.reports.lock().unwrap().last().cloned()
    }

    /// Waits (bounded) for a report satisfying `pred`.
    pub async fn wait_report(
        &self,
        what: &str,
        pred: impl Fn(&ProxyReport) -> bool,
    ) -> ProxyReport {
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

    /// Publishes `routes` and waits until the proxy reports it applied them.
    pub async fn apply(&self, routes: RoutesResponse) {
        let index = routes.index;
        self.set(routes);
        self.wait_report(&format!("applied_index {index}"), |r| {
            r.applied_index == index
        })
        .await;
    }
}

// ------------------------------------------------------------ backends ----

/// Serves `router` on a fresh 127.0.0.1 port.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    addr
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// --------------------------------------------------------------- proxy ----

/// The proxy child process; killed on drop, its log shown if the test failed.
pub struct ProxyProcess {
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

impl ProxyProcess {
    /// Sends SIGTERM (graceful stop).
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits (bounded) for the process to exit; its status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The proxy id `start_proxy` gives a proxy started under `name`: unique per
/// test process, so that concurrent tests never share pingora's files.
pub fn proxy_name(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// Starts `drover-proxy-dev` with `engine` (`pingora` or `h1`) on
/// `listen`, fed by the control plane at `server`.
pub fn start_proxy(
    engine: &str,
    listen: SocketAddr,
    server: SocketAddr,
    name: &str,
) -> ProxyProcess {
    start_proxy_with(engine, listen, server, name, &[])
}

/// [`start_proxy`] with extra command-line arguments.
pub fn start_proxy_with(
    engine: &str,
    listen: SocketAddr,
    server: SocketAddr,
    name: &str,
    extra: &[&str],
) -> ProxyProcess {
    let name = proxy_name(name);
    let log = std::env::temp_dir().join(format!("drover-proxy-{name}.log"));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_drover-proxy-dev"))
        .args(["--listen", &listen.to_string()])
        .args(["--server", &format!("http://{server}")])
        .args(["--name", &name])
        .args(["--threads", "2", "--grace", "1"])
        .args(["--engine", engine])
        .args(extra)
        .env("RUST_LOG", "info,drover_proxy=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn drover-proxy-dev");
    ProxyProcess { child, log }
}

/// Waits (bounded) until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A control plane serving `routes` and a proxy that has applied them and
/// listens, ready for requests.
pub struct Harness {
    pub cp: ControlPlane,
    pub listen: SocketAddr,
    pub client: reqwest::Client,
    pub proxy: ProxyProcess,
}

impl Harness {
    /// `name` is suffixed with the engine (see [`proxy_name`]).
    pub async fn start(engine: &str, name: &str, routes: RoutesResponse) -> Harness {
        Self::start_with(engine, name, routes, &[]).await
    }

    /// [`Harness::start`] with extra proxy arguments.
    pub async fn start_with(
        engine: &str,
        name: &str,
        routes: RoutesResponse,
        extra: &[&str],
    ) -> Harness {
        let index = routes.index;
        let (cp, cp_addr) = ControlPlane::start(routes).await;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let proxy = start_proxy_with(engine, listen, cp_addr, &format!("{name}-{engine}"), extra);
        cp.wait_report(&format!("applied_index {index}"), |r| {
            r.applied_index == index
        })
        .await;
        wait_listening(listen).await;
        Harness {
            cp,
            listen,
            client: reqwest::Client::builder().build().unwrap(),
            proxy,
        }
    }

    /// `GET /` for `host` through the proxy, with extra request headers.
    pub async fn get(&self, host: &str, headers: &[(&str, &str)]) -> Reply {
        send_with(&self.client, self.listen, "GET", host, "/", headers).await
    }
}

/// Makes `$test(engine)` one test per engine: `$test::pingora` and
/// `$test::h1`.
#[macro_export]
macro_rules! for_each_engine {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pingora() {
                super::$test("pingora").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn h1() {
                super::$test("h1").await
            }
        }
    )*};
}

// -------------------------------------------------------------- client ----

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    /// A response header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn send(
    client: &reqwest::Client,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> Reply {
    send_with(client, proxy, method, host, path, &[]).await
}

pub async fn send_with(
    client: &reqwest::Client,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let url = format!("http://{proxy}{path}");
    let mut req = match method {
        "POST" => client.post(&url).body("payload"),
        _ => client.get(&url),
    };
    req = req.header("host", host);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req
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
