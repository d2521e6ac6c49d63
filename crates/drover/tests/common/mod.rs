//! Test harness: a drover cluster of real processes on 127.0.0.1 (server,
//! agents, proxy — the `drover` binary under test), app repos made with git,
//! a CLI runner and a load generator through the proxy.
//!
//! Every wait is bounded; every process is killed on drop (apps too, through
//! the agents' state files).
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

pub mod docker;

/// Prints a test's figures where a CI log shows them: straight to stderr,
/// which the test harness does not capture (unlike `println!`).
pub fn figures(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Cluster tests share two cores: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port free on 127.0.0.1 now, and never one this process was handed
/// before: the kernel may give a released ephemeral port out again at
/// once, and two roles told the same port would collide (seen in CI: the
/// proxy could not bind and the API answered on its port).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct Proc {
    pub name: String,
    pub child: Child,
}

/// A role's process, killed when dropped.
impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The server's bootstrap admin token (the CLI runs with it).
    pub admin_token: String,
    /// The join token agents and proxies run with.
    pub join_token: String,
    pub api: String,
    pub api_addr: String,
    /// The server's agent port (mutual TLS).
    pub agent_addr: String,
    pub proxy_addr: String,
    pub server: Proc,
    /// Every server's command line (one; two sharing PostgreSQL for HA).
    pub server_args: Vec<Vec<String>>,
    /// The API URL of each server, and what agents and proxies are told
    /// (all of them, comma-separated).
    pub apis: Vec<String>,
    pub servers: String,
    /// The other server of an HA cluster (`start_ha`).
    pub standby: Option<Proc>,
    pub agents: Vec<Proc>,
    pub proxy: Proc,
    pub nodes: u32,
    port_base: u16,
    poll: String,
    /// Labels of node-i at index i-1 ("key=value").
    labels: Vec<Vec<String>>,
}

/// What a test does with a cluster, wherever its roles run (processes on
/// 127.0.0.1, or containers: `docker::DockerCluster`).
pub trait ClusterApi: Sized {
    /// The server's base URL.
    fn api_base(&self) -> &str;
    /// The admin token the CLI and API calls use.
    fn admin(&self) -> &str;
    /// The last lines of every role's log, for failure messages.
    fn role_logs(&self) -> String;

    fn api_get(&self, path: &str) -> Result<Value, String> {
        let body = http_get_auth(self.api_base(), path, Some(self.admin()))?;
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    fn status(&self, app: &str) -> Value {
        self.api_get(&format!("/v1/apps/{app}/status"))
            .unwrap_or_else(|e| panic!("status: {e}\n{}", self.role_logs()))
    }

    /// Runs the CLI (on this machine) against the cluster, as admin.
    fn cli(&self, args: &[&str]) -> Output {
        cli_with(self.api_base(), self.admin(), args)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed ({:?}):\n{}\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.role_logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\n{}",
            self.role_logs()
        );
    }

