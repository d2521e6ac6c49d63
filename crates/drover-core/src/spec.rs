//! `drover.toml`: the app spec, parsed and validated.
//!
//! Every error names the file, line, column and field, and says what to do
//! (SCENARIOS.md 15). Parsing is strict: unknown fields are errors, so a typo
//! never silently falls back to a default.

use crate::duration::parse_duration_ms;
use crate::model::{
    AnalysisSettings, CanaryStep, Condition, DeploySettings, MetricQuery, Strategy,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use toml::Spanned;

/// A validated app spec. Durations are in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: String,
    pub build: BuildSpec,
    pub test: Option<CommandSpec>,
    pub run: RunSpec,
    pub health: HealthSpec,
    pub route: RouteSpec,
    pub deploy: DeploySettings,
    pub release: Option<CommandSpec>,
    /// In file order: a release goes through them one after the other
    /// (e.g. staging, then production). Empty: one unnamed environment.
    pub environments: Vec<EnvironmentSpec>,
    /// `[[notify]]`: webhooks called on rollout events, in file order.
    #[serde(default)]
    pub notify: Vec<NotifySpec>,
    /// `[registry]`: a container image release is pushed there and the
    /// agents pull it (instead of the server's archive).
    #[serde(default)]
    pub registry: Option<RegistrySpec>,
}

/// `[registry]`: where a container image release is pushed, as
/// `<server>/<repository>:rN`, and pulled from by digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrySpec {
    /// `host[:port]`, e.g. `registry.example.com` or `127.0.0.1:5000`.
    pub server: String,
    /// The repository path on it (default: the app's name).
    pub repository: String,
    /// For a registry that asks for a login: the user name, and the name
    /// of the app's secret holding the password.
    pub username: Option<String>,
    pub password_secret: Option<String>,
}

impl RegistrySpec {
    /// `<server>/<repository>`.
    pub fn image_repo(&self) -> String {
        format!("{}/{}", self.server, self.repository)
    }
}

/// One `[[notify]]` table: a webhook called with a signed JSON body when a
/// rollout of the app starts, steps, pauses, succeeds, fails or rolls back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifySpec {
    /// `http://` or `https://` URL the body is POSTed to.
    pub url: String,
    /// The name of the app's secret (`drover secrets set APP NAME`) whose
    /// value keys the body's HMAC-SHA256 signature.
    pub secret: String,
    /// Which events (see [`NOTIFY_EVENTS`]); empty: all.
    pub events: Vec<String>,
}

/// The rollout events a webhook can ask for: `rollout.<event>` in the
/// event log, `"event": "rollout.<event>"` in the body.
pub const NOTIFY_EVENTS: &[&str] = &[
    "started",
    "step",
    "switched",
    "paused",
    "resumed",
    "promoted",
    "succeeded",
    "failed",
    "rolling_back",
    "rolled_back",
    "aborted",
];

impl NotifySpec {
    /// Whether this webhook wants `event` (the part after `rollout.`).
    pub fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// `None`: nothing to build, the artifact is taken from the checkout.
    pub command: Option<String>,
    pub artifact: Vec<String>,
    pub timeout_ms: u64,
    /// `[build] image`: the release is a container image built from
    /// [`Self::dockerfile`] (run by the agents' docker driver). `None`: an
    /// image exactly when the checkout has that Dockerfile.
    #[serde(default)]
    pub image: Option<bool>,
    /// The Dockerfile's path in the checkout (`Dockerfile`).
    #[serde(default = "default_dockerfile")]
    pub dockerfile: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

impl BuildSpec {
    /// Whether this build makes a container image, given whether the
    /// checkout has the Dockerfile.
    pub fn makes_image(&self, has_dockerfile: bool) -> bool {
        self.image.unwrap_or(has_dockerfile)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub command: String,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Empty only for a container image: the image's own command runs.
    pub command: String,
    pub instances: u32,
    pub stop_timeout_ms: u64,
    pub env: BTreeMap<String, String>,
    /// `[run] memory`: a container's memory limit, in bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// `[run] cpus`: a container's CPU limit, in CPUs (0.5 = half of one).
    #[serde(default)]
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub host: String,
    /// Where a request's user key comes from, for sticky traffic splits:
    /// `header:NAME` or `cookie:NAME` (default `cookie:drover_user`).
    #[serde(default = "default_user_key")]
    pub user_key: String,
}

fn default_user_key() -> String {
    "cookie:drover_user".into()
}

/// One `[environments.NAME]` table, with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentSpec {
    pub name: String,
    /// Node selector: a node runs this environment's instances only when it
    /// has every one of these labels. Empty: any node.
    pub nodes: BTreeMap<String, String>,
    /// The host the proxy serves it on. Default: `[route] host` for the last
    /// environment, `NAME.<route host>` for the others.
    pub host: String,
    /// Default: `[run] instances`.
    pub instances: u32,
    /// Added to (and overriding) `[run] env`.
    pub env: BTreeMap<String, String>,
    /// Run (sh -c, in the release's checkout) once this environment serves
    /// the release, with DROVER_URL set; a failure stops the release here.
    pub smoke_test: Option<CommandSpec>,
    /// How a release that passed the previous environment enters this one.
    pub promote: Promote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promote {
    /// As soon as the previous environment passed (continuous deployment).
    Auto,
    /// When someone runs `drover promote APP` (continuous delivery).
    Manual,
}

/// " in staging", or "" for an app without environments (for messages).
pub fn in_env(env: &str) -> String {
    if env.is_empty() {
        String::new()
    } else {
        format!(" in {env}")
    }
}

impl AppSpec {
    /// Environment names in order; `[""]` for an app without `[environments]`.
    pub fn env_names(&self) -> Vec<String> {
        if self.environments.is_empty() {
            vec![String::new()]
        } else {
            self.environments.iter().map(|e| e.name.clone()).collect()
        }
    }

    pub fn environment(&self, env: &str) -> Option<&EnvironmentSpec> {
        self.environments.iter().find(|e| e.name == env)
    }

