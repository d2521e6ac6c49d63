//! HTTP/1.1 behaviour of the h1 engine, through the real proxy process:
//! bodies (chunked both ways, large, streamed), framing attacks refused,
//! header limits, bodiless responses, upgrades, upstream keep-alive and its
//! retry rules, and the graceful stop. The backend and the client here
//! speak raw HTTP/1.1 over 127.0.0.1 sockets, so every byte on the wire is
//! the test's own choice.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use drover_api::{Route, RoutesResponse, Upstream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const HOST: &str = "h1.localhost";

// ------------------------------------------------------------- wire bits ----

/// Reads until `buf` holds a complete head; returns its length.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 16384];
        let n = r.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, want: usize) -> bool {
    while buf.len() < want {
        let mut chunk = [0u8; 65536];
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A parsed head: first line and lowercased header names.
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> Head {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap().to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Head { line, headers }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }
}

/// Reads a body framed by `head` from `r` (bytes already in `buf` first);
/// returns it and leaves what follows in `buf`.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    head: &Head,
    bodiless: bool,
) -> Vec<u8> {
    if bodiless {
        return Vec::new();
    }
    if head
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(fill(r, buf, buf.len() + 1).await, "chunked body cut short");
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            buf.drain(..line_end + 2);
            if size == 0 {
                // No trailers in these tests: the final CRLF.
                assert!(fill(r, buf, 2).await);
                assert_eq!(&buf[..2], b"\r\n");
                buf.drain(..2);
                return body;
            }
            assert!(fill(r, buf, size + 2).await, "chunk cut short");
            body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n");
            buf.drain(..size + 2);
        }
    }
    match head.get("content-length") {
        Some(n) => {
            let n: usize = n.parse().unwrap();
            assert!(fill(r, buf, n).await, "body cut short");
            buf.drain(..n).collect()
        }
        None if head.line.starts_with("HTTP/") => {
            // Close-delimited response.
            while fill(r, buf, buf.len() + 1).await {}
            std::mem::take(buf)
        }
        None => Vec::new(),
    }
}

// --------------------------------------------------------------- backend ----

/// A raw HTTP/1.1 instance that counts its connections and requests and
/// answers by path.
#[derive(Clone, Default)]
struct Backend {
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Serve one response per connection, then drop the connection when
    /// the next request arrives on it, without answering (a connection the
    /// instance closed while the proxy had it pooled).
    one_per_connection: Arc<AtomicBool>,
    /// `/slow` waits for this.
    release: Arc<Notify>,
    /// Notified when `/slow` has arrived.
    slow_arrived: Arc<Notify>,
}

