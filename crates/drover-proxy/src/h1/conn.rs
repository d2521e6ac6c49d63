//! The h1 engine's request path: one downstream connection, request after
//! request, each proxied to an instance over a pooled connection.
//!
//! Per request, in order (the same behaviour as pingora's [`crate::service`]):
//! 1. read the head into the connection's buffer (idle keep-alive timeout,
//!    then a header timeout from its first byte; 431 above [`MAX_HEAD`]);
//! 2. [`admit`]: parse it once with `httparse`, take the request's strong
//!    reference to the current routing table (kept until the request is
//!    completely done: drain tracking), route by Host, decide the split,
//!    and write the upstream request head (hop-by-hop headers dropped,
//!    `x-forwarded-for` appended, framing headers of our own) — or answer
//!    404/503/400 itself;
//! 3. attempts: pick an untried upstream of the request's group, take an
//!    idle pooled connection or connect; a failed connect goes to another
//!    untried upstream (any method); a pooled connection that fails before
//!    any response byte is retried only for an idempotent request whose
//!    body has not been streamed; at most [`MAX_TRIES`] attempts;
//! 4. stream the body (Content-Length or chunked, never buffered whole;
//!    `Expect: 100-continue` waits briefly for the instance's answer);
//! 5. read the response head (1xx passed on), write ours (hop-by-hop
//!    dropped, `x-drover-release`/`x-drover-instance`, a split's
//!    `Set-Cookie`) and stream the body; `101 Switching Protocols` turns
//!    the connection into a two-way byte copy;
//! 6. count the request in its release's counters (5xx or an upstream
//!    failure is an error, the client hanging up is not), release the
//!    table, and pool the upstream connection when its framing allows.
//!
//! Failures become HTTP statuses in one place, [`Failure::status`].

use std::cell::Cell;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::codec::{
    connection_has, is_hop_by_hop, relay_body, request_framing, response_framing, write_all, Buf,
    ChunkedOut, Framing, RelayError, MAX_HEAD, MAX_HEADERS,
};
use super::pool::{Pool, UpstreamConn};
use crate::service::IO_TIMEOUT;
use crate::split::RequestHeaders;
use crate::state::ProxyState;
use crate::table::{normalize_host, Group, RouteEntry, Table, UpstreamEntry, MAX_TRIES};

/// A new connection must send a complete request head within this time,
/// and so must a keep-alive connection from the first byte of its next
/// request (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request with `Expect: 100-continue` waits for the instance's
/// interim (or final) answer before its body is sent anyway.
pub const EXPECT_WAIT: Duration = Duration::from_secs(1);
/// A connection closed with a request body not read to its end (an early
/// answer, the proxy's own 4xx/5xx) is first half-closed, and what the
/// client still sends is read and dropped for up to this long: closing a
/// socket with unread bytes resets the connection, and the reset can
/// destroy the answer before the client has read it (nginx's lingering
/// close does the same).
pub const LINGER_TIME: Duration = Duration::from_secs(5);

impl<'b> RequestHeaders for [httparse::Header<'b>] {
    fn find_map<'h, T>(
        &'h self,
        name: &str,
        mut f: impl FnMut(&'h [u8]) -> Option<T>,
    ) -> Option<T> {
        self.iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .find_map(|h| f(h.value))
    }
}

/// What a worker thread's connections share.
pub struct Worker {
    pub state: Arc<ProxyState>,
    /// This thread's idle upstream connections.
    pub pool: Pool,
    /// Cancelled on SIGTERM: stop accepting, close idle connections, answer
    /// in-flight requests with `Connection: close`.
    pub shutdown: CancellationToken,
    /// An upgraded connection idle this long (no bytes either way) is
    /// closed.
    pub tunnel_idle: Duration,
}

/// A downstream connection and its buffers, reused request after request.
struct Downstream<S> {
    io: S,
    /// The client's address as text, for `x-forwarded-for`.
    peer: String,
    /// The connection's one timer: the keep-alive and header timeouts,
    /// the wait for an instance's response head, an upgraded tunnel's
    /// idle timeout.
    deadline: Deadline,
    /// Received bytes: the request head, then body and pipelined requests.
    buf: Buf,
    /// Bytes to write to the client (a response head, small bodies).
    out: Vec<u8>,
    /// The upstream request head of the current request.
    uphead: Vec<u8>,
    /// The head plus the first body bytes for one upstream attempt.
    upout: Vec<u8>,
}

