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
    cli::main()
}
