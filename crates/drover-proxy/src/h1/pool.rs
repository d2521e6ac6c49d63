//! Keep-alive connections to instances, one pool per worker thread.
//!
//! A worker's connections all run on its current-thread runtime, so the pool
//! is a plain `RefCell` map with no lock; it is never borrowed across an
//! `.await`. Its map hashes with FxHash: the keys are the routing table's
//! instance addresses, not client input. Idle connections are used newest first (the most likely to be
//! alive) and dropped after [`POOL_IDLE_TIMEOUT`], or when the instance
//! closed them while they sat in the pool.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use rustc_hash::FxHashMap;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::codec::Buf;
use crate::service::{CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT};

/// Most idle connections kept per instance and thread.
const MAX_IDLE_PER_UPSTREAM: usize = 64;

/// A connection to an instance and its read buffer.
#[derive(Debug)]
pub struct UpstreamConn {
    pub stream: TcpStream,
    pub buf: Buf,
}

impl UpstreamConn {
    /// Opens a new connection within [`CONNECT_TIMEOUT`].
    pub async fn connect(addr: SocketAddr) -> io::Result<UpstreamConn> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting took longer than the connect timeout",
                ))
            }
        };
        stream.set_nodelay(true)?;
        Ok(UpstreamConn {
            stream,
            buf: Buf::new(),
        })
    }
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// One worker thread's idle upstream connections, by address.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<FxHashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    /// An idle connection to `addr` that still looks usable at `now`, if
    /// any.
    pub fn take(&self, addr: SocketAddr, now: Instant) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(Idle { conn, since }) = list.pop() {
            if now.duration_since(since) >= POOL_IDLE_TIMEOUT {
                continue;
            }
            // An idle connection must have nothing to read: end of stream
            // (the instance closed it) or stray bytes both disqualify it.
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
        None
    }

    /// Keeps `conn` (idle since `now`, its response fully read) for reuse.
    pub fn put(&self, addr: SocketAddr, conn: UpstreamConn, now: Instant) {
        debug_assert!(conn.buf.is_empty());
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_UPSTREAM {
            list.remove(0);
        }
        list.push(Idle { conn, since: now });
    }

    /// Closes the connections idle for longer than [`POOL_IDLE_TIMEOUT`].
    pub fn evict_expired(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < POOL_IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Closes every idle connection (shutdown).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}