/// A connection's deadline. Moving it is a field write: the tokio timer
/// under it is re-armed only when it fires before the deadline (or the
/// deadline moves earlier), so a busy keep-alive connection does not arm
/// and cancel timers request after request, as per-request
/// `tokio::time::timeout`s would (each a clock read and two timer-wheel
/// updates).
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    fn set(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
        self.at = at;
    }

    /// Completes once the deadline has passed.
    async fn passed(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if self.sleep.deadline() >= self.at {
                return;
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
    }
}

/// What to do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Close, with bytes of the request (its body) perhaps still coming:
    /// half-close and drain them first ([`LINGER_TIME`]).
    Linger,
}

/// Serves HTTP/1.x on one client connection until it closes, fails, idles
/// out, or the proxy shuts down.
pub async fn serve<S>(io: S, peer: SocketAddr, worker: &Worker)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut since = Instant::now();
    let mut c = Downstream {
        io,
        peer: peer.ip().to_string(),
        deadline: Deadline::new(since + HEADER_TIMEOUT),
        buf: Buf::new(),
        out: Vec::with_capacity(1024),
        uphead: Vec::with_capacity(1024),
        upout: Vec::with_capacity(1024),
    };
    // Polled across requests, so that its place in the token's waiter list
    // is taken once per connection.
    let mut cancelled = std::pin::pin!(worker.shutdown.cancelled());
    let mut first = true;
    let mut linger = false;
    loop {
        let head_len = match wait_head(&mut c, first, since, worker, cancelled.as_mut()).await {
            Ok(n) => n,
            Err(HeadWait::Closed) => break,
            Err(HeadWait::TooLarge) => {
                let _ = respond_text(
                    &mut c,
                    431,
                    "drover: request header too large\n",
                    false,
                    true,
                )
                .await;
                linger = true;
                break;
            }
        };
        first = false;
        let (next, done) = handle(&mut c, head_len, worker).await;
        since = done;
        match next {
            Next::KeepAlive => {}
            Next::Close => break,
            Next::Linger => {
                linger = true;
                break;
            }
        }
        c.buf.shrink_if_empty();
    }
    if c.io.shutdown().await.is_ok() && linger {
        drain(&mut c).await;
    }
}

