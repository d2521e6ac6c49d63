//! Wire types of drover's HTTP/JSON protocols.
//!
//! *API Boundary*: this is the only crate that knows the JSON shape of what
//! travels between the server, agents, proxies and the CLI. The pure core
//! (`drover-core`) has its own plain types; the server translates.
//!
//! Protocols:
//! - agent → server: `POST /v1/agent/register` on the API port with the
//!   join token and a CSR (the answer: the node's certificate, the CA and
//!   the agent port); then, on the agent port over mutual TLS only,
//!   `POST /v1/agent/register` (again, or with a CSR to renew),
//!   `POST /v1/agent/report` (also the heartbeat),
//!   `GET /v1/agent/assignments?node=N&index=I&wait_ms=W`
//!   (a blocking query: returns at once when the server's index is past `I`,
//!   otherwise waits up to `W` ms for a change), `POST /v1/agent/logs`,
//!   `GET /v1/artifacts/{sha256}`.
//! - proxy → server: `GET /v1/routes?index=I&wait_ms=W` (blocking query),
//!   `POST /v1/proxy/report`.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
pub mod metrics;

use std::collections::BTreeMap;

/// Latency histogram bucket upper bounds in milliseconds, shared by the proxy
/// (which records) and the server (which computes p99 from them). The last
/// implicit bucket is +Inf.
pub const LATENCY_BUCKETS_MS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0,
    10000.0, 30000.0,
];

// ---------------------------------------------------------------- agent ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisterRequest {
    /// Node name, unique in the cluster.
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A PEM certificate signing request for this node's key: required with
    /// the join token (the answer is the node's certificate); over mutual
    /// TLS it renews the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// The environment variable naming a PEM file of CA certificates the
/// clients of the API (CLI, agents, proxies) trust besides the system's:
/// for a server whose `--tls-cert` comes from a private CA.
pub const CA_CERT_ENV: &str = "DROVER_CA_CERT";

