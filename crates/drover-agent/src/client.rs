//! HTTP client for the control plane's agent protocol: register, long-poll
//! assignments, report, and raw GETs (artifact downloads).

use std::error::Error as StdError;
use std::time::Duration;

use drover_api::{AgentReport, AssignmentsResponse, RegisterRequest, RegisterResponse};
use serde::de::DeserializeOwned;

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered 404: it does not know this node (any more), or
    /// this agent holds no certificate yet.
    #[error("server answered 404 Not Found")]
    NotFound,
    /// No answer: connection refused, reset, timed out, DNS…
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake failed: the server refused this node's
    /// certificate (expired, from another CA) or showed one this agent does
    /// not trust, or the CA it handed out did not check out.
    #[error("refused: {0}")]
    Refused(String),
    /// The server answered with a non-success status.
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    /// The answer did not parse.
    #[error("bad response from server: {0}")]
    Decode(String),
}

impl ClientError {
    /// Worth retrying: unreachable or a 5xx answer.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Status { status, .. } => *status >= 500 || *status == 429,
            ClientError::NotFound | ClientError::Decode(_) | ClientError::Refused(_) => false,
        }
    }

    /// The server does not take this node's certificate (any more).
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Refused(_)
                | ClientError::Status {
                    status: 401 | 403,
                    ..
                }
        )
    }
}

/// What an agent keeps to talk to the agent port: its key, the
/// certificate the server issued for it, the CA, and where the port is.
/// In `<data-dir>/identity.json`, mode 0600.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeIdentity {
    pub node: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub agent_port: u16,
    /// When it was received and when it expires (ms since the epoch).
    pub issued_at_ms: u64,
    pub not_after_ms: u64,
}

impl NodeIdentity {
    /// When to renew: at two thirds of its lifetime.
    pub fn renew_at_ms(&self) -> u64 {
        self.issued_at_ms + self.not_after_ms.saturating_sub(self.issued_at_ms) * 2 / 3
    }
}

/// The mutual-TLS client of an identity.
#[derive(Debug, Clone)]
struct Tls {
    /// HTTP/2 when the server offers it: the long poll, reports and logs
    /// share one connection (one file descriptor per agent on the server).
    http: reqwest::Client,
    /// HTTP/1.1 only, no idle connection kept: to tell why a connection
    /// failed. Over HTTP/2 the server's TLS alert for a refused client
    /// certificate is lost (the request only sees the connection close);
    /// over HTTP/1.1 it surfaces as the rustls error it is.
    probe: reqwest::Client,
    /// `https://server.drover:<agent port>`.
    base: String,
    identity: NodeIdentity,
}

impl Tls {
    /// The error of a failed request to the agent port: when it is not
    /// plainly a TLS failure, one HTTP/1.1 request tells whether the server
    /// refuses this node's certificate (Refused) or is not there.
    async fn why(&self, e: &reqwest::Error) -> ClientError {
        let err = transport(e);
        if err.is_refusal() {
            return err;
        }
        match self
            .probe
            .get(format!("{}/v1/agent/probe", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Err(p) if is_tls_error(&p) => transport(&p),
            _ => err,
        }
    }
}

/// A client of one control plane (of one or several servers sharing a
/// database: when the one in use does not answer, the next one is tried).
#[derive(Debug, Clone)]
pub struct ControlClient {
    /// The servers' API URLs: the first registration, with the join token.
    servers: std::sync::Arc<Vec<String>>,
    /// The one in use.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
    /// The join token: it registers the agent, nothing else.
    join: Option<String>,
    /// The agent port's client once registered (shared by clones).
    tls: std::sync::Arc<std::sync::RwLock<Option<Tls>>>,
    identity_file: Option<std::path::PathBuf>,
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ControlClient {
    /// `base` is the server's URL, e.g. `http://127.0.0.1:7070`, or
    /// several servers' URLs separated by commas (servers sharing one
    /// database: all take agents, the agent moves on when one fails).
    /// `token`: the join token, sent when registering without a certificate.
    pub fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let mut servers = Vec::new();
        for base in base.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let base = base.trim_end_matches('/').to_string();
            let url = reqwest::Url::parse(&base)
                .map_err(|e| anyhow::anyhow!("the server URL {base:?} does not parse: {e}"))?;
            anyhow::ensure!(
                url.host_str().is_some(),
                "the server URL {base:?} names no host"
            );
            servers.push(base);
        }
        anyhow::ensure!(!servers.is_empty(), "no server URL given (--server)");
        // Only for registering with the join token (rare): no connection
        // is kept open for it — with thousands of agents, the server's
        // file descriptors are for their agent-port connections.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .no_proxy()
            .tls_certs_merge(drover_api::trusted_cas().map_err(|e| anyhow::anyhow!(e))?)
            .build()?;
        Ok(ControlClient {
            servers: std::sync::Arc::new(servers),
            current: Default::default(),
            http,
            join: token.map(str::to_string),
            tls: Default::default(),
            identity_file: None,
        })
    }

