//! HTTP/1.1 framing for the h1 engine: a connection's read buffer, how a
//! message's body is delimited (RFC 9112 §6), header classification
//! (hop-by-hop), a strict incremental chunked decoder, and the body relays
//! that move bytes from one socket to the other without buffering a whole
//! body.
//!
//! Everything here is I/O-agnostic apart from the relays, which take any
//! `AsyncRead`/`AsyncWrite` and wrap every read and write in
//! [`IO_TIMEOUT`](crate::service::IO_TIMEOUT).

use std::future::Future;
use std::io;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::service::IO_TIMEOUT;

/// Largest request or response head (request line, or status line, and
/// header fields) accepted; a larger request head gets 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head; more gets 431 (requests) or 502.
pub const MAX_HEADERS: usize = 128;
/// A connection's read buffer starts this large (grown up to [`MAX_HEAD`]
/// only for a head that needs it).
pub const BUF_SIZE: usize = 16 * 1024;
/// Largest trailer section of a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// A read buffer: bytes `start..end` of `data` are received and not yet
/// consumed.
#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    pub fn new() -> Buf {
        Buf {
            data: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
        }
    }

    /// The received, unconsumed bytes.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes as consumed.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once more from `r`, growing the buffer up to `limit` bytes of
    /// unconsumed data when it is full. `Ok(0)`: end of stream, or the
    /// buffer holds `limit` bytes already.
    pub async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        limit: usize,
    ) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < limit {
                let grown = (self.data.len() * 2).min(limit);
                self.data.resize(grown, 0);
            } else {
                return Ok(0);
            }
        }
        let n = r.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Shrinks a buffer grown for a large head back to its usual size once
    /// it is empty, so an idle connection does not keep 64 KiB.
    pub fn shrink_if_empty(&mut self) {
        if self.is_empty() && self.data.len() > BUF_SIZE {
            self.data.truncate(BUF_SIZE);
            self.data.shrink_to_fit();
        }
    }
}

