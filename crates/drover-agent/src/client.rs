//! HTTP client for the control plane's agent protocol: register, long-poll
//! assignments, report, and raw GETs (artifact downloads).

use std::error::Error as StdError;
use std::time::Duration;

use drover_api::{AgentReport, AssignmentsResponse, RegisterRequest, RegisterResponse};
use serde::de::DeserializeOwned;

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered 404: it does not know this node (any more).
    #[error("server answered 404 Not Found")]
    NotFound,
    /// No answer: connection refused, reset, timed out, DNS…
    #[error("server unreachable: {0}")]
    Unreachable(String),
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
            ClientError::NotFound | ClientError::Decode(_) => false,
        }
    }
}

/// A client of one control plane.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base: String,
    http: reqwest::Client,
    /// The join token: it registers the agent, nothing else.
    join: Option<String>,
    /// This node's own credential, issued at its first registration and
    /// kept in `cred_file`: every other call carries it (shared by clones).
    cred: std::sync::Arc<std::sync::RwLock<Option<String>>>,
    cred_file: Option<std::path::PathBuf>,
}

impl ControlClient {
    /// `base` is the server's URL, e.g. `http://127.0.0.1:7070`.
    /// `token`: the join token, sent as a bearer token with every request.
    pub fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()?;
        Ok(ControlClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            join: token.map(str::to_string),
            cred: Default::default(),
            cred_file: None,
        })
    }

    /// Keeps this node's credential in `path` (mode 0600), reading the one
    /// a previous run got.
    pub fn with_credential_file(mut self, path: std::path::PathBuf) -> Self {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let t = text.trim().to_string();
            if !t.is_empty() {
                *self.cred.write().expect("cred lock") = Some(t);
            }
        }
        self.cred_file = Some(path);
        self
    }

    fn credential(&self) -> Option<String> {
        self.cred.read().expect("cred lock").clone()
    }

    fn set_credential(&self, token: Option<String>) {
        if let Some(path) = &self.cred_file {
            let res = match &token {
                Some(t) => crate::state::write_private(path, format!("{t}\n").as_bytes()),
                None => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            if let Err(e) = res {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot keep this node's credential; a restarted agent will need the join token again");
            }
        }
        *self.cred.write().expect("cred lock") = token;
    }

    /// The request with this node's credential, or the join token before
    /// there is one.
    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.credential().or_else(|| self.join.clone()) {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// The server's base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `base` + `path` (path starts with `/`).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{}", self.base, path)
        } else {
            format!("{}/{}", self.base, path)
        }
    }

    /// `POST /v1/agent/register`.
    /// With this node's credential if it has one; when the server no
    /// longer knows it (401: revoked, or a new database), with the join
    /// token. A credential in the answer is kept for every later call.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        let send = |token: Option<String>| {
            let rb = self
                .http
                .post(self.url("/v1/agent/register"))
                .timeout(Duration::from_secs(10))
                .json(req);
            let rb = match token {
                Some(t) => rb.bearer_auth(t),
                None => rb,
            };
            async move { rb.send().await.map_err(|e| unreachable(&e)) }
        };
        let mut res: Result<RegisterResponse, ClientError> =
            decode(send(self.credential().or_else(|| self.join.clone())).await?).await;
        if matches!(res, Err(ClientError::Status { status: 401, .. }))
            && self.credential().is_some()
        {
            tracing::warn!(node = %req.node,
                "the control plane refused this node's credential; registering with the join token");
            self.set_credential(None);
            res = decode(send(self.join.clone()).await?).await;
        }
        let resp = res?;
        if let Some(t) = &resp.node_token {
            self.set_credential(Some(t.clone()));
        }
        Ok(resp)
    }

    /// `GET /v1/agent/assignments?node=N&index=I&wait_ms=W` (blocking query).
    pub async fn assignments(
        &self,
        node: &str,
        index: u64,
        wait_ms: u64,
    ) -> Result<AssignmentsResponse, ClientError> {
        let resp = self
            .authed(self.http.get(self.url(&format!(
                "/v1/agent/assignments?node={}&index={index}&wait_ms={wait_ms}",
                drover_api::encode_query(node)
            ))))
            .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        decode(resp).await
    }

    /// `POST /v1/agent/report` (also the heartbeat).
    pub async fn report(&self, report: &AgentReport) -> Result<(), ClientError> {
        let resp = self
            .authed(self.http.post(self.url("/v1/agent/report")))
            .timeout(Duration::from_secs(10))
            .json(report)
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        check_status(resp).await.map(|_| ())
    }

    /// `POST /v1/agent/logs`: new output of one instance.
    pub async fn ship_logs(&self, chunk: &drover_api::LogChunk) -> Result<(), ClientError> {
        let resp = self
            .authed(self.http.post(self.url("/v1/agent/logs")))
            .timeout(Duration::from_secs(10))
            .json(chunk)
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        check_status(resp).await.map(|_| ())
    }

    /// A plain GET of `path` on the server, status checked (artifacts).
    /// No overall timeout: the caller bounds reads itself.
    pub async fn get(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let resp = self
            .authed(self.http.get(self.url(path)))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        check_status(resp).await
    }
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