/// The certificates of [`CA_CERT_ENV`]'s file (none when it is unset); the
/// error names the file and what is wrong with it.
pub fn trusted_cas() -> Result<Vec<reqwest::Certificate>, String> {
    let Some(path) = std::env::var_os(CA_CERT_ENV) else {
        return Ok(Vec::new());
    };
    let path = std::path::PathBuf::from(path);
    let pem = std::fs::read(&path)
        .map_err(|e| format!("{CA_CERT_ENV}={}: cannot read it: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "{CA_CERT_ENV}={}: not PEM certificates: {e}",
            path.display()
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "{CA_CERT_ENV}={}: no certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// What a join-token registration's `ca_mac` is: the hex HMAC-SHA256 of
/// the CA's PEM keyed by the join token.
pub fn ca_mac(join_token: &str, ca_pem: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(join_token.as_bytes()).expect("any key length");
    mac.update(ca_pem.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisterResponse {
    pub node: String,
    /// The node is marked lost when no report arrives for this long.
    pub lease_ms: u64,
    /// How often the agent should report (heartbeat).
    pub report_interval_ms: u64,
    /// The port of the agent listener (mutual TLS), on the host the agent
    /// reached the server at: every call but the first registration goes
    /// there.
    pub agent_port: u16,
    /// The node's certificate (PEM), when a CSR was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// When that certificate expires (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after_ms: Option<u64>,
    /// The cluster CA's certificate (PEM): the server's certificate on the
    /// agent port is for `server.drover`, from this CA.
    pub ca: String,
    /// With the join token: hex HMAC-SHA256 of `ca` keyed by the join
    /// token, so the agent knows the CA comes from a holder of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_mac: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignmentsResponse {
    /// Pass back as `index` to block until something changes.
    pub index: u64,
    pub assignments: Vec<Assignment>,
    /// Instances on this node that the server cannot describe right now
    /// (their app's stored records are in error): keep them as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
}

/// One instance the server wants on this node, and whether it should run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    /// Unique instance id, e.g. `hello-r2-7f3a9c`. Safe as a file name.
    pub instance: String,
    pub app: String,
    /// Release name, e.g. `r2`.
    pub release: String,
    pub artifact: ArtifactRef,
    /// A container image release: the image id (`sha256:…`) the artifact
    /// holds (a `docker save` archive, zstd-compressed), run by the docker
    /// driver. `None`: a process release, unpacked and run with `sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// With a `[registry]`: where to pull the image from, by digest
    /// (`host/repo@sha256:…`); the artifact is then not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<String>,
    /// The registry's login, when it asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    pub run: RunSpec,
    pub health: HealthSpec,
    pub desired: DesiredState,
}

/// A registry login (the password is an app secret's value).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactRef {
    /// Hex sha256 of the `.tar.zst` file; the content address.
    pub sha256: String,
    pub size: u64,
    /// Path on the server, e.g. `/v1/artifacts/<sha256>`.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSpec {
    /// Run with `sh -c` in the unpacked release directory. Gets `PORT`.
    /// For an image: empty runs the image's own command, anything else
    /// runs with `sh -c` inside the container.
    pub command: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub stop_timeout_ms: u64,
    /// Containers only: memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Containers only: CPU limit in CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthSpec {
    /// HTTP path checked with GET on 127.0.0.1:PORT; 2xx = success.
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes before the instance counts as healthy.
    pub healthy_after: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Run,
    /// Stop gracefully (SIGTERM, stop_timeout, SIGKILL). The server only
    /// says this after the instance left routing and drained.
    Stop,
}

/// The answer to a report: the pace the server wants now (it slows
/// heartbeats down as the cluster grows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReportResponse {
    pub report_interval_ms: u64,
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentReport {
    pub node: String,
    pub instances: Vec<InstanceReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceReport {
    pub instance: String,
    pub state: InstanceState,
    #[serde(default)]
    pub pid: Option<u32>,
    /// `host:port` where the instance listens, once known.
    #[serde(default)]
    pub address: Option<String>,
    /// How many times the agent restarted it after it exited.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub health: HealthReport,
    /// Human-readable detail: why it failed, what it waits for.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthReport {
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// e.g. `GET /healthz → 503 "db down"` or `GET /healthz → connection refused`.
    #[serde(default)]
    pub last_response: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Downloading/unpacking the artifact.
    Preparing,
    /// Process running, not yet `healthy_after` successful checks.
    Starting,
    Healthy,
    /// Was healthy, then failed `unhealthy_after` checks in a row.
    Unhealthy,
    /// Exited unexpectedly; waiting for its backoff to restart it.
    Crashed,
    /// SIGTERM sent, waiting for exit.
    Stopping,
    /// Gone after a requested stop.
    Stopped,
    /// Cannot run at all (artifact download/verify/unpack failed).
    Failed,
}

// ---------------------------------------------------------------- proxy ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoutesResponse {
    pub index: u64,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub app: String,
    /// The app's environment this route serves ("" for an app without
    /// `[environments]`). Stats are kept per (app, env, release).
    #[serde(default)]
    pub env: String,
    /// Matched against the request's Host header (port ignored, case-insensitive).
    pub host: String,
    /// Healthy, routed instances. Empty = 503.
    pub upstreams: Vec<Upstream>,
    /// Splits traffic between `split.release` ("new") and the other upstreams'
    /// releases ("stable"). None: every upstream by weight (rolling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// How a route's traffic is divided between a "new" release and the
/// "stable" rest — canary (a per-mille share of user keys), partial (listed
/// keys only) and blue/green (preview host or header, then a flip).
///
/// Upstreams of [`Split::release`] form the new group; all other upstreams
/// form the stable group. Within a group the proxy balances by
/// [`Upstream::weight`] as usual. A request decided for a group with no
/// instance goes to the other group instead — except a preview request,
/// which only ever reaches the new release (503 when it has no instance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Split {
    /// The new release, e.g. `r7`.
    pub release: String,
    /// Share of user keys sent to `release`, in per mille (0..=1000; larger
    /// values count as 1000). A key goes to `release` iff
    /// `split_bucket(key) < weight_permille`, so raising the weight only ever
    /// moves users from stable to new. Ignored when `values` is non-empty.
    pub weight_permille: u32,
    /// Where a request's user key comes from.
    pub key: SplitKey,
    /// Partial deployments: keys listed here always go to `release`. When
    /// non-empty, keys not listed (and requests without a key) go to stable
    /// whatever the weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Blue/green preview: requests for this Host (case-insensitive, port
    /// ignored) go only to `release`. Must not be another route's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_host: Option<String>,
    /// Requests carrying this header with a non-empty value go only to
    /// `release`, on the route's normal host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_header: Option<String>,
    /// Partial by node label: a proxy with every one of these labels sends
    /// all of the route's users to `release`, any other proxy none of them
    /// (preview aside). When non-empty, `weight_permille` and `values` are
    /// not used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy_labels: BTreeMap<String, String>,
}

/// Where the proxy reads a request's user key for [`Split`]. JSON:
/// `{"header": "x-user"}` or `{"cookie": "drover_key"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitKey {
    /// The value of this request header (case-insensitive name). A request
    /// without it is decided at random, with probability
    /// `weight_permille / 1000` of going to the new release.
    Header(String),
    /// The value of this cookie (case-sensitive name). A request without it
    /// gets a fresh random key, decided like any other and handed back in a
    /// `Set-Cookie` so that the client stays on the same side.
    Cookie(String),
}

/// The split bucket of a user key: `0..1000`, compared with
/// [`Split::weight_permille`]. FNV-1a (64-bit) of the key's bytes, modulo
/// 1000 — deterministic across processes, restarts and machines, so the
/// server, the proxies and tests all agree on where a user goes.
/// *Never change this function*: it would move users between releases.
pub fn split_bucket(key: &str) -> u32 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in key.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    // The remainder is < 1000, so the cast is lossless.
    (hash % 1000) as u32
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Upstream {
    pub instance: String,
    pub release: String,
    /// `host:port`.
    pub address: String,
    /// Relative weight (all equal for rolling).
    pub weight: u32,
}

/// `GET /v1/discovery/{app}`: the app's serving instances in one
/// environment, by the part of its traffic they take. A blocking query
/// (`?index=I`) answers once the index has passed `I`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Discovery {
    pub index: u64,
    pub app: String,
    pub environment: String,
    pub live_release: Option<String>,
    /// Where the app's ordinary traffic goes.
    pub stable: Vec<Endpoint>,
    /// A new release taking a share of the users (canary, partial).
    pub canary: Vec<Endpoint>,
    /// A new release reachable by preview only (blue/green before the switch).
    pub preview: Vec<Endpoint>,
}

/// One serving instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub instance: String,
    pub release: String,
    /// `host:port`.
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyReport {
    pub proxy: String,
    /// Index of the routing table now in use for new requests.
    pub applied_index: u64,
    /// Oldest routing-table index still referenced by an in-flight request
    /// (== applied_index when none). An instance removed from routing at
    /// index I has drained on this proxy once `oldest_live_index >= I`.
    pub oldest_live_index: u64,
    /// Cumulative per-release counters since the proxy started.
    pub stats: Vec<ReleaseStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseStats {
    pub app: String,
    #[serde(default)]
    pub env: String,
    pub release: String,
    pub requests: u64,
    /// Responses with status >= 500, plus upstream failures answered by the proxy.
    pub errors: u64,
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS_MS`], plus one
    /// final +Inf bucket (len = LATENCY_BUCKETS_MS.len() + 1).
    pub latency_buckets: Vec<u64>,
    /// The sum of all latencies in microseconds (for a histogram's `_sum`).
    #[serde(default)]
    pub latency_sum_us: u64,
}

/// Default headers carrying `token` as a bearer token (marked sensitive,
/// so it never shows in debug output); empty without a token.
pub fn bearer_headers(token: Option<&str>) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Some(mut v) =
        token.and_then(|t| http::HeaderValue::from_str(&format!("Bearer {}", t.trim())).ok())
    {
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    headers
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode_query(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// -------------------------------------------------------------- secrets ----

/// Sets a secret. Its Debug form leaves the value out.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct SecretSetRequest {
    pub name: String,
    /// The environment ("" or absent: the app has none).
    #[serde(default)]
    pub env: String,
    pub value: String,
}

impl std::fmt::Debug for SecretSetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSetRequest")
            .field("name", &self.name)
            .field("env", &self.env)
            .field("value", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretUnsetRequest {
    pub name: String,
    #[serde(default)]
    pub env: String,
}

/// A secret as listed: its name, never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub env: String,
    pub name: String,
    pub updated_at: u64,
}

// --------------------------------------------------------------- tokens ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    pub name: String,
    /// admin, deployer, viewer or node.
    pub role: String,
    /// e.g. "30d", "12h"; none: it does not expire.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// The answer to creating a token: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenCreated {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

// ------------------------------------------------------------------ CLI ----

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub error: String,
}

// ------------------------------------------------------- control plane ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddAppRequest {
    /// A path on the server's machine or a git URL.
    pub repo: String,
    #[serde(default)]
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppInfo {
    /// Only in the answer to `POST /v1/apps`: the HMAC-SHA256 key for push
    /// webhooks to `/v1/hooks/<app>`. Never shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    pub name: String,
    pub repo: String,
    pub branch: String,
    /// The host of the last environment (production).
    pub host: String,
    /// Live in the last environment (production).
    pub live_release: Option<String>,
    /// In promotion order; one unnamed ("") for an app without environments.
    #[serde(default)]
    pub environments: Vec<EnvSummary>,
    /// Why this app's records cannot be read (e.g. stored by another
    /// version); the rest of the list and the server are unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One environment of an app at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvSummary {
    pub name: String,
    pub host: String,
    pub live_release: Option<String>,
    /// How a release enters it: auto | manual.
    pub promote: String,
    /// The state of its newest rollout, e.g. "progressing → r7".
    pub rollout: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployRequest {
    /// Branch, tag or commit; default: the tracked branch's tip.
    #[serde(default)]
    pub git_ref: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RollbackRequest {
    /// e.g. `r3`; default: the release that was live before the current one.
    #[serde(default)]
    pub to: Option<String>,
    /// Default: the last environment (production).
    #[serde(default)]
    pub env: Option<String>,
}

/// `drover plan`: a dry run of a rollout, when everything goes well.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanInfo {
    pub env: String,
    pub from: Option<String>,
    pub to: String,
    pub strategy: String,
    pub steps: Vec<PlanStep>,
    /// Expected time until the rollout is final (or waits for an operator).
    pub duration_ms: u64,
    pub outcome: String,
    /// What the simulation assumes.
    pub assumptions: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanStep {
    pub at_ms: u64,
    pub changes: Vec<String>,
    /// Percent of users per release after the step.
    pub traffic: BTreeMap<String, u32>,
    pub message: String,
}

/// `pause`, `resume`, `abort`, `promote` of an app's environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ControlRequest {
    /// Default: the last environment (production).
    #[serde(default)]
    pub env: Option<String>,
    /// promote: past the last canary step at once.
    #[serde(default)]
    pub full: bool,
}

/// What `promote` did: a canary step, or a release into the next environment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlResponse {
    pub env: String,
    pub message: String,
    /// The rollout acted on (pause/resume/abort/canary promote).
    #[serde(default)]
    pub rollout_id: Option<i64>,
    /// The run resumed (promotion into the next environment).
    #[serde(default)]
    pub run_id: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployResponse {
    pub release: String,
    pub commit: String,
    /// The environment the rollout moves ("" for an app without environments).
    #[serde(default)]
    pub env: String,
    pub rollout_id: i64,
    #[serde(default)]
    pub run_id: Option<i64>,
    /// A rollback that reverts the rollout in progress (same rollout id):
    /// done when that rollout ends `rolled_back`.
    #[serde(default)]
    pub reverts: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseInfo {
    pub name: String,
    pub commit: String,
    pub artifact_sha256: String,
    pub artifact_size: u64,
    /// A container image release: its image id (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pushed to a registry: `host/repo@sha256:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<String>,
    pub created_at_ms: u64,
    /// Live in the last environment (production).
    pub live: bool,
    /// ok | failed (its [release] command failed; never deployed) | pruned
    #[serde(default)]
    pub status: String,
    /// The environments it is live in.
    #[serde(default)]
    pub live_in: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppStatus {
    pub app: String,
    /// The environment this status is of ("" for an app without environments).
    pub environment: String,
    /// Every environment of the app, in promotion order.
    #[serde(default)]
    pub environments: Vec<EnvSummary>,
    /// A release waiting for `drover promote`, described.
    #[serde(default)]
    pub waiting: Option<String>,
    pub live_release: Option<String>,
    pub rollout: Option<RolloutStatus>,
    /// Release → percent of traffic (integers summing to 100 when serving).
    pub traffic: BTreeMap<String, u32>,
    pub instances: Vec<InstanceStatus>,
    /// The newest pipeline run.
    #[serde(default)]
    pub last_run: Option<RunInfo>,
    /// Each release's live figures from the proxies (the last few seconds).
    #[serde(default)]
    pub figures: Vec<ReleaseFigures>,
}

/// One release's traffic over the last few seconds, from the proxies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseFigures {
    pub release: String,
    /// Requests per second.
    pub rate: f64,
    /// errors / requests; None without requests.
    pub error_rate: Option<f64>,
    /// The 99th percentile latency in ms (bucket bound); None without requests.
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutStatus {
    pub id: i64,
    pub from: Option<String>,
    pub to: String,
    pub strategy: String,
    /// pending | progressing | paused | succeeded | failed | rolled_back | aborted
    pub state: String,
    /// Instances of the target release serving.
    pub step: u32,
    /// Instances wanted.
    pub steps: u32,
    /// True while an automatic rollback is moving back to `from`.
    pub reverting: bool,
    /// Canary: "2/3" while in a step, None otherwise.
    #[serde(default)]
    pub canary_step: Option<String>,
    /// Canary: percent of users sent to `to` now.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Canary: the last analysis verdict.
    #[serde(default)]
    pub analysis: Option<String>,
    /// Blue/green: the host that reaches only the new set (also: any request
    /// with an `x-drover-preview: 1` header).
    #[serde(default)]
    pub preview: Option<String>,
    pub message: String,
    pub failure: Option<String>,
    pub started_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub id: String,
    pub release: String,
    pub node: String,
    pub address: Option<String>,
    /// pending | preparing | starting | healthy | unhealthy | crashed |
    /// draining | stopping | stopped | failed | lost
    pub state: String,
    pub routed: bool,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_check: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub last_seen_ms_ago: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventInfo {
    pub id: i64,
    pub at_ms: u64,
    pub app: Option<String>,
    pub kind: String,
    pub message: String,
}

/// One webhook delivery of a rollout event (`GET /v1/apps/{app}/deliveries`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryInfo {
    /// The same on every attempt (`X-Drover-Delivery`).
    pub id: String,
    pub env: String,
    pub event: String,
    /// Scheme and host only: the rest of a webhook URL may hold a token.
    pub url: String,
    /// pending | delivered | failed
    pub state: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// New output of one instance, shipped by its agent (`POST /v1/agent/logs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogChunk {
    pub node: String,
    pub instance: String,
    /// The bytes appended to the instance's log since the last chunk
    /// (lossy UTF-8; at most 256 KiB).
    pub data: String,
}

/// One pipeline run: a commit through checkout, build, test, pack, release
/// command and the start of its rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub id: i64,
    pub app: String,
    pub commit: String,
    pub git_ref: String,
    /// manual | poll | webhook
    pub trigger: String,
    /// queued | running | waiting (for `drover promote`) | succeeded |
    /// failed | superseded
    pub state: String,
    pub steps: Vec<RunStep>,
    pub release: Option<String>,
    pub rollout_id: Option<i64>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStep {
    /// checkout | build | test | pack | release | deploy [ENV] |
    /// smoke ENV | promote ENV
    pub name: String,
    /// running | waiting | succeeded | failed
    pub state: String,
    pub started_at_ms: u64,
    pub duration_ms: Option<u64>,
    /// On failure: the last lines of the step's output.
    pub log_tail: Option<String>,
}

/// Answer to a webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HookResponse {
    /// run_started | duplicate | ignored
    pub outcome: String,
    pub run_id: Option<i64>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_bucket_is_fnv1a_64_modulo_1000_and_never_changes() {
        // Known FNV-1a 64 values: "" = 0xcbf29ce484222325, "a" = 0xaf63dc4c8601ec8c,
        // "foobar" = 0x85944171f73967e8.
        assert_eq!(split_bucket(""), (0xcbf2_9ce4_8422_2325_u64 % 1000) as u32);
        assert_eq!(split_bucket("a"), (0xaf63_dc4c_8601_ec8c_u64 % 1000) as u32);
        assert_eq!(
            split_bucket("foobar"),
            (0x8594_4171_f739_67e8_u64 % 1000) as u32
        );
        // Pinned literals: a change here moves real users between releases.
        assert_eq!(split_bucket(""), 37);
        assert_eq!(split_bucket("a"), 996);
        assert_eq!(split_bucket("alice"), 183);
        assert_eq!(split_bucket("user-1"), 708);
    }

    #[test]
    fn split_bucket_spreads_keys_over_all_buckets() {
        let mut counts = [0u32; 10];
        for i in 0..10_000 {
            let b = split_bucket(&format!("user-{i}"));
            assert!(b < 1000);
            counts[(b / 100) as usize] += 1;
        }
        // 1,000 expected per tenth; allow a generous ±20%.
        for (tenth, &n) in counts.iter().enumerate() {
            assert!((800..=1200).contains(&n), "tenth {tenth}: {n} of 10000");
        }
    }

    #[test]
    fn route_without_split_keeps_its_old_json() {
        let json = r#"{"app":"hello","env":"","host":"h","upstreams":[]}"#;
        let route: Route = serde_json::from_str(json).unwrap();
        assert_eq!(route.split, None);
        assert_eq!(serde_json::to_string(&route).unwrap(), json);
    }

    #[test]
    fn split_json_shape() {
        let json = serde_json::json!({
            "app": "hello",
            "env": "production",
            "host": "hello.example",
            "upstreams": [],
            "split": {
                "release": "r7",
                "weight_permille": 100,
                "key": {"cookie": "drover_key"},
                "preview_header": "x-drover-preview"
            }
        });
        let route: Route = serde_json::from_value(json.clone()).unwrap();
        let split = route.split.clone().unwrap();
        assert_eq!(
            split,
            Split {
                release: "r7".into(),
                weight_permille: 100,
                key: SplitKey::Cookie("drover_key".into()),
                values: vec![],
                preview_host: None,
                preview_header: Some("x-drover-preview".into()),
                proxy_labels: BTreeMap::new(),
            }
        );
        assert_eq!(serde_json::to_value(&route).unwrap(), json);
        let header: SplitKey = serde_json::from_str(r#"{"header":"x-user"}"#).unwrap();
        assert_eq!(header, SplitKey::Header("x-user".into()));
    }
}
