//! A stand-alone launcher for the proxy, for development and for this crate's
//! end-to-end test (pingora exits the process it runs in, so the test runs the
//! proxy as a child process). The real entry point is `drover proxy`.
//!
//! Usage: `drover-proxy-dev [--listen ADDR] [--server URL] [--name NAME]
//! [--threads N] [--grace SECS] [--engine pingora|h1] [--tls-cert PEM
//! --tls-key PEM] [--tunnel-idle-timeout SECS]`; the engine defaults
//! to `$DROVER_PROXY_ENGINE`, then h1; logs follow `RUST_LOG`.

use anyhow::{bail, Context as _};
use drover_proxy::ProxyConfig;

fn parse_args() -> anyhow::Result<ProxyConfig> {
    let mut config = ProxyConfig::default();
    if let Ok(engine) = std::env::var(drover_proxy::ENGINE_ENV) {
        config.engine = engine
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", drover_proxy::ENGINE_ENV))?;
    }
    let mut args = std::env::args().skip(1);
    let (mut cert, mut key) = (None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => config.listen = value()?,
            "--server" => config.server = value()?,
            "--name" => config.name = value()?,
            "--threads" => config.threads = value()?.parse().context("--threads")?,
            "--grace" => config.grace_period_secs = value()?.parse().context("--grace")?,
            "--engine" => {
                config.engine = value()?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--engine: {e}"))?
            }
            "--tls-cert" => cert = Some(value()?),
            "--tls-key" => key = Some(value()?),
            "--tunnel-idle-timeout" => {
                let secs: u64 = value()?.parse().context("--tunnel-idle-timeout")?;
                anyhow::ensure!(secs > 0, "--tunnel-idle-timeout must be at least 1 second");
                config.tunnel_idle_timeout = std::time::Duration::from_secs(secs);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    config.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = parse_args()?;
    drover_proxy::run(config)
}
