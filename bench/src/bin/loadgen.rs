//! A bounded HTTP/1.1 load generator.
//!
//! `loadgen ADDR HOST CONNECTIONS SECONDS [--new-conn] [--max N] [--rate R] [--until FILE]`
//! sends GET / with `Host: HOST` to ADDR (127.0.0.1 only) over CONNECTIONS
//! keep-alive connections (or a fresh connection per request with
//! `--new-conn`) for SECONDS (or N requests), as fast as it can or at R
//! requests/s in all (spread over the connections), or until FILE exists,
//! then prints one JSON line: requests, errors, rps, p50_us, p90_us, p99_us.
#![forbid(unsafe_code)]

use bytes::Bytes;
use drover_bench::percentile;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!(
            "usage: loadgen ADDR HOST CONNECTIONS SECONDS [--new-conn] [--max N] [--rate R] [--until FILE]"
        );
        std::process::exit(2);
    }
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR like 127.0.0.1:8080");
    assert!(addr.ip().is_loopback(), "loadgen only targets 127.0.0.0/8");
    let host = args[2].clone();
    let conns: usize = args[3].parse().expect("CONNECTIONS");
    let secs: f64 = args[4].parse().expect("SECONDS");
    let new_conn = args.iter().any(|a| a == "--new-conn");
    let max: u64 = args
        .iter()
        .position(|a| a == "--max")
        .map(|i| args[i + 1].parse().expect("N"))
        .unwrap_or(u64::MAX);
    // Each connection's pause between request starts at --rate.
    let pace: Option<Duration> = args
        .iter()
        .position(|a| a == "--rate")
        .map(|i| args[i + 1].parse::<f64>().expect("R"))
        .map(|r| Duration::from_secs_f64(conns as f64 / r.max(1.0)));
    let until: Option<std::path::PathBuf> = args
        .iter()
        .position(|a| a == "--until")
        .map(|i| args[i + 1].clone().into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let (lat, errors, elapsed) = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let host = host.clone();
            let count = count.clone();
            let until = until.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u64> = Vec::with_capacity(100_000);
                let mut errors = 0u64;
                let mut sender = None;
                let mut ticks = pace.map(|p| {
                    let mut i = tokio::time::interval(p);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                while Instant::now() < deadline && count.fetch_add(1, Ordering::Relaxed) < max {
                    if let Some(t) = ticks.as_mut() {
                        t.tick().await;
                    }
                    if until.as_ref().is_some_and(|f| f.exists()) {
                        break;
                    }
                    let t0 = Instant::now();
                    if sender.is_none() {
                        match connect(addr).await {
                            Ok(s) => sender = Some(s),
                            Err(_) => {
                                errors += 1;
                                continue;
                            }
                        }
                    }
                    let s = sender.as_mut().expect("connected");
                    let req = hyper::Request::get("/")
                        .header("host", &host)
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let ok = match s.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            resp.into_body().collect().await.is_ok() && status.is_success()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t0.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                        sender = None;
                    }
                    if new_conn {
                        sender = None;
                    }
                }
                (lat, errors)
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            all.extend(l);
            errors += e;
        }
        (all, errors, start.elapsed())
    });
    let mut lat = lat;
    lat.sort_unstable();
    let n = lat.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "requests": lat.len(), "errors": errors,
            "rps": (n / elapsed.as_secs_f64()).round(),
            "p50_us": percentile(&lat, 0.50), "p90_us": percentile(&lat, 0.90), "p99_us": percentile(&lat, 0.99),
        })
    );
}

async fn connect(
    addr: std::net::SocketAddr,
) -> Result<
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
