//! What the dashboard's templates show, built from the API's own views
//! (`drover_api::AppStatus`, `RunInfo`, `NodeInfo`, …) by pure functions,
//! and the askama templates themselves (checked at compile time, HTML
//! escaped by default).
//!
//! Every state is written as a symbol and a word (colour only adds to it),
//! and the elements a script or test reads carry `data-*` attributes.

use super::chart::Chart;
use askama::Template;
use drover_api as api;
use std::collections::BTreeMap;

/// A state as shown: symbol + word, and a style class (colour is extra).
#[derive(Debug, Clone, PartialEq)]
pub struct StateLabel {
    pub text: String,
    /// ok | bad | warn | run | idle
    pub class: &'static str,
}

fn label(symbol: &str, word: &str, class: &'static str) -> StateLabel {
    StateLabel {
        text: format!("{symbol} {word}"),
        class,
    }
}

/// A rollout's state (`reverting` while an automatic or operator rollback moves back).
pub fn rollout_state(state: &str, reverting: bool) -> StateLabel {
    if reverting && state != "rolled_back" {
        return label("↺", "rolling back", "warn");
    }
    match state {
        "pending" => label("…", "pending", "idle"),
        "progressing" => label("▶", "progressing", "run"),
        "paused" => label("‖", "paused", "warn"),
        "succeeded" => label("✓", "succeeded", "ok"),
        "failed" => label("✗", "failed", "bad"),
        "rolled_back" => label("↺", "rolled back", "bad"),
        "aborted" => label("■", "aborted", "bad"),
        other => label("?", other, "idle"),
    }
}

pub fn instance_state(state: &str) -> StateLabel {
    match state {
        "healthy" => label("✓", state, "ok"),
        "pending" | "preparing" | "starting" => label("…", state, "idle"),
        "unhealthy" | "crashed" | "lost" => label("⚠", state, "warn"),
        "draining" => label("↘", state, "idle"),
        "stopping" | "stopped" => label("■", state, "idle"),
        "failed" => label("✗", state, "bad"),
        other => label("?", other, "idle"),
    }
}

pub fn run_state(state: &str) -> StateLabel {
    match state {
        "queued" => label("…", state, "idle"),
        "running" => label("▶", state, "run"),
        "waiting" => label("‖", state, "warn"),
        "succeeded" => label("✓", state, "ok"),
        "failed" => label("✗", state, "bad"),
        "superseded" => label("↷", state, "idle"),
        other => label("?", other, "idle"),
    }
}