/// Reads and drops what the client still sends, until it closes or
/// [`LINGER_TIME`] is up.
async fn drain<S>(c: &mut Downstream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(LINGER_TIME, async {
        loop {
            let n = c.buf.len();
            c.buf.consume(n);
            match c.buf.read_from(&mut c.io, MAX_HEAD).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

enum HeadWait {
    /// End of stream, an error, a timeout or shutdown: close quietly.
    Closed,
    /// No complete head within [`MAX_HEAD`] bytes.
    TooLarge,
}

/// The end of the head in `buf` (just past the empty line), searching from
/// `from`. Lines end with CRLF, or a bare LF, which RFC 9112 §2.2 lets a
/// recipient accept (as nginx and HAProxy do; httparse parses both).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let nl = at + i;
        match &buf[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            _ => at = nl + 1,
        }
    }
    None
}

/// Waits until `c.buf` starts with a complete request head; its length.
/// `since`: when the connection was accepted (`first`) or its last request
/// ended, the start of the idle time.
async fn wait_head<S>(
    c: &mut Downstream<S>,
    first: bool,
    since: Instant,
    w: &Worker,
    mut cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
) -> Result<usize, HeadWait>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut scanned = 0;
    let mut header_deadline_set = false;
    loop {
        // Empty lines before a request are ignored (RFC 9112 §2.2).
        let blank = c
            .buf
            .filled()
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if blank > 0 {
            c.buf.consume(blank);
            scanned = 0;
        }
        if let Some(end) = head_end(c.buf.filled(), scanned) {
            return Ok(end);
        }
        if c.buf.len() >= MAX_HEAD {
            return Err(HeadWait::TooLarge);
        }
        scanned = c.buf.len().saturating_sub(3);
        let between = c.buf.is_empty();
        if between {
            // Between requests: wait for the next one, or give up.
            if w.shutdown.is_cancelled() {
                return Err(HeadWait::Closed);
            }
            let idle = if first {
                HEADER_TIMEOUT
            } else {
                KEEPALIVE_TIMEOUT
            };
            c.deadline.set(since + idle);
        } else if !header_deadline_set {
            // The rest of the head within the header timeout.
            header_deadline_set = true;
            c.deadline.set(Instant::now() + HEADER_TIMEOUT);
        }
        let read = tokio::select! {
            biased;
            r = c.buf.read_from(&mut c.io, MAX_HEAD) => r,
            _ = cancelled.as_mut(), if between => return Err(HeadWait::Closed),
            _ = c.deadline.passed() => return Err(HeadWait::Closed),
        };
        match read {
            Ok(0) | Err(_) => return Err(HeadWait::Closed),
            Ok(_) => {}
        }
    }
}

/// Facts about a request, owned (the parsed head borrows the buffer).
#[derive(Debug, Clone, Copy)]
struct Request {
    head_only: bool,
    idempotent: bool,
    http10: bool,
    /// The client wants the connection kept open after this request.
    keep_alive: bool,
    framing: Framing,
    /// `Connection: upgrade` with an `Upgrade` header.
    upgrade: bool,
    expect_continue: bool,
}

/// What [`admit`] decided.
enum Admit {
    /// Proxy to `route`'s `group`; the upstream head is in `uphead`.
    Proxy {
        req: Request,
        route: usize,
        group: Group,
        set_cookie: Option<String>,
    },
    /// Answer with a short text, then keep the connection or close it.
    Respond {
        status: u16,
        body: String,
        head_only: bool,
        close: bool,
    },
}

fn bad_request(message: &str) -> Admit {
    Admit::Respond {
        status: 400,
        body: format!("drover: bad request: {message}\n"),
        head_only: false,
        close: true,
    }
}

/// Parses the head, routes the request against `table`, and writes the
/// upstream request head into `uphead`.
fn admit(head: &[u8], peer: &str, table: &Table, uphead: &mut Vec<u8>) -> Admit {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut storage);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return bad_request("incomplete request head"),
        Err(httparse::Error::TooManyHeaders) => {
            return Admit::Respond {
                status: 431,
                body: "drover: too many request header fields\n".into(),
                head_only: false,
                close: true,
            }
        }
        Err(e) => return bad_request(&e.to_string()),
    }
    let (Some(method), Some(path), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return bad_request("incomplete request line");
    };
    let headers: &[httparse::Header<'_>] = parsed.headers;
    let http10 = version == 0;
    let framing = match request_framing(headers) {
        Ok(Framing::Chunked) if http10 => return bad_request("chunked body in HTTP/1.0"),
        Ok(f) => f,
        Err(e) => return bad_request(e.message()),
    };
    let has_connection = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("connection"));
    let keep_alive = if http10 {
        has_connection && connection_has(headers, "keep-alive")
    } else {
        !(has_connection && connection_has(headers, "close"))
    };
    let upgrade_value = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
        .map(|h| h.value);
    let upgrade =
        !http10 && upgrade_value.is_some() && has_connection && connection_has(headers, "upgrade");
    let expect_continue = !http10
        && headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
        });
    let head_only = method == "HEAD";
    let req = Request {
        head_only,
        // The http crate's rule (GET, HEAD, PUT, DELETE, OPTIONS, TRACE).
        idempotent: http::Method::from_bytes(method.as_bytes()).is_ok_and(|m| m.is_idempotent()),
        http10,
        keep_alive,
        framing,
        upgrade,
        expect_continue,
    };

    // Route by Host.
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let raw_host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad_request("more than one Host header"),
        (None, _) if !http10 => return bad_request("no Host header"),
        (None, _) => "",
        (Some(h), None) => match std::str::from_utf8(h.value) {
            Ok(v) => v,
            Err(_) => return bad_request("Host is not valid UTF-8"),
        },
    };
    let host = normalize_host(raw_host);
    // An early answer leaves any request body unread: close after it (and
    // when the client asked to close, or spoke HTTP/1.0 without keep-alive).
    let admitted = match table.admit(&host, headers, &mut rand::random::<u64>) {
        Ok(a) => a,
        Err((status, body)) => {
            return Admit::Respond {
                status,
                body,
                head_only,
                close: framing != Framing::None || !keep_alive,
            }
        }
    };

    // The upstream head: always HTTP/1.1, keep-alive.
    uphead.clear();
    uphead.extend_from_slice(method.as_bytes());
    uphead.push(b' ');
    uphead.extend_from_slice(path.as_bytes());
    uphead.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        if is_hop_by_hop(h.name)
            || h.name.eq_ignore_ascii_case("x-forwarded-for")
            || (has_connection && connection_has(headers, h.name))
        {
            continue;
        }
        push_header(uphead, h.name.as_bytes(), h.value);
    }
    uphead.extend_from_slice(b"x-forwarded-for: ");
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
    {
        let v = h.value.trim_ascii();
        if !v.is_empty() {
            uphead.extend_from_slice(v);
            uphead.extend_from_slice(b", ");
        }
    }
    uphead.extend_from_slice(peer.as_bytes());
    uphead.extend_from_slice(b"\r\n");
    match framing {
        Framing::Length(n) => push_header(
            uphead,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Framing::Chunked => uphead.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if let (true, Some(v)) = (upgrade, upgrade_value) {
        uphead.extend_from_slice(b"connection: upgrade\r\n");
        push_header(uphead, b"upgrade", v);
    }
    uphead.extend_from_slice(b"\r\n");
    Admit::Proxy {
        req,
        route: admitted.route,
        group: admitted.group,
        set_cookie: admitted.set_cookie,
    }
}

/// `HTTP/1.1 {status} {reason}\r\n`, without `fmt`.
fn status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Handles the request whose head is the first `head_len` bytes of `c.buf`.
/// What next, and when the request ended.
async fn handle<S>(c: &mut Downstream<S>, head_len: usize, w: &Worker) -> (Next, Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    // The request's reference to the table, held until it is done.
    let table = w.state.tables.load();
    let admitted = admit(&c.buf.filled()[..head_len], &c.peer, &table, &mut c.uphead);
    c.buf.consume(head_len);
    match admitted {
        Admit::Respond {
            status,
            body,
            head_only,
            close,
        } => {
            let close = close || w.shutdown.is_cancelled();
            let next = match respond_text(c, status, &body, head_only, close).await {
                Ok(()) if !close => Next::KeepAlive,
                // A body the request may have had is unread.
                Ok(()) => Next::Linger,
                Err(_) => Next::Close,
            };
            (next, Instant::now())
        }
        Admit::Proxy {
            req,
            route,
            group,
            set_cookie,
        } => {
            let route = &table.routes[route];
            proxy(c, req, route, group, set_cookie, w, started).await
        }
    }
}

/// The upstreams a request attempted, in order.
#[derive(Debug, Default)]
struct Tried {
    list: [usize; MAX_TRIES],
    len: usize,
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        &self.list[..self.len]
    }

    fn push(&mut self, i: usize) {
        if self.len < MAX_TRIES {
            self.list[self.len] = i;
            self.len += 1;
        }
    }
}

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    /// Connecting to the instance failed.
    Connect(io::Error),
    /// The instance failed before any byte of its response arrived.
    Early(io::Error),
    /// The instance's response head is invalid.
    BadResponse(&'static str),
    /// The instance failed after its response began (the client got part
    /// of it): the connection is closed.
    Late(io::Error),
    /// The client's body framing is invalid.
    BadBody,
    /// The client went away or stalled: not the release's fault.
    Client(io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Early(e) => write!(f, "failed before responding: {e}"),
            Failure::BadResponse(why) => write!(f, "invalid response: {why}"),
            Failure::Late(e) => write!(f, "failed in the middle of its response: {e}"),
            Failure::BadBody => f.write_str("the client sent an invalid chunked body"),
            Failure::Client(e) => write!(f, "the client failed: {e}"),
        }
    }
}

