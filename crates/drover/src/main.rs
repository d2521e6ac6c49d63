//! The `drover` binary: parses the command line and hands over to
//! [`cli::run`]. Exit codes: 0 success, 1 the operation failed, 2 bad usage
//! or bad input.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod demo;
mod output;
mod up;
mod watch;

// mimalloc: the proxy's request path (pingora) allocates and frees several
// small buffers per request; glibc's malloc cost ~10% of the proxy's CPU
// (BENCHMARKS.md, "proxy tuning").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // One rustls provider for the whole process (STACK.md): pingora links
    // ring, everything else aws-lc-rs, and a library that asks for the
    // process default would otherwise find two and panic.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::main()
}