/// "2026-11-05 12:34:56Z" (UTC; no time zone database on the server).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// "0.4 s", "12 s", "3 min", "2 h", "5 d".
pub fn age(ms: u64) -> String {
    match ms {
        0..=9_999 => format!("{:.1} s", ms as f64 / 1000.0),
        10_000..=119_999 => format!("{} s", ms / 1000),
        120_000..=7_199_999 => format!("{} min", ms / 60_000),
        7_200_000..=172_799_999 => format!("{} h", ms / 3_600_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

pub fn short_commit(c: &str) -> String {
    c.chars().take(12).collect()
}

/// The id suffix of an environment's parts ("_" for an app without environments).
pub fn env_key(env: &str) -> String {
    if env.is_empty() {
        "_".into()
    } else {
        env.to_string()
    }
}

pub fn env_title(env: &str) -> String {
    if env.is_empty() {
        "(no environments)".into()
    } else {
        env.to_string()
    }
}

// ----------------------------------------------------------- overview ----

#[derive(Debug, Clone)]
pub struct AppRow {
    pub name: String,
    pub repo: String,
    pub branch: String,
    pub envs: Vec<EnvRow>,
    /// Its records cannot be read: why.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EnvRow {
    pub env: String,
    pub title: String,
    pub host: String,
    pub live: String,
    pub commit: String,
    /// The newest rollout, one line; None before the first.
    pub rollout: Option<RolloutLine>,
}

#[derive(Debug, Clone)]
pub struct RolloutLine {
    pub state: String,
    pub label: StateLabel,
    /// "r1 → r2 · canary · step 1/2 · 20% of users"
    pub detail: String,
    /// Why it waits, or how it ended.
    pub message: String,
}

/// One line about a rollout, for tables.
pub fn rollout_line(r: &api::RolloutStatus) -> RolloutLine {
    let mut detail = vec![
        format!("{} → {}", r.from.as_deref().unwrap_or("∅"), r.to),
        r.strategy.clone(),
    ];
    if let Some(s) = &r.canary_step {
        detail.push(format!("step {s}"));
    }
    if let Some(w) = r.weight {
        detail.push(format!("{w}% of users on {}", r.to));
    }
    RolloutLine {
        state: r.state.clone(),
        label: rollout_state(&r.state, r.reverting),
        detail: detail.join(" · "),
        message: r.failure.clone().unwrap_or_else(|| r.message.clone()),
    }
}

/// A row per environment of one app, from its status in each.
pub fn app_row(
    info: &api::AppInfo,
    statuses: &[api::AppStatus],
    commits: &BTreeMap<String, String>,
) -> AppRow {
    AppRow {
        error: info.error.clone(),
        name: info.name.clone(),
        repo: info.repo.clone(),
        branch: info.branch.clone(),
        envs: info
            .environments
            .iter()
            .map(|e| {
                let st = statuses.iter().find(|s| s.environment == e.name);
                let live = e.live_release.clone().unwrap_or_default();
                EnvRow {
                    env: e.name.clone(),
                    title: env_title(&e.name),
                    host: e.host.clone(),
                    commit: commits
                        .get(&live)
                        .map(|c| short_commit(c))
                        .unwrap_or_default(),
                    live: if live.is_empty() { "—".into() } else { live },
                    rollout: st.and_then(|s| s.rollout.as_ref()).map(rollout_line),
                }
            })
            .collect(),
    }
}

#[derive(Template)]
#[template(path = "parts/apps.html")]
pub struct AppsPart {
    pub apps: Vec<AppRow>,
}

// ----------------------------------------------------------- app page ----

#[derive(Debug, Clone)]
pub struct RolloutView {
    pub id: i64,
    pub state: String,
    pub label: StateLabel,
    pub strategy: String,
    pub from: String,
    pub to: String,
    pub reverting: bool,
    /// Canary "1/2" (empty otherwise), for `data-step`.
    pub canary_step: String,
    /// Percent of users on `to` (empty without a split), for `data-weight`.
    pub weight: String,
    /// "step 1/2 · 20% of users on r2", or "" when not stepping.
    pub step_text: String,
    /// "2 of 3 instances of r2 serving"
    pub serving: String,
    /// The reason it waits, or what it did last.
    pub message: String,
    pub analysis: Option<String>,
    pub failure: Option<String>,
    pub preview: Option<String>,
    pub started: String,
}

#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub release: String,
    pub address: String,
    pub state: String,
    pub label: StateLabel,
    pub routed: bool,
    pub restarts: u32,
    /// The last health answer or the agent's message.
    pub note: String,
}

#[derive(Debug, Clone)]
pub struct NodeGroup {
    pub node: String,
    pub instances: Vec<InstanceRow>,
}

#[derive(Debug, Clone)]
pub struct Share {
    pub release: String,
    pub percent: u32,
}

/// One environment of the app page: its rollout, traffic and instances.
#[derive(Template, Debug, Clone)]
#[template(path = "parts/env.html")]
pub struct EnvPart {
    pub env: String,
    pub host: String,
    pub live: String,
    pub live_commit: String,
    pub promote: String,
    pub rollout: Option<RolloutView>,
    pub traffic: Vec<Share>,
}

/// One environment's instances, per node, with their health.
#[derive(Template, Debug, Clone)]
#[template(path = "parts/instances.html")]
pub struct InstancesPart {
    pub nodes: Vec<NodeGroup>,
}

pub fn rollout_view(r: &api::RolloutStatus) -> RolloutView {
    let mut step = Vec::new();
    if let Some(s) = &r.canary_step {
        step.push(format!("step {s}"));
    }
    if let Some(w) = r.weight {
        step.push(format!("{w}% of users on {}", r.to));
    }
    RolloutView {
        id: r.id,
        state: r.state.clone(),
        label: rollout_state(&r.state, r.reverting),
        strategy: r.strategy.clone(),
        from: r.from.clone().unwrap_or_else(|| "∅".into()),
        to: r.to.clone(),
        reverting: r.reverting,
        canary_step: r.canary_step.clone().unwrap_or_default(),
        weight: r.weight.map(|w| w.to_string()).unwrap_or_default(),
        step_text: step.join(" · "),
        serving: format!("{} of {} instances of {} serving", r.step, r.steps, r.to),
        message: r.message.clone(),
        analysis: r.analysis.clone(),
        failure: r.failure.clone(),
        preview: r.preview.clone(),
        started: utc(r.started_at_ms),
    }
}

pub fn instances_part(st: &api::AppStatus) -> InstancesPart {
    let mut nodes: BTreeMap<String, Vec<InstanceRow>> = BTreeMap::new();
    for i in &st.instances {
        nodes.entry(i.node.clone()).or_default().push(InstanceRow {
            id: i.id.clone(),
            release: i.release.clone(),
            address: i.address.clone().unwrap_or_default(),
            state: i.state.clone(),
            label: instance_state(&i.state),
            routed: i.routed,
            restarts: i.restarts,
            note: i
                .message
                .clone()
                .or_else(|| i.last_check.clone())
                .unwrap_or_default(),
        });
    }
    InstancesPart {
        nodes: nodes
            .into_iter()
            .map(|(node, instances)| NodeGroup { node, instances })
            .collect(),
    }
}

pub fn env_part(st: &api::AppStatus, commits: &BTreeMap<String, String>) -> EnvPart {
    let summary = st.environments.iter().find(|e| e.name == st.environment);
    let live = st.live_release.clone().unwrap_or_default();
    EnvPart {
        env: st.environment.clone(),
        host: summary.map(|e| e.host.clone()).unwrap_or_default(),
        live_commit: commits
            .get(&live)
            .map(|c| short_commit(c))
            .unwrap_or_default(),
        live: if live.is_empty() { "—".into() } else { live },
        promote: summary.map(|e| e.promote.clone()).unwrap_or_default(),
        rollout: st.rollout.as_ref().map(rollout_view),
        traffic: st
            .traffic
            .iter()
            .map(|(r, p)| Share {
                release: r.clone(),
                percent: *p,
            })
            .collect(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// promote | pause | resume | abort | rollback (the API path's last part)
    pub name: &'static str,
    pub enabled: bool,
    /// Asked in the confirmation.
    pub question: String,
}

/// The operator's buttons of one environment.
#[derive(Template, Debug, Clone)]
#[template(path = "parts/actions.html")]
pub struct ActionsPart {
    pub app: String,
    pub env: String,
    /// Whether the caller may act (a deployer or admin token); a viewer
    /// gets no buttons (and the API would refuse them anyway).
    pub can_act: bool,
    pub actions: Vec<Action>,
}

/// Which controls apply to the environment now (the API is the judge: a
/// click on one that no longer applies shows its refusal). `waiting_for`:
/// the environment a release waits to be promoted into, if any.
pub fn actions(app: &str, st: &api::AppStatus, waiting_for: Option<&str>) -> Vec<Action> {
    let active = st.rollout.as_ref().filter(|r| {
        !matches!(
            &r.state[..],
            "succeeded" | "failed" | "rolled_back" | "aborted"
        )
    });
    let steering = active.filter(|r| !r.reverting);
    let split =
        steering.is_some_and(|r| matches!(&r.strategy[..], "canary" | "blue_green" | "partial"));
    let at = if st.environment.is_empty() {
        app.to_string()
    } else {
        format!("{app} in {}", st.environment)
    };
    let to = active.map(|r| r.to.clone()).unwrap_or_default();
    // Promotion into the next environment is this environment's button.
    let waiting = st
        .waiting
        .as_ref()
        .filter(|_| waiting_for == Some(&st.environment[..]));
    vec![
        Action {
            name: "promote",
            enabled: split || waiting.is_some(),
            question: match (split, waiting) {
                (true, _) => format!("Promote {to} of {at} to its next step?"),
                (false, Some(w)) => format!("Promote: {w}?"),
                _ => format!("Promote {at}?"),
            },
        },
        Action {
            name: "pause",
            enabled: steering.is_some_and(|r| r.state == "progressing"),
            question: format!("Pause the rollout of {to} in {at}?"),
        },
        Action {
            name: "resume",
            enabled: steering.is_some_and(|r| r.state == "paused"),
            question: format!("Resume the rollout of {to} in {at}?"),
        },
        Action {
            name: "abort",
            enabled: steering.is_some(),
            question: format!(
                "Abort the rollout of {to} in {at}? Traffic goes back to {}.",
                active
                    .and_then(|r| r.from.clone())
                    .unwrap_or_else(|| "the stable release".into())
            ),
        },
        Action {
            name: "rollback",
            enabled: steering.is_some() || st.live_release.is_some(),
            question: match steering {
                Some(r) => format!(
                    "Roll {at} back to {}? The rollout of {} reverts.",
                    r.from.as_deref().unwrap_or("the stable release"),
                    r.to
                ),
                None => format!("Roll {at} back to the previous release?"),
            },
        },
    ]
}

#[derive(Template)]
#[template(path = "parts/chart.html")]
pub struct ChartPart {
    pub env: String,
    pub chart: Chart,
}

#[derive(Template)]
#[template(path = "parts/head.html")]
pub struct HeadPart {
    pub waiting: Option<String>,
    pub last_run: Option<RunRow>,
}

#[derive(Debug, Clone)]
pub struct ReleaseRow {
    pub name: String,
    pub commit: String,
    pub created: String,
    pub status: String,
    pub live_in: String,
}

#[derive(Template)]
#[template(path = "parts/releases.html")]
pub struct ReleasesPart {
    pub releases: Vec<ReleaseRow>,
}

pub fn release_rows(list: &[api::ReleaseInfo]) -> Vec<ReleaseRow> {
    list.iter()
        .map(|r| ReleaseRow {
            name: r.name.clone(),
            commit: short_commit(&r.commit),
            created: utc(r.created_at_ms),
            status: r.status.clone(),
            live_in: r
                .live_in
                .iter()
                .map(|e| env_title(e))
                .collect::<Vec<_>>()
                .join(", "),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: i64,
    pub trigger: String,
    pub commit: String,
    pub release: String,
    pub state: String,
    pub label: StateLabel,
    /// "✓ checkout 0.1 s · ✓ build 2.0 s · ▶ deploy"
    pub steps: String,
    pub created: String,
    pub error: Option<String>,
}

pub fn run_row(r: &api::RunInfo) -> RunRow {
    RunRow {
        id: r.id,
        trigger: r.trigger.clone(),
        commit: short_commit(&r.commit),
        release: r.release.clone().unwrap_or_default(),
        state: r.state.clone(),
        label: run_state(&r.state),
        steps: r
            .steps
            .iter()
            .map(|s| {
                let sym = run_state(&s.state).text;
                let sym = sym.split(' ').next().unwrap_or("");
                match s.duration_ms {
                    Some(d) => format!("{sym} {} {}", s.name, drover_core::duration::format_ms(d)),
                    None => format!("{sym} {}", s.name),
                }
            })
            .collect::<Vec<_>>()
            .join(" · "),
        created: utc(r.created_at_ms),
        error: r.error.clone(),
    }
}

#[derive(Template)]
#[template(path = "parts/runs.html")]
pub struct RunsPart {
    pub runs: Vec<RunRow>,
}

// ----------------------------------------------------------- run page ----

#[derive(Debug, Clone)]
pub struct StepRow {
    pub name: String,
    pub label: StateLabel,
    pub started: String,
    pub duration: String,
    pub log_tail: Option<String>,
}

#[derive(Template)]
#[template(path = "parts/run.html")]
pub struct RunPart {
    pub run: RunRow,
    pub app: String,
    pub git_ref: String,
    pub commit_full: String,
    pub updated: String,
    pub steps: Vec<StepRow>,
}

pub fn run_part(r: &api::RunInfo) -> RunPart {
    RunPart {
        run: run_row(r),
        app: r.app.clone(),
        git_ref: r.git_ref.clone(),
        commit_full: r.commit.clone(),
        updated: utc(r.updated_at_ms),
        steps: r
            .steps
            .iter()
            .map(|s| StepRow {
                name: s.name.clone(),
                label: run_state(&s.state),
                started: utc(s.started_at_ms),
                duration: s
                    .duration_ms
                    .map(drover_core::duration::format_ms)
                    .unwrap_or_default(),
                log_tail: s.log_tail.clone(),
            })
            .collect(),
    }
}

// --------------------------------------------------------- nodes page ----

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub ready: bool,
    pub label: StateLabel,
    pub labels: String,
    pub heartbeat: String,
    pub instances: u32,
}

pub fn node_rows(nodes: &[api::NodeInfo]) -> Vec<NodeRow> {
    nodes
        .iter()
        .map(|n| NodeRow {
            name: n.name.clone(),
            ready: n.ready,
            label: if n.ready {
                label("✓", "ready", "ok")
            } else {
                label("✗", "not ready", "bad")
            },
            labels: if n.labels.is_empty() {
                "—".into()
            } else {
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            heartbeat: format!("{} ago", age(n.last_seen_ms_ago)),
            instances: n.instances,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "parts/nodes.html")]
pub struct NodesPart {
    pub nodes: Vec<NodeRow>,
}

// -------------------------------------------------------------- pages ----

/// A live region of a page: its element id and its HTML.
pub struct Slot {
    pub id: String,
    pub html: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub title: String,
    pub stream: String,
    /// Who is signed in, e.g. "ci (deployer)".
    pub who: String,
    pub apps: Slot,
}

pub struct EnvSlots {
    pub env: String,
    pub title: String,
    pub state: Slot,
    pub actions: Slot,
    pub chart: Slot,
    pub instances: Slot,
}

#[derive(Template)]
#[template(path = "app.html")]
pub struct AppPage {
    pub title: String,
    pub stream: String,
    /// Who is signed in, e.g. "ci (deployer)".
    pub who: String,
    pub app: String,
    pub repo: String,
    pub branch: String,
    pub head: Slot,
    pub envs: Vec<EnvSlots>,
    pub releases: Slot,
    pub runs: Slot,
}

#[derive(Template)]
#[template(path = "run.html")]
pub struct RunPage {
    pub title: String,
    pub stream: String,
    /// Who is signed in, e.g. "ci (deployer)".
    pub who: String,
    pub app: String,
    pub id: i64,
    pub run: Slot,
    /// The log shown at first (its tail when it is long).
    pub log: String,
    /// The byte offset the live log continues from.
    pub log_offset: u64,
    pub log_cut: bool,
}

#[derive(Template)]
#[template(path = "nodes.html")]
pub struct NodesPage {
    pub title: String,
    pub stream: String,
    /// Who is signed in, e.g. "ci (deployer)".
    pub who: String,
    pub nodes: Slot,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub stream: String,
    /// Who is signed in, e.g. "ci (deployer)".
    pub who: String,
    pub message: String,
}