impl Failure {
    /// The status the client gets, when it can still get one.
    fn status(&self) -> Option<(u16, &'static str)> {
        let timeout = |e: &io::Error| e.kind() == io::ErrorKind::TimedOut;
        match self {
            Failure::Connect(e) | Failure::Early(e) if timeout(e) => {
                Some((504, "drover: the instance did not answer in time\n"))
            }
            Failure::Connect(_) | Failure::Early(_) | Failure::BadResponse(_) => {
                Some((502, "drover: the instance failed to answer\n"))
            }
            Failure::BadBody => Some((400, "drover: bad request: invalid chunked body\n")),
            Failure::Late(_) | Failure::Client(_) => None,
        }
    }

    /// Whether the release is to blame.
    fn upstream(&self) -> bool {
        !matches!(self, Failure::Client(_) | Failure::BadBody)
    }
}

/// How an attempt ended well.
struct Answered {
    status: u16,
    client_keep: bool,
    /// The instance answered before the request body was all sent: the
    /// rest of it is still to come from the client.
    body_unread: bool,
}

/// Proxies an admitted request: attempts, response, counters.
async fn proxy<S>(
    c: &mut Downstream<S>,
    req: Request,
    route: &RouteEntry,
    group: Group,
    set_cookie: Option<String>,
    w: &Worker,
    started: Instant,
) -> (Next, Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tried = Tried::default();
    // Set once body bytes were taken from the client: no more retries.
    let mut body_sent = false;
    let mut chosen: Option<&UpstreamEntry> = None;
    // When the request ended (the clock read once, for the counters, the
    // pool and the next keep-alive wait).
    let mut done = None;
    let result = loop {
        let Some(i) = route.select(group, tried.as_slice()) else {
            break Err(Failure::Connect(io::Error::other("no selectable upstream")));
        };
        tried.push(i);
        let up = &route.upstreams[i];
        chosen = Some(up);
        // The first attempt starts with the request; a later one, now.
        let attempt = if tried.len == 1 {
            started
        } else {
            Instant::now()
        };
        let (mut uc, reused) = match w.pool.take(up.socket_addr, attempt) {
            Some(uc) => (uc, true),
            None => match UpstreamConn::connect(up.socket_addr).await {
                Ok(uc) => (uc, false),
                Err(e) => {
                    // Nothing reached the instance: any method may go elsewhere.
                    let retry = tried.len < MAX_TRIES && route.has_untried(group, tried.as_slice());
                    tracing::debug!(upstream = %up.socket_addr, tries = tried.len, retry, error = %e, "connect to upstream failed");
                    if retry {
                        continue;
                    }
                    break Err(Failure::Connect(e));
                }
            },
        };
        // The request head goes up now (a new connection took its time).
        let sending = if reused { attempt } else { Instant::now() };
        match exchange(
            c,
            &mut uc,
            req,
            up,
            set_cookie.as_deref(),
            w,
            &mut body_sent,
            sending,
        )
        .await
        {
            Ok((answered, reusable)) => {
                let now = Instant::now();
                done = Some(now);
                if reusable {
                    w.pool.put(up.socket_addr, uc, now);
                }
                break Ok(answered);
            }
            Err(Failure::Early(e))
                if reused && req.idempotent && !body_sent && tried.len < MAX_TRIES =>
            {
                tracing::debug!(upstream = %up.socket_addr, tries = tried.len, error = %e, "pooled upstream connection failed; retrying");
                continue;
            }
            Err(f) => break Err(f),
        }
    };
    let (status, failed, next) = match result {
        Ok(a) => (
            a.status,
            false,
            if a.client_keep {
                Next::KeepAlive
            } else if a.body_unread {
                Next::Linger
            } else {
                Next::Close
            },
        ),
        Err(f) => {
            if f.upstream() {
                tracing::warn!(
                    upstream = chosen.map(|u| u.address.as_str()).unwrap_or(""),
                    tries = tried.len,
                    failure = %f,
                    "request to upstream failed"
                );
            } else {
                tracing::debug!(failure = %f, "client failed mid-request");
            }
            let mut status = 0;
            let mut next = Next::Close;
            if let Some((s, body)) = f.status() {
                status = s;
                if respond_text(c, s, body, req.head_only, true).await.is_ok()
                    && req.framing != Framing::None
                {
                    // The body may not have been read to its end.
                    next = Next::Linger;
                }
            }
            (status, f.upstream(), next)
        }
    };
    let done = done.unwrap_or_else(Instant::now);
    if let Some(u) = chosen {
        u.counters.record(done - started, status >= 500 || failed);
    }
    if next == Next::KeepAlive && w.shutdown.is_cancelled() {
        return (Next::Close, done);
    }
    (next, done)
}