    /// Keeps this node's identity in `path` (mode 0600), reading the one a
    /// previous run got (for `node`: an identity of another name is not
    /// used).
    pub fn with_identity_file(mut self, path: std::path::PathBuf, node: &str) -> Self {
        let found = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<NodeIdentity>(&b).ok());
        match found {
            Some(id) if id.node == node && id.not_after_ms > now_ms() => match self.tls_for(id) {
                Ok(tls) => *self.tls.write().expect("tls lock") = Some(tls),
                Err(e) => tracing::warn!(path = %path.display(), error = %e,
                    "cannot use this node's saved certificate; registering with the join token"),
            },
            Some(_) => tracing::info!(path = %path.display(),
                "this node's saved certificate is expired or for another name; registering with the join token"),
            None => {}
        }
        self.identity_file = Some(path);
        self
    }

    /// Talks to the agent port with `id` from now on (what registration
    /// does with the certificate it gets; for tools and tests that hold
    /// one already).
    pub fn with_identity(self, id: NodeIdentity) -> Result<Self, ClientError> {
        let tls = self.tls_for(id)?;
        *self.tls.write().expect("tls lock") = Some(tls);
        Ok(self)
    }

    /// A client of the agent port for `id`: trusts only the cluster CA, for
    /// the name `server.drover`, found at the API host's address.
    fn tls_for(&self, id: NodeIdentity) -> Result<Tls, ClientError> {
        let url =
            reqwest::Url::parse(self.base()).map_err(|e| ClientError::Decode(e.to_string()))?;
        let host = url
            .host_str()
            .unwrap_or("127.0.0.1")
            .trim_matches(['[', ']'])
            .to_string();
        let bad = |what: &str, e: reqwest::Error| ClientError::Refused(format!("{what}: {e}"));
        let ca = reqwest::Certificate::from_pem(id.ca_pem.as_bytes())
            .map_err(|e| bad("the CA is not a certificate", e))?;
        let me = reqwest::Identity::from_pem(format!("{}{}", id.cert_pem, id.key_pem).as_bytes())
            .map_err(|e| bad("this node's certificate or key does not load", e))?;
        let build = |http1: bool| {
            let b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .no_proxy()
                .tls_certs_only([ca.clone()])
                .identity(me.clone())
                .dns_resolver(ServerHost(host.clone()));
            let b = if http1 {
                b.http1_only().pool_max_idle_per_host(0)
            } else {
                b
            };
            b.build().map_err(|e| bad("cannot build the TLS client", e))
        };
        Ok(Tls {
            http: build(false)?,
            probe: build(true)?,
            base: format!("https://{SERVER_NAME}:{}", id.agent_port),
            identity: id,
        })
    }

    fn tls(&self) -> Option<Tls> {
        self.tls.read().expect("tls lock").clone()
    }

    /// This node's identity, once registered.
    pub fn identity(&self) -> Option<NodeIdentity> {
        self.tls().map(|t| t.identity)
    }

    fn set_tls(&self, tls: Option<Tls>) {
        if let Some(path) = &self.identity_file {
            let res = match &tls {
                Some(t) => crate::state::write_private(
                    path,
                    &serde_json::to_vec_pretty(&t.identity).expect("identity serializes"),
                ),
                None => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            if let Err(e) = res {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot keep this node's certificate; a restarted agent will need the join token again");
            }
        }
        *self.tls.write().expect("tls lock") = tls;
    }

    /// The base URL (API port) of the server in use, without a trailing
    /// slash.
    pub fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.servers[i % self.servers.len()]
    }

    /// `base` + `path` (path starts with `/`).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{}", self.base(), path)
        } else {
            format!("{}/{}", self.base(), path)
        }
    }

    /// The server in use did not answer: the next one is used from now on
    /// (with several). Returns the error, for the caller to pass on.
    fn fail_over(&self, err: ClientError) -> ClientError {
        if self.servers.len() < 2 || !matches!(err, ClientError::Unreachable(_)) {
            return err;
        }
        let failed = self.base().to_string();
        self.current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(failed = %failed, next = %self.base(), error = %err,
            "the server does not answer; trying the next one");
        if let Some(tls) = self.tls() {
            match self.tls_for(tls.identity) {
                Ok(tls) => *self.tls.write().expect("tls lock") = Some(tls),
                Err(e) => tracing::warn!(error = %e, "cannot reach the next server's agent port"),
            }
        }
        err
    }

    /// `POST /v1/agent/register`.
    ///
    /// With this node's certificate, on the agent port. When the server
    /// no longer takes it (revoked, expired, another CA, a new database),
    /// or there is none: on the API port with the join token and a new key's
    /// CSR; the certificate in the answer is kept for every later call.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        if self.tls().is_some() {
            match self
                .tls_post::<_, RegisterResponse>("/v1/agent/register", req)
                .await
            {
                Ok(resp) => {
                    self.note_port(resp.agent_port);
                    return Ok(resp);
                }
                Err(e) if e.is_refusal() => {
                    tracing::warn!(node = %req.node, error = %e,
                        "the control plane refused this node's certificate; registering with the join token");
                    self.set_tls(None);
                }
                Err(e) => return Err(e),
            }
        }
        let (key, csr) = new_key_and_csr(&req.node)?;
        let req = RegisterRequest {
            csr: Some(csr),
            ..req.clone()
        };
        let mut rb = self
            .http
            .post(self.url("/v1/agent/register"))
            .timeout(Duration::from_secs(10))
            .json(&req);
        if let Some(t) = &self.join {
            rb = rb.bearer_auth(t);
        }
        let resp: RegisterResponse =
            decode(rb.send().await.map_err(|e| self.fail_over(transport(&e)))?).await?;
        if let Some(join) = &self.join {
            // The CA comes from someone who knows the join token.
            let want = drover_api::ca_mac(join, &resp.ca);
            if resp.ca_mac.as_deref() != Some(want.as_str()) {
                return Err(ClientError::Refused(
                    "the CA in the server's answer is not vouched for by the join token \
                     (a different server, or someone in between); check --server and the join token"
                        .into(),
                ));
            }
        }
        self.adopt(&req.node, key, &resp).await?;
        Ok(resp)
    }

    /// A new certificate for this node (a new key), asked for over the
    /// agent port with the one it has; kept for every later call.
    pub async fn renew(&self, req: &RegisterRequest) -> Result<NodeIdentity, ClientError> {
        let (key, csr) = new_key_and_csr(&req.node)?;
        let req = RegisterRequest {
            csr: Some(csr),
            ..req.clone()
        };
        let resp: RegisterResponse = self.tls_post("/v1/agent/register", &req).await?;
        self.adopt(&req.node, key, &resp).await
    }

    async fn adopt(
        &self,
        node: &str,
        key_pem: String,
        resp: &RegisterResponse,
    ) -> Result<NodeIdentity, ClientError> {
        let (Some(cert), Some(not_after)) = (&resp.cert, resp.cert_not_after_ms) else {
            return Err(ClientError::Decode(
                "the server sent no certificate for this node".into(),
            ));
        };
        let id = NodeIdentity {
            node: node.to_string(),
            key_pem,
            cert_pem: cert.clone(),
            ca_pem: resp.ca.clone(),
            agent_port: resp.agent_port,
            issued_at_ms: now_ms(),
            not_after_ms: not_after,
        };
        let tls = self.tls_for(id.clone())?;
        self.set_tls(Some(tls));
        Ok(id)
    }

    /// The agent port moved (the server was started with another one).
    fn note_port(&self, port: u16) {
        let Some(t) = self.tls() else { return };
        if t.identity.agent_port != port {
            let id = NodeIdentity {
                agent_port: port,
                ..t.identity
            };
            if let Ok(tls) = self.tls_for(id) {
                self.set_tls(Some(tls));
            }
        }
    }

    /// Sends a request to the agent port. Without a certificate, or when
    /// the server stopped taking it, NotFound: the caller registers again.
    async fn tls_send(
        &self,
        build: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let Some(tls) = self.tls() else {
            return Err(ClientError::NotFound);
        };
        let res = match build(&tls.http, &tls.base).send().await {
            Ok(r) => check_status(r).await,
            Err(e) => Err(self.fail_over(tls.why(&e).await)),
        };
        match res {
            Err(e) if e.is_refusal() => {
                tracing::warn!(error = %e, "the control plane refused this node's certificate");
                Err(ClientError::NotFound)
            }
            other => other,
        }
    }

    async fn tls_post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let Some(tls) = self.tls() else {
            return Err(ClientError::NotFound);
        };
        let resp = tls
            .http
            .post(format!("{}{path}", tls.base))
            .timeout(Duration::from_secs(10))
            .json(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Err(self.fail_over(tls.why(&e).await)),
        };
        decode(resp).await
    }

    /// `GET /v1/agent/assignments?node=N&index=I&wait_ms=W` (blocking query).
    pub async fn assignments(
        &self,
        node: &str,
        index: u64,
        wait_ms: u64,
    ) -> Result<AssignmentsResponse, ClientError> {
        let path = format!(
            "/v1/agent/assignments?node={}&index={index}&wait_ms={wait_ms}",
            drover_api::encode_query(node)
        );
        let resp = self
            .tls_send(|http, base| {
                http.get(format!("{base}{path}"))
                    .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15))
            })
            .await?;
        decode(resp).await
    }

    /// `POST /v1/agent/report` (also the heartbeat). The answer is the
    /// pace the server asks for (None from a server that sends none).
    pub async fn report(
        &self,
        report: &AgentReport,
    ) -> Result<Option<drover_api::ReportResponse>, ClientError> {
        let resp = self
            .tls_send(|http, base| {
                http.post(format!("{base}/v1/agent/report"))
                    .timeout(Duration::from_secs(10))
                    .json(report)
            })
            .await?;
        Ok(resp.json().await.ok())
    }

    /// `POST /v1/agent/logs`: new output of one instance.
    pub async fn ship_logs(&self, chunk: &drover_api::LogChunk) -> Result<(), ClientError> {
        self.tls_send(|http, base| {
            http.post(format!("{base}/v1/agent/logs"))
                .timeout(Duration::from_secs(10))
                .json(chunk)
        })
        .await
        .map(|_| ())
    }

    /// A GET of `path` on the agent port, status checked (artifacts).
    /// No overall timeout: the caller bounds reads itself.
    pub async fn get(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.tls_send(|http, base| http.get(format!("{base}{path}")))
            .await
    }
}

