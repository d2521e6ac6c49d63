//! Cluster on separate hosts: the server, each agent and the proxy in its
//! own container of the machine's Docker Engine, each with its own
//! addresses, on two private networks:
//!
//! ```text
//!   ctl  (control plane)  server ── agents ── proxy        the test process (host)
//!   data (app traffic)              agents ── proxy        reaches both networks
//! ```
//!
//! so that cutting a node off the control plane (`cut_off`: out of `ctl`)
//! leaves its instances reachable by the proxy, as when a server's link to
//! the control plane fails but the service network does not.
//!
//! There is no registry: the image is made here by `docker import` of a
//! minimal root filesystem holding the `drover` binary under test. The
//! machine's `/usr` (and `/etc/ssl`, its CA certificates) is mounted
//! read-only into every host for the runtime the test apps and builds need
//! (sh, python3, git), as a Debian server's packages would be. Each host runs `docker-init` with `sleep` as PID 1 and
//! the role started by `docker exec`, so a role can be killed and restarted
//! while its apps (children of PID 1 once orphaned) keep running, and a
//! whole host can be killed, paused or cut off.
//!
//! Everything is labelled `drover.test.pid=<pid>`; containers and networks of
//! test processes that died are removed at the next start.

use super::*;
use std::sync::OnceLock;

const LABEL: &str = "drover.test.pid";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";
const API_PORT: u16 = 7070;
const PROXY_PORT: u16 = 8080;

/// Runs the docker CLI; stdout (trimmed) or an error naming the command.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker (is Docker Engine installed?): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn docker_ok(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The image with the `drover` binary under test (built once per binary).
pub fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        remove_stale();
        let meta = std::fs::metadata(BIN).unwrap();
        let mtime = meta
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // The layout version first: a change here must not reuse an old image.
        let tag = format!("drover-test:2-{:x}-{:x}", mtime, meta.len());
        if docker(&["image", "inspect", &tag]).is_ok() {
            return tag;
        }
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // /sbin stays a directory: `--init` mounts docker-init there.
        for d in ["opt/drover", "etc", "tmp", "data", "usr", "root", "sbin"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::copy(BIN, r.join("opt/drover/drover")).unwrap();
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(to, r.join(link)).unwrap();
        }
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let mut tar = Command::new("tar")
            .args(["-C", &r.to_string_lossy(), "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Command::new("docker")
            .args([
                "import",
                "--change",
                &format!("ENV PATH={PATH}"),
                "-",
                &tag,
            ])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the image's root failed");
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tag
    })
}

/// Removes containers and networks left by test processes that are gone.
fn remove_stale() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let filter = format!("label={LABEL}");
    let list = docker(&[
        "ps",
        "-a",
        "--filter",
        &filter,
        "--format",
        &format!("{{{{.Names}}}} {{{{.Label \"{LABEL}\"}}}}"),
    ])
    .unwrap_or_else(|e| panic!("the cluster tests need a running Docker Engine: {e}"));
    for line in list.lines() {
        if let Some((name, pid)) = line.split_once(' ') {
            if !alive(pid) {
                let _ = docker(&["rm", "-f", name]);
            }
        }
    }
    let nets = docker(&[
        "network",
        "ls",
        "--filter",
        &filter,
        "--format",
        &format!("{{{{.Name}}}} {{{{.Label \"{LABEL}\"}}}}"),
    ])
    .unwrap_or_default();
    for line in nets.lines() {
        if let Some((name, pid)) = line.split_once(' ') {
            if !alive(pid) {
                let _ = docker(&["network", "rm", name]);
            }
        }
    }
}

/// One host: a container with its addresses.
#[derive(Clone, Debug)]
pub struct Host {
    /// The container's name (also its hostname).
    pub name: String,
    /// Its address on the control-plane network.
    pub ctl_ip: String,
    /// Its address on the app-traffic network (agents and proxy).
    pub data_ip: Option<String>,
    /// Where its /data is on this machine (role logs, data dirs).
    pub dir: PathBuf,
}

pub struct DockerCluster {
    pub dir: tempfile::TempDir,
    prefix: String,
    ctl_net: String,
    data_net: String,
    pub admin_token: String,
    pub join_token: String,
    pub api: String,
    pub server: Host,
    pub agents: Vec<Host>,
    pub proxy: Host,
    /// Where the proxy listens, as reached from here.
    pub proxy_addr: String,
}

fn ip_on(container: &str, net: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        container,
    ])
}