/// Reads from the instance until `uc.buf` holds a complete response head,
/// by `deadline` (set by the caller); its length. A failure before any byte
/// arrived is [`Failure::Early`].
async fn read_response_head(
    uc: &mut UpstreamConn,
    deadline: &mut Deadline,
) -> Result<usize, Failure> {
    let mut scanned = 0;
    loop {
        if let Some(end) = head_end(uc.buf.filled(), scanned) {
            return Ok(end);
        }
        if uc.buf.len() >= MAX_HEAD {
            return Err(Failure::BadResponse("response head too large"));
        }
        scanned = uc.buf.len().saturating_sub(3);
        let had_bytes = !uc.buf.is_empty();
        let read = tokio::select! {
            biased;
            r = uc.buf.read_from(&mut uc.stream, MAX_HEAD) => Some(r),
            _ = deadline.passed() => None,
        };
        let e = match read {
            Some(Ok(0)) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the instance closed the connection",
            ),
            Some(Ok(_)) => continue,
            Some(Err(e)) => e,
            None => io::Error::new(
                io::ErrorKind::TimedOut,
                "no response within the I/O timeout",
            ),
        };
        return Err(if had_bytes {
            Failure::BadResponse("the response head was cut short")
        } else {
            Failure::Early(e)
        });
    }
}