    /// The spec as it applies in `env`, overrides applied (instances, host,
    /// run env). `None` when the spec has no such environment.
    pub fn for_env(&self, env: &str) -> Option<AppSpec> {
        if env.is_empty() && self.environments.is_empty() {
            return Some(self.clone());
        }
        let e = self.environment(env)?;
        let mut s = self.clone();
        s.run.instances = e.instances;
        s.deploy.instances = e.instances;
        s.route.host = e.host.clone();
        s.run.env.extend(e.env.clone());
        Some(s)
    }
}

/// A spec error: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted field path, e.g. `deploy.max_surge`; empty for syntax errors.
    pub field: String,
    pub message: String,
    /// The offending source line, for display.
    pub snippet: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)?;
        if !self.snippet.is_empty() {
            let width = self.line.to_string().len();
            write!(
                f,
                "\n {:width$} |\n {} | {}\n {:width$} | {}^",
                "",
                self.line,
                self.snippet,
                "",
                " ".repeat(self.column.saturating_sub(1))
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

// ----------------------------------------------------------- raw shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    app: Spanned<RawApp>,
    #[serde(default)]
    build: Option<RawBuild>,
    #[serde(default)]
    test: Option<RawCommand>,
    run: Spanned<RawRun>,
    #[serde(default)]
    health: Option<RawHealth>,
    route: Option<Spanned<RawRoute>>,
    #[serde(default)]
    deploy: Option<RawDeploy>,
    #[serde(default)]
    release: Option<RawCommand>,
    #[serde(default)]
    environments: BTreeMap<String, Spanned<RawEnvironment>>,
    #[serde(default)]
    notify: Vec<Spanned<RawNotify>>,
    #[serde(default)]
    registry: Option<Spanned<RawRegistry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    server: Spanned<String>,
    repository: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_secret: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    url: Spanned<String>,
    secret: Option<Spanned<String>>,
    #[serde(default)]
    events: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: Option<String>,
    #[serde(default)]
    artifact: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
    image: Option<bool>,
    dockerfile: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    command: Spanned<String>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    command: Option<Spanned<String>>,
    instances: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
    cpus: Option<Spanned<f64>>,
    stop_timeout: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_after: Option<Spanned<i64>>,
    unhealthy_after: Option<Spanned<i64>>,
    deadline: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Spanned<String>,
    user_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    strategy: Option<Spanned<String>>,
    max_surge: Option<Spanned<i64>>,
    max_unavailable: Option<Spanned<i64>>,
    #[serde(default)]
    steps: Option<Spanned<Vec<Spanned<RawStep>>>>,
    auto_rollback: Option<bool>,
    drain_timeout: Option<Spanned<String>>,
    #[serde(default)]
    analysis: Option<Spanned<RawAnalysis>>,
    auto_promote: Option<bool>,
    bake: Option<Spanned<String>>,
    preview_check: Option<Spanned<String>>,
    #[serde(default)]
    partial: Option<Spanned<RawPartial>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartial {
    #[serde(default)]
    users: Vec<String>,
    percent: Option<Spanned<i64>>,
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    instances: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    weight: Spanned<i64>,
    pause: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    max_error_rate: Option<Spanned<f64>>,
    max_p99_latency: Option<Spanned<String>>,
    min_requests: Option<Spanned<i64>>,
    interval: Option<Spanned<String>>,
    deadline: Option<Spanned<String>>,
    builtin: Option<bool>,
    prometheus: Option<Spanned<String>>,
    #[serde(default)]
    query: Vec<Spanned<RawQuery>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    name: Spanned<String>,
    query: Spanned<String>,
    condition: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    host: Option<Spanned<String>>,
    instances: Option<Spanned<i64>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    smoke_test: Option<Spanned<String>>,
    smoke_timeout: Option<Spanned<String>>,
    promote: Option<Spanned<String>>,
}

// ------------------------------------------------------------- parsing ----

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> SpecError {
        let start = span.start.min(self.src.len());
        let before = &self.src[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = self.src[line_start..start].chars().count() + 1;
        let snippet = self.src[line_start..]
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        SpecError {
            file: self.file.to_string(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            snippet,
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: u64,
    ) -> Result<u64, SpecError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration_ms(s.get_ref()).map_err(|m| self.err(s.span(), field, m)),
        }
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        field: &str,
        default: u32,
        min: i64,
        max: i64,
    ) -> Result<u32, SpecError> {
        match v {
            None => Ok(default),
            Some(n) => {
                let x = *n.get_ref();
                if x < min || x > max {
                    Err(self.err(
                        n.span(),
                        field,
                        format!("{x} is out of range; use a whole number from {min} to {max}"),
                    ))
                } else {
                    Ok(x as u32)
                }
            }
        }
    }
}

/// Parses and validates `drover.toml` source. `file` is only used in errors.
pub fn parse_spec(file: &str, src: &str) -> Result<AppSpec, SpecError> {
    let ctx = Ctx { file, src };
    let raw: Raw = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let field = field_at(src, &span);
        let message = e.message().trim().to_string();
        let message = if message.contains("unknown field") {
            format!("{message}; remove it or fix its spelling")
        } else {
            message
        };
        ctx.err(span, &field, message)
    })?;

    let name = raw.app.get_ref().name.clone();
    if !valid_name(name.get_ref()) {
        return Err(ctx.err(
            name.span(),
            "app.name",
            format!(
                "{:?} is not a valid app name; use 1-40 lowercase letters, digits and '-', starting with a letter",
                name.get_ref()
            ),
        ));
    }

    let build = match raw.build {
        None => BuildSpec {
            command: None,
            artifact: vec![".".into()],
            timeout_ms: 600_000,
            image: None,
            dockerfile: default_dockerfile(),
        },
        Some(b) => {
            let timeout_ms = ctx.duration(&b.timeout, "build.timeout", 600_000)?;
            let artifact = match b.artifact {
                None => vec![".".to_string()],
                Some(list) => {
                    if list.get_ref().is_empty() {
                        return Err(ctx.err(list.span(), "build.artifact", "the artifact list is empty; list the files and directories to ship, e.g. [\"target/release/app\"]"));
                    }
                    let mut out = Vec::new();
                    for p in list.get_ref() {
                        let s = p.get_ref();
                        if s.is_empty() || s.starts_with('/') || s.split('/').any(|c| c == "..") {
                            return Err(ctx.err(p.span(), "build.artifact", format!("{s:?} must be a relative path inside the checkout (no leading '/', no '..')")));
                        }
                        out.push(s.clone());
                    }
                    out
                }
            };
            let dockerfile = match &b.dockerfile {
                None => default_dockerfile(),
                Some(d) => {
                    let s = d.get_ref();
                    if s.is_empty() || s.starts_with('/') || s.split('/').any(|c| c == "..") {
                        return Err(ctx.err(d.span(), "build.dockerfile", format!("{s:?} must be a relative path inside the checkout (no leading '/', no '..'), e.g. \"Dockerfile\"")));
                    }
                    s.clone()
                }
            };
            if let (Some(false), Some(d)) = (b.image, &b.dockerfile) {
                return Err(ctx.err(
                    d.span(),
                    "build.dockerfile",
                    "is set but [build] image = false; remove one of them",
                ));
            }
            BuildSpec {
                command: b.command.filter(|c| !c.trim().is_empty()),
                artifact,
                timeout_ms,
                image: b.image,
                dockerfile,
            }
        }
    };

    let test = match raw.test {
        None => None,
        Some(t) => Some(CommandSpec {
            timeout_ms: ctx.duration(&t.timeout, "test.timeout", 600_000)?,
            command: nonempty(&ctx, &t.command, "test.command")?,
        }),
    };
    let release = match raw.release {
        None => None,
        Some(t) => Some(CommandSpec {
            timeout_ms: ctx.duration(&t.timeout, "release.timeout", 600_000)?,
            command: nonempty(&ctx, &t.command, "release.command")?,
        }),
    };

    let r = raw.run.get_ref();
    let command = match &r.command {
        Some(c) => nonempty(&ctx, c, "run.command")?,
        None if build.image == Some(false) => {
            return Err(ctx.err(raw.run.span(), "run.command", "is missing; an app that is not a container image needs the command that starts it, e.g. command = \"./app\""));
        }
        // A container image's own command (decided at build time: an app
        // without an image is refused then).
        None => String::new(),
    };
    let memory_bytes = match &r.memory {
        None => None,
        Some(m) => Some(parse_bytes(m.get_ref()).ok_or_else(|| {
            ctx.err(
                m.span(),
                "run.memory",
                format!(
                    "{:?} is not a size; use a number with k, m or g, e.g. \"256m\" (at least 6m)",
                    m.get_ref()
                ),
            )
        })?),
    };
    let cpus = match &r.cpus {
        None => None,
        Some(c) if c.get_ref().is_finite() && *c.get_ref() >= 0.01 && *c.get_ref() <= 1024.0 => {
            Some(*c.get_ref())
        }
        Some(c) => {
            return Err(ctx.err(
                c.span(),
                "run.cpus",
                format!(
                    "{} is out of range; use a number of CPUs from 0.01 to 1024, e.g. 0.5",
                    c.get_ref()
                ),
            ))
        }
    };
    let run = RunSpec {
        command,
        instances: ctx.count(&r.instances, "run.instances", 1, 1, 1000)?,
        stop_timeout_ms: ctx.duration(&r.stop_timeout, "run.stop_timeout", 10_000)?,
        env: r.env.clone(),
        memory_bytes,
        cpus,
    };
    for k in r.env.keys() {
        if !valid_env_name(k) {
            return Err(ctx.err(raw.run.span(), "run.env", format!("environment variable name {k:?} is not allowed; use letters, digits and '_' (PORT and DROVER_* are set by drover)")));
        }
    }

    let health = {
        let h = raw.health.unwrap_or(RawHealth {
            path: None,
            interval: None,
            timeout: None,
            healthy_after: None,
            unhealthy_after: None,
            deadline: None,
        });
        let path = match &h.path {
            None => "/healthz".to_string(),
            Some(p) => url_path(&ctx, p, "health.path")?,
        };
        let interval_ms = ctx.duration(&h.interval, "health.interval", 1_000)?;
        if interval_ms < 50 {
            let s = h.interval.as_ref().map(|s| s.span()).unwrap_or(0..0);
            return Err(ctx.err(s, "health.interval", "must be at least 50ms"));
        }
        HealthSpec {
            path,
            interval_ms,
            timeout_ms: ctx.duration(&h.timeout, "health.timeout", interval_ms.clamp(50, 5_000))?,
            healthy_after: ctx.count(&h.healthy_after, "health.healthy_after", 1, 1, 100)?,
            unhealthy_after: ctx.count(&h.unhealthy_after, "health.unhealthy_after", 3, 1, 100)?,
            deadline_ms: ctx.duration(&h.deadline, "health.deadline", 60_000)?,
        }
    };

    let route = match raw.route {
        None => return Err(ctx.err(0..0, "route.host", "missing [route] section; add [route] with host = \"myapp.example.com\" so the proxy can reach the app")),
        Some(rt) => {
            let h = &rt.get_ref().host;
            let s = h.get_ref();
            if !valid_host(s) {
                return Err(ctx.err(h.span(), "route.host", format!("{s:?} is not a valid host name; use letters, digits, '-' and '.' such as \"hello.localhost\"")));
            }
            let user_key = match &rt.get_ref().user_key {
                None => default_user_key(),
                Some(k) => {
                    let v = k.get_ref();
                    let ok = v
                        .split_once(':')
                        .filter(|(kind, name)| {
                            matches!(*kind, "header" | "cookie")
                                && !name.is_empty()
                                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                        })
                        .is_some();
                    if !ok {
                        return Err(ctx.err(k.span(), "route.user_key", format!("{v:?} is not a user key source; use \"header:NAME\" or \"cookie:NAME\" (letters, digits, '-', '_')")));
                    }
                    v.to_ascii_lowercase()
                }
            };
            RouteSpec { host: s.to_ascii_lowercase(), user_key }
        }
    };

    let deploy = {
        let d = raw.deploy.unwrap_or(RawDeploy {
            strategy: None,
            max_surge: None,
            max_unavailable: None,
            steps: None,
            auto_rollback: None,
            drain_timeout: None,
            analysis: None,
            auto_promote: None,
            bake: None,
            preview_check: None,
            partial: None,
        });
        let strategy = match &d.strategy {
            None => Strategy::Rolling,
            Some(s) => match s.get_ref().as_str() {
                "rolling" => Strategy::Rolling,
                "recreate" => Strategy::Recreate,
                "canary" => Strategy::Canary,
                "blue_green" => Strategy::BlueGreen,
                "partial" => Strategy::Partial,
                other => return Err(ctx.err(s.span(), "deploy.strategy", format!("unknown strategy {other:?}; use one of rolling, canary, blue_green, partial, recreate"))),
            },
        };
        let max_surge = ctx.count(&d.max_surge, "deploy.max_surge", 1, 0, 1000)?;
        let max_unavailable =
            ctx.count(&d.max_unavailable, "deploy.max_unavailable", 0, 0, 1000)?;
        // Canary and partial finish (and roll back) by the rolling rules too.
        let replaces_rolling = matches!(
            strategy,
            Strategy::Rolling | Strategy::Canary | Strategy::Partial
        );
        if replaces_rolling && max_surge == 0 && max_unavailable == 0 {
            let span = d
                .max_surge
                .as_ref()
                .or(d.max_unavailable.as_ref())
                .map(|s| s.span())
                .unwrap_or(0..0);
            return Err(ctx.err(span, "deploy.max_surge", "max_surge and max_unavailable are both 0, so no instance could ever be replaced; set max_surge = 1 (or max_unavailable = 1)"));
        }
        if max_unavailable > run.instances {
            let span = d.max_unavailable.as_ref().map(|s| s.span()).unwrap_or(0..0);
            return Err(ctx.err(
                span,
                "deploy.max_unavailable",
                format!(
                    "{max_unavailable} is more than run.instances ({}); use at most {}",
                    run.instances, run.instances
                ),
            ));
        }
        let mut steps = Vec::new();
        if let Some(raw_steps) = &d.steps {
            let mut last = 0;
            for st in raw_steps.get_ref() {
                let w = *st.get_ref().weight.get_ref();
                if !(0..=100).contains(&w) {
                    return Err(ctx.err(
                        st.get_ref().weight.span(),
                        "deploy.steps.weight",
                        format!("weight {w} is not a percentage; use 0 to 100"),
                    ));
                }
                if w < last {
                    return Err(ctx.err(st.get_ref().weight.span(), "deploy.steps.weight", format!("weight {w} is lower than the step before ({last}); step weights must not decrease")));
                }
                last = w;
                steps.push(CanaryStep {
                    weight: w as u32,
                    pause_ms: ctx.duration(&st.get_ref().pause, "deploy.steps.pause", 0)?,
                });
            }
        }
        let (mut partial_users, mut partial_instances) = (Vec::new(), 0);
        let mut partial_nodes = BTreeMap::new();
        if strategy == Strategy::Partial {
            let Some(p) = &d.partial else {
                let span = d.strategy.as_ref().map(|s| s.span()).unwrap_or(0..0);
                return Err(ctx.err(span, "deploy.partial", "a partial deployment needs its segment: add [deploy.partial] with users = [\"alice\", \"bob\"], percent = 5 or nodes = { region = \"eu\" }"));
            };
            let raw = p.get_ref();
            let percent = ctx.count(&raw.percent, "deploy.partial.percent", 0, 0, 100)?;
            let given = [!raw.users.is_empty(), percent > 0, !raw.nodes.is_empty()];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ctx.err(p.span(), "deploy.partial", "give exactly one segment: users = [...] (listed user keys), percent = N (a hash share of user keys) or nodes = { region = \"eu\" } (nodes and proxies with these labels)"));
            }
            if let Some((k, v)) = raw
                .nodes
                .iter()
                .find(|(k, v)| !crate::model::valid_label(k) || !crate::model::valid_label(v))
            {
                return Err(ctx.err(
                    p.span(),
                    "deploy.partial.nodes",
                    format!("{k}={v} is not a label; use letters, digits, '-', '_' and '.'"),
                ));
            }
            partial_nodes = raw.nodes.clone();
            if raw
                .users
                .iter()
                .any(|u| u.is_empty() || u.chars().any(|c| c.is_control()))
            {
                return Err(ctx.err(
                    p.span(),
                    "deploy.partial.users",
                    "user keys must be non-empty text without control characters",
                ));
            }
            partial_users = raw.users.clone();
            partial_instances = ctx.count(
                &raw.instances,
                "deploy.partial.instances",
                1,
                1,
                run.instances.into(),
            )?;
            // One step held until promoted: the segment.
            steps = vec![CanaryStep {
                weight: percent,
                pause_ms: u64::MAX,
            }];
        }
        if strategy == Strategy::Canary && steps.is_empty() {
            let span = d.strategy.as_ref().map(|s| s.span()).unwrap_or(0..0);
            return Err(ctx.err(span, "deploy.steps", "a canary needs steps, e.g. steps = [{ weight = 10, pause = \"1m\" }, { weight = 50, pause = \"1m\" }]"));
        }
        let mut analysis = None;
        if let Some(sa) = &d.analysis {
            let a = sa.get_ref();
            if let Some(r) = &a.max_error_rate {
                let v = *r.get_ref();
                if !(0.0..=1.0).contains(&v) {
                    return Err(ctx.err(
                        r.span(),
                        "deploy.analysis.max_error_rate",
                        format!("{v} is not a ratio; use a number from 0 to 1 (0.01 = 1%)"),
                    ));
                }
            }
            let interval_ms = ctx.duration(&a.interval, "deploy.analysis.interval", 10_000)?;
            let queries = analysis_queries(&ctx, a)?;
            let builtin = a.builtin.unwrap_or(true);
            if !builtin && queries.is_empty() {
                return Err(ctx.err(
                    sa.span(),
                    "deploy.analysis.builtin",
                    "builtin = false leaves nothing to judge; add a [[deploy.analysis.query]] or remove builtin = false",
                ));
            }
            analysis = Some(AnalysisSettings {
                builtin,
                prometheus: a
                    .prometheus
                    .as_ref()
                    .map(|p| p.get_ref().trim_end_matches('/').to_string()),
                queries,
                max_error_rate: a.max_error_rate.as_ref().map(|r| *r.get_ref()),
                max_p99_ms: match &a.max_p99_latency {
                    None => None,
                    Some(_) => Some(ctx.duration(
                        &a.max_p99_latency,
                        "deploy.analysis.max_p99_latency",
                        0,
                    )?),
                },
                min_requests: u64::from(ctx.count(
                    &a.min_requests,
                    "deploy.analysis.min_requests",
                    20,
                    1,
                    1_000_000_000,
                )?),
                interval_ms,
                deadline_ms: ctx.duration(&a.deadline, "deploy.analysis.deadline", 600_000)?,
            });
        }
        DeploySettings {
            strategy,
            instances: run.instances,
            max_surge,
            max_unavailable,
            health_deadline_ms: health.deadline_ms,
            drain_timeout_ms: ctx.duration(&d.drain_timeout, "deploy.drain_timeout", 30_000)?,
            stop_timeout_ms: run.stop_timeout_ms,
            auto_rollback: d.auto_rollback.unwrap_or(true),
            steps,
            analysis,
            auto_promote: d.auto_promote.unwrap_or(true),
            bake_ms: ctx.duration(&d.bake, "deploy.bake", 300_000)?,
            partial_users,
            partial_instances,
            partial_nodes,
            preview_check: match &d.preview_check {
                None => None,
                Some(p) => Some(url_path(&ctx, p, "deploy.preview_check")?),
            },
        }
    };

    // File order is promotion order.
    let mut raw_envs: Vec<_> = raw.environments.into_iter().collect();
    raw_envs.sort_by_key(|(_, e)| e.span().start);
    let last = raw_envs.len().saturating_sub(1);
    let mut environments = Vec::new();
    for (i, (k, e)) in raw_envs.into_iter().enumerate() {
        let span = e.span();
        let e = e.into_inner();
        let field = |f: &str| format!("environments.{k}.{f}");
        if !valid_name(&k) {
            return Err(ctx.err(span, &format!("environments.{k}"), format!("{k:?} is not a valid environment name; use 1-40 lowercase letters, digits and '-', starting with a letter")));
        }
        let promote = match &e.promote {
            None => Promote::Auto,
            Some(p) => match p.get_ref().as_str() {
                "auto" => Promote::Auto,
                "manual" => Promote::Manual,
                other => {
                    return Err(ctx.err(
                        p.span(),
                        &field("promote"),
                        format!("{other:?} is not a promotion rule; use \"auto\" or \"manual\""),
                    ))
                }
            },
        };
        if i == 0 && promote == Promote::Manual {
            let s = e.promote.as_ref().map(|p| p.span()).unwrap_or(span.clone());
            return Err(ctx.err(s, &field("promote"), format!("{k:?} is the first environment: every new release enters it; put promote = \"manual\" on a later environment")));
        }
        let host = match &e.host {
            Some(h) => {
                let s = h.get_ref();
                if !valid_host(s) {
                    return Err(ctx.err(h.span(), &field("host"), format!("{s:?} is not a valid host name; use letters, digits, '-' and '.' such as \"staging.hello.localhost\"")));
                }
                s.to_ascii_lowercase()
            }
            None if i == last => route.host.clone(),
            None => format!("{k}.{}", route.host),
        };
        for v in e.env.keys() {
            if !valid_env_name(v) {
                return Err(ctx.err(span, &field("env"), format!("environment variable name {v:?} is not allowed; use letters, digits and '_' (PORT and DROVER_* are set by drover)")));
            }
        }
        let smoke_test = match &e.smoke_test {
            None => None,
            Some(c) => Some(CommandSpec {
                command: nonempty(&ctx, c, &field("smoke_test"))?,
                timeout_ms: ctx.duration(&e.smoke_timeout, &field("smoke_timeout"), 300_000)?,
            }),
        };
        environments.push(EnvironmentSpec {
            instances: ctx.count(&e.instances, &field("instances"), run.instances, 1, 1000)?,
            name: k,
            nodes: e.nodes,
            host,
            env: e.env,
            smoke_test,
            promote,
        });
    }
    for (i, e) in environments.iter().enumerate() {
        if let Some(o) = environments[..i].iter().find(|o| o.host == e.host) {
            return Err(ctx.err(
                0..0,
                &format!("environments.{}.host", e.name),
                format!(
                    "{:?} serves the same host {:?} as {:?}; give each environment its own host",
                    e.name, e.host, o.name
                ),
            ));
        }
    }

    let mut notify = Vec::new();
    for (i, n) in raw.notify.into_iter().enumerate() {
        notify.push(parse_notify(&ctx, i, n)?);
    }

    let registry = match raw.registry {
        None => None,
        Some(r) => Some(parse_registry(&ctx, r, name.get_ref())?),
    };

    Ok(AppSpec {
        name: name.into_inner(),
        build,
        test,
        run,
        health,
        route,
        deploy,
        release,
        environments,
        notify,
        registry,
    })
}