impl Default for Buf {
    fn default() -> Self {
        Buf::new()
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// Headers the proxy never copies from one hop to the next: hop-by-hop
/// fields (RFC 9110 §7.6.1) and the framing fields it writes itself.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The comma-separated tokens of a header value, trimmed, empty ones left
/// out.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// True when some `Connection` header of `headers` lists `token`.
pub fn connection_has(headers: &[httparse::Header<'_>], token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| tokens(h.value).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

/// Why a message's framing headers are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// Both `Transfer-Encoding` and `Content-Length`.
    LengthAndEncoding,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, or
    /// `chunked` applied twice.
    BadEncoding,
    /// An unparsable `Content-Length`, or several that disagree.
    BadLength,
}

impl FramingError {
    pub fn message(self) -> &'static str {
        match self {
            FramingError::LengthAndEncoding => "both Transfer-Encoding and Content-Length",
            FramingError::BadEncoding => "unsupported Transfer-Encoding",
            FramingError::BadLength => "invalid or conflicting Content-Length",
        }
    }
}

/// The `Content-Length` of `headers`: None when absent; an error when a
/// value is not a plain decimal number or two values differ.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, FramingError> {
    let mut found: Option<u64> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let v = h.value.trim_ascii();
        if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
            return Err(FramingError::BadLength);
        }
        let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(FramingError::BadLength);
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether `Transfer-Encoding` is present and ends in `chunked`:
/// `Ok(None)` when absent, `Ok(Some(true))` for a chunked body,
/// `Ok(Some(false))` for codings without a final `chunked`.
fn transfer_encoding(headers: &[httparse::Header<'_>]) -> Result<Option<bool>, FramingError> {
    let mut present = false;
    let mut chunked_seen = 0;
    let mut last_is_chunked = false;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        present = true;
        for t in tokens(h.value) {
            last_is_chunked = t.eq_ignore_ascii_case(b"chunked");
            if last_is_chunked {
                chunked_seen += 1;
            }
        }
    }
    if !present {
        return Ok(None);
    }
    if chunked_seen > 1 || (chunked_seen == 1 && !last_is_chunked) {
        return Err(FramingError::BadEncoding);
    }
    Ok(Some(last_is_chunked))
}

/// A request's body framing. Requests are never close-delimited: without
/// `Transfer-Encoding` or `Content-Length` there is no body. A request may
/// not carry both (a classic smuggling vector), nor a coding other than a
/// final `chunked`.
pub fn request_framing(headers: &[httparse::Header<'_>]) -> Result<Framing, FramingError> {
    let te = transfer_encoding(headers)?;
    let cl = content_length(headers)?;
    match (te, cl) {
        (Some(_), Some(_)) => Err(FramingError::LengthAndEncoding),
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err(FramingError::BadEncoding),
        (None, Some(0)) | (None, None) => Ok(Framing::None),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// A response's body framing (RFC 9112 §6.3): none for HEAD, 1xx, 204 and
/// 304; `Transfer-Encoding` wins over `Content-Length`; a coding without a
/// final `chunked`, or neither header, means "until the upstream closes".
pub fn response_framing(
    head_request: bool,
    status: u16,
    headers: &[httparse::Header<'_>],
) -> Result<Framing, FramingError> {
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    match transfer_encoding(headers) {
        Ok(Some(true)) => return Ok(Framing::Chunked),
        Ok(Some(false)) => return Ok(Framing::Close),
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    match content_length(headers)? {
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::Close),
    }
}

/// Invalid chunked framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex chunk size (`digits` of them so far).
    Size { digits: u8 },
    /// After the size: optional whitespace, then `;` extensions or CR.
    SizeTail,
    /// Inside chunk extensions, up to CR.
    Ext,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line, up to CR.
    Trailer,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// An incremental, strict decoder of a chunked body: sizes are hex (at most
/// 15 digits), lines end in CRLF, extensions are skipped, trailer fields
/// are bounded.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Data bytes left in the current chunk (or the size being read).
    remaining: u64,
    trailer_bytes: usize,
}

/// What one [`ChunkedDecoder::step`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input this step used.
    pub consumed: usize,
    /// Chunk data inside the used bytes (`start..end` of the input).
    pub data: Option<(usize, usize)>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> ChunkedDecoder {
        ChunkedDecoder {
            state: ChunkState::Size { digits: 0 },
            remaining: 0,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from the start of `input`: framing bytes up to the next
    /// data (or the end), or one run of data. Call again with the rest.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            if self.state == Data {
                if i > 0 {
                    // Framing before the data: reported alone first.
                    return Ok(Step {
                        consumed: i,
                        data: None,
                    });
                }
                let n = input
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = DataCr;
                }
                return Ok(Step {
                    consumed: n,
                    data: Some((0, n)),
                });
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                Size { digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 15 => {
                        self.remaining = self.remaining * 16 + u64::from(d);
                        Size { digits: digits + 1 }
                    }
                    Some(_) => return Err(BadChunk),
                    None if digits == 0 => return Err(BadChunk),
                    None => match b {
                        b' ' | b'\t' => SizeTail,
                        b';' => Ext,
                        b'\r' => SizeLf,
                        _ => return Err(BadChunk),
                    },
                },
                SizeTail => match b {
                    b' ' | b'\t' => SizeTail,
                    b';' => Ext,
                    b'\r' => SizeLf,
                    _ => return Err(BadChunk),
                },
                Ext => match b {
                    b'\r' => SizeLf,
                    b'\n' => return Err(BadChunk),
                    _ => Ext,
                },
                SizeLf if b == b'\n' => {
                    if self.remaining == 0 {
                        TrailerStart
                    } else {
                        Data
                    }
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size { digits: 0 },
                TrailerStart => match b {
                    b'\r' => EndLf,
                    b'\n' => return Err(BadChunk),
                    _ => {
                        self.trailer_bytes += 1;
                        Trailer
                    }
                },
                Trailer => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(BadChunk);
                    }
                    match b {
                        b'\r' => TrailerLf,
                        b'\n' => return Err(BadChunk),
                        _ => Trailer,
                    }
                }
                TrailerLf if b == b'\n' => TrailerStart,
                EndLf if b == b'\n' => {
                    self.state = Done;
                    return Ok(Step {
                        consumed: i,
                        data: None,
                    });
                }
                Done => {
                    return Ok(Step {
                        consumed: i - 1,
                        data: None,
                    })
                }
                SizeLf | DataCr | DataLf | TrailerLf | EndLf | Data => return Err(BadChunk),
            };
        }
        Ok(Step {
            consumed: i,
            data: None,
        })
    }
}