/// One attempt on `uc`: the request (head and body) up, the response
/// down. Ok: the response was passed on completely; whether `uc` may be
/// pooled. `sending`: about now (the head goes up first); the response
/// head is due within [`IO_TIMEOUT`] of the request's end.
#[allow(clippy::too_many_arguments)]
async fn exchange<S>(
    c: &mut Downstream<S>,
    uc: &mut UpstreamConn,
    req: Request,
    up: &UpstreamEntry,
    set_cookie: Option<&str>,
    w: &Worker,
    body_sent: &mut bool,
    sending: Instant,
) -> Result<(Answered, bool), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    c.deadline.set(sending + IO_TIMEOUT);
    c.upout.clear();
    c.upout.extend_from_slice(&c.uphead);
    let mut early_head = None;
    let mut body_skipped = false;
    if req.framing == Framing::None {
        write_all(&mut uc.stream, &c.upout)
            .await
            .map_err(Failure::Early)?;
    } else {
        if req.expect_continue {
            write_all(&mut uc.stream, &c.upout)
                .await
                .map_err(Failure::Early)?;
            c.upout.clear();
            // Let the instance say 100 (or refuse) before the body goes.
            let waited = tokio::time::timeout(EXPECT_WAIT, read_response_head(uc, &mut c.deadline));
            if let Ok(head) = waited.await {
                let head = head?;
                let status = response_status(&uc.buf.filled()[..head]);
                if status == Some(100) {
                    uc.buf.consume(head);
                    if !req.http10 {
                        write_all(&mut c.io, b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await
                            .map_err(Failure::Client)?;
                    }
                } else {
                    early_head = Some(head);
                    body_skipped = true;
                }
            }
        }
        if !body_skipped {
            *body_sent = true;
            if let Some(head) = send_body(c, uc, req.framing).await? {
                early_head = Some(head);
                body_skipped = true;
            }
            c.deadline.set(Instant::now() + IO_TIMEOUT);
        }
    }

    // The response: 1xx passed on, then the final head.
    let (head_len, status, framing, upstream_keep, upgrade, client_keep) = loop {
        let head_len = match early_head.take() {
            Some(h) => h,
            None => read_response_head(uc, &mut c.deadline).await?,
        };
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut storage);
        match parsed.parse(&uc.buf.filled()[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(Failure::BadResponse("incomplete head")),
            Err(_) => return Err(Failure::BadResponse("invalid response head")),
        }
        let (Some(version), Some(status)) = (parsed.version, parsed.code) else {
            return Err(Failure::BadResponse("invalid status line"));
        };
        let reason = parsed.reason.unwrap_or("");
        let headers: &[httparse::Header<'_>] = parsed.headers;
        if (100..200).contains(&status) && status != 101 {
            // Interim: to an HTTP/1.1 client only.
            if !req.http10 {
                c.out.clear();
                let _ = write!(c.out, "HTTP/1.1 {status} {reason}\r\n");
                for h in headers.iter().filter(|h| !is_hop_by_hop(h.name)) {
                    push_header(&mut c.out, h.name.as_bytes(), h.value);
                }
                c.out.extend_from_slice(b"\r\n");
            }
            uc.buf.consume(head_len);
            let r = write_all(&mut c.io, &c.out).await;
            c.out.clear();
            r.map_err(Failure::Client)?;
            continue;
        }
        let upgrade = status == 101;
        if upgrade && !req.upgrade {
            return Err(Failure::BadResponse("101 without an upgrade request"));
        }
        let framing = response_framing(req.head_only, status, headers)
            .map_err(|e| Failure::BadResponse(e.message()))?;
        let has_connection = headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection"));
        let upstream_keep = !upgrade
            && !body_skipped
            && framing != Framing::Close
            && if version == 1 {
                !(has_connection && connection_has(headers, "close"))
            } else {
                has_connection && connection_has(headers, "keep-alive")
            };
        let dechunk = framing == Framing::Chunked && req.http10;
        let client_keep = req.keep_alive
            && !upgrade
            && !body_skipped
            && !dechunk
            && framing != Framing::Close
            && !w.shutdown.is_cancelled();

        let out = &mut c.out;
        out.clear();
        status_line(out, status, reason);
        let mut length_copied = false;
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                // Kept as sent for a bodiless response (HEAD, 304).
                if framing == Framing::None && !length_copied && status != 204 {
                    length_copied = true;
                    push_header(out, b"content-length", h.value);
                }
                continue;
            }
            if upgrade && name.eq_ignore_ascii_case("upgrade") {
                push_header(out, name.as_bytes(), h.value);
                continue;
            }
            if is_hop_by_hop(name)
                || (has_connection && connection_has(headers, name))
                || (up.release_header.is_some() && name.eq_ignore_ascii_case("x-drover-release"))
                || (up.instance_header.is_some() && name.eq_ignore_ascii_case("x-drover-instance"))
            {
                continue;
            }
            push_header(out, name.as_bytes(), h.value);
        }
        match framing {
            Framing::Length(n) => push_header(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            ),
            Framing::Chunked if !dechunk => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            _ => {}
        }
        if let Some(v) = &up.release_header {
            push_header(out, b"x-drover-release", v.as_bytes());
        }
        if let Some(v) = &up.instance_header {
            push_header(out, b"x-drover-instance", v.as_bytes());
        }
        if let Some(cookie) = set_cookie {
            // Appended: the app's own cookies stay.
            push_header(out, b"set-cookie", cookie.as_bytes());
        }
        if upgrade {
            out.extend_from_slice(b"connection: upgrade\r\n");
        } else if !client_keep {
            out.extend_from_slice(b"connection: close\r\n");
        } else if req.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        break (
            head_len,
            status,
            framing,
            upstream_keep,
            upgrade,
            client_keep,
        );
    };
    uc.buf.consume(head_len);

    let chunked_out = if req.http10 {
        ChunkedOut::Data
    } else {
        ChunkedOut::Raw
    };
    relay_body(
        &mut uc.stream,
        &mut uc.buf,
        &mut c.io,
        &mut c.out,
        framing,
        chunked_out,
    )
    .await
    .map_err(|e| match e {
        RelayError::Read(e) => Failure::Late(e),
        RelayError::Write(e) => Failure::Client(e),
        RelayError::Framing => Failure::Late(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid chunked response body",
        )),
    })?;

    if upgrade {
        tunnel(c, uc, w.tunnel_idle).await;
        return Ok((
            Answered {
                status,
                client_keep: false,
                body_unread: false,
            },
            false,
        ));
    }
    let reusable = upstream_keep && uc.buf.is_empty();
    Ok((
        Answered {
            status,
            client_keep,
            body_unread: body_skipped,
        },
        reusable,
    ))
}

