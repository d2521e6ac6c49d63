//! Command-line definition (clap derive: one definition per flag feeds help)
//! and dispatch. Roles (`server`, `agent`, `proxy`, `up`) run long; client
//! commands talk to the API at `DROVER_SERVER`.

use crate::client::{fail, Client, Fail};
use crate::{output, up};
use clap::{Parser, Subcommand};
use drover_core::spec::in_env;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Continuous deployment for your own servers: build, release, roll out, roll back."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ServerArg {
    /// API URL of the drover server.
    #[arg(
        long,
        env = "DROVER_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// API token (see `drover tokens`). Without it, the token in
    /// DROVER_TOKEN_FILE, else in .drover/server/admin-token (what
    /// `drover up` writes) when that file exists.
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

/// How agents and proxies prove they belong to the cluster.
#[derive(clap::Args, Clone)]
pub struct JoinArg {
    /// The cluster's join token (the server writes it to its data dir, file
    /// join-token, at first start).
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
}

impl JoinArg {
    fn token(self) -> anyhow::Result<String> {
        self.join_token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                fail(
                    2,
                    "no join token: pass --join-token or set DROVER_JOIN_TOKEN (the server writes it to <server data dir>/join-token at first start)",
                )
            })
    }
}

impl ServerArg {
    /// A client of the server with the caller's token.
    pub fn client(&self) -> Client {
        Client::new(&self.server, self.resolve_token().as_deref())
    }