fn parse_registry(
    ctx: &Ctx<'_>,
    r: Spanned<RawRegistry>,
    app: &str,
) -> Result<RegistrySpec, SpecError> {
    let span = r.span();
    let r = r.into_inner();
    let server = r.server.get_ref().trim().to_string();
    let host_ok = !server.is_empty()
        && server.len() <= 255
        && server
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !server.starts_with(['.', '-', ':']);
    if !host_ok {
        return Err(ctx.err(
            r.server.span(),
            "registry.server",
            format!(
                "{:?} is not a registry host; give host[:port] without a scheme, e.g. \"registry.example.com\" or \"127.0.0.1:5000\"",
                r.server.get_ref()
            ),
        ));
    }
    let repository = match &r.repository {
        None => app.to_string(),
        Some(p) => {
            let s = p.get_ref();
            let ok = !s.is_empty()
                && s.len() <= 200
                && s.split('/').all(|part| {
                    !part.is_empty()
                        && part.chars().all(|c| {
                            c.is_ascii_lowercase()
                                || c.is_ascii_digit()
                                || matches!(c, '.' | '_' | '-')
                        })
                        && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                });
            if !ok {
                return Err(ctx.err(
                    p.span(),
                    "registry.repository",
                    format!("{s:?} is not a repository path; use lowercase letters, digits, '.', '_', '-' and '/', e.g. \"team/shop\""),
                ));
            }
            s.clone()
        }
    };
    let username = r.username.as_ref().map(|u| u.get_ref().clone());
    let password_secret = r.password_secret.as_ref().map(|p| p.get_ref().clone());
    match (&username, &r.password_secret) {
        (Some(_), None) => {
            return Err(ctx.err(
                span,
                "registry.password_secret",
                "is missing; with a username, name the app secret that holds the password, e.g. password_secret = \"REGISTRY_PASSWORD\" (set it with `drover secrets set`)",
            ))
        }
        (None, Some(p)) => {
            return Err(ctx.err(p.span(), "registry.username", "is missing; a password needs its user name"))
        }
        (_, Some(p)) if !secret_name_shape(p.get_ref()) => {
            return Err(ctx.err(
                p.span(),
                "registry.password_secret",
                format!("{:?} is not a secret name; use upper-case letters, digits and '_', e.g. \"REGISTRY_PASSWORD\"", p.get_ref()),
            ))
        }
        _ => {}
    }
    Ok(RegistrySpec {
        server,
        repository,
        username,
        password_secret,
    })
}