/// Streams the request body up, while watching for an answer the instance
/// gives before it has read all of it (a 413, a 401): then the rest of the
/// body is not sent, and the answer's head length in `uc.buf` is returned.
/// An interim (1xx) head or the instance closing its side only ends the
/// watch; the body goes on, and the response is read after it as usual.
async fn send_body<S>(
    c: &mut Downstream<S>,
    uc: &mut UpstreamConn,
    framing: Framing,
) -> Result<Option<usize>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let UpstreamConn { stream, buf: ubuf } = uc;
    let (mut rd, mut wr) = stream.split();
    let relay = relay_body(
        &mut c.io,
        &mut c.buf,
        &mut wr,
        &mut c.upout,
        framing,
        ChunkedOut::Raw,
    );
    tokio::pin!(relay);
    let mut watching = true;
    let mut scanned = 0;
    loop {
        tokio::select! {
            // An answer that came in wins over a write it made fail.
            biased;
            read = ubuf.read_from(&mut rd, MAX_HEAD), if watching => {
                if !matches!(read, Ok(n) if n > 0) {
                    watching = false;
                    continue;
                }
                let Some(end) = head_end(ubuf.filled(), scanned) else {
                    scanned = ubuf.len().saturating_sub(3);
                    watching = ubuf.len() < MAX_HEAD;
                    continue;
                };
                match response_status(&ubuf.filled()[..end]) {
                    Some(s) if (100..200).contains(&s) => watching = false,
                    _ => return Ok(Some(end)),
                }
            }
            sent = &mut relay => {
                return sent.map(|_| None).map_err(|e| match e {
                    RelayError::Read(e) => Failure::Client(e),
                    RelayError::Write(e) => Failure::Early(e),
                    RelayError::Framing => Failure::BadBody,
                });
            }
        }
    }
}

/// The status code of a response head, if it parses.
fn response_status(head: &[u8]) -> Option<u16> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut storage);
    parsed.parse(head).ok()?;
    parsed.code
}

