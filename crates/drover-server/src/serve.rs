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
    let app = app
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            timeouts.body,
        ));
    let conns = TaskTracker::new();
    loop {
        let (io, _peer) = tokio::select! {
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
        let svc = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        conns.spawn(async move {
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
        });
    }
    conns.close();
    if tokio::time::timeout(DRAIN, conns.wait()).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN:?}; stopping anyway");
    }
}