/// A relay failed: which side, or the body's framing.
#[derive(Debug)]
pub enum RelayError {
    /// Reading the body's sender failed, timed out, or it closed early.
    Read(io::Error),
    /// Writing to the receiver failed or timed out.
    Write(io::Error),
    /// The chunked framing is invalid.
    Framing,
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no progress within the I/O timeout",
    )
}

/// Reads once more into `buf`, within [`IO_TIMEOUT`]; end of stream is an
/// `UnexpectedEof` error.
pub async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Buf) -> io::Result<()> {
    match within_io_timeout(buf.read_from(r, BUF_SIZE)).await {
        Some(Ok(0)) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a message",
        )),
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e),
        None => Err(timed_out()),
    }
}

/// Writes all of `bytes` within [`IO_TIMEOUT`].
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    within_io_timeout(w.write_all(bytes))
        .await
        .unwrap_or_else(|| Err(timed_out()))
}

/// `fut`'s output if it completes within [`IO_TIMEOUT`]. It is polled once
/// first: most socket reads and writes on the hot path complete at once,
/// and then no timer is armed (arming one reads the clock and takes a slot
/// in the timer wheel, request after request).
pub async fn within_io_timeout<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(v);
    }
    tokio::time::timeout(IO_TIMEOUT, fut).await.ok()
}

/// Writes `out` (a pending head, possibly empty) followed by `body`, in one
/// write when they are small, then clears `out`.
async fn write_with<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut Vec<u8>,
    body: &[u8],
) -> Result<(), RelayError> {
    if out.is_empty() {
        return write_all(w, body).await.map_err(RelayError::Write);
    }
    if body.len() <= BUF_SIZE {
        out.extend_from_slice(body);
        let r = write_all(w, out).await;
        out.clear();
        return r.map_err(RelayError::Write);
    }
    let r = write_all(w, out).await;
    out.clear();
    r.map_err(RelayError::Write)?;
    write_all(w, body).await.map_err(RelayError::Write)
}

/// Flushes a pending head in `out` (if any).
pub async fn flush_out<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = write_all(w, out).await;
    out.clear();
    r
}

/// How a chunked body is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedOut {
    /// As it came (validated): to an HTTP/1.1 peer.
    Raw,
    /// Only the data (an HTTP/1.0 client, which then sees the end of the
    /// body as the end of the connection).
    Data,
}

/// Relays a body framed by `framing` from `src` (bytes already received in
/// `buf`) to `dst`, after the pending head in `out`. Returns the number of
/// body bytes read from `src`'s side (framing included). On success
/// exactly the body has been consumed from `buf`.
pub async fn relay_body<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    framing: Framing,
    chunked_out: ChunkedOut,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        Framing::None => {
            flush_out(dst, out).await.map_err(RelayError::Write)?;
            Ok(0)
        }
        Framing::Length(n) => relay_length(src, buf, dst, out, n).await.map(|()| n),
        Framing::Close => relay_to_eof(src, buf, dst, out).await,
        Framing::Chunked => relay_chunked(src, buf, dst, out, chunked_out).await,
    }
}

async fn relay_length<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    mut left: u64,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if take > 0 || !out.is_empty() {
            write_with(dst, out, &buf.filled()[..take]).await?;
            buf.consume(take);
            left -= take as u64;
        }
        if left == 0 {
            return Ok(());
        }
        fill(src, buf).await.map_err(RelayError::Read)?;
    }
}

async fn relay_to_eof<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        if !buf.is_empty() || !out.is_empty() {
            let n = buf.len();
            write_with(dst, out, buf.filled()).await?;
            buf.consume(n);
            total += n as u64;
        }
        match within_io_timeout(buf.read_from(src, BUF_SIZE)).await {
            Some(Ok(0)) => return Ok(total),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(RelayError::Read(e)),
            None => return Err(RelayError::Read(timed_out())),
        }
    }
}