/// After `101 Switching Protocols`: bytes both ways until both sides have
/// closed, either fails, or no byte has moved for `idle`.
async fn tunnel<S>(c: &mut Downstream<S>, uc: &mut UpstreamConn, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Bytes each side sent right behind the heads go first.
    if !uc.buf.is_empty() {
        if write_all(&mut c.io, uc.buf.filled()).await.is_err() {
            return;
        }
        let n = uc.buf.len();
        uc.buf.consume(n);
    }
    if !c.buf.is_empty() {
        if write_all(&mut uc.stream, c.buf.filled()).await.is_err() {
            return;
        }
        let n = c.buf.len();
        c.buf.consume(n);
    }
    // Every read that returns bytes stamps `last`; the connection's
    // deadline is moved to `last + idle` each time it passes early.
    let last = Cell::new(Instant::now());
    let mut down = Stamped {
        io: &mut c.io,
        last: &last,
    };
    let mut up = Stamped {
        io: &mut uc.stream,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    let deadline = &mut c.deadline;
    let idled = async {
        loop {
            deadline.set(last.get() + idle);
            deadline.passed().await;
            if last.get() + idle <= Instant::now() {
                return;
            }
        }
    };
    tokio::select! {
        r = copy => if let Err(e) = r {
            tracing::debug!(error = %e, "upgraded connection ended");
        },
        () = idled => tracing::debug!(?idle, "upgraded connection idle: closed"),
    }
}

/// A stream whose reads stamp the time of the last bytes received.
struct Stamped<'a, T> {
    io: &'a mut T,
    last: &'a Cell<Instant>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.set(Instant::now());
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Answers with a short plain-text body (like pingora's path: content
/// type, length, `cache-control: no-store`; no body for HEAD).
async fn respond_text<S>(
    c: &mut Downstream<S>,
    status: u16,
    body: &str,
    head_only: bool,
    close: bool,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let out = &mut c.out;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\n",
        body.len()
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let r = write_all(&mut c.io, out).await;
    out.clear();
    r
}

#[cfg(test)]
mod tests {
    use super::super::codec::tokens;
    use super::*;

    fn tokens_of(v: &str) -> Vec<String> {
        tokens(v.as_bytes())
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect()
    }

    #[test]
    fn a_head_ends_at_its_empty_line_with_crlf_or_bare_lf() {
        let crlf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(head_end(crlf, 0), Some(crlf.len() - 4));
        let lf = b"GET / HTTP/1.1\nHost: a\n\nbody";
        assert_eq!(head_end(lf, 0), Some(lf.len() - 4));
        let mixed = b"GET / HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(head_end(mixed, 0), Some(mixed.len()));
        // Not complete yet, whatever the read split.
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r"[..],
            b"GET / HTTP/1.1\nHost: a\n",
        ] {
            assert_eq!(head_end(head, 0), None);
        }
        // Resuming 3 bytes back finds a terminator split across reads.
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(whole, whole.len() - 2 - 3), Some(whole.len()));
    }

    #[test]
    fn header_tokens_are_trimmed_and_empty_ones_dropped() {
        assert_eq!(tokens_of(" close ,, Upgrade"), ["close", "Upgrade"]);
    }

    fn admit_str(head: &str) -> (Admit, String) {
        let empty = drover_api::RoutesResponse {
            index: 1,
            routes: vec![],
        };
        let table = Table::build(&empty, &crate::stats::Stats::default());
        let mut up = Vec::new();
        let a = admit(head.as_bytes(), "10.0.0.1", &table, &mut up);
        (a, String::from_utf8(up).unwrap())
    }

    fn status_of(a: &Admit) -> u16 {
        match a {
            Admit::Respond { status, .. } => *status,
            Admit::Proxy { .. } => 0,
        }
    }

    #[test]
    fn smuggling_shapes_are_refused_before_routing() {
        for head in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        ] {
            assert_eq!(status_of(&admit_str(head).0), 400, "{head:?}");
        }
    }

    #[test]
    fn an_unknown_host_gets_404_and_keeps_the_connection() {
        let (a, _) = admit_str("GET / HTTP/1.1\r\nHost: Nowhere.Example:8080\r\n\r\n");
        match a {
            Admit::Respond {
                status,
                body,
                close,
                ..
            } => {
                assert_eq!(status, 404);
                assert_eq!(body, "drover: no route for host nowhere.example\n");
                assert!(!close);
            }
            Admit::Proxy { .. } => panic!("routed"),
        }
    }
}
