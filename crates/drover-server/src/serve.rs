//! The HTTP listener: axum's router on hyper, with the timeouts axum's own
//! `serve` leaves out (SCENARIOS 18). A client gets `header_timeout` to send
//! a request's headers — a slowloris connection is closed, and so is a
//! keep-alive connection idle that long — and `body_timeout` between the
//! pieces of a body (a stalled body fails the request). Long polls and
//! event streams are unaffected: they send no body and wait on the answer.
//! Bodies are capped at [`MAX_BODY`] (less on some routes): a request that
//! declares more is answered 413 from its headers, before any of the body is
//! read; one that sends more without saying so is cut off at the cap.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest request body the server takes.
pub const MAX_BODY: usize = 1024 * 1024;

/// How long a shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(30),
            body: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in
/// flight finish (up to [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    serve_with(listener, app, timeouts, shutdown, None).await
}

/// Who is on the other end of a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Anyone (the API with `drover server --tls-cert`).
    Anyone,
    /// Agents: `tls` requires a client certificate, and every request of a
    /// connection carries the peer's [`crate::pki::PeerNode`] (read from
    /// its certificate) as an extension.
    Agents,
}

/// Serves `app` like [`serve`], over TLS with `tls`; a connection that
/// fails the handshake (e.g. a client certificate `tls` does not accept)
/// ends there.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    tls: std::sync::Arc<rustls::ServerConfig>,
    peers: Peers,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let agents = peers == Peers::Agents;
    serve_with(listener, app, timeouts, shutdown, Some((acceptor, agents))).await
}

/// `tls`: the acceptor, and whether the peer is an agent whose
/// certificate names its node.
async fn serve_with(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    tls: Option<(tokio_rustls::TlsAcceptor, bool)>,
) {
    let app = app
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            timeouts.body,
        ));
    let conns = TaskTracker::new();
    loop {
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (app, shutdown, tls) = (app.clone(), shutdown.clone(), tls.clone());
        conns.spawn(async move {
            let Some((tls, agents)) = tls else {
                return serve_conn(io, app, timeouts, shutdown).await;
            };
            let what = if agents { "an agent connection" } else { "a connection" };
            // The handshake is bounded like a request's headers.
            let stream = match tokio::time::timeout(timeouts.header, tls.accept(io)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused {what}: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "refused {what}: no TLS handshake within {:?}", timeouts.header);
                    return;
                }
            };
            if !agents {
                return serve_conn(stream, app, timeouts, shutdown).await;
            }
            let who = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::pki::peer_node(c));
            let Some(who) = who else {
                tracing::warn!(%peer, "refused an agent connection: its certificate names no node");
                return;
            };
            serve_conn(stream, app.layer(axum::Extension(who)), timeouts, shutdown).await
        });
    }
    conns.close();
    if tokio::time::timeout(DRAIN, conns.wait()).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN:?}; stopping anyway");
    }
}

/// One connection, HTTP/1.1 or HTTP/2, until it ends or `shutdown`.
async fn serve_conn<I>(io: I, app: Router, timeouts: Timeouts, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(app);
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    b.http2().timer(TokioTimer::new());
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