/// The shape of a secret's name (an environment variable name): upper-case
/// letters, digits and `_`, not starting with a digit, at most 128 bytes.
pub fn secret_name_shape(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

fn parse_notify(ctx: &Ctx<'_>, i: usize, n: Spanned<RawNotify>) -> Result<NotifySpec, SpecError> {
    let field = |f: &str| format!("notify[{i}].{f}");
    let span = n.span();
    let n = n.into_inner();
    let url = n.url.get_ref();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    let ok = url.len() <= 2048
        && !url.chars().any(|c| c.is_control() || c.is_whitespace())
        && host.is_some_and(|h| !h.is_empty() && !h.contains('@'));
    if !ok {
        return Err(ctx.err(
            n.url.span(),
            &field("url"),
            "must be an http:// or https:// URL with a host, such as \"https://hooks.example.com/drover\" (no spaces, no user:password@)",
        ));
    }
    let Some(secret) = n.secret else {
        return Err(ctx.err(
            span,
            &field("secret"),
            "every webhook body is signed: add secret = \"NAME\", the name of a secret you set with `drover secrets set APP NAME`",
        ));
    };
    let name = secret.get_ref();
    if !secret_name_shape(name) {
        return Err(ctx.err(
            secret.span(),
            &field("secret"),
            format!("{name:?} is not a secret name; use upper-case letters, digits and _ such as \"NOTIFY_KEY\""),
        ));
    }
    let mut events = Vec::new();
    for e in &n.events {
        if !NOTIFY_EVENTS.contains(&e.get_ref().as_str()) {
            return Err(ctx.err(
                e.span(),
                &field("events"),
                format!(
                    "{:?} is not a rollout event; use some of {}",
                    e.get_ref(),
                    NOTIFY_EVENTS.join(", ")
                ),
            ));
        }
        events.push(e.get_ref().clone());
    }
    Ok(NotifySpec {
        url: url.clone(),
        secret: name.clone(),
        events,
    })
}

/// `256m`, `1g`, `512k`, `1048576`: bytes, at least 6 MiB (Docker's floor).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k') => (&s[..i], 1u64 << 10),
        (i, 'm') => (&s[..i], 1 << 20),
        (i, 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    let bytes = n.checked_mul(mult)?;
    (bytes >= 6 << 20).then_some(bytes)
}

fn nonempty(ctx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<String, SpecError> {
    if s.get_ref().trim().is_empty() {
        Err(ctx.err(s.span(), field, "must not be empty"))
    } else {
        Ok(s.get_ref().clone())
    }
}

/// The key text at a span, when the span covers a key (for unknown-field
/// errors), as a best effort; empty otherwise.
fn field_at(src: &str, span: &Range<usize>) -> String {
    let text = src.get(span.clone()).unwrap_or("").trim();
    if !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        // Prefix with the enclosing [table] header if there is one.
        let before = &src[..span.start.min(src.len())];
        let table = before.lines().rev().find_map(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']'))
                .then(|| l.trim_matches(|c| c == '[' || c == ']').to_string())
        });
        match table {
            Some(t) if !t.is_empty() => format!("{t}.{text}"),
            _ => text.to_string(),
        }
    } else {
        String::new()
    }
}