/// The name the server's certificate on the agent port is for.
pub const SERVER_NAME: &str = "server.drover";

/// Resolves [`SERVER_NAME`] to the API host's addresses, at each connect
/// (so a server whose address changes is found again).
struct ServerHost(String);

impl reqwest::dns::Resolve for ServerHost {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = self.0.clone();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![std::net::SocketAddr::new(ip, 0)],
                Err(_) => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A new key (ECDSA P-256) and a CSR for it, both PEM.
fn new_key_and_csr(node: &str) -> Result<(String, String), ClientError> {
    let fail = |e: rcgen::Error| ClientError::Decode(format!("cannot make a key and CSR: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    let csr = params
        .serialize_request(&key)
        .map_err(fail)?
        .pem()
        .map_err(fail)?;
    Ok((key.serialize_pem(), csr))
}

async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(ClientError::NotFound);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(ClientError::Status {
        status: status.as_u16(),
        body: snippet(&body, 200),
    })
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let resp = check_status(resp).await?;
    let bytes = resp.bytes().await.map_err(|e| unreachable(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

fn unreachable(e: &reqwest::Error) -> ClientError {
    ClientError::Unreachable(describe_error(e))
}

/// A transport error: Refused when TLS failed, otherwise Unreachable.
fn transport(e: &reqwest::Error) -> ClientError {
    if is_tls_error(e) {
        ClientError::Refused(describe_error(e))
    } else {
        unreachable(e)
    }
}

/// Whether a rustls error is somewhere in the error's sources (also inside
/// an I/O error, as TLS streams report them).
pub fn is_tls_error(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // An I/O error's `source` skips the error it wraps: step into it.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    false
}

/// A short description of a transport error: "connection refused",
/// "timed out", or the error's source chain.
pub fn describe_error(e: &reqwest::Error) -> String {
    if is_connection_refused(e) {
        return "connection refused".to_string();
    }
    if e.is_timeout() {
        return "timed out".to_string();
    }
    error_chain(e)
}

/// Whether an I/O `ConnectionRefused` is somewhere in the error's sources.
pub fn is_connection_refused(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// `error: source: source…`, without repeating identical messages.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// First `max` characters of `s` on one line, control characters dropped,
/// whitespace runs collapsed.
pub fn snippet(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut last_space = false;
    for c in s.trim().chars() {
        if out.chars().count() >= max {
            out.push('…');
            break;
        }
        if c.is_whitespace() {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
        } else if !c.is_control() {
            out.push(c);
            last_space = false;
        }
    }
    out
}
