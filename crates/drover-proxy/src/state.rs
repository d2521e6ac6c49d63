//! State shared between pingora's request path and the proxy's background
//! control loop (route poller and reporter).

use tokio::sync::Notify;

use crate::stats::Stats;
use crate::table::Tables;

/// Everything the request path and the control loop share. Lives in an
/// `Arc` for the life of the process.
#[derive(Default)]
pub struct ProxyState {
    /// Proxy id used in reports.
    pub name: String,
    /// This proxy's labels (partial deployments by node label).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Current routing table and the registry used for drain tracking.
    pub tables: Tables,
    /// Per-release counters.
    pub stats: Stats,
    /// Signalled after a new table is installed, so a report goes out at once.
    pub table_installed: Notify,
}

impl ProxyState {
    pub fn new(name: impl Into<String>) -> Self {
        ProxyState {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The report this proxy sends to the control plane right now.
    pub fn report(&self) -> drover_api::ProxyReport {
        // Read the oldest live index before the applied one: a table installed
        // in between only makes `applied_index` larger, never the reverse.
        let oldest_live_index = self.tables.oldest_live_index();
        let applied_index = self.tables.applied_index();
        drover_api::ProxyReport {
            proxy: self.name.clone(),
            applied_index,
            oldest_live_index: oldest_live_index.min(applied_index),
            stats: self.stats.snapshot(),
        }
    }
}
