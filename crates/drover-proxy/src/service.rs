//! The request path: drover's [`ProxyHttp`] implementation for pingora.
//!
//! Per request: [`ProxyHttp::new_ctx`] takes a strong reference to the
//! current routing table and the request keeps it until `logging` (so the
//! table's index counts as live while the request is in flight — drain
//! tracking), `request_filter` resolves the host to a route, confines the
//! request to one group of the route's upstreams when the route has a split
//! (see [`crate::split`]; all upstreams otherwise) and answers 404/503 itself
//! when there is nothing to proxy to, `upstream_peer` picks an untried
//! upstream of that group from the *same* table, the retry hooks decide
//! whether another attempt (in the same group) is safe, the header filters add
//! `x-forwarded-for` upstream and `x-drover-release`/`x-drover-instance` (and
//! a split's `Set-Cookie`, when the proxy drew a key for the client)
//! downstream, and `logging` records the request in its release's counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, ProxyWarnLogContext, Session};

use crate::state::ProxyState;
use crate::table::{normalize_host, Group, RouteEntry, Table, UpstreamEntry, MAX_TRIES};

/// Timeout for establishing a TCP connection to an instance.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout for each read from / write to an instance.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle pooled upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// drover's proxy logic, one per process.
pub struct DroverProxy {
    state: Arc<ProxyState>,
}

impl DroverProxy {
    pub fn new(state: Arc<ProxyState>) -> Self {
        DroverProxy { state }
    }
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    /// The routing table this request was admitted under; held until the
    /// request ends (taken in `logging`).
    table: Option<Arc<Table>>,
    /// Normalised host of the request.
    host: String,
    /// The request's route, as an index into `table.routes`.
    route: Option<usize>,
    /// The route's upstreams this request may use: its split group, or all.
    group: Group,
    /// A `Set-Cookie` value for the response: the split key the proxy drew
    /// for a client that had none.
    set_cookie: Option<String>,
    /// Indices (into the route's upstreams) already attempted.
    tried: Vec<usize>,
    /// The upstream of the latest attempt.
    chosen: Option<usize>,
}

impl RequestCtx {
    fn route(&self) -> Option<&RouteEntry> {
        self.table.as_ref()?.routes.get(self.route?)
    }

    fn chosen_upstream(&self) -> Option<&UpstreamEntry> {
        let i = self.chosen?;
        self.route()?.upstreams.get(i)
    }

    /// Attempts made so far.
    fn tries(&self) -> usize {
        self.tried.len()
    }
}

/// The request's host: the Host header, else the URI authority (HTTP/2).
fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    normalize_host(&raw)
}

/// Answers the request with a short plain-text body.
async fn respond_text(session: &mut Session, status: u16, body: String) -> Result<()> {
    let head_only = session.req_header().method == "HEAD";
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for DroverProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            table: Some(self.state.tables.load()),
            host: String::new(),
            route: None,
            group: Group::All,
            set_cookie: None,
            tried: Vec::with_capacity(1),
            chosen: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.host = request_host(session.req_header());
        let Some(table) = &ctx.table else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "request has no table",
            ));
        };
        let admitted = table.admit(
            &ctx.host,
            &session.req_header().headers,
            &mut rand::random::<u64>,
        );
        match admitted {
            Ok(a) => {
                ctx.route = Some(a.route);
                ctx.group = a.group;
                ctx.set_cookie = a.set_cookie;
                Ok(false)
            }
            Err((status, body)) => {
                respond_text(session, status, body).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.route().ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "request has no route (table gone?)",
            )
        })?;
        let i = route
            .select(ctx.group, &ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no selectable upstream"))?;
        let upstream = &route.upstreams[i];
        let mut peer = HttpPeer::new(upstream.socket_addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT * 2);
        peer.options.read_timeout = Some(IO_TIMEOUT);
        peer.options.write_timeout = Some(IO_TIMEOUT);
        peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
        ctx.tried.push(i);
        ctx.chosen = Some(i);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the instance, so any method may go elsewhere.
        let another = ctx
            .route()
            .is_some_and(|r| r.has_untried(ctx.group, &ctx.tried));
        let retry = ctx.tries() < MAX_TRIES && another;
        tracing::debug!(%peer, tries = ctx.tries(), retry, "connect to upstream failed");
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // pingora's policy (idempotent method, replayable body, failure on a
        // reused connection), capped at MAX_TRIES attempts.
        if ctx.tries() >= MAX_TRIES
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        tracing::debug!(%peer, tries = ctx.tries(), retry = e.retry(), client_reused, "upstream failed mid-request");
        e
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        // A retried attempt is logged at debug by the hooks above; a dead
        // instance would otherwise cost a warning per request. Final failures
        // are still logged by pingora.
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let value = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
                _ => ip.to_string(),
            };
            upstream_request.insert_header("x-forwarded-for", value)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(u) = ctx.chosen_upstream() {
            // Values made when the table was built: a refcount, no copy.
            if let Some(v) = &u.release_header {
                upstream_response.insert_header("x-drover-release", v.clone())?;
            }
            if let Some(v) = &u.instance_header {
                upstream_response.insert_header("x-drover-instance", v.clone())?;
            }
        }
        if let Some(cookie) = ctx.set_cookie.take() {
            // Appended: the app's own cookies stay.
            upstream_response.append_header("set-cookie", cookie)?;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if let Some(u) = ctx.chosen_upstream() {
            // A client hanging up is not the release's fault; anything else is.
            let failed = e.is_some_and(|e| *e.esource() != ErrorSource::Downstream);
            u.counters
                .record(ctx.started.elapsed(), status >= 500 || failed);
        }
        tracing::trace!(
            host = ctx.host,
            status,
            tries = ctx.tries(),
            group = ?ctx.group,
            elapsed_ms = ctx.started.elapsed().as_millis() as u64,
            "request done"
        );
        // The request is over: release its table (drain tracking).
        ctx.table = None;
    }
}
