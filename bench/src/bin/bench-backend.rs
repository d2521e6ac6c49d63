//! A trivial HTTP/1.1 app for benchmarks: listens on 127.0.0.1:$PORT,
//! answers `/healthz` with `ok` and everything else with `hello <release>`.
#![forbid(unsafe_code)]

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT");
    let release = std::env::var("DROVER_RELEASE").unwrap_or_else(|_| "dev".into());
    let body = Bytes::from(format!("hello {release}\n"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let b = if req.uri().path() == "/healthz" {
                        Bytes::from_static(b"ok\n")
                    } else {
                        body.clone()
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(b))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
