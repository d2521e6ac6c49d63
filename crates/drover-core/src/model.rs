//! Domain types shared by the planner and the server: plain data, no I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Milliseconds since the Unix epoch. The planner's only notion of time.
pub type Millis = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Rolling,
    Recreate,
    /// Steps of traffic weight to a few new instances, each judged by
    /// analysis, then a rolling replacement of the rest.
    Canary,
    /// A full set of the new release, reachable only by preview until the
    /// switch moves all users at once; the old set stays warm for a bake
    /// window so rolling back is a flip.
    BlueGreen,
    /// A few new instances serving only a segment of users (listed user
    /// keys or a hash percentage), held there until promoted or rolled back.
    Partial,
}

impl Strategy {
    /// Strategies whose rollouts split traffic between two releases.
    pub fn splits(self) -> bool {
        matches!(
            self,
            Strategy::Canary | Strategy::BlueGreen | Strategy::Partial
        )
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Recreate => "recreate",
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue_green",
            Strategy::Partial => "partial",
        })
    }
}

/// What the planner needs of a release's spec to move to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySettings {
    pub strategy: Strategy,
    pub instances: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// An instance not healthy this long after it was placed fails the rollout.
    pub health_deadline_ms: u64,
    /// An instance out of routing counts as drained after this long even if
    /// requests are still in flight.
    pub drain_timeout_ms: u64,
    pub stop_timeout_ms: u64,
    pub auto_rollback: bool,
    /// Canary: traffic steps, in order (weights never decrease).
    #[serde(default)]
    pub steps: Vec<CanaryStep>,
    /// Canary: how each step is judged from live traffic. None: by its pause only.
    #[serde(default)]
    pub analysis: Option<AnalysisSettings>,
    /// Blue/green: switch by itself once the new set is ready (and its
    /// preview check passed); false: wait for `drover promote`.
    #[serde(default)]
    pub auto_promote: bool,
    /// Blue/green: how long the old set stays warm after the switch.
    #[serde(default)]
    pub bake_ms: u64,
    /// Blue/green: a path every new instance must answer with 2xx before
    /// the switch (the pre-promotion check).
    #[serde(default)]
    pub preview_check: Option<String>,
    /// Partial: the user keys the new release serves (empty: by percent).
    #[serde(default)]
    pub partial_users: Vec<String>,
    /// Partial: how many instances of the new release serve the segment.
    #[serde(default)]
    pub partial_instances: u32,
    /// Partial by node label: the new release runs only on nodes with all
    /// these labels and serves the users of proxies with them (empty: by
    /// user key).
    #[serde(default)]
    pub partial_nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryStep {
    /// Percent of users (by their key) sent to the new release.
    pub weight: u32,
    /// The step lasts at least this long.
    pub pause_ms: u64,
}

/// Thresholds a canary step must meet, from the proxies' figures for the
/// new release during the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisSettings {
    /// Errors (5xx and failed upstream attempts) / requests.
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<u64>,
    /// Fewer requests than this is "inconclusive", never a pass.
    pub min_requests: u64,
    /// How often the figures are judged (and the shortest window that may pass).
    pub interval_ms: u64,
    /// A step still inconclusive this long after it started fails.
    pub deadline_ms: u64,
    /// Judge the proxies' own figures (the thresholds above); false: judge
    /// only by the Prometheus queries.
    #[serde(default = "yes")]
    pub builtin: bool,
    /// The Prometheus the queries go to (its base URL).
    #[serde(default)]
    pub prometheus: Option<String>,
    /// PromQL queries judged beside (or instead of) the built-in figures.
    #[serde(default)]
    pub queries: Vec<MetricQuery>,
}

fn yes() -> bool {
    true
}

/// A PromQL query whose result must meet a condition for a step to pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricQuery {
    pub name: String,
    /// PromQL with placeholders: `{{app}}`, `{{env}}`, `{{release}}` (the
    /// new release), `{{stable}}` (the old one) and `{{window}}` (how long the
    /// step has run, as a PromQL duration such as `12s`).
    pub query: String,
    pub condition: Condition,
}

/// `OP VALUE`, e.g. `< 0.01`: what a query's result must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub op: CompareOp,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
        }
    }
}

impl Condition {
    /// Parses `< 0.01`, `>= 100`, `== 0`.
    pub fn parse(s: &str) -> Option<Condition> {
        let s = s.trim();
        let ops = [
            ("<=", CompareOp::Le),
            (">=", CompareOp::Ge),
            ("==", CompareOp::Eq),
            ("!=", CompareOp::Ne),
            ("<", CompareOp::Lt),
            (">", CompareOp::Gt),
        ];
        let (op, rest) = ops
            .iter()
            .find_map(|(sym, op)| s.strip_prefix(sym).map(|rest| (*op, rest)))?;
        let value: f64 = rest.trim().parse().ok()?;
        value.is_finite().then_some(Condition { op, value })
    }

    pub fn holds(&self, v: f64) -> bool {
        match self.op {
            CompareOp::Lt => v < self.value,
            CompareOp::Le => v <= self.value,
            CompareOp::Gt => v > self.value,
            CompareOp::Ge => v >= self.value,
            CompareOp::Eq => v == self.value,
            CompareOp::Ne => v != self.value,
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.op.symbol(), self.value)
    }
}

