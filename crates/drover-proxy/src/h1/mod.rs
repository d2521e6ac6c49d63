//! The h1 engine: drover's own HTTP/1.1 forwarding path, an alternative to
//! pingora selected with `ProxyConfig::engine` (`--engine h1`).
//!
//! Threading is nginx's worker model: `threads` OS threads, each a tokio
//! current-thread runtime with its own `SO_REUSEPORT` listener on the
//! proxy's address (the kernel spreads new connections over them); a
//! connection stays on the thread that accepted it, and each thread keeps
//! its own keep-alive pool of upstream connections ([`pool`]), so nothing on
//! the request path takes a lock or crosses threads. The request path
//! ([`conn`]) parses each head once into the connection's buffer
//! (`httparse`), streams bodies ([`codec`]), and allocates per request only
//! what the routing logic it shares with pingora's path needs (the
//! normalised host, a split's cookie).
//!
//! The process's main thread waits for signals: SIGTERM stops accepting,
//! closes idle keep-alive connections, lets in-flight requests finish (their
//! responses say `Connection: close`) for up to `grace_period_secs`, then
//! [`run`] returns; SIGINT returns at once.

pub mod codec;
pub mod conn;
pub mod pool;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::service::POOL_IDLE_TIMEOUT;
use crate::state::ProxyState;
use crate::ProxyConfig;
use conn::{Worker, HEADER_TIMEOUT};
use pool::Pool;

/// Open client connections across all workers, for the graceful stop.
#[derive(Default)]
struct Active(AtomicUsize);

/// Counts one connection while it lives.
struct ActiveGuard(Arc<Active>);

impl ActiveGuard {
    fn new(active: &Arc<Active>) -> ActiveGuard {
        active.0.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds one `SO_REUSEPORT` listener on `addr`.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The TLS acceptor for a certificate chain and key (PEM files).
fn tls_acceptor(cert: &str, key: &str) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the certificate chain --tls-cert {cert}"))?;
    anyhow::ensure!(!certs.is_empty(), "--tls-cert {cert} holds no certificate");
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the private key --tls-key {key}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a usable TLS configuration")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `config.listen` with the h1 engine until SIGTERM (graceful) or
/// SIGINT (fast). The control loop is already running and feeds `state`.
pub fn run(config: &ProxyConfig, state: Arc<ProxyState>) -> anyhow::Result<()> {
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let mut addr = config
        .listen
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --listen {}", config.listen))?
        .next()
        .with_context(|| format!("--listen {} resolves to no address", config.listen))?;
    let threads = config.threads.max(1);
    let mut listeners = Vec::with_capacity(threads);
    for _ in 0..threads {
        let l = bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        // With port 0, every thread's listener shares the first one's port.
        addr = l.local_addr()?;
        listeners.push(l);
    }
    let shutdown = CancellationToken::new();
    let active = Arc::new(Active::default());
    for (i, listener) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a worker runtime")?;
        let worker = Worker {
            state: state.clone(),
            pool: Pool::default(),
            shutdown: shutdown.clone(),
            tunnel_idle: config.tunnel_idle_timeout,
        };
        let (tls, active) = (tls.clone(), active.clone());
        std::thread::Builder::new()
            .name(format!("drover-proxy-{i}"))
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, serve_listener(listener, worker, tls, active));
            })
            .context("spawning a worker thread")?;
    }
    tracing::info!(
        listen = %addr,
        threads,
        tls = tls.is_some(),
        name = config.name,
        "drover proxy (h1 engine) listening"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    let grace = Duration::from_secs(config.grace_period_secs);
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                return Ok(());
            }
            _ = term.recv() => {}
        }
        tracing::info!(
            grace_secs = grace.as_secs(),
            "SIGTERM: no longer accepting; finishing in-flight requests"
        );
        shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let open = active.0.load(Ordering::Relaxed);
            if open == 0 {
                tracing::info!("every connection closed; stopping");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(open, "grace period over; stopping with connections open");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = int.recv() => break,
            }
        }
        Ok(())
    })
}

/// One worker: accepts on its listener until shutdown, each connection a
/// local task; then keeps running the tasks still serving requests.
async fn serve_listener(
    listener: std::net::TcpListener,
    worker: Worker,
    tls: Option<TlsAcceptor>,
    active: Arc<Active>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the listener");
            return;
        }
    };
    let worker = Rc::new(worker);
    tokio::task::spawn_local({
        let worker = worker.clone();
        async move {
            let mut tick = tokio::time::interval(POOL_IDLE_TIMEOUT / 6);
            loop {
                tick.tick().await;
                worker.pool.evict_expired();
            }
        }
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = worker.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: let some close.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let guard = ActiveGuard::new(&active);
        let worker = worker.clone();
        match &tls {
            None => {
                tokio::task::spawn_local(async move {
                    conn::serve(socket, peer, &worker).await;
                    drop(guard);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::task::spawn_local(async move {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => conn::serve(stream, peer, &worker).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(guard);
                });
            }
        }
    }
    drop(listener);
    worker.pool.clear();
    // The connections still open finish on this runtime; the main thread
    // decides when the process ends.
    std::future::pending::<()>().await;
}