async fn relay_chunked<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    mode: ChunkedOut,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = ChunkedDecoder::new();
    let mut total = 0u64;
    loop {
        // Decode everything received, then pass it on in one write.
        let input = buf.filled();
        let mut used = 0;
        while used < input.len() && !decoder.is_done() {
            let step = decoder
                .step(&input[used..])
                .map_err(|BadChunk| RelayError::Framing)?;
            if mode == ChunkedOut::Data {
                if let Some((s, e)) = step.data {
                    out.extend_from_slice(&input[used + s..used + e]);
                }
            }
            used += step.consumed;
        }
        match mode {
            ChunkedOut::Raw => write_with(dst, out, &input[..used]).await?,
            ChunkedOut::Data => flush_out(dst, out).await.map_err(RelayError::Write)?,
        }
        buf.consume(used);
        total += used as u64;
        if decoder.is_done() {
            return Ok(total);
        }
        fill(src, buf).await.map_err(RelayError::Read)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<httparse::Header<'a>> {
        pairs
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    /// Decodes `input` fed in pieces of `piece` bytes: the data, and
    /// whether the body ended (with how many bytes used).
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, Option<usize>), BadChunk> {
        let mut d = ChunkedDecoder::new();
        let mut data = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        while !d.is_done() && pos < input.len() {
            avail = (avail + piece).min(input.len());
            while pos < avail && !d.is_done() {
                let s = d.step(&input[pos..avail])?;
                if let Some((a, b)) = s.data {
                    data.extend_from_slice(&input[pos + a..pos + b]);
                }
                pos += s.consumed;
            }
        }
        Ok((data, d.is_done().then_some(pos)))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, 100] {
            let (data, end) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello, world", "piece {piece}");
            assert_eq!(end, Some(body.len() - 4), "piece {piece}");
        }
    }

    #[test]
    fn invalid_chunk_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"1234567890abcdef0\r\n",
            b"\r\n",
            b"5 x\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(
                decode(bad, 100),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_unfinished_chunked_body_is_not_done() {
        let (data, end) = decode(b"5\r\nhel", 100).unwrap();
        assert_eq!((data.as_slice(), end), (&b"hel"[..], None));
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        assert_eq!(request_framing(&h(&[])), Ok(Framing::None));
        assert_eq!(
            request_framing(&h(&[("Content-Length", "12")])),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            request_framing(&h(&[("content-length", "3"), ("Content-Length", "3")])),
            Ok(Framing::Length(3))
        );
        assert_eq!(
            request_framing(&h(&[("Transfer-Encoding", "gzip, Chunked")])),
            Ok(Framing::Chunked)
        );
        for bad in [
            h(&[("content-length", "3"), ("content-length", "4")]),
            h(&[("content-length", "3, 3")]),
            h(&[("content-length", "-1")]),
            h(&[("content-length", "")]),
            h(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
            h(&[("transfer-encoding", "gzip")]),
            h(&[("transfer-encoding", "chunked, gzip")]),
            h(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
        ] {
            assert!(request_framing(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cl = h(&[("content-length", "5")]);
        assert_eq!(response_framing(true, 200, &cl), Ok(Framing::None));
        assert_eq!(response_framing(false, 204, &cl), Ok(Framing::None));
        assert_eq!(response_framing(false, 304, &cl), Ok(Framing::None));
        assert_eq!(response_framing(false, 200, &cl), Ok(Framing::Length(5)));
        assert_eq!(response_framing(false, 200, &h(&[])), Ok(Framing::Close));
        let both = h(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert_eq!(response_framing(false, 200, &both), Ok(Framing::Chunked));
    }

    #[test]
    fn hop_by_hop_headers_are_recognised_in_any_case() {
        for name in [
            "Connection",
            "KEEP-ALIVE",
            "te",
            "Upgrade",
            "Transfer-Encoding",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        assert!(!is_hop_by_hop("x-forwarded-for"));
        let hs = h(&[
            ("Connection", "keep-alive, X-Secret"),
            ("connection", "Upgrade"),
        ]);
        assert!(connection_has(&hs, "x-secret"));
        assert!(connection_has(&hs, "upgrade"));
        assert!(!connection_has(&hs, "close"));
    }
}
