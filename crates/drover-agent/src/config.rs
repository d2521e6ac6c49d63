//! Agent configuration: what `drover agent` and `drover up` hand to [`crate::run`].

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything the agent needs to know to join a control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Control plane base URL, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// Node name, unique in the cluster.
    pub node: String,
    /// Node labels (region=eu, role=web, …) sent at registration.
    pub labels: BTreeMap<String, String>,
    /// Everything the agent keeps: state file, artifacts, releases, logs.
    pub data_dir: PathBuf,
    /// Host part of the instance addresses reported to the server.
    pub advertise_host: String,
    /// Inclusive range of ports handed to instances as `PORT`.
    pub port_range: (u16, u16),
    /// The join token (role `node`) sent with every request to the server.
    pub token: Option<String>,
    /// Where to serve `GET /metrics` (this node's instances); None: nowhere.
    pub metrics_addr: Option<String>,
}

impl AgentConfig {
    /// A configuration with the default advertise host (`127.0.0.1`) and
    /// port range (20000–29999) and no labels.
    pub fn new(server: impl Into<String>, node: impl Into<String>, data_dir: PathBuf) -> Self {
        AgentConfig {
            server: server.into(),
            node: node.into(),
            labels: BTreeMap::new(),
            data_dir,
            advertise_host: DEFAULT_ADVERTISE_HOST.to_string(),
            port_range: DEFAULT_PORT_RANGE,
            token: None,
            metrics_addr: None,
        }
    }
}

/// Default host part of instance addresses.
pub const DEFAULT_ADVERTISE_HOST: &str = "127.0.0.1";
/// Default port range for instances.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (20000, 29999);
