//! Test helpers: a tiny HTTP/1.1 server on a tokio TcpListener, bounded
//! waiting, assignment builders and a supervisor factory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_agent::artifacts::{release_dir, ArtifactStore};
use drover_agent::client::ControlClient;
use drover_agent::supervisor::{Supervisor, SupervisorConfig};
use drover_api::{ArtifactRef, Assignment, DesiredState, HealthSpec, InstanceReport, RunSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "drover_agent=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Resp {
            status,
            body: body.into(),
        }
    }
    pub fn json<T: serde::Serialize>(v: &T) -> Self {
        Resp::new(200, serde_json::to_vec(v).unwrap())
    }
}

pub type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

/// A running test server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on 127.0.0.1:`port` (0 = any).
pub async fn serve(port: u16, handler: Handler) -> TestServer {
    serve_with(port, handler, None).await
}

/// Serves `handler` over TLS with [`CA`]'s certificate for
/// `server.drover`, as the server's agent port does (client certificates
/// are asked for but not required: this stands in for the server's side).
pub async fn serve_tls(port: u16, handler: Handler) -> TestServer {
    serve_with(port, handler, Some(CA.acceptor())).await
}

async fn serve_with(
    port: u16,
    handler: Handler,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> TestServer {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (h, tls) = (handler.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => {
                        let _ = handle(stream, h).await;
                    }
                    Some(tls) => {
                        if let Ok(s) = tls.accept(stream).await {
                            let _ = handle(s, h).await;
                        }
                    }
                }
            });
        }
    });
    TestServer { addr, task }
}

/// A CA standing in for the server's: a certificate for `server.drover`,
/// certificates for nodes' CSRs, and whole identities.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

pub static CA: std::sync::LazyLock<TestCa> = std::sync::LazyLock::new(|| {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_pem = p.self_signed(&key).unwrap().pem();
    TestCa {
        issuer: rcgen::Issuer::new(p, key),
        ca_pem,
    }
});

impl TestCa {
    /// A certificate (PEM) for the public key of `csr_pem`, for `node`.
    pub fn sign_csr(&self, node: &str, csr_pem: &str) -> String {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, node);
        p.signed_by(&csr.public_key, &self.issuer).unwrap().pem()
    }

    /// A whole identity for `node`, the agent port being `agent_port`.
    pub fn identity(&self, node: &str, agent_port: u16) -> drover_agent::client::NodeIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, node);
        drover_agent::client::NodeIdentity {
            node: node.to_string(),
            cert_pem: p.signed_by(&key, &self.issuer).unwrap().pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.ca_pem.clone(),
            agent_port,
            issued_at_ms: 0,
            not_after_ms: u64::MAX / 2,
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["server.drover".to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }
}

async fn handle<S>(mut stream: S, handler: Handler) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let resp = handler(&Req {
        method,
        path,
        query,
        body,
    });
    let head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        resp.status,
        resp.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&resp.body).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `secs`.
pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const FAKE_SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub fn assignment(instance: &str, command: &str) -> Assignment {
    Assignment {
        instance: instance.to_string(),
        app: "hello".to_string(),
        release: "r1".to_string(),
        artifact: ArtifactRef {
            sha256: FAKE_SHA.to_string(),
            size: 1,
            path: format!("/v1/artifacts/{FAKE_SHA}"),
        },
        image: None,
        image_ref: None,
        registry_auth: None,
        run: RunSpec {
            command: command.to_string(),
            env: BTreeMap::new(),
            stop_timeout_ms: 2000,
            memory_bytes: None,
            cpus: None,
        },
        health: HealthSpec {
            path: "/healthz".to_string(),
            interval_ms: 50,
            timeout_ms: 500,
            healthy_after: 2,
            unhealthy_after: 2,
        },
        desired: DesiredState::Run,
    }
}

/// Creates the release dir of `a` so no download is needed.
pub fn prepare_release(data_dir: &Path, a: &Assignment) -> PathBuf {
    let dir = release_dir(data_dir, &a.app, &a.release, &a.artifact.sha256);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A supervisor whose artifact server is `server` (default: nothing
/// listening), ports from `range`.
pub fn supervisor(data_dir: &Path, range: (u16, u16), server: Option<&str>) -> Supervisor {
    // The artifact server stands in for the agent port (TLS, see serve_tls).
    let client = ControlClient::new("http://127.0.0.1:9", None).unwrap();
    let client = match server {
        Some(url) => {
            let port = url.rsplit(':').next().unwrap().parse().unwrap();
            client
                .with_identity(CA.identity("test-node", port))
                .unwrap()
        }
        None => client,
    };
    let store = ArtifactStore::new(data_dir.to_path_buf(), client)
        .with_retry_delays(vec![Duration::from_millis(50), Duration::from_millis(50)]);
    Supervisor::start(
        SupervisorConfig::new(data_dir.to_path_buf(), "127.0.0.1".to_string(), range),
        Arc::new(store),
    )
    .unwrap()
}

pub fn report(sup: &Supervisor, id: &str) -> Option<InstanceReport> {
    sup.reports().into_iter().find(|r| r.instance == id)
}

/// Kills a whole process group (test cleanup).
pub fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

pub fn pid_exists(pid: u32) -> bool {
    drover_agent::process::start_time(pid).is_some()
}