impl Backend {
    async fn start() -> (Backend, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Backend::default();
        let b2 = b.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                b2.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(b2.clone().serve(s));
            }
        });
        (b, addr)
    }

    async fn serve(self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut served = 0;
        loop {
            let Some(n) = read_head(&mut s, &mut buf).await else {
                return;
            };
            if served > 0 && self.one_per_connection.load(Ordering::SeqCst) {
                return;
            }
            let head = Head::parse(&buf[..n]);
            buf.drain(..n);
            if head.line.starts_with("POST /too-large ") {
                // Refused on its head: the body is never read, and the
                // connection closes with it unread (the kernel resets it).
                self.requests.fetch_add(1, Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 10\r\nconnection: close\r\n\r\ntoo large\n")
                    .await;
                return;
            }
            if head.get("expect") == Some("100-continue")
                && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
            {
                return;
            }
            let body = read_body(&mut s, &mut buf, &head, false).await;
            self.requests.fetch_add(1, Ordering::SeqCst);
            served += 1;
            let mut parts = head.line.split(' ');
            let method = parts.next().unwrap().to_string();
            let path = parts.next().unwrap().to_string();
            let reply: Vec<u8> = match path.as_str() {
                "/echo" => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-got-te: {}\r\nx-got-cl: {}\r\n\r\n",
                        body.len(),
                        head.get("transfer-encoding").unwrap_or("-"),
                        head.get("content-length").unwrap_or("-"),
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    r
                }
                "/headers" => {
                    let text: String = head
                        .headers
                        .iter()
                        .map(|(n, v)| format!("{n}: {v}\n"))
                        .collect();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: x-app-hop\r\nx-app-hop: 1\r\nkeep-alive: timeout=5\r\nx-drover-release: forged\r\n\r\n{text}",
                        text.len()
                    )
                    .into_bytes()
                }
                "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n".to_vec(),
                "/big" => {
                    let n = 8 << 20;
                    let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").into_bytes();
                    r.extend((0..n).map(|i| (i % 251) as u8));
                    r
                }
                "/head" if method == "HEAD" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec()
                }
                "/204" => b"HTTP/1.1 204 No Content\r\nx-k: v\r\n\r\n".to_vec(),
                "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\n\r\n".to_vec(),
                "/close" => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await;
                    return;
                }
                "/upgrade" => {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: shout\r\nconnection: upgrade\r\n\r\n")
                        .await;
                    // Echo upper-cased, bytes after the head included.
                    let mut pending = std::mem::take(&mut buf);
                    loop {
                        if !pending.is_empty() {
                            let up: Vec<u8> = pending.to_ascii_uppercase();
                            if s.write_all(&up).await.is_err() {
                                return;
                            }
                            pending.clear();
                        }
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&chunk[..n]),
                        }
                    }
                }
                "/slow" => {
                    self.slow_arrived.notify_one();
                    self.release.notified().await;
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow".to_vec()
                }
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            };
            if s.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}

fn routes(addr: SocketAddr) -> RoutesResponse {
    RoutesResponse {
        index: 1,
        routes: vec![Route {
            app: "h1".into(),
            env: String::new(),
            host: HOST.into(),
            upstreams: vec![Upstream {
                instance: "h1-1".into(),
                release: "r1".into(),
                address: addr.to_string(),
                weight: 1,
            }],
            split: None,
        }],
    }
}

async fn start(name: &str) -> (Backend, Harness) {
    let (b, addr) = Backend::start().await;
    let h = Harness::start("h1", name, routes(addr)).await;
    (b, h)
}

// ---------------------------------------------------------------- client ----

/// One client connection to the proxy.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

struct Response {
    head: Head,
    body: Vec<u8>,
}