    /// (id, pid, restarts) of every instance of `app`, sorted.
    fn pids(&self, app: &str) -> Vec<(String, u64, u64)> {
        let st = self.status(app);
        let mut v: Vec<_> = st["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    i["id"].as_str().unwrap_or_default().to_string(),
                    i["pid"].as_u64().unwrap_or(0),
                    i["restarts"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v
    }
}

impl ClusterApi for Cluster {
    fn api_base(&self) -> &str {
        &self.api
    }
    fn admin(&self) -> &str {
        &self.admin_token
    }
    fn role_logs(&self) -> String {
        self.logs()
    }
}

/// `drover ARGS` against `api` with `token` ("": none).
pub fn cli_with(api: &str, token: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DROVER_SERVER", api)
        .env("DROVER_TOKEN", token)
        .env("DROVER_TOKEN_FILE", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The last 25 lines of each file, under its name, in name order.
pub fn tail_logs(mut files: Vec<PathBuf>) -> String {
    files.sort();
    let mut out = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!(
            "--- {} ---\n{}\n",
            f.display(),
            lines[lines.len().saturating_sub(25)..].join("\n")
        ));
    }
    out
}

impl Cluster {
    pub fn start(nodes: u32) -> Cluster {
        Cluster::start_polling(nodes, "0")
    }

    /// A cluster whose server polls tracked branches every `poll` ("0": off).
    pub fn start_polling(nodes: u32, poll: &str) -> Cluster {
        Cluster::start_with(nodes, poll, &[])
    }

    /// A cluster whose server gets extra flags.
    pub fn start_with(nodes: u32, poll: &str, server_flags: &[&str]) -> Cluster {
        Cluster::start_full(nodes, poll, server_flags, &[])
    }

    /// A cluster of one node per entry of `labels`, node-i with labels[i-1]
    /// ("key=value" each).
    pub fn start_labeled(poll: &str, labels: &[&[&str]]) -> Cluster {
        Cluster::start_full(labels.len() as u32, poll, &[], labels)
    }

    /// Two servers sharing a fresh PostgreSQL database (and the data dir):
    /// server-a on 127.0.0.1 leads (the test waits for it), server-b on
    /// 127.0.0.2 (same ports) follows; agents and the proxy are given both.
    pub fn start_ha(nodes: u32) -> Cluster {
        let url = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(drover_store::testing::TestPostgres::shared().fresh_database());
        Cluster::start_servers(nodes, "0", &[], &[], Some(&url))
    }

    fn start_full(nodes: u32, poll: &str, server_flags: &[&str], labels: &[&[&str]]) -> Cluster {
        Cluster::start_servers(nodes, poll, server_flags, labels, None)
    }

    fn start_servers(
        nodes: u32,
        poll: &str,
        server_flags: &[&str],
        labels: &[&[&str]],
        database: Option<&str>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (api_port, agent_port) = (free_port(), free_port());
        let api_addr = format!("127.0.0.1:{api_port}");
        let agent_addr = format!("127.0.0.1:{agent_port}");
        let proxy_addr = format!("127.0.0.1:{}", free_port());
        let api = format!("http://{api_addr}");
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        // The agents' app and metrics ports: fixed per test process, and
        // below Linux's ephemeral range (32768–60999), where `free_port`
        // takes the servers' and proxies' ports (CI once saw an agent's
        // metrics port be the server's API port).
        let port_base = 10000 + (std::process::id() % 50) as u16 * 400;
        let data_dir = dir.path().join("server").to_string_lossy().into_owned();
        let server_args = |host: &str, name: &str| -> Vec<String> {
            let mut a: Vec<String> = [
                "server",
                "--addr",
                &format!("{host}:{api_port}"),
                "--agent-addr",
                &format!("{host}:{agent_port}"),
                "--data-dir",
                &data_dir,
                "--poll-interval",
                poll,
            ]
            .iter()
            .chain(server_flags)
            .map(|s| s.to_string())
            .collect();
            if let Some(db) = database {
                a.extend(["--database", db, "--name", name].map(String::from));
            }
            a
        };
        let mut all_args = vec![server_args("127.0.0.1", "server-a")];
        if database.is_some() {
            all_args.push(server_args("127.0.0.2", "server-b"));
        }
        let apis: Vec<String> = all_args
            .iter()
            .map(|a| format!("http://{}", a[2]))
            .collect();
        let server = spawn_server(dir.path(), &all_args[0], 0);
        wait_http(dir.path(), &api, "/v1/health");
        let mut standby = None;
        if database.is_some() {
            wait_leader(dir.path(), &api, "server-a");
            standby = Some(spawn_server(dir.path(), &all_args[1], 1));
            wait_http(dir.path(), &apis[1], "/v1/health");
        }
        let servers = apis.join(",");
        let read = |f: &str| {
            std::fs::read_to_string(dir.path().join("server").join(f))
                .unwrap_or_else(|e| panic!("the server did not write {f}: {e}"))
                .trim()
                .to_string()
        };
        let (admin_token, join_token) = (read("admin-token"), read("join-token"));
        let proxy = spawn_role_env(
            dir.path(),
            "proxy",
            &[
                "proxy",
                "--server",
                &servers,
                "--listen",
                &proxy_addr,
                "--name",
                "proxy-1",
                "--grace",
                "1",
            ],
            &[("DROVER_JOIN_TOKEN", &join_token)],
        );
        let mut c = Cluster {
            admin_token,
            join_token,
            api: api.clone(),
            api_addr,
            agent_addr,
            proxy_addr,
            server,
            server_args: all_args,
            apis,
            servers,
            standby,
            agents: Vec::new(),
            proxy,
            nodes,
            port_base,
            poll: poll.to_string(),
            labels: labels
                .iter()
                .map(|l| l.iter().map(|s| s.to_string()).collect())
                .collect(),
            dir,
        };
        for i in 1..=nodes {
            let a = c.spawn_agent(i);
            c.agents.push(a);
        }
        c.wait_until("all nodes ready", Duration::from_secs(30), |c| {
            c.api_get("/v1/nodes")
                .map(|v| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .filter(|n| n["ready"] == true)
                        .count() as u32
                        == nodes
                })
                .unwrap_or(false)
        });
        c
    }

    pub fn spawn_agent(&self, i: u32) -> Proc {
        let base = self.port_base + (i as u16 - 1) * 100;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            self.servers.clone(),
            "--name".into(),
            format!("node-{i}"),
            "--data-dir".into(),
            self.agent_dir(i).to_string_lossy().into_owned(),
            "--ports".into(),
            format!("{base}-{}", base + 98),
            "--metrics-addr".into(),
            self.agent_metrics_addr(i),
        ];
        for l in self.labels.get(i as usize - 1).into_iter().flatten() {
            args.extend(["--label".to_string(), l.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_role_env(
            self.dir.path(),
            &format!("agent-{i}"),
            &args,
            &[("DROVER_JOIN_TOKEN", &self.join_token)],
        )
    }

    /// Another proxy of this cluster, with labels ("key=value" each) and
    /// extra flags; returns it and its listen address.
    pub fn spawn_proxy(&self, name: &str, labels: &[&str], extra: &[&str]) -> (Proc, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "proxy",
            "--server",
            &self.servers,
            "--listen",
            &addr,
            "--name",
            name,
            "--grace",
            "1",
        ];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(extra);
        let p = spawn_role_env(
            self.dir.path(),
            name,
            &args,
            &[("DROVER_JOIN_TOKEN", &self.join_token)],
        );
        (p, addr)
    }

    /// Where agent `i` serves its /metrics.
    pub fn agent_metrics_addr(&self, i: u32) -> String {
        format!("127.0.0.1:{}", self.port_base + (i as u16 - 1) * 100 + 99)
    }

    pub fn agent_dir(&self, i: u32) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    pub fn restart_server(&mut self) {
        self.server = spawn_server(self.dir.path(), &self.server_args[0], 0);
        self.wait_http("/v1/health");
    }

    /// Starts server `i` (0: the first) again, and waits for its API.
    pub fn spawn_server(&self, i: usize) -> Proc {
        let p = spawn_server(self.dir.path(), &self.server_args[i], i);
        wait_http(self.dir.path(), &self.apis[i], "/v1/health");
        p
    }

    /// `GET /v1/leader` of server `i`.
    pub fn leader_seen_by(&self, i: usize) -> Result<Value, String> {
        let body = http_get_auth(&self.apis[i], "/v1/leader", Some(&self.admin_token))?;
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    fn wait_http(&self, path: &str) {
        wait_http(self.dir.path(), &self.api, path)
    }

    /// The app's pipeline runs, newest first.
    pub fn runs(&self, app: &str) -> Vec<Value> {
        self.api_get(&format!("/v1/apps/{app}/runs"))
            .unwrap_or_else(|e| panic!("runs: {e}"))
            .as_array()
            .unwrap()
            .clone()
    }

    /// Runs the CLI against this cluster with `token` ("": none).
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        cli_with(&self.api, token, args)
    }

    /// The last lines of every role's log, for failure messages.
    pub fn logs(&self) -> String {
        let files = std::fs::read_dir(self.dir.path().join("logs"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        tail_logs(files)
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.proxy.kill9();
        for a in &mut self.agents {
            a.kill9();
        }
        for i in 1..=self.nodes {
            drover_agent::stop_recorded_apps(&self.agent_dir(i), Duration::ZERO);
        }
        self.server.kill9();
        if let Some(s) = &mut self.standby {
            s.kill9();
        }
        if std::env::var_os("DROVER_TEST_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

fn wait_http(dir: &Path, api: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(api, path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{path} did not answer within 30s; logs in {}",
        dir.display()
    );
}

/// Server `i`'s process ("server", then "server-b", … for its log).
fn spawn_server(dir: &Path, args: &[String], i: usize) -> Proc {
    let name = match i {
        0 => "server".to_string(),
        i => format!("server-{}", (b'a' + i as u8) as char),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_role_env(dir, &name, &args, &[])
}

/// Waits until the server at `api` says `name` leads (and runs its term).
fn wait_leader(dir: &Path, api: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(body) = http_get(api, "/v1/leader") {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            if v["leader"] == name && v["leading"] == true {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} did not lead within 30s; logs in {}", dir.display());
}

/// Starts a role with extra environment (secrets go there, not in args).
pub fn spawn_role_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env(
            "DROVER_LOG",
            "info,drover_server=debug,pingora=warn,pingora_core=warn,pingora_proxy=warn,sqlx=warn",
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc {
        name: name.into(),
        child,
    }
}

/// A minimal blocking HTTP/1.1 GET with `Connection: close`; returns the
/// status line's head and the raw body.
pub fn raw_get(addr: &str, host: &str, path: &str) -> Result<(String, String), String> {
    raw_get_with(addr, host, path, "")
}

/// [`raw_get`] with extra header lines (each ending in `\r\n`).
pub fn raw_get_with(
    addr: &str,
    host: &str,
    path: &str,
    headers: &str,
) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    Ok((head.to_string(), body.to_string()))
}

/// GET without a token; Err unless 2xx. Handles chunked bodies.
pub fn http_get(base: &str, path: &str) -> Result<String, String> {
    http_get_auth(base, path, None)
}

/// GET with a bearer token; Err unless 2xx. Handles chunked bodies.
pub fn http_get_auth(base: &str, path: &str, token: Option<&str>) -> Result<String, String> {
    let addr = base.trim_start_matches("http://");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (head, body) = raw_get_with(addr, addr, path, &auth)?;
    let body = body.as_str();
    if !head.starts_with("HTTP/1.1 2") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    // The API answers JSON with content-length; chunked bodies are small here.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        return Ok(out);
    }
    Ok(body.to_string())
}

// ------------------------------------------------------------- test apps ----

/// How a test app behaves; written into the commit as behavior.json.
#[derive(Clone, Debug)]
pub struct Behavior {
    pub version: String,
    pub health_status: u16,
    pub start_delay_ms: u64,
    /// Extra latency for requests to /slow.
    pub slow_ms: u64,
    /// Every n-th request (not health checks) answers 500; 0: never.
    pub fail_every: u64,
    /// What GET /ready answers (a deeper readiness check than /healthz).
    pub ready_status: u16,
    /// /healthz flaps: (ok, bad) answers 200 `ok` times, then 503 `bad`
    /// times, over and over (instead of `health_status`).
    pub health_flap: Option<(u32, u32)>,
}

impl Behavior {
    pub fn ok(version: &str) -> Self {
        Behavior {
            version: version.into(),
            health_status: 200,
            start_delay_ms: 0,
            slow_ms: 300,
            fail_every: 0,
            ready_status: 200,
            health_flap: None,
        }
    }
}

pub const TEST_APP_PY: &str = r#"
import http.server, itertools, json, os, time
cfg = json.load(open("behavior.json"))
counter = itertools.count(1)
checks = itertools.count(0)
time.sleep(cfg["start_delay_ms"] / 1000.0)
PORT = int(os.environ["PORT"])
print("started %s on port %d" % (cfg["version"], PORT), flush=True)

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 200
        if self.path == "/healthz":
            status = cfg["health_status"]
            flap = cfg.get("health_flap")
            if flap:
                status = 200 if next(checks) % (flap[0] + flap[1]) < flap[0] else 503
            body = b"ok\n" if status == 200 else b"not ready\n"
        elif self.path.startswith("/env/"):
            body = (os.environ.get(self.path[5:], "<unset>") + "\n").encode()
        elif self.path == "/ready":
            status = cfg["ready_status"]
            body = b"ready\n" if status == 200 else b"not ready\n"
        else:
            if self.path == "/slow":
                time.sleep(cfg["slow_ms"] / 1000.0)
            if cfg["fail_every"] and next(counter) % cfg["fail_every"] == 0:
                status = 500
            body = ("%s pid=%d color=%s port=%d\n" % (cfg["version"], os.getpid(), os.environ.get("COLOR", "-"), PORT)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

S((os.environ.get("HOST", "127.0.0.1"), PORT), H).serve_forever()
"#;

pub struct Repo {
    pub path: PathBuf,
}

pub fn spec(name: &str, instances: u32, deadline: &str) -> String {
    format!(
        r#"[app]
name = "{name}"

[build]
command = "python3 -c 'import json; json.load(open(\"behavior.json\"))'"
artifact = ["app.py", "behavior.json"]

[run]
command = "exec python3 app.py"
instances = {instances}
stop_timeout = "3s"

[health]
path = "/healthz"
interval = "200ms"
healthy_after = 1
unhealthy_after = 2
deadline = "{deadline}"

[route]
host = "{name}.localhost"

[deploy]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
drain_timeout = "10s"
"#
    )
}

impl Repo {
    pub fn create(dir: &Path, spec: &str, b: &Behavior) -> Repo {
        let path = dir.join("repo");
        std::fs::create_dir_all(&path).unwrap();
        git(&path, &["init", "--quiet", "--initial-branch=main"]);
        let r = Repo { path };
        r.commit(spec, b);
        r
    }

    pub fn commit(&self, spec: &str, b: &Behavior) -> String {
        std::fs::write(self.path.join("app.py"), TEST_APP_PY).unwrap();
        std::fs::write(self.path.join("drover.toml"), spec).unwrap();
        let json = format!(
            r#"{{"version": "{}", "health_status": {}, "start_delay_ms": {}, "slow_ms": {}, "fail_every": {}, "ready_status": {}, "health_flap": {}}}"#,
            b.version,
            b.health_status,
            b.start_delay_ms,
            b.slow_ms,
            b.fail_every,
            b.ready_status,
            b.health_flap
                .map_or("null".to_string(), |(ok, bad)| format!("[{ok}, {bad}]"))
        );
        std::fs::write(self.path.join("behavior.json"), json).unwrap();
        git(&self.path, &["add", "-A"]);
        git(
            &self.path,
            &[
                "commit",
                "--quiet",
                "--allow-empty",
                "-m",
                &format!("version {}", b.version),
            ],
        );
        git(&self.path, &["rev-parse", "HEAD"]).trim().to_string()
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------------------ load ----

#[derive(Default, Debug)]
pub struct LoadStats {
    pub sent: u64,
    pub failed: u64,
    /// Failures that were an HTTP 500 answer (the app's own errors).
    pub status_500: u64,
    pub by_version: std::collections::BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

impl LoadStats {
    /// No request failed, enough were sent to mean something, and every
    /// answer came from one of `versions`; `logs` for the failure message.
    pub fn assert_clean(&self, versions: &[&str], logs: &str) {
        assert_eq!(
            self.failed, 0,
            "failed requests: {:?}\n{logs}",
            self.failures
        );
        assert!(
            self.sent > 100,
            "too little load to mean anything: {}",
            self.sent
        );
        assert!(
            self.by_version
                .keys()
                .all(|v| versions.contains(&v.as_str())),
            "answers from other versions than {versions:?}: {:?}",
            self.by_version
        );
    }
}

/// Sends requests through the proxy until stopped: one task over a
/// keep-alive connection, one with a fresh connection per request, one
/// with slow (in-flight during drains) requests. Bounded by `max_time`.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub stats: Arc<Mutex<LoadStats>>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub sent: Arc<AtomicU64>,
}

impl Load {
    pub fn start(proxy: &str, host: &str, max_time: Duration) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let (proxy, host) = (proxy.to_string(), host.to_string());
        let (stop2, stats2, sent2) = (stop.clone(), stats.clone(), sent.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let keepalive = reqwest::Client::builder()
                    .pool_max_idle_per_host(4)
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let fresh = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let deadline = tokio::time::Instant::now() + max_time;
                let mut tasks = Vec::new();
                for (client, path) in [(keepalive.clone(), "/"), (fresh, "/"), (keepalive, "/slow")]
                {
                    let (proxy, host, stop, stats, sent) = (
                        proxy.clone(),
                        host.clone(),
                        stop2.clone(),
                        stats2.clone(),
                        sent2.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed)
                            && tokio::time::Instant::now() < deadline
                        {
                            let res = client
                                .get(format!("{proxy}{path}"))
                                .header("host", &host)
                                .send()
                                .await;
                            let outcome = match res {
                                Ok(r) if r.status().is_success() => {
                                    Ok(r.text().await.unwrap_or_default())
                                }
                                Ok(r) => Err(format!(
                                    "{} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                )),
                                Err(e) => Err(format!("{e:?}")),
                            };
                            sent.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut s = stats.lock().unwrap();
                                s.sent += 1;
                                match outcome {
                                    Ok(body) => {
                                        *s.by_version
                                            .entry(
                                                body.split_whitespace()
                                                    .next()
                                                    .unwrap_or("")
                                                    .to_string(),
                                            )
                                            .or_default() += 1
                                    }
                                    Err(e) => {
                                        s.failed += 1;
                                        if e.starts_with("500 ") {
                                            s.status_500 += 1;
                                        }
                                        if s.failures.len() < 20 {
                                            s.failures.push(e);
                                        }
                                    }
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            stop,
            stats,
            handle: Some(handle),
            sent,
        }
    }

    pub fn finish(mut self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        std::mem::take(&mut *self.stats.lock().unwrap())
    }
}

/// One GET through the proxy; returns the body's first word (the version).
pub fn get_version(proxy: &str, host: &str) -> Result<String, String> {
    let (head, body) = raw_get(proxy.trim_start_matches("http://"), host, "/")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head} {body}"));
    }
    Ok(body.split_whitespace().next().unwrap_or("").to_string())
}

// ---------------------------------------------------------- prometheus ----

/// A real Prometheus (Debian's `prometheus`) scraping the given targets
/// every 500 ms with a bearer token, its data in a temporary directory.
pub struct Prometheus {
    pub url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(targets: &[&str], token: &str) -> Prometheus {
        let bin = std::env::var("DROVER_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let credentials = dir.path().join("token");
        std::fs::write(&credentials, token).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\nscrape_configs:\n  - job_name: drover\n    scrape_interval: 500ms\n    authorization:\n      type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: [{list}]\n",
                credentials.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin} ({e}); install Debian's prometheus package (.ci/run does)"
                )
            });
        let p = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            _proc: Proc {
                name: "prometheus".into(),
                child,
            },
            _dir: dir,
        };
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while http_get(&p.url, "/-/ready").is_err() {
            assert!(
                std::time::Instant::now() < until,
                "prometheus did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// The `data.result` of an instant query.
    pub fn query(&self, promql: &str) -> Value {
        let enc = drover_api::encode_query(promql);
        let body = http_get(&self.url, &format!("/api/v1/query?query={enc}"))
            .unwrap_or_else(|e| panic!("prometheus query {promql}: {e}"));
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self._proc.kill9();
    }
}
