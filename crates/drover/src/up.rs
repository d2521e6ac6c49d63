//! `drover up`: everything on one machine, as child processes of this one —
//! a server (SQLite under `<data-dir>/server`), N agents (each its own data
//! dir and port range, each acting as one server) and a proxy. With
//! `--demo` it creates the sample app and deploys it.
//!
//! On Ctrl-C it stops the proxy and agents, then the apps the agents ran
//! (agents deliberately leave apps running when they stop), then the server.

use crate::client::{fail, Client};
use crate::{demo, output};
use anyhow::Context;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct UpArgs {
    pub data_dir: PathBuf,
    pub nodes: u32,
    pub demo: bool,
    pub api_addr: String,
    pub proxy_addr: String,
    pub poll_interval: Duration,
}

struct Role {
    name: String,
    child: Child,
}

/// Starts a role; `join_token` goes in its environment, never in its
/// arguments (which any user can list).
fn spawn(
    exe: &Path,
    logs: &Path,
    name: &str,
    args: &[String],
    join_token: Option<&str>,
) -> anyhow::Result<Role> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(exe);
    if let Some(t) = join_token {
        cmd.env("DROVER_JOIN_TOKEN", t);
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Role {
        name: name.to_string(),
        child,
    })
}

fn terminate(role: &mut Role, timeout: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(role.child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = role.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = role.child.kill();
    let _ = role.child.wait();
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data = std::fs::canonicalize(&args.data_dir)?;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs)?;
    let exe = std::env::current_exe().context("cannot find the drover executable")?;
    let api_url = format!("http://{}", args.api_addr);
    if args.nodes == 0 || args.nodes > 50 {
        return Err(fail(2, "--nodes must be between 1 and 50"));
    }

    let mut roles: Vec<Role> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        roles.push(spawn(
            &exe,
            &logs,
            "server",
            &[
                "server".into(),
                "--addr".into(),
                args.api_addr.clone(),
                "--data-dir".into(),
                data.join("server").to_string_lossy().into(),
                "--poll-interval".into(),
                format!("{}ms", args.poll_interval.as_millis()),
            ],
            None,
        )?);
        let health = Client::new(&api_url, None);
        wait_until(
            Duration::from_secs(30),
            || health.get_text("/v1/health").is_ok(),
            &mut roles,
        )
        .context("the server did not come up; see logs/server.log")?;
        // The server wrote its bootstrap tokens before it began to listen.
        let admin_file = data.join("server").join("admin-token");
        let read = |f: &Path| {
            std::fs::read_to_string(f)
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "cannot read {} (written by the server at its first start)",
                        f.display()
                    )
                })
        };
        let client = Client::new(&api_url, Some(&read(&admin_file)?));
        let join = read(&data.join("server").join("join-token"))?;
        for i in 1..=args.nodes {
            let base = 20000 + (i - 1) * 1000;
            roles.push(spawn(
                &exe,
                &logs,
                &format!("agent-node-{i}"),
                &[
                    "agent".into(),
                    "--server".into(),
                    api_url.clone(),
                    "--name".into(),
                    format!("node-{i}"),
                    "--data-dir".into(),
                    data.join("agents")
                        .join(format!("node-{i}"))
                        .to_string_lossy()
                        .into(),
                    "--ports".into(),
                    format!("{base}-{}", base + 999),
                    "--label".into(),
                    "role=web".into(),
                ],
                Some(&join),
            )?);
        }
        roles.push(spawn(
            &exe,
            &logs,
            "proxy",
            &[
                "proxy".into(),
                "--server".into(),
                api_url.clone(),
                "--listen".into(),
                args.proxy_addr.clone(),
                "--grace".into(),
                "1".into(),
            ],
            Some(&join),
        )?);
        let want = args.nodes as usize;
        wait_until(
            Duration::from_secs(30),
            || {
                client
                    .get::<Vec<drover_api::NodeInfo>>("/v1/nodes")
                    .map(|n| n.iter().filter(|n| n.ready).count() >= want)
                    .unwrap_or(false)
            },
            &mut roles,
        )
        .context("the agents did not register; see logs/agent-*.log")?;
        println!(
            "drover is up ({} nodes, data in {})",
            args.nodes,
            data.display()
        );
        println!("  API and dashboard: {api_url}");
        println!("  proxy:             http://{}", args.proxy_addr);
        if args.demo {
            let repo = data.join("demo").join("hello");
            if demo::create(&repo)? {
                println!("created the demo app repo at {}", repo.display());
            }
            let add: anyhow::Result<drover_api::AppInfo> = client.post(
                "/v1/apps",
                &drover_api::AddAppRequest {
                    repo: repo.to_string_lossy().into(),
                    branch: Some("main".into()),
                },
            );
            match add {
                Ok(_) => {}
                Err(e) if e.to_string().contains("already exists") => {}
                Err(e) => return Err(e),
            }
            let d: drover_api::DeployResponse = client.post(
                "/v1/apps/hello/deploy",
                &drover_api::DeployRequest::default(),
            )?;
            println!(
                "deploying hello {} (commit {})…",
                d.release,
                &d.commit[..12]
            );
            output::follow(&client, "hello", None, Some(d.rollout_id))?;
            println!(
                "try:  curl -H 'Host: hello.localhost' http://{}/",
                args.proxy_addr
            );
        }
        println!(
            "use the CLI with:  export DROVER_SERVER={api_url} DROVER_TOKEN_FILE={}; drover status hello",
            admin_file.display()
        );
        println!("press Ctrl-C to stop");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = term.recv() => return Ok(()),
                    _ = tick.tick() => {
                        for r in roles.iter_mut() {
                            if let Ok(Some(st)) = r.child.try_wait() {
                                anyhow::bail!("{} exited ({st}); see {}", r.name, logs.join(format!("{}.log", r.name)).display());
                            }
                        }
                    }
                }
            }
        })
    })();

    eprintln!("stopping…");
    // Proxy and agents first, then the apps they leave running, then the server.
    for r in roles.iter_mut().rev().filter(|r| r.name != "server") {
        terminate(r, Duration::from_secs(5));
    }
    for i in 1..=args.nodes {
        drover_agent::stop_recorded_apps(
            &data.join("agents").join(format!("node-{i}")),
            Duration::from_secs(5),
        );
    }
    for r in roles.iter_mut().filter(|r| r.name == "server") {
        terminate(r, Duration::from_secs(5));
    }
    result
}

fn wait_until(
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
    roles: &mut [Role],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        for r in roles.iter_mut() {
            if let Ok(Some(st)) = r.child.try_wait() {
                anyhow::bail!("{} exited ({st})", r.name);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out after {}s", timeout.as_secs())
}