impl Response {
    fn status(&self) -> u16 {
        self.head.line.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

impl Client {
    async fn connect(h: &Harness) -> Client {
        Client {
            s: TcpStream::connect(h.listen).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).await.unwrap();
    }

    /// Reads one response (of a HEAD request when `head_request`).
    async fn response(&mut self, head_request: bool) -> Response {
        let n = tokio::time::timeout(
            Duration::from_secs(20),
            read_head(&mut self.s, &mut self.buf),
        )
        .await
        .expect("no response within 20 s")
        .expect("connection closed before a response");
        let head = Head::parse(&self.buf[..n]);
        self.buf.drain(..n);
        let status: u16 = head.line.split(' ').nth(1).unwrap().parse().unwrap();
        let bodiless = head_request || status == 204 || status == 304 || status < 200;
        let body = read_body(&mut self.s, &mut self.buf, &head, bodiless).await;
        Response { head, body }
    }

    async fn request(&mut self, raw: &str) -> Response {
        self.send(raw.as_bytes()).await;
        self.response(raw.starts_with("HEAD ")).await
    }

    /// True once the proxy has closed this connection.
    /// `GET /upgrade` with `Upgrade: shout`, answered 101.
    async fn upgrade(&mut self) -> Response {
        let r = self
            .request(&format!(
                "GET /upgrade HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n"
            ))
            .await;
        assert_eq!(r.status(), 101);
        r
    }

    /// Over an upgraded connection: sends `word`, expects it upper-cased
    /// back; false if the connection closed first.
    async fn shout(&mut self, word: &str) -> bool {
        self.send(word.as_bytes()).await;
        if !fill(&mut self.s, &mut self.buf, word.len()).await {
            return false;
        }
        let got: Vec<u8> = self.buf.drain(..word.len()).collect();
        assert_eq!(got, word.to_ascii_uppercase().as_bytes());
        true
    }

    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(20), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
}

// ----------------------------------------------------------------- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_reach_the_instance_chunked() {
    let (_b, h) = start("chunked-req").await;
    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, b"hello, world");
    assert_eq!(r.head.get("x-got-te"), Some("chunked"));
    // The connection goes on.
    let r = c.request(&get("/")).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"ok"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_pass_through_and_http10_clients_get_them_unchunked() {
    let (_b, h) = start("chunked-resp").await;
    let mut c = Client::connect(&h).await;
    let r = c.request(&get("/chunked")).await;
    assert_eq!(r.head.get("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, b"wikipedia");
    assert_eq!(r.head.get("x-drover-instance"), Some("h1-1"));

    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!(
            "GET /chunked HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n"
        ))
        .await;
    assert_eq!(r.head.get("transfer-encoding"), None);
    assert_eq!(r.head.get("connection"), Some("close"));
    assert_eq!(r.body, b"wikipedia");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let (_b, h) = start("large").await;
    let mut c = Client::connect(&h).await;
    let r = c.request(&get("/big")).await;
    assert_eq!(r.body.len(), 8 << 20);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 251) as u8));

    // 16 MiB up, sent while the proxy forwards it.
    let n = 16usize << 20;
    let body: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
    c.send(
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
    )
    .await;
    let (mut rd, mut wr) = c.s.split();
    let mut buf = std::mem::take(&mut c.buf);
    let (_, r) = tokio::join!(
        async {
            wr.write_all(&body).await.unwrap();
        },
        async {
            let n = read_head(&mut rd, &mut buf).await.unwrap();
            let head = Head::parse(&buf[..n]);
            buf.drain(..n);
            let got = read_body(&mut rd, &mut buf, &head, false).await;
            (head, got)
        }
    );
    assert_eq!(r.0.get("x-got-cl"), Some(n.to_string().as_str()));
    assert!(r.1 == body, "echoed body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_with_400() {
    let (b, h) = start("smuggling").await;
    for raw in [
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ] {
        let mut c = Client::connect(&h).await;
        let r = c.request(&raw).await;
        assert_eq!(r.status(), 400, "{raw:?}");
        assert_eq!(r.head.get("connection"), Some("close"));
        assert!(c.closed().await, "connection kept after {raw:?}");
    }
    // The invalid chunk framing reached no app as a request of its own.
    assert!(b.requests.load(Ordering::SeqCst) <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let (b, h) = start("big-head").await;
    let mut c = Client::connect(&h).await;
    let big = "a".repeat(70 * 1024);
    c.send(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 431);
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    // Below the limit is fine.
    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!(
            "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(30 * 1024)
        ))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_responses_have_no_body_and_keep_the_connection() {
    let (_b, h) = start("bodiless").await;
    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!("HEAD /head HTTP/1.1\r\nHost: {HOST}\r\n\r\n"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.get("content-length"), Some("5"));
    let r = c.request(&get("/204")).await;
    assert_eq!((r.status(), r.head.get("x-k")), (204, Some("v")));
    let r = c.request(&get("/304")).await;
    assert_eq!((r.status(), r.head.get("etag")), (304, Some("\"e\"")));
    // Nothing stray in between: the next response parses.
    let r = c.request(&get("/")).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"ok"[..]));
    // A drover answer to HEAD has no body either.
    let r = c
        .request("HEAD / HTTP/1.1\r\nHost: nowhere.localhost\r\n\r\n")
        .await;
    assert_eq!(r.status(), 404);
    let r = c.request(&get("/")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let (_b, h) = start("hop").await;
    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!(
            "GET /headers HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive, X-Client-Hop\r\nX-Client-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 10.1.1.1\r\nX-End: 1\r\n\r\n"
        ))
        .await;
    let seen = String::from_utf8(r.body.clone()).unwrap();
    for gone in [
        "x-client-hop",
        "keep-alive",
        "te:",
        "proxy-connection",
        "connection",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the app: {seen}");
    }
    assert!(seen.contains("x-end: 1"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 10.1.1.1, 127.0.0.1"),
        "{seen}"
    );
    // And on the way back.
    assert_eq!(r.head.get("x-app-hop"), None);
    assert_eq!(r.head.get("keep-alive"), None);
    assert_eq!(r.head.get("x-drover-release"), Some("r1"));
    assert_eq!(r.head.count("x-drover-release"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_close_the_connection_only_when_the_client_asked() {
    let (_b, h) = start("own-answers").await;
    // Keep-alive: a 404 and then a proxied request on the same connection.
    let mut c = Client::connect(&h).await;
    let r = c
        .request("GET / HTTP/1.1\r\nHost: nowhere.localhost\r\n\r\n")
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.body, b"drover: no route for host nowhere.localhost\n");
    assert_eq!(c.request(&get("/")).await.status(), 200);
    // `Connection: close`, and HTTP/1.0 without keep-alive: closed after it.
    for raw in [
        "GET / HTTP/1.1\r\nHost: nowhere.localhost\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: nowhere.localhost\r\n\r\n",
    ] {
        let mut c = Client::connect(&h).await;
        let r = c.request(raw).await;
        assert_eq!(r.status(), 404, "{raw:?}");
        assert!(c.closed().await, "connection kept after {raw:?}");
    }
    // A head whose lines end with a bare LF is a request too.
    let mut c = Client::connect(&h).await;
    let r = c
        .request(&format!(
            "GET / HTTP/1.1\nHost: {HOST}\nConnection: close\n\n"
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_responses_end_the_client_connection() {
    let (_b, h) = start("close-delimited").await;
    let mut c = Client::connect(&h).await;
    let r = c.request(&get("/close")).await;
    assert_eq!(r.head.get("connection"), Some("close"));
    assert_eq!(r.body, b"until close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_becomes_a_two_way_byte_stream() {
    let (_b, h) = start("upgrade").await;
    let mut c = Client::connect(&h).await;
    let r = c.upgrade().await;
    assert_eq!(r.head.get("upgrade"), Some("shout"));
    for word in ["hello", "again"] {
        assert!(c.shout(word).await, "the tunnel closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_closed_after_the_tunnel_idle_timeout() {
    let (_b, addr) = Backend::start().await;
    let h = Harness::start_with(
        "h1",
        "tunnel-idle",
        routes(addr),
        &["--tunnel-idle-timeout", "2"],
    )
    .await;
    let mut c = Client::connect(&h).await;
    c.upgrade().await;
    // Busy for twice the timeout, a word every half second: stays open.
    for i in 0..8 {
        assert!(
            c.shout(&format!("w{i}")).await,
            "closed while busy after {i} words"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Quiet: the proxy closes it, about two seconds after the last byte.
    let quiet = std::time::Instant::now();
    assert!(c.closed().await, "an idle tunnel stayed open");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(1000),
        "closed after {after:?}, before the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (b, h) = start("reuse").await;
    let mut c = Client::connect(&h).await;
    for _ in 0..20 {
        let r = c.request(&get("/")).await;
        assert_eq!(r.status(), 200);
    }
    // Pipelined: three requests in one write, answered in order.
    c.send(format!("{}{}{}", get("/chunked"), get("/"), get("/204")).as_bytes())
        .await;
    assert_eq!(c.response(false).await.body, b"wikipedia");
    assert_eq!(c.response(false).await.body, b"ok");
    assert_eq!(c.response(false).await.status(), 204);
    assert_eq!(b.requests.load(Ordering::SeqCst), 23);
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_on_a_stale_pooled_connection_is_retried() {
    let (b, h) = start("stale-get").await;
    b.one_per_connection.store(true, Ordering::SeqCst);
    let mut c = Client::connect(&h).await;
    for i in 0..5 {
        let r = c.request(&get("/")).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 5);
    assert!(b.connections.load(Ordering::SeqCst) >= 5);
    h.cp.wait_report("5 requests without errors", |r| {
        r.stats
            .iter()
            .any(|s| s.release == "r1" && s.requests == 5 && s.errors == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_a_body_is_not_retried_on_a_stale_connection() {
    let (b, h) = start("stale-post").await;
    let mut c = Client::connect(&h).await;
    assert_eq!(c.request(&get("/")).await.status(), 200);
    b.one_per_connection.store(true, Ordering::SeqCst);
    let r = c
        .request(&format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\r\nbody"
        ))
        .await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        1,
        "the POST was sent twice"
    );
    h.cp.wait_report("the failed POST counted as an error", |r| {
        r.stats
            .iter()
            .any(|s| s.release == "r1" && s.requests == 2 && s.errors == 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_cleanly() {
    let (b, addr) = Backend::start().await;
    let mut h = Harness::start_with("h1", "graceful", routes(addr), &["--grace", "30"]).await;
    // An idle keep-alive connection, and a request in flight.
    let mut idle = Client::connect(&h).await;
    assert_eq!(idle.request(&get("/")).await.status(), 200);
    let mut busy = Client::connect(&h).await;
    busy.send(get("/slow").as_bytes()).await;
    b.slow_arrived.notified().await;

    h.proxy.terminate();
    // The idle connection is closed, and new connections are refused.
    assert!(idle.closed().await, "idle keep-alive connection left open");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(h.listen).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight completes, told that the connection ends.
    b.release.notify_one();
    let r = busy.response(false).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"slow"[..]));
    assert_eq!(r.head.get("connection"), Some("close"));
    let status = h.proxy.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_on_the_listener_with_a_given_certificate() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("drover-h1-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("tls.pem"), dir.join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let (_b, addr) = Backend::start().await;
    let h = Harness::start_with(
        "h1",
        "tls",
        routes(addr),
        &[
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(h.listen).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let mut buf = Vec::new();
    // Two requests on one TLS connection.
    for path in ["/", "/chunked"] {
        tls.write_all(get(path).as_bytes()).await.unwrap();
        let n = read_head(&mut tls, &mut buf).await.expect("a response");
        let head = Head::parse(&buf[..n]);
        buf.drain(..n);
        let body = read_body(&mut tls, &mut buf, &head, false).await;
        assert!(head.line.starts_with("HTTP/1.1 200"), "{}", head.line);
        assert_eq!(head.get("x-drover-instance"), Some("h1-1"));
        assert!(body == b"ok" || body == b"wikipedia", "{body:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_waits_for_the_instance_before_the_body() {
    let (_b, h) = start("expect").await;
    let mut c = Client::connect(&h).await;
    c.send(
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .as_bytes(),
    )
    .await;
    // The body is sent only after the instance's 100, passed on.
    let interim = c.response(false).await;
    assert_eq!(interim.status(), 100);
    c.send(b"body").await;
    let r = c.response(false).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"body"[..]));
    let r = c.request(&get("/")).await;
    assert_eq!(r.status(), 200);
}

/// Sends `head` and then a body of `len` bytes to the proxy, the whole body
/// before reading anything (as many clients do), and reads the answer.
async fn post_all_then_read(h: &Harness, head: &str, len: usize) -> Response {
    let mut c = Client::connect(h).await;
    c.send(head.as_bytes()).await;
    let body = vec![b'x'; len];
    tokio::time::timeout(Duration::from_secs(20), c.s.write_all(&body))
        .await
        .expect("the body was not taken within 20 s")
        .expect("the proxy reset the connection while the body was sent");
    let r = c.response(false).await;
    assert!(c.closed().await, "the connection stays open after {head:?}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_before_reading_the_body_is_heard() {
    let (b, h) = start("early-answer").await;
    let len = 16 << 20;
    let r = post_all_then_read(
        &h,
        &format!("POST /too-large HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n"),
        len,
    )
    .await;
    assert_eq!(
        (r.status(), r.body.as_slice()),
        (413, &b"too large\n"[..]),
        "the instance's answer, not a 502"
    );
    assert_eq!(r.head.get("connection"), Some("close"));
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
    // Chunked, too.
    let r = post_all_then_read(
        &h,
        &format!("POST /too-large HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n1000000\r\n"),
        len,
    )
    .await;
    assert_eq!(r.status(), 413);
    // The proxy goes on serving.
    assert_eq!(
        Client::connect(&h).await.request(&get("/")).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answer_to_a_request_with_a_body_is_not_lost_to_a_reset() {
    let (b, h) = start("own-answer-body").await;
    let len = 16 << 20;
    let r = post_all_then_read(
        &h,
        &format!("POST /echo HTTP/1.1\r\nHost: nowhere.localhost\r\nContent-Length: {len}\r\n\r\n"),
        len,
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.body, b"drover: no route for host nowhere.localhost\n");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// Reads until the proxy closes `c`, writing `line` once a second (when
/// given) meanwhile; how long that took. At most 30 s.
async fn time_to_close(c: &mut Client, line: Option<&[u8]>) -> Duration {
    let t = std::time::Instant::now();
    let mut b = [0u8; 64];
    while t.elapsed() < Duration::from_secs(30) {
        match tokio::time::timeout(Duration::from_secs(1), c.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
            Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&b[..n])),
            Err(_) => {
                if let Some(line) = line {
                    if c.s.write_all(line).await.is_err() {
                        return t.elapsed();
                    }
                }
            }
        }
    }
    panic!("the connection was still open after 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_cut_off_by_the_header_timeout() {
    let (_b, h) = start("header-timeout").await;
    // A client that connects and says nothing.
    let silent = async {
        let mut c = Client::connect(&h).await;
        time_to_close(&mut c, None).await
    };
    // A keep-alive client whose second request head comes a line a second
    // (slowloris): the header timeout (10 s) counts from the head's first
    // bytes, not the keep-alive timeout (60 s), and the trickle does not
    // extend it.
    let slow = async {
        let mut c = Client::connect(&h).await;
        assert_eq!(c.request(&get("/")).await.status(), 200);
        c.send(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())
            .await;
        time_to_close(&mut c, Some(b"x-slow: 1\r\n")).await
    };
    let (silent, slow) = tokio::join!(silent, slow);
    eprintln!("silent closed after {silent:?}, slow after {slow:?}");
    for took in [silent, slow] {
        assert!(
            took >= Duration::from_secs(9) && took <= Duration::from_secs(16),
            "closed after {took:?}, not by the 10 s header timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_answers_gets_a_504_after_the_io_timeout() {
    // An instance that takes the request and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let h = Harness::start("h1", "hung", routes(addr)).await;
    let mut c = Client::connect(&h).await;
    let t = std::time::Instant::now();
    c.send(get("/").as_bytes()).await;
    let n = tokio::time::timeout(Duration::from_secs(90), read_head(&mut c.s, &mut c.buf))
        .await
        .expect("no answer within 90 s")
        .expect("closed without an answer");
    let took = t.elapsed();
    let head = Head::parse(&c.buf[..n]);
    assert!(head.line.starts_with("HTTP/1.1 504 "), "{}", head.line);
    assert!(
        took >= Duration::from_secs(59) && took <= Duration::from_secs(70),
        "answered after {took:?}, not by the 60 s I/O timeout"
    );
}