    fn resolve_token(&self) -> Option<String> {
        if let Some(t) = self.token.as_ref().filter(|t| !t.trim().is_empty()) {
            return Some(t.trim().to_string());
        }
        let file = std::env::var_os("DROVER_TOKEN_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".drover/server/admin-token"));
        std::fs::read_to_string(file)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything on this machine: a server, N agents and a proxy.
    Up {
        #[arg(long, default_value = ".drover")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Create a sample app (at <data-dir>/demo/hello) and deploy it.
        #[arg(long)]
        demo: bool,
        #[arg(long, default_value = "127.0.0.1:7070")]
        api_addr: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        proxy_addr: String,
        /// How often the server polls tracked branches ("0": off).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        poll_interval: std::time::Duration,
    },
    /// Run the control plane.
    Server {
        #[arg(long, default_value = "127.0.0.1:7070")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = ".drover/server")]
        data_dir: PathBuf,
        /// How often tracked branches are polled for new commits ("0s": off;
        /// push webhooks work either way).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        poll_interval: std::time::Duration,
        /// Releases per app whose artifacts are kept (the live release and
        /// the rollback target are always kept).
        #[arg(long, default_value_t = 10)]
        keep_releases: usize,
        /// The key that seals app secrets (default: <data-dir>/secrets.key,
        /// created at first start). Keep it apart from database backups.
        #[arg(long)]
        secrets_key_file: Option<PathBuf>,
        /// How long a client may take to send a request's headers (a
        /// keep-alive connection idle this long is closed too).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        header_timeout: std::time::Duration,
        /// How long a client may pause while sending a request body.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        body_timeout: std::time::Duration,
        /// Where agents connect after registering (mutual TLS with
        /// certificates from the server's own CA). Default: --addr's host,
        /// port + 1.
        #[arg(long)]
        agent_addr: Option<std::net::SocketAddr>,
        /// Answer DNS (UDP) here for service discovery: A and SRV records
        /// of `[stable.|canary.|preview.]<app>[.<env>].service.drover`
        /// (e.g. 127.0.0.1:8600). Off by default.
        #[arg(long)]
        dns_addr: Option<std::net::SocketAddr>,
        /// How long an agent's certificate is valid; agents renew it at
        /// two thirds of that.
        #[arg(long, default_value = "72h", value_parser = parse_duration)]
        agent_cert_ttl: std::time::Duration,
        /// Serve the API over HTTPS with this certificate chain (PEM);
        /// clients trusting a private CA set DROVER_CA_CERT.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Keep state in PostgreSQL (postgres://user:password@host/db)
        /// instead of SQLite in the data dir. Several servers may share
        /// it: one leads (elected by the database), the others serve
        /// reads and agents and forward changes to it. Servers sharing a
        /// database share the data dir too (artifacts, the CA, the
        /// secrets key), e.g. on NFS. Also DROVER_DATABASE.
        #[arg(long, env = "DROVER_DATABASE", hide_env_values = true)]
        database: Option<String>,
        /// This server's name among several (default: host name and port).
        #[arg(long)]
        name: Option<String>,
        /// The URL other servers reach this one's API at (default:
        /// http(s)://<--addr>).
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Run an agent (one per server).
    Agent {
        #[command(flatten)]
        s: ServerArg,
        /// This node's name.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".drover/agent")]
        data_dir: PathBuf,
        /// Node labels, e.g. --label role=web --label region=eu.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Host part of the addresses instances listen on.
        #[arg(long, default_value = "127.0.0.1")]
        advertise_host: String,
        /// Ports handed to instances, e.g. 20000-29999.
        #[arg(long, default_value = "20000-29999", value_parser = parse_range)]
        ports: (u16, u16),
        /// Serve GET /metrics (this node's instances by app, release and
        /// state, Prometheus text format) on this address.
        #[arg(long)]
        metrics_addr: Option<String>,
        #[command(flatten)]
        join: JoinArg,
    },
    /// Run the traffic layer (proxy).
    Proxy {
        #[command(flatten)]
        s: ServerArg,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, default_value = "proxy-1")]
        name: String,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Seconds to let in-flight requests finish on SIGTERM.
        #[arg(long, default_value_t = 5)]
        grace: u64,
        /// This proxy's labels, e.g. --label region=eu: a partial deployment
        /// with `nodes = { region = "eu" }` sends its users to the new release.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Serve GET /metrics (this proxy's per-release traffic, Prometheus
        /// text format) on this address, e.g. 127.0.0.1:9101.
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Serve HTTPS on --listen with this certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<String>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<String>,
        /// The request path: drover's own HTTP/1.1 engine (h1), or pingora.
        #[arg(long, env = "DROVER_PROXY_ENGINE", default_value = "h1")]
        engine: drover_proxy::Engine,
        /// Close an upgraded connection (WebSocket) after this many seconds
        /// without a byte either way (h1 engine).
        #[arg(long, default_value_t = drover_proxy::TUNNEL_IDLE_TIMEOUT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..))]
        tunnel_idle_timeout: u64,
        #[command(flatten)]
        join: JoinArg,
    },
    /// Manage apps.
    Apps {
        #[command(subcommand)]
        cmd: AppsCmd,
    },
    /// Manage API tokens (admin).
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// Manage an app's secrets (environment variables kept encrypted; a
    /// release runs with the secrets of when it was made).
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Build a commit into a release and roll it out.
    Deploy {
        app: String,
        /// Branch, tag or commit (default: the tracked branch's tip).
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// Wait for the rollout's end; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Promote: an active canary to its next step (--full: past the last),
    /// else the release waiting before an environment with
    /// promote = "manual" (e.g. staging → production).
    Promote {
        app: String,
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Dry run: each step of moving to a release (default: the newest one
    /// not live) — instances started and stopped per node, traffic, time.
    Plan {
        app: String,
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Hold the active rollout where it is.
    Pause {
        app: String,
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Let a paused rollout go on.
    Resume {
        app: String,
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Stop the active rollout and go back to the release it started from.
    Abort {
        app: String,
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Roll back to the previous live release (or --to rN).
    Rollback {
        app: String,
        #[arg(long)]
        to: Option<String>,
        /// Environment (default: the last one, e.g. production).
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Watch an app's rollout live: progress bars, the traffic split and
    /// each release's request rate, error rate and p99. Ends with the
    /// rollout (exit 0 only if it succeeded) unless --follow.
    Watch {
        app: String,
        /// Environment (default: the last one, e.g. production).
        #[arg(long)]
        env: Option<String>,
        /// Keep watching across rollouts until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Show an app's live release, rollout, traffic and instances.
    Status {
        app: String,
        /// Environment (default: the last one, e.g. production).
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List an app's releases.
    Releases {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List an app's pipeline runs with their steps and durations.
    Runs {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Cancel a queued, running or waiting pipeline run (its running
    /// command is killed; a rollout it started goes on).
    Cancel {
        run: i64,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List nodes.
    Nodes {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Show the recent output of an app's instances (or one), or a build log.
    Logs {
        app: String,
        /// One instance (ids as in `drover status`).
        #[arg(long)]
        instance: Option<String>,
        /// Lines per instance.
        #[arg(long, default_value_t = 50)]
        lines: usize,
        /// The build log of the newest release (or of --release rN).
        #[arg(long)]
        build: bool,
        /// The log of a pipeline run (see `drover runs APP`).
        #[arg(long)]
        run: Option<i64>,
        /// With --run: keep printing until the run ends.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        release: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Show an app's webhook deliveries (`[[notify]]`), newest first.
    Notifications {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Show recent events.
    Events {
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
}

#[derive(Subcommand)]
enum AppsCmd {
    /// Register the app whose drover.toml is at the root of REPO (path or URL).
    Add {
        repo: String,
        #[arg(long)]
        branch: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List apps.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a token; prints it once, on stdout.
    Create {
        /// Who or what it is for, e.g. ci.
        #[arg(long)]
        name: String,
        /// admin, deployer, viewer, or node (agents and proxies).
        #[arg(long)]
        role: String,
        /// It stops working after this long, e.g. 30d or 12h.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[command(flatten)]
        s: ServerArg,
    },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Set a secret; its value is read from stdin (never an argument, which
    /// other users could see in the process list), e.g.
    /// `drover secrets set web DATABASE_URL < db-url.txt`.
    Set {
        app: String,
        name: String,
        /// The environment (required when the app has environments).
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
    /// List an app's secrets: names and when they were set, never values.
    List {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: ServerArg,
    },
    /// Remove a secret (releases made afterwards run without it).
    Unset {
        app: String,
        name: String,
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        s: ServerArg,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    drover_core::duration::parse_duration_ms(s).map(std::time::Duration::from_millis)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must look like key=value"))?;
    if !drover_core::valid_label(k) || !drover_core::valid_label(v) {
        return Err(format!(
            "label {s:?}: keys and values are 1-63 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} must look like 20000-29999"))?;
    let a: u16 = a.parse().map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b.parse().map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a port range"));
    }
    Ok((a, b))
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,pingora=warn,pingora_core=warn,pingora_proxy=warn,sqlx=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Cancels the token on SIGINT or SIGTERM.
async fn stop_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    token.cancel();
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(f) = e.downcast_ref::<Fail>() {
                if !f.message.is_empty() {
                    eprintln!("error: {}", f.message);
                }
                return ExitCode::from(f.code);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up {
            data_dir,
            nodes,
            demo,
            api_addr,
            proxy_addr,
            poll_interval,
        } => {
            init_logs();
            up::run(up::UpArgs {
                data_dir,
                nodes,
                demo,
                api_addr,
                proxy_addr,
                poll_interval,
            })
        }
        Cmd::Server {
            addr,
            data_dir,
            poll_interval,
            keep_releases,
            secrets_key_file,
            header_timeout,
            body_timeout,
            agent_addr,
            dns_addr,
            agent_cert_ttl,
            tls_cert,
            tls_key,
            database,
            name,
            advertise,
        } => {
            init_logs();
            runtime().block_on(async {
                let token = tokio_util::sync::CancellationToken::new();
                tokio::spawn(stop_signal(token.clone()));
                drover_server::run(
                    drover_server::ServerConfig {
                        addr,
                        agent_addr: agent_addr.unwrap_or_else(|| {
                            std::net::SocketAddr::new(addr.ip(), addr.port().wrapping_add(1))
                        }),
                        dns_addr,
                        agent_cert_ttl,
                        tls: tls_cert.zip(tls_key),
                        data_dir,
                        poll_interval,
                        keep_releases,
                        secrets_key_file,
                        timeouts: drover_server::serve::Timeouts {
                            header: header_timeout,
                            body: body_timeout,
                        },
                        database,
                        name,
                        advertise,
                    },
                    token,
                )
                .await
            })
        }
        Cmd::Agent {
            s,
            name,
            data_dir,
            labels,
            advertise_host,
            ports,
            metrics_addr,
            join,
        } => {
            init_logs();
            let mut cfg = drover_agent::AgentConfig::new(s.server, name, data_dir);
            cfg.token = Some(join.token()?);
            cfg.metrics_addr = metrics_addr;
            cfg.labels = labels.into_iter().collect::<BTreeMap<_, _>>();
            cfg.advertise_host = advertise_host;
            cfg.port_range = ports;
            runtime().block_on(async {
                let token = tokio_util::sync::CancellationToken::new();
                tokio::spawn(stop_signal(token.clone()));
                drover_agent::run(cfg, token).await
            })
        }
        Cmd::Proxy {
            s,
            listen,
            name,
            threads,
            grace,
            labels,
            metrics_addr,
            tls_cert,
            tls_key,
            engine,
            tunnel_idle_timeout,
            join,
        } => {
            let token = Some(join.token()?);
            init_logs();
            drover_proxy::run(drover_proxy::ProxyConfig {
                tls: tls_cert.zip(tls_key),
                listen,
                server: s.server,
                name,
                threads,
                grace_period_secs: grace,
                labels: labels.into_iter().collect(),
                token,
                metrics_addr,
                engine,
                tunnel_idle_timeout: std::time::Duration::from_secs(tunnel_idle_timeout),
            })
        }
        Cmd::Tokens {
            cmd:
                TokensCmd::Create {
                    name,
                    role,
                    expires,
                    s,
                },
        } => {
            let t: drover_api::TokenCreated = s.client().post(
                "/v1/tokens",
                &drover_api::TokenCreateRequest {
                    name,
                    role,
                    expires_in: expires,
                },
            )?;
            eprintln!(
                "created token {} ({}, role {}); it is shown only now:",
                t.info.id,
                output::escape_terminal(&t.info.name),
                t.info.role
            );
            println!("{}", t.token);
            Ok(())
        }
        Cmd::Secrets {
            cmd: SecretsCmd::Set { app, name, env, s },
        } => {
            use std::io::Read;
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).map_err(|e| {
                crate::client::fail(2, format!("cannot read the secret's value from stdin: {e}"))
            })?;
            // One trailing newline (from echo or a file) is not part of it.
            if value.ends_with('\n') {
                value.pop();
                if value.ends_with('\r') {
                    value.pop();
                }
            }
            let r: drover_api::SecretInfo = s.client().post(
                &format!("/v1/apps/{app}/secrets"),
                &drover_api::SecretSetRequest {
                    name,
                    env: env.unwrap_or_default(),
                    value,
                },
            )?;
            println!(
                "secret {} set for {app}{}; releases made from now on run with it (drover deploy {app})",
                r.name,
                if r.env.is_empty() { String::new() } else { format!(" in {}", r.env) }
            );
            Ok(())
        }
        Cmd::Secrets {
            cmd: SecretsCmd::List { app, json, s },
        } => {
            let list: Vec<drover_api::SecretInfo> =
                s.client().get(&format!("/v1/apps/{app}/secrets"))?;
            output::secrets(&list, json)
        }
        Cmd::Secrets {
            cmd: SecretsCmd::Unset { app, name, env, s },
        } => {
            let r: drover_api::SecretInfo = s.client().post(
                &format!("/v1/apps/{app}/secrets/unset"),
                &drover_api::SecretUnsetRequest {
                    name,
                    env: env.unwrap_or_default(),
                },
            )?;
            println!(
                "secret {} removed from {app}{}; releases made from now on run without it",
                r.name,
                if r.env.is_empty() {
                    String::new()
                } else {
                    format!(" in {}", r.env)
                }
            );
            Ok(())
        }
        Cmd::Tokens {
            cmd: TokensCmd::List { json, s },
        } => {
            let t: Vec<drover_api::TokenInfo> = s.client().get("/v1/tokens")?;
            output::tokens(&t, json)
        }
        Cmd::Tokens {
            cmd: TokensCmd::Revoke { id, s },
        } => {
            let t: drover_api::TokenInfo = s
                .client()
                .post(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}))?;
            println!(
                "revoked token {} ({})",
                t.id,
                output::escape_terminal(&t.name)
            );
            Ok(())
        }
        Cmd::Apps {
            cmd: AppsCmd::Add { repo, branch, s },
        } => {
            let repo = absolutize(&repo);
            let c = s.client();
            let app: drover_api::AppInfo =
                c.post("/v1/apps", &drover_api::AddAppRequest { repo, branch })?;
            println!(
                "added app {} (host {}, branch {}); deploy it with: drover deploy {}",
                app.name, app.host, app.branch, app.name
            );
            println!(
                "new commits on {} deploy automatically (polling, or a push webhook)",
                app.branch
            );
            if let Some(secret) = app.webhook_secret {
                println!(
                    "push webhook: POST {}/v1/hooks/{} signed with HMAC-SHA256 secret {secret}",
                    s.server.trim_end_matches('/'),
                    app.name
                );
                println!("(the secret is shown only now)");
            }
            Ok(())
        }
        Cmd::Apps {
            cmd: AppsCmd::List { json, s },
        } => {
            let apps: Vec<drover_api::AppInfo> = s.client().get("/v1/apps")?;
            output::apps(&apps, json)
        }
        Cmd::Deploy {
            app,
            git_ref,
            wait,
            s,
        } => {
            let c = s.client();
            eprintln!(
                "building {} ({})…",
                output::escape_terminal(&app),
                output::escape_terminal(git_ref.as_deref().unwrap_or("branch tip"))
            );
            let d: drover_api::DeployResponse = c.post(
                &format!("/v1/apps/{app}/deploy"),
                &drover_api::DeployRequest { git_ref },
            )?;
            eprintln!(
                "run {} built {} from commit {}; rollout {} started{}",
                d.run_id.map(|i| i.to_string()).unwrap_or_default(),
                d.release,
                &d.commit[..12.min(d.commit.len())],
                d.rollout_id,
                in_env(&d.env)
            );
            if wait {
                output::follow(&c, &app, Some(&d.env), Some(d.rollout_id))
            } else {
                Ok(())
            }
        }
        Cmd::Promote { app, env, full, s } => control(
            &s,
            &app,
            "promote",
            drover_api::ControlRequest { env, full },
        ),
        Cmd::Plan {
            app,
            env,
            to,
            json,
            s,
        } => {
            let mut q = Vec::new();
            for (k, v) in [("env", env), ("to", to)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", output::query_safe(&v)));
                }
            }
            let path = format!("/v1/apps/{app}/plan?{}", q.join("&"));
            let p: drover_api::PlanInfo = s.client().get(&path)?;
            output::plan(&p, json)
        }
        Cmd::Pause { app, env, s } => control(
            &s,
            &app,
            "pause",
            drover_api::ControlRequest { env, full: false },
        ),
        Cmd::Resume { app, env, s } => control(
            &s,
            &app,
            "resume",
            drover_api::ControlRequest { env, full: false },
        ),
        Cmd::Abort { app, env, s } => control(
            &s,
            &app,
            "abort",
            drover_api::ControlRequest { env, full: false },
        ),
        Cmd::Rollback {
            app,
            to,
            env,
            wait,
            s,
        } => {
            let c = s.client();
            let d: drover_api::DeployResponse = c.post(
                &format!("/v1/apps/{app}/rollback"),
                &drover_api::RollbackRequest { to, env },
            )?;
            if d.reverts {
                eprintln!(
                    "rolling {app} back to {}{}: rollout {} reverts in place",
                    d.release,
                    in_env(&d.env),
                    d.rollout_id
                );
            } else {
                eprintln!(
                    "rolling {app} back to {}{}; rollout {} started",
                    d.release,
                    in_env(&d.env),
                    d.rollout_id
                );
            }
            if wait {
                // Reverting the rollout in progress succeeds as `rolled_back`.
                let done = if d.reverts {
                    "rolled_back"
                } else {
                    "succeeded"
                };
                output::follow_until(&c, &app, Some(&d.env), Some(d.rollout_id), done)
            } else {
                Ok(())
            }
        }
        Cmd::Status { app, env, json, s } => {
            let st: drover_api::AppStatus =
                s.client().get(&output::status_path(&app, env.as_deref()))?;
            output::status(&st, json)
        }
        Cmd::Releases { app, json, s } => {
            let r: Vec<drover_api::ReleaseInfo> =
                s.client().get(&format!("/v1/apps/{app}/releases"))?;
            output::releases(&r, json)
        }
        Cmd::Runs { app, json, s } => {
            let r: Vec<drover_api::RunInfo> = s.client().get(&format!("/v1/apps/{app}/runs"))?;
            output::runs(&r, json)
        }
        Cmd::Cancel { run, s } => {
            let r: drover_api::RunInfo = s
                .client()
                .post(&format!("/v1/runs/{run}/cancel"), &serde_json::json!({}))?;
            eprintln!("run {} of {}: {}", r.id, r.app, r.state);
            Ok(())
        }
        Cmd::Nodes { json, s } => {
            let n: Vec<drover_api::NodeInfo> = s.client().get("/v1/nodes")?;
            output::nodes(&n, json)
        }
        Cmd::Logs {
            app,
            run: Some(id),
            follow,
            s,
            ..
        } => output::run_log(&s.client(), &app, id, follow),
        Cmd::Logs {
            app,
            instance,
            lines,
            build,
            release,
            s,
            ..
        } => {
            let mut path = format!("/v1/apps/{app}/logs?lines={lines}");
            if build {
                path.push_str("&build=true");
            }
            if let Some(r) = release {
                path.push_str(&format!("&release={r}"));
            }
            if let Some(i) = instance {
                path.push_str(&format!("&instance={i}"));
            }
            print!("{}", output::escape_terminal(&s.client().get_text(&path)?));
            Ok(())
        }
        Cmd::Watch {
            app,
            env,
            follow,
            s,
        } => crate::watch::run(&s.client(), &app, env.as_deref(), !follow),
        Cmd::Notifications { app, json, s } => {
            let d: Vec<drover_api::DeliveryInfo> =
                s.client().get(&format!("/v1/apps/{app}/deliveries"))?;
            output::deliveries(&d, json)
        }
        Cmd::Events { app, json, s } => {
            let path = match app {
                Some(a) => format!("/v1/events?app={a}"),
                None => "/v1/events".to_string(),
            };
            let ev: Vec<drover_api::EventInfo> = s.client().get(&path)?;
            output::events(&ev, json)
        }
    }
}

/// A local path becomes absolute (the server may run elsewhere on this machine).
fn absolutize(repo: &str) -> String {
    let p = std::path::Path::new(repo);
    if !repo.contains("://") && p.exists() {
        if let Ok(abs) = std::fs::canonicalize(p) {
            return abs.to_string_lossy().into_owned();
        }
    }
    repo.to_string()
}

fn control(
    s: &ServerArg,
    app: &str,
    verb: &str,
    req: drover_api::ControlRequest,
) -> anyhow::Result<()> {
    let r: drover_api::ControlResponse =
        s.client().post(&format!("/v1/apps/{app}/{verb}"), &req)?;
    eprintln!("{}{}", r.message, in_env(&r.env));
    Ok(())
}