impl DeploySettings {
    /// The longest the rollout may go without progress before it fails.
    pub fn progress_deadline_ms(&self) -> u64 {
        self.health_deadline_ms + self.drain_timeout_ms + self.stop_timeout_ms + 30_000
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Progressing,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Failed
                | RolloutState::RolledBack
                | RolloutState::Aborted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Progressing => "progressing",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RolloutState::Pending,
            "progressing" => RolloutState::Progressing,
            "paused" => RolloutState::Paused,
            "succeeded" => RolloutState::Succeeded,
            "failed" => RolloutState::Failed,
            "rolled_back" => RolloutState::RolledBack,
            "aborted" => RolloutState::Aborted,
            _ => return None,
        })
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The persisted progress of one rollout: everything the planner needs to
/// resume after a control-plane restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: i64,
    pub app: String,
    /// The app's environment it deploys to ("" for an app without
    /// `[environments]`); each environment has its own rollouts.
    #[serde(default)]
    pub env: String,
    /// The release that was live when the rollout started (None on first deploy).
    pub from: Option<String>,
    pub to: String,
    pub state: RolloutState,
    /// True once the rollout failed and is moving back to `from`.
    pub reverting: bool,
    /// Rolling: instances of the target release ready. Recreate: 0 stopping, 1 starting.
    pub step: u32,
    pub message: String,
    /// Why it failed, kept while rolling back.
    pub failure: Option<String>,
    pub started_at: Millis,
    /// When the rollout started moving back (set with `reverting`).
    pub reverted_at: Option<Millis>,
    /// Last time `step` advanced (or the rollout started/reverted).
    pub progress_at: Millis,
    /// Canary progress (None for other strategies).
    #[serde(default)]
    pub canary: Option<CanaryProgress>,
    /// Blue/green progress (None for other strategies).
    #[serde(default)]
    pub blue_green: Option<BlueGreenProgress>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlueGreenProgress {
    /// An operator promoted it (`drover promote`).
    pub promoted: bool,
    /// When all users moved to the new set (None: still in preview).
    pub switched_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryProgress {
    /// Index into the settings' steps; `steps.len()` = past the last step
    /// (the rest of the instances are being replaced, no split).
    pub step: u32,
    /// Percent of users sent to the new release now.
    pub weight: u32,
    /// When the current step's instances were all serving and its weight
    /// applied: the start of its pause and analysis window.
    pub step_started_at: Option<Millis>,
    /// The last analysis verdict, for status.
    pub analysis: Option<String>,
    /// When the engine began measuring the step's analysis window (its
    /// measurements live in memory: after a server restart it measures
    /// again from then). The analysis deadline and the shortest passing
    /// window count from here; None: from `step_started_at`.
    #[serde(default)]
    pub window_started_at: Option<Millis>,
}

impl Rollout {
    /// A pending rollout of (app, env) from `from` (the live release, if
    /// any) to `to`, starting at `now`. Its id is the store's to assign.
    pub fn new(app: &str, env: &str, from: Option<String>, to: &str, now: Millis) -> Rollout {
        Rollout {
            id: 0,
            app: app.to_string(),
            env: env.to_string(),
            from,
            to: to.to_string(),
            state: RolloutState::Pending,
            reverting: false,
            step: 0,
            message: String::new(),
            failure: None,
            started_at: now,
            reverted_at: None,
            progress_at: now,
            canary: None,
            blue_green: None,
        }
    }

    /// The release the planner is currently moving towards.
    pub fn target(&self) -> Option<&str> {
        if self.reverting {
            self.from.as_deref()
        } else {
            Some(&self.to)
        }
    }

    /// When the current direction began: instances placed before it are not
    /// held to the health deadline of this phase.
    pub fn phase_started_at(&self) -> Millis {
        self.reverted_at.unwrap_or(self.started_at)
    }
}

/// What the server wants of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Run it; it may receive traffic when `routed` and healthy.
    Run,
    /// Out of routing since `since`; waiting for in-flight requests to finish.
    Drain { since: Millis },
    /// Stop it (SIGTERM, stop_timeout, SIGKILL).
    Stop,
}

/// What the agent last said of an instance, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Placed, not reported yet.
    Pending,
    /// Preparing or started, not yet healthy.
    Starting,
    Healthy,
    /// Failing checks, or crashed and waiting to restart.
    Unhealthy,
    /// Cannot run (bad artifact).
    Failed,
    /// Exited after a stop.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub release: String,
    pub node: String,
    pub desired: Desired,
    pub routed: bool,
    pub health: Health,
    /// When it was placed.
    pub created_at: Millis,
    /// Out of routing on every proxy and no request in flight (or the drain
    /// timeout passed). Only meaningful while `desired` is `Drain`.
    pub drained: bool,
    /// Last health-check result, for messages.
    pub last_check: Option<String>,
}

impl Instance {
    /// Still (possibly) a running process: counts towards max_surge.
    pub fn alive(&self) -> bool {
        !(self.desired == Desired::Stop && self.health == Health::Stopped)
    }

    /// Serving traffic now.
    pub fn serving(&self) -> bool {
        self.desired == Desired::Run && self.routed && self.health == Health::Healthy
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Heartbeat within its lease.
    pub ready: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A node (or proxy) with `labels` matches `selector` when it has every
/// label of it.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A label key or value: 1-63 letters, digits, '-', '_' or '.'.
pub fn valid_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `region=eu,role=web`.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