/// `s` quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl DockerCluster {
    /// A server, `nodes` agents (node-1…) and a proxy, each on its own host.
    pub fn start(nodes: u32) -> DockerCluster {
        static N: AtomicU64 = AtomicU64::new(0);
        let image = image();
        let prefix = format!(
            "drv{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let label = format!("{LABEL}={}", std::process::id());
        let (ctl_net, data_net) = (format!("{prefix}-ctl"), format!("{prefix}-data"));
        for n in [&ctl_net, &data_net] {
            docker_ok(&["network", "create", "--label", &label, n]);
        }
        let mut c = DockerCluster {
            server: Host {
                name: String::new(),
                ctl_ip: String::new(),
                data_ip: None,
                dir: PathBuf::new(),
            },
            agents: Vec::new(),
            proxy: Host {
                name: String::new(),
                ctl_ip: String::new(),
                data_ip: None,
                dir: PathBuf::new(),
            },
            admin_token: String::new(),
            join_token: String::new(),
            api: String::new(),
            proxy_addr: String::new(),
            prefix,
            ctl_net,
            data_net,
            dir,
        };
        // The server also sees the test's git repos, at the same path.
        let repos = c.dir.path().join("repos").to_string_lossy().into_owned();
        c.server = c.host(image, "server", false, &[&format!("{repos}:{repos}:ro")]);
        c.api = format!("http://{}:{API_PORT}", c.server.ctl_ip);
        c.start_server();
        let read = |f: &str| {
            std::fs::read_to_string(c.server.dir.join("server").join(f))
                .unwrap_or_else(|e| panic!("the server did not write {f}: {e}"))
                .trim()
                .to_string()
        };
        let (admin, join) = (read("admin-token"), read("join-token"));
        c.admin_token = admin;
        c.join_token = join;
        c.proxy = c.host(image, "proxy", true, &[]);
        c.proxy_addr = format!("{}:{PROXY_PORT}", c.proxy.data_ip.as_ref().unwrap());
        c.start_proxy();
        for i in 1..=nodes {
            let h = c.host(image, &format!("node-{i}"), true, &[]);
            c.agents.push(h);
            c.start_agent(i);
        }
        c.wait_nodes_ready(nodes);
        c
    }

    /// Starts a host (container) on the control network, and on the data
    /// network too when `data`.
    fn host(&self, image: &str, role: &str, data: bool, mounts: &[&str]) -> Host {
        let name = format!("{}-{role}", self.prefix);
        let dir = self.dir.path().join("hosts").join(role);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let label = format!("{LABEL}={}", std::process::id());
        let data_mount = format!("{}:/data", dir.display());
        let mut args: Vec<&str> = vec![
            "run",
            "-d",
            "--init",
            "--name",
            &name,
            "--hostname",
            role,
            "--label",
            &label,
            "--network",
            &self.ctl_net,
            "-v",
            "/usr:/usr:ro",
            // The CA certificates of a Debian host (ca-certificates): the
            // HTTP clients will not start without a trust store.
            "-v",
            "/etc/ssl:/etc/ssl:ro",
            "-v",
            &data_mount,
            "-e",
            "HOME=/data",
        ];
        for m in mounts {
            args.extend(["-v", m]);
        }
        args.extend([image, "sleep", "infinity"]);
        docker_ok(&args);
        if data {
            docker_ok(&["network", "connect", &self.data_net, &name]);
        }
        Host {
            ctl_ip: ip_on(&name, &self.ctl_net),
            data_ip: data.then(|| ip_on(&name, &self.data_net)),
            name,
            dir,
        }
    }

    /// Starts `drover ARGS` on `host` in the background (its log in
    /// /data/logs/<log>.log, its pid in /data/<log>.pid).
    fn exec_role(&self, host: &Host, log: &str, args: &[&str], env: &[(&str, &str)]) {
        let cmd = format!(
            "echo $$ > /data/{log}.pid; exec /opt/drover/drover {} >>/data/logs/{log}.log 2>&1",
            args.iter()
                .map(|a| sh_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut a: Vec<String> = vec!["exec".into(), "-d".into()];
        let log_filter =
            "info,drover_server=debug,pingora=warn,pingora_core=warn,pingora_proxy=warn,sqlx=warn";
        for (k, v) in env.iter().chain(&[("DROVER_LOG", log_filter)]) {
            a.extend(["-e".into(), format!("{k}={v}")]);
        }
        a.extend([host.name.clone(), "sh".into(), "-c".into(), cmd]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        docker_ok(&a);
    }

    pub fn start_server(&self) {
        self.exec_role(
            &self.server,
            "server",
            &[
                "server",
                "--addr",
                &format!("0.0.0.0:{API_PORT}"),
                "--data-dir",
                "/data/server",
                "--poll-interval",
                "0",
            ],
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&self.api, "/v1/health").is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not answer within 30s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn start_proxy(&self) {
        self.exec_role(
            &self.proxy,
            "proxy",
            &[
                "proxy",
                "--server",
                &self.api,
                "--listen",
                &format!("0.0.0.0:{PROXY_PORT}"),
                "--name",
                "proxy-1",
                "--grace",
                "1",
            ],
            &[("DROVER_JOIN_TOKEN", &self.join_token)],
        );
    }

    pub fn agent(&self, i: u32) -> &Host {
        &self.agents[i as usize - 1]
    }

    /// Node-i hands out ports 2i000-2i999, so an answer's port tells its
    /// node.
    pub fn start_agent(&self, i: u32) {
        let h = self.agent(i);
        let base = 20000 + i * 1000;
        let ports = format!("{base}-{}", base + 999);
        self.exec_role(
            h,
            "agent",
            &[
                "agent",
                "--server",
                &self.api,
                "--name",
                &format!("node-{i}"),
                "--data-dir",
                "/data/agent",
                "--advertise-host",
                h.data_ip.as_ref().unwrap(),
                "--ports",
                &ports,
            ],
            &[("DROVER_JOIN_TOKEN", &self.join_token)],
        );
    }

    pub fn wait_nodes_ready(&self, nodes: u32) {
        self.wait_until("all nodes ready", Duration::from_secs(30), |c| {
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
    }

    /// SIGKILLs the role (`server`, `agent` or `proxy`) running on `host`;
    /// the host and whatever else runs there stay.
    pub fn kill_role(&self, host: &Host, role: &str) {
        docker_ok(&[
            "exec",
            &host.name,
            "sh",
            "-c",
            &format!("kill -9 $(cat /data/{role}.pid)"),
        ]);
        // Gone before this returns (a restarted role must not meet it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while docker(&[
            "exec",
            &host.name,
            "sh",
            "-c",
            &format!("kill -0 $(cat /data/{role}.pid) 2>/dev/null"),
        ])
        .is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "{role} on {} did not die",
                host.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts `host` off the control-plane network (its app traffic goes on).
    pub fn cut_off(&self, host: &Host) {
        docker_ok(&["network", "disconnect", &self.ctl_net, &host.name]);
    }

    /// Connects `host` to the control-plane network again.
    pub fn heal(&self, host: &Host) {
        docker_ok(&["network", "connect", &self.ctl_net, &host.name]);
    }

    /// Runs `sh -c CMD` on `host`; its stdout.
    pub fn sh(&self, host: &Host, cmd: &str) -> Result<String, String> {
        docker(&["exec", &host.name, "sh", "-c", cmd])
    }

    /// The last lines of every role's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = Vec::new();
        if let Ok(hosts) = std::fs::read_dir(self.dir.path().join("hosts")) {
            for h in hosts.flatten() {
                if let Ok(rd) = std::fs::read_dir(h.path().join("logs")) {
                    files.extend(rd.flatten().map(|e| e.path()));
                }
            }
        }
        tail_logs(files)
    }

    /// Waits until node-i's agent has reported within the last 500 ms.
    pub fn wait_reporting(&self, i: u32, what: &str) {
        let node = format!("node-{i}");
        self.wait_until(what, Duration::from_secs(20), |c| {
            c.node(&node)["last_seen_ms_ago"]
                .as_u64()
                .unwrap_or(u64::MAX)
                < 500
        });
    }

    /// How often `needle` occurs in the agents' logs, all nodes together.
    pub fn in_agent_logs(&self, needle: &str) -> usize {
        self.agents
            .iter()
            .map(|h| {
                std::fs::read_to_string(h.dir.join("logs/agent.log"))
                    .unwrap_or_default()
                    .matches(needle)
                    .count()
            })
            .sum()
    }

    /// `GET /v1/nodes`' entry for `node`.
    pub fn node(&self, node: &str) -> Value {
        self.api_get("/v1/nodes")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .cloned()
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// A git repo for an app, where the server can read it.
    pub fn repo(&self, name: &str, spec: &str, b: &Behavior) -> Repo {
        Repo::create(&self.dir.path().join("repos").join(name), spec, b)
    }
}

impl ClusterApi for DockerCluster {
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

impl Drop for DockerCluster {
    fn drop(&mut self) {
        if std::env::var_os("DROVER_TEST_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {} and containers {}-*", p.display(), self.prefix);
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
            return;
        }
        let names: Vec<&str> = std::iter::once(&self.server)
            .chain(&self.agents)
            .chain(std::iter::once(&self.proxy))
            .map(|h| h.name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        let mut args = vec!["rm", "-f"];
        args.extend(names);
        let _ = docker(&args);
        let _ = docker(&["network", "rm", &self.ctl_net, &self.data_net]);
    }
}