/// App names become parts of file names, instance ids and URLs.
/// An absolute URL path (checked with GET by drover).
/// `[[deploy.analysis.query]]`: PromQL queries with their conditions, and
/// the Prometheus they go to.
fn analysis_queries(ctx: &Ctx<'_>, a: &RawAnalysis) -> Result<Vec<MetricQuery>, SpecError> {
    if let Some(p) = &a.prometheus {
        let url = p.get_ref();
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() > "https://".len()
            && !url.chars().any(|c| c.is_control() || c.is_whitespace());
        if !ok {
            return Err(ctx.err(
                p.span(),
                "deploy.analysis.prometheus",
                format!("{url:?} is not a Prometheus URL; use its base URL such as \"http://127.0.0.1:9090\""),
            ));
        }
        if a.query.is_empty() {
            return Err(ctx.err(
                p.span(),
                "deploy.analysis.prometheus",
                "prometheus is set but nothing asks it: add a [[deploy.analysis.query]] with name, query and condition",
            ));
        }
    }
    let mut out: Vec<MetricQuery> = Vec::new();
    for (i, q) in a.query.iter().enumerate() {
        let field = |f: &str| format!("deploy.analysis.query[{i}].{f}");
        let raw = q.get_ref();
        if a.prometheus.is_none() {
            return Err(ctx.err(
                q.span(),
                "deploy.analysis.prometheus",
                "a query needs the Prometheus to ask: add prometheus = \"http://127.0.0.1:9090\" to [deploy.analysis]",
            ));
        }
        let name = raw.name.get_ref();
        if !valid_query_name(name) {
            return Err(ctx.err(
                raw.name.span(),
                &field("name"),
                format!("{name:?} is not a query name; use 1-40 letters, digits, '-' or '_'"),
            ));
        }
        if out.iter().any(|o| &o.name == name) {
            return Err(ctx.err(
                raw.name.span(),
                &field("name"),
                format!("two queries are named {name:?}; give each its own name"),
            ));
        }
        let text = raw.query.get_ref();
        if text.trim().is_empty() {
            return Err(ctx.err(
                raw.query.span(),
                &field("query"),
                "the query is empty; write the PromQL whose result the condition checks",
            ));
        }
        let unknown = crate::analysis::unknown_placeholders(text);
        if !unknown.is_empty() {
            return Err(ctx.err(
                raw.query.span(),
                &field("query"),
                format!(
                    "unknown placeholder(s) {}; a query may use {}",
                    unknown
                        .iter()
                        .map(|u| format!("{{{{{u}}}}}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    crate::analysis::QUERY_PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{{{p}}}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let cond = raw.condition.get_ref();
        let Some(condition) = Condition::parse(cond) else {
            return Err(ctx.err(
                raw.condition.span(),
                &field("condition"),
                format!("{cond:?} is not a condition; write an operator and a number, e.g. \"< 0.01\" (operators: < <= > >= == !=)"),
            ));
        };
        out.push(MetricQuery {
            name: name.clone(),
            query: text.clone(),
            condition,
        });
    }
    Ok(out)
}

fn valid_query_name(s: &str) -> bool {
    (1..=40).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn url_path(ctx: &Ctx<'_>, p: &Spanned<String>, field: &str) -> Result<String, SpecError> {
    let s = p.get_ref();
    if !s.starts_with('/') || s.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ctx.err(
            p.span(),
            field,
            format!("{s:?} must be an absolute URL path such as \"/healthz\""),
        ));
    }
    Ok(s.clone())
}

fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k != "PORT"
        && !k.starts_with("DROVER_")
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[app]
name = "hello"

[build]
command = "true"
artifact = ["app.py"]

[run]
command = "python3 app.py"
instances = 3
stop_timeout = "5s"

[health]
path = "/healthz"
interval = "200ms"
healthy_after = 2
deadline = "30s"

[route]
host = "hello.localhost"

[deploy]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
"#;

    fn err(src: &str) -> SpecError {
        parse_spec("drover.toml", src).expect_err("spec should be rejected")
    }

    #[test]
    fn a_complete_spec_parses_into_milliseconds() {
        let s = parse_spec("drover.toml", GOOD).unwrap();
        assert_eq!(s.name, "hello");
        assert_eq!(s.run.instances, 3);
        assert_eq!(s.run.stop_timeout_ms, 5_000);
        assert_eq!(s.health.interval_ms, 200);
        assert_eq!(s.health.healthy_after, 2);
        assert_eq!(s.deploy.max_surge, 1);
        assert_eq!(s.deploy.strategy, Strategy::Rolling);
        assert_eq!(s.route.host, "hello.localhost");
    }

    const IMAGE_APP: &str =
        "[app]\nname = \"c\"\n[run]\ninstances = 2\n[route]\nhost = \"c.localhost\"\n";

    #[test]
    fn a_container_image_app_needs_no_run_command_and_takes_limits() {
        let s = parse_spec("drover.toml", IMAGE_APP).unwrap();
        assert_eq!(s.run.command, "", "the image's own command");
        assert_eq!(s.build.image, None, "decided by the Dockerfile's presence");
        assert_eq!(s.build.dockerfile, "Dockerfile");
        assert!(s.build.makes_image(true) && !s.build.makes_image(false));
        let src = IMAGE_APP.replace(
            "instances = 2",
            "instances = 2\nmemory = \"256m\"\ncpus = 0.5\ncommand = \"./serve --fast\"",
        ) + "[build]\nimage = true\ndockerfile = \"deploy/Containerfile\"\n";
        let s = parse_spec("drover.toml", &src).unwrap();
        assert_eq!(s.run.memory_bytes, Some(256 << 20));
        assert_eq!(s.run.cpus, Some(0.5));
        assert_eq!(s.run.command, "./serve --fast");
        assert!(s.build.makes_image(false), "image = true wins");
        assert_eq!(s.build.dockerfile, "deploy/Containerfile");
        // GOOD's process app is not an image unless its checkout has a Dockerfile.
        let s = parse_spec("drover.toml", GOOD).unwrap();
        assert!(!s.build.makes_image(false));
    }

    #[test]
    fn a_registry_is_host_and_repository_with_an_optional_login() {
        let src = IMAGE_APP.to_string() + "[registry]\nserver = \"127.0.0.1:5000\"\n";
        let r = parse_spec("drover.toml", &src).unwrap().registry.unwrap();
        assert_eq!(
            r.image_repo(),
            "127.0.0.1:5000/c",
            "the app's name by default"
        );
        assert_eq!((r.username, r.password_secret), (None, None));
        let src = IMAGE_APP.to_string()
            + "[registry]\nserver = \"r.example.com\"\nrepository = \"team/shop\"\nusername = \"ci\"\npassword_secret = \"REG_PW\"\n";
        let r = parse_spec("drover.toml", &src).unwrap().registry.unwrap();
        assert_eq!(r.image_repo(), "r.example.com/team/shop");
        assert_eq!(r.password_secret.as_deref(), Some("REG_PW"));
        for (bad, field) in [
            ("server = \"https://r.example.com\"", "registry.server"),
            (
                "server = \"r\"\nrepository = \"Team/Shop\"",
                "registry.repository",
            ),
            (
                "server = \"r\"\nrepository = \"a//b\"",
                "registry.repository",
            ),
            (
                "server = \"r\"\nusername = \"ci\"",
                "registry.password_secret",
            ),
            (
                "server = \"r\"\npassword_secret = \"PW\"",
                "registry.username",
            ),
            (
                "server = \"r\"\nusername = \"ci\"\npassword_secret = \"pw\"",
                "registry.password_secret",
            ),
        ] {
            let e = err(&(IMAGE_APP.to_string() + "[registry]\n" + bad + "\n"));
            assert_eq!(e.field, field, "{bad}: {e:?}");
        }
    }

    #[test]
    fn bad_container_settings_name_the_field() {
        let e = err(&(IMAGE_APP.to_string() + "[build]\nimage = false\n"));
        assert_eq!(e.field, "run.command");
        assert!(e.message.contains("is missing"), "{}", e.message);
        for (bad, field) in [
            ("memory = \"lots\"", "run.memory"),
            ("memory = \"1m\"", "run.memory"),
            ("cpus = 0.0", "run.cpus"),
            ("cpus = -1.0", "run.cpus"),
        ] {
            let e = err(&IMAGE_APP.replace("instances = 2", &format!("instances = 2\n{bad}")));
            assert_eq!(e.field, field, "{bad}: {e:?}");
            assert_eq!(e.line, 5, "{bad}: {e:?}");
        }
        let e = err(&(IMAGE_APP.to_string() + "[build]\ndockerfile = \"../Dockerfile\"\n"));
        assert_eq!(e.field, "build.dockerfile");
        let e = err(&(IMAGE_APP.to_string() + "[build]\nimage = false\ndockerfile = \"D\"\n"));
        assert_eq!(e.field, "build.dockerfile");
        assert!(e.message.contains("image = false"), "{}", e.message);
    }

    #[test]
    fn notify_webhooks_parse_with_their_events() {
        let src = format!(
            "{GOOD}\n[[notify]]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"NOTIFY_KEY\"\nevents = [\"started\", \"rolled_back\"]\n\n[[notify]]\nurl = \"https://hooks.example.com/x?y=1\"\nsecret = \"K2\"\n"
        );
        let s = parse_spec("drover.toml", &src).unwrap();
        assert_eq!(s.notify.len(), 2);
        assert_eq!(s.notify[0].secret, "NOTIFY_KEY");
        assert!(s.notify[0].wants("rolled_back") && !s.notify[0].wants("step"));
        assert!(s.notify[1].wants("step"), "no events listed: all of them");
    }

    #[test]
    fn bad_notify_tables_name_the_field() {
        let hook = |body: &str| err(&format!("{GOOD}\n[[notify]]\n{body}\n"));
        let e = hook("url = \"ftp://x/y\"\nsecret = \"K\"");
        assert_eq!(e.field, "notify[0].url", "{e}");
        let e = hook("url = \"http://user:pw@x/y\"\nsecret = \"K\"");
        assert_eq!(e.field, "notify[0].url", "{e}");
        let e = hook("url = \"http://x/y\"");
        assert_eq!(e.field, "notify[0].secret", "{e}");
        assert!(e.message.contains("drover secrets set"), "{e}");
        let e = hook("url = \"http://x/y\"\nsecret = \"lower\"");
        assert_eq!(e.field, "notify[0].secret", "{e}");
        let e = hook("url = \"http://x/y\"\nsecret = \"K\"\nevents = [\"started\", \"exploded\"]");
        assert_eq!(e.field, "notify[0].events", "{e}");
        assert!(
            e.message.contains("rolled_back"),
            "lists the valid events: {e}"
        );
        let e = hook("url = \"http://x/y\"\nsecret = \"K\"\nretries = 3");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let e = err("[app]\nname = \"x\"\n[run\ncommand = \"a\"\n");
        assert_eq!((e.file.as_str(), e.line), ("drover.toml", 3), "{e}");
    }

    #[test]
    fn a_wrong_type_names_line_and_field() {
        let src = GOOD.replace("instances = 3", "instances = \"three\"");
        let e = err(&src);
        assert_eq!(e.line, 11, "{e}");
        assert!(e.to_string().contains("drover.toml:11:"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_named_with_its_table() {
        let src = GOOD.replace("max_surge = 1", "max_surge = 1\nmax_surges = 2");
        let e = err(&src);
        assert_eq!(e.field, "deploy.max_surges", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn surge_and_unavailable_both_zero_is_rejected_with_advice() {
        let src = GOOD.replace("max_surge = 1", "max_surge = 0");
        let e = err(&src);
        assert_eq!(e.field, "deploy.max_surge");
        assert_eq!(e.line, 25, "{e}");
        assert!(e.message.contains("set max_surge = 1"), "{e}");
    }

    #[test]
    fn step_weights_over_100_are_rejected() {
        let src = format!("{GOOD}steps = [{{ weight = 10 }}, {{ weight = 150 }}]\n");
        let e = err(&src);
        assert_eq!(e.field, "deploy.steps.weight", "{e}");
        assert!(e.message.contains("150"), "{e}");
    }

    #[test]
    fn bad_durations_hosts_and_names_are_rejected() {
        assert_eq!(
            err(&GOOD.replace("\"5s\"", "\"5\"")).field,
            "run.stop_timeout"
        );
        assert_eq!(
            err(&GOOD.replace("hello.localhost", "bad host")).field,
            "route.host"
        );
        assert_eq!(
            err(&GOOD.replace("name = \"hello\"", "name = \"../x\"")).field,
            "app.name"
        );
    }

    #[test]
    fn strategies_not_yet_available_are_refused_not_ignored() {
        let e = err(&GOOD.replace("\"rolling\"", "\"partial\""));
        assert_eq!(e.field, "deploy.partial", "a partial without its segment");
        let both = GOOD.replace("\"rolling\"", "\"partial\"")
            + "\n[deploy.partial]\nusers = [\"a\"]\npercent = 5\n";
        assert_eq!(err(&both).field, "deploy.partial");
        let ok = GOOD.replace("\"rolling\"", "\"partial\"")
            + "\n[deploy.partial]\nusers = [\"alice\", \"bob\"]\n";
        let s = parse_spec("drover.toml", &ok).unwrap();
        assert_eq!(s.deploy.partial_users, ["alice", "bob"]);
        assert_eq!(s.deploy.partial_instances, 1);
        let by_node = GOOD.replace("\"rolling\"", "\"partial\"")
            + "\n[deploy.partial]\nnodes = { region = \"eu\" }\n";
        let s = parse_spec("drover.toml", &by_node).unwrap();
        assert_eq!(
            s.deploy.partial_nodes.get("region").map(String::as_str),
            Some("eu")
        );
        let e = err(&by_node.replace("\"eu\"", "\"eu west\""));
        assert_eq!(e.field, "deploy.partial.nodes", "{e}");
        let e = err(&(by_node + "users = [\"a\"]\n"));
        assert_eq!(e.field, "deploy.partial", "two segments: {e}");
        let e = err(&GOOD.replace("\"rolling\"", "\"canary\""));
        assert_eq!(e.field, "deploy.steps", "a canary without steps");
        // A canary finishes and rolls back by the rolling rules: with
        // neither surge nor unavailability it could never replace the rest.
        let stuck = GOOD
            .replace("\"rolling\"", "\"canary\"")
            .replace("max_surge = 1", "max_surge = 0\nsteps = [{ weight = 50 }]");
        assert!(stuck.contains("max_unavailable = 0"), "{stuck}");
        assert_eq!(err(&stuck).field, "deploy.max_surge");
    }

    #[test]
    fn a_canary_parses_its_steps_analysis_and_user_key() {
        let src = GOOD.replace("\"rolling\"", "\"canary\"").replace(
            "host = \"hello.localhost\"",
            "host = \"hello.localhost\"\nuser_key = \"header:X-User\"",
        ) + "steps = [{ weight = 10, pause = \"30s\" }, { weight = 50 }]\n\n[deploy.analysis]\nmax_error_rate = 0.01\nmax_p99_latency = \"250ms\"\nmin_requests = 100\n";
        let s = parse_spec("drover.toml", &src).unwrap();
        assert_eq!(s.deploy.strategy, Strategy::Canary);
        assert_eq!(
            s.deploy.steps,
            [
                CanaryStep {
                    weight: 10,
                    pause_ms: 30_000
                },
                CanaryStep {
                    weight: 50,
                    pause_ms: 0
                }
            ]
        );
        let a = s.deploy.analysis.unwrap();
        assert_eq!(
            (
                a.max_error_rate,
                a.max_p99_ms,
                a.min_requests,
                a.interval_ms,
                a.deadline_ms
            ),
            (Some(0.01), Some(250), 100, 10_000, 600_000)
        );
        assert_eq!(s.route.user_key, "header:x-user");
        let e = err(&src.replace("header:X-User", "query:u"));
        assert_eq!(e.field, "route.user_key");
    }

    #[test]
    fn prometheus_queries_parse_and_bad_ones_name_their_field() {
        let base = GOOD.replace("\"rolling\"", "\"canary\"")
            + "steps = [{ weight = 10 }]\n\n[deploy.analysis]\n";
        let q = "builtin = false\nprometheus = \"http://127.0.0.1:9090/\"\n\n[[deploy.analysis.query]]\nname = \"errors\"\nquery = 'sum(rate(x{release=\"{{release}}\"}[{{window}}]))'\ncondition = \"< 0.02\"\n";
        let s = parse_spec("drover.toml", &(base.clone() + q)).unwrap();
        let a = s.deploy.analysis.unwrap();
        assert!(!a.builtin);
        assert_eq!(a.prometheus.as_deref(), Some("http://127.0.0.1:9090"));
        assert_eq!(a.queries.len(), 1);
        assert_eq!(a.queries[0].condition.to_string(), "< 0.02");
        for (bad, field, says) in [
            (
                q.replace("< 0.02", "below 0.02"),
                "deploy.analysis.query[0].condition",
                "not a condition",
            ),
            (
                q.replace("{{release}}", "{{relase}}"),
                "deploy.analysis.query[0].query",
                "{{relase}}",
            ),
            (
                q.replace("\"errors\"", "\"no spaces\""),
                "deploy.analysis.query[0].name",
                "not a query name",
            ),
            (
                q.replace("http://127.0.0.1:9090/", "127.0.0.1:9090"),
                "deploy.analysis.prometheus",
                "not a Prometheus URL",
            ),
            (
                q.replace("prometheus = \"http://127.0.0.1:9090/\"\n", ""),
                "deploy.analysis.prometheus",
                "needs the Prometheus",
            ),
            (
                "builtin = false\n".to_string(),
                "deploy.analysis.builtin",
                "nothing to judge",
            ),
        ] {
            let e = err(&(base.clone() + &bad));
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn display_shows_the_source_line_and_a_caret() {
        let e = err(&GOOD.replace("max_surge = 1", "max_surge = 0"));
        let shown = e.to_string();
        assert!(shown.contains("max_surge = 0"), "{shown}");
        assert!(shown.contains('^'), "{shown}");
    }

    const ENVS: &str = r#"
[environments.staging]
nodes = { stage = "staging" }
instances = 1
env = { LOG_LEVEL = "debug" }
smoke_test = "python3 smoke.py"

[environments.production]
nodes = { stage = "production" }
promote = "manual"
"#;

    #[test]
    fn environments_keep_file_order_and_fill_defaults() {
        let s = parse_spec("drover.toml", &format!("{GOOD}{ENVS}")).unwrap();
        assert_eq!(s.env_names(), ["staging", "production"]);
        let st = &s.environments[0];
        assert_eq!(st.host, "staging.hello.localhost");
        assert_eq!(st.instances, 1);
        assert_eq!(st.promote, Promote::Auto);
        assert_eq!(st.smoke_test.as_ref().unwrap().timeout_ms, 300_000);
        let pr = &s.environments[1];
        assert_eq!(
            pr.host, "hello.localhost",
            "the last environment gets [route] host"
        );
        assert_eq!(pr.instances, 3, "defaults to [run] instances");
        assert_eq!(pr.promote, Promote::Manual);

        let staged = s.for_env("staging").unwrap();
        assert_eq!(staged.deploy.instances, 1);
        assert_eq!(staged.route.host, "staging.hello.localhost");
        assert_eq!(staged.run.env["LOG_LEVEL"], "debug");
        assert!(s.for_env("nowhere").is_none());
        assert!(
            s.for_env("").is_none(),
            "an app with environments has no unnamed one"
        );

        let plain = parse_spec("drover.toml", GOOD).unwrap();
        assert_eq!(plain.env_names(), [""]);
        assert_eq!(plain.for_env("").unwrap(), plain);
    }

    #[test]
    fn bad_environments_are_rejected_with_their_field() {
        let e = err(&format!(
            "{GOOD}{}",
            ENVS.replace("\"manual\"", "\"sometimes\"")
        ));
        assert_eq!(e.field, "environments.production.promote");
        assert!(e.message.contains("\"auto\" or \"manual\""), "{e}");
        let e = err(&format!(
            "{GOOD}{}",
            ENVS.replace("instances = 1\n", "instances = 1\npromote = \"manual\"\n")
        ));
        assert_eq!(e.field, "environments.staging.promote");
        assert!(e.message.contains("first environment"), "{e}");
        let e = err(&format!(
            "{GOOD}{}",
            ENVS.replace("instances = 1", "instances = 0")
        ));
        assert_eq!(e.field, "environments.staging.instances");
        let e = err(&format!(
            "{GOOD}{}",
            ENVS.replace("instances = 1", "host = \"hello.localhost\"")
        ));
        assert_eq!(e.field, "environments.production.host");
        let e = err(&format!("{GOOD}{}", ENVS.replace("LOG_LEVEL", "DROVER_X")));
        assert_eq!(e.field, "environments.staging.env");
        let e = err(&format!("{GOOD}{}", ENVS.replace("smoke_test", "smoke")));
        assert!(e.message.contains("unknown field"), "{e}");
    }
}
