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

fn main() -> std::process::ExitCode {
    // One rustls provider for the whole process (STACK.md): pingora links
    // ring, everything else aws-lc-rs, and a library that asks for the
    // process default would otherwise find two and panic.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::main()
}
