//! The HTTP/JSON API: CLI endpoints, the agent protocol, the proxy protocol
//! and artifact downloads.
//!
//! *API Boundary*: errors become HTTP statuses only here, in
//! [`ApiErr::into_response`]; bodies are `{"error": "..."}` and say what to do.

use crate::engine::Control;
use crate::{git, now_ms, pipeline, view, Server};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api as api;
use drover_core::spec::Promote;
use drover_store::{ProxyRecord, StoreError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

type S = State<Arc<Server>>;

#[derive(Debug, thiserror::Error)]
pub enum ApiErr {
    /// The request or its input is wrong (CLI exit code 2).
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the token's role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// The operation ran and failed (build failed, …).
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiErr::NotFound(format!("{what} not found")),
            StoreError::Conflict(what) => ApiErr::Conflict(format!("{what} already exists")),
            StoreError::NoSpace(_) | StoreError::Fenced { .. } => {
                ApiErr::Unavailable(e.to_string())
            }
            other => ApiErr::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiErr::BadInput(_) => StatusCode::BAD_REQUEST,
            ApiErr::NotFound(_) => StatusCode::NOT_FOUND,
            ApiErr::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiErr::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiErr::Conflict(_) => StatusCode::CONFLICT,
            ApiErr::Failed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiErr::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiErr::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (
            status,
            Json(api::ApiError {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

type R<T> = Result<Json<T>, ApiErr>;

pub fn router(server: Arc<Server>) -> Router {
    use crate::auth::{Guarded, Need::*};
    Guarded::new(server.clone())
        .route("/v1/health", Public, get(|| async { "ok\n" }))
        // Who leads (like Nomad's /v1/status/leader): for operators and
        // balancers, no token.
        .route("/v1/leader", Public, get(crate::ha::leader_status))
        .route(
            "/login",
            Public,
            get(crate::auth::login_page).post(crate::auth::login),
        )
        .route("/logout", Public, post(crate::auth::logout))
        .route("/metrics", Viewer, get(metrics))
        .route("/v1/apps", Admin, post(add_app))
        .route("/v1/apps", Viewer, get(list_apps))
        .route("/v1/apps/{app}/deploy", Deployer, post(deploy))
        .route("/v1/apps/{app}/rollback", Deployer, post(rollback))
        .route("/v1/apps/{app}/promote", Deployer, post(promote))
        .route("/v1/apps/{app}/plan", Viewer, get(plan_dry_run))
        .route("/v1/apps/{app}/pause", Deployer, post(pause))
        .route("/v1/apps/{app}/resume", Deployer, post(resume))
        .route("/v1/apps/{app}/abort", Deployer, post(abort))
        .route("/v1/apps/{app}/status", Viewer, get(status))
        .route("/v1/apps/{app}/releases", Viewer, get(releases))
        .route("/v1/apps/{app}/logs", Viewer, get(app_logs))
        .route("/v1/apps/{app}/runs", Viewer, get(runs))
        .route("/v1/runs/{id}", Viewer, get(run))
        .route("/v1/runs/{id}/cancel", Deployer, post(cancel_run))
        .route("/v1/runs/{id}/log", Viewer, get(run_log))
        .route("/v1/discovery/{app}", Viewer, get(discovery))
        .route("/v1/nodes", Viewer, get(nodes))
        .route("/v1/events", Viewer, get(events))
        .route("/v1/apps/{app}/deliveries", Viewer, get(deliveries))
        .route("/v1/apps/{app}/secrets", Viewer, get(list_secrets))
        .route("/v1/apps/{app}/secrets", Deployer, post(set_secret))
        .route("/v1/apps/{app}/secrets/unset", Deployer, post(unset_secret))
        .route("/v1/tokens", Admin, post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}/revoke", Admin, post(revoke_token))
        // An agent's first registration (join token + CSR); the rest of
        // its calls are on the agent port (`agent_router`).
        .route("/v1/agent/register", Node, post(agent_register))
        .route("/v1/routes", Node, get(routes))
        .route("/v1/proxy/report", Node, post(proxy_report))
        // Webhooks prove themselves with their HMAC signature.
        .route(
            "/v1/hooks/{app}",
            Public,
            post(hook)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(
                    crate::source::HOOK_BODY_LIMIT,
                ))
                .layer::<_, std::convert::Infallible>(
                    tower_http::limit::RequestBodyLimitLayer::new(crate::source::HOOK_BODY_LIMIT),
                ),
        )
        .into_router()
        .layer(DefaultBodyLimit::max(crate::serve::MAX_BODY))
        .with_state(server)
}

/// The agent port's routes, served over mutual TLS only: the caller is
/// the node of its certificate, and may act for that node only.
pub fn agent_router(server: Arc<Server>) -> Router {
    use crate::auth::{Guarded, Need::*};
    Guarded::new(server.clone())
        .route("/v1/agent/register", Node, post(agent_register))
        .route("/v1/agent/report", Node, post(agent_report))
        .route("/v1/agent/assignments", Node, get(agent_assignments))
        .route("/v1/agent/logs", Node, post(agent_logs))
        .route("/v1/artifacts/{sha256}", Node, get(artifact))
        .into_router()
        .layer(DefaultBodyLimit::max(crate::serve::MAX_BODY))
        .with_state(server)
}

// -------------------------------------------------------------- secrets ----

/// The environment a secret call names: one of the app's; none only for an
/// app without environments (a secret is never set somewhere by default).
async fn secret_env(s: &Server, app: &str, env: &str) -> Result<String, ApiErr> {
    let envs = environments(s, app).await?;
    let has_envs = envs.iter().any(|e| !e.name.is_empty());
    if env.is_empty() && has_envs {
        return Err(ApiErr::BadInput(format!(
            "{app} has environments ({}); secrets are per environment: pass --env",
            envs.iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    pick_env(app, &envs, Some(env))
}

async fn list_secrets(State(s): S, Path(app): Path<String>) -> R<Vec<api::SecretInfo>> {
    s.store.get_app(&app).await?;
    Ok(Json(
        s.store
            .list_secrets(&app)
            .await?
            .into_iter()
            .map(|r| api::SecretInfo {
                env: r.env,
                name: r.name,
                updated_at: r.updated_at,
            })
            .collect(),
    ))
}

async fn set_secret(
    State(s): S,
    Path(app): Path<String>,
    Json(req): Json<api::SecretSetRequest>,
) -> R<api::SecretInfo> {
    s.store.get_app(&app).await?;
    crate::secrets::check_name(&req.name).map_err(ApiErr::BadInput)?;
    if req.value.len() > crate::secrets::MAX_VALUE_BYTES {
        return Err(ApiErr::BadInput(format!(
            "the value of {} is {} bytes; a secret holds at most {} bytes",
            req.name,
            req.value.len(),
            crate::secrets::MAX_VALUE_BYTES
        )));
    }
    if req.value.contains('\0') {
        return Err(ApiErr::BadInput(format!(
            "the value of {} contains a NUL byte, which an environment variable cannot hold",
            req.name
        )));
    }
    let env = secret_env(&s, &app, &req.env).await?;
    let now = now_ms();
    let sealed = s.secrets.seal(&app, &env, &req.name, &req.value);
    s.store
        .set_secret(&drover_store::SecretRecord {
            app: app.clone(),
            env: env.clone(),
            name: req.name.clone(),
            ciphertext: sealed,
            updated_at: now,
        })
        .await?;
    let what = format!("set; releases made from now on run with it (drover deploy {app})");
    secret_changed(&s, &app, env, req.name, "secret.set", &what, now).await
}

/// Records a secret's change as an event (its name, never its value).
async fn secret_changed(
    s: &Server,
    app: &str,
    env: String,
    name: String,
    kind: &str,
    what: &str,
    now: u64,
) -> R<api::SecretInfo> {
    let msg = format!("{}secret {name} {what}", view::env_tag(&env));
    s.store.add_event(Some(app), kind, &msg, now).await?;
    Ok(Json(api::SecretInfo {
        env,
        name,
        updated_at: now,
    }))
}

async fn unset_secret(
    State(s): S,
    Path(app): Path<String>,
    Json(req): Json<api::SecretUnsetRequest>,
) -> R<api::SecretInfo> {
    s.store.get_app(&app).await?;
    let env = secret_env(&s, &app, &req.env).await?;
    s.store
        .unset_secret(&app, &env, &req.name)
        .await
        .map_err(|e| match e {
            drover_store::StoreError::NotFound(_) => ApiErr::NotFound(format!(
                "{app} has no secret {}{}; see drover secrets list {app}",
                req.name,
                view::in_env(&env)
            )),
            e => e.into(),
        })?;
    let what = "removed; releases made from now on run without it";
    secret_changed(&s, &app, env, req.name, "secret.unset", what, now_ms()).await
}

/// The secrets release `rel` runs with in `env`, opened.
async fn release_secret_values(
    s: &Server,
    app: &str,
    number: i64,
    env: &str,
) -> Result<Vec<(String, String)>, ApiErr> {
    let mut out = Vec::new();
    for r in s.store.release_secrets(app, number, env).await? {
        let value = s
            .secrets
            .open(app, env, &r.name, &r.ciphertext)
            .map_err(ApiErr::Internal)?;
        out.push((r.name, value));
    }
    Ok(out)
}

// --------------------------------------------------------------- tokens ----

async fn create_token(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Json(req): Json<api::TokenCreateRequest>,
) -> R<api::TokenCreated> {
    use crate::auth::Role;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiErr::BadInput(
            "a token needs a name of 1-64 characters without control characters, e.g. --name ci"
                .into(),
        ));
    }
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiErr::BadInput(format!(
            "{:?} is not a role; use admin, deployer, viewer or node",
            req.role
        ))
    })?;
    let now = now_ms();
    let expires_at = match req.expires_in.as_deref() {
        None => None,
        Some(d) => {
            let ms = drover_core::duration::parse_duration_ms(d)
                .map_err(|e| ApiErr::BadInput(format!("expires_in: {e}")))?;
            if ms == 0 {
                return Err(ApiErr::BadInput("expires_in must be longer than 0s".into()));
            }
            Some(now.saturating_add(ms))
        }
    };
    let (token, rec) = crate::auth::new_token(name, role, expires_at, now);
    s.store.insert_token(&rec).await?;
    s.store
        .add_event(
            None,
            "token.created",
            &format!(
                "token {} ({}, role {}) created by {}",
                rec.id, rec.name, rec.role, caller.name
            ),
            now,
        )
        .await?;
    Ok(Json(api::TokenCreated {
        token,
        info: token_info(&rec),
    }))
}

fn token_info(t: &drover_store::TokenRecord) -> api::TokenInfo {
    api::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
    }
}

async fn list_tokens(State(s): S) -> R<Vec<api::TokenInfo>> {
    Ok(Json(
        s.store
            .list_tokens()
            .await?
            .iter()
            .map(token_info)
            .collect(),
    ))
}

async fn revoke_token(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(id): Path<String>,
) -> R<api::TokenInfo> {
    let now = now_ms();
    let tokens = s.store.list_tokens().await?;
    let usable_admin = |t: &&drover_store::TokenRecord| {
        t.role == "admin" && t.revoked_at.is_none() && t.expires_at.is_none_or(|e| e > now)
    };
    let target = tokens.iter().find(|t| t.id == id).ok_or_else(|| {
        ApiErr::NotFound(format!("token {id} not found (see `drover tokens list`)"))
    })?;
    if usable_admin(&target) && tokens.iter().filter(usable_admin).count() == 1 {
        return Err(ApiErr::Conflict(format!(
            "token {id} is the last usable admin token; create another admin token first, or nobody could manage drover"
        )));
    }
    s.store.revoke_token(&id, now).await?;
    s.store
        .add_event(
            None,
            "token.revoked",
            &format!("token {id} ({}) revoked by {}", target.name, caller.name),
            now,
        )
        .await?;
    Ok(Json(token_info(&s.store.get_token(&id).await?)))
}

// ------------------------------------------------------------------ CLI ----

/// The app's environments in promotion order (from its newest release's
/// spec, plus any other that still has a deployment), summarized.
pub async fn environments(s: &Server, app: &str) -> Result<Vec<api::EnvSummary>, ApiErr> {
    let spec = view::current_spec(s, app).await?;
    let mut names = spec.env_names();
    let deployments: Vec<_> = s
        .store
        .list_deployments()
        .await?
        .into_iter()
        .filter(|d| d.app == app)
        .collect();
    for d in &deployments {
        if !names.contains(&d.env) {
            names.push(d.env.clone());
        }
    }
    let mut out = Vec::new();
    for name in names {
        let d = deployments.iter().find(|d| d.env == name);
        let rollout = s.store.latest_rollout(app, &name).await?;
        out.push(api::EnvSummary {
            host: spec
                .for_env(&name)
                .map(|e| e.route.host)
                .unwrap_or_default(),
            promote: match spec.environment(&name).map(|e| e.promote) {
                Some(Promote::Manual) => "manual".into(),
                _ => "auto".into(),
            },
            live_release: d.and_then(|d| d.live_release.clone()),
            rollout: rollout.map(|r| format!("{} → {}", r.state, r.to)),
            name,
        });
    }
    Ok(out)
}

/// The environment an operator means when they name none: the last one
/// (production), or "" for an app without environments.
fn default_env(envs: &[api::EnvSummary]) -> String {
    envs.last().map(|e| e.name.clone()).unwrap_or_default()
}

/// Checks that `env` is one of the app's environments.
fn pick_env(app: &str, envs: &[api::EnvSummary], env: Option<&str>) -> Result<String, ApiErr> {
    match env {
        None => Ok(default_env(envs)),
        Some(e) if envs.iter().any(|x| x.name == e) => Ok(e.to_string()),
        Some(e) => Err(ApiErr::BadInput(format!(
            "{app} has no environment {e:?}; its environments are: {}",
            envs.iter()
                .map(|x| if x.name.is_empty() {
                    "(none)"
                } else {
                    x.name.as_str()
                })
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub async fn app_info(s: &Server, a: &drover_store::AppRecord) -> Result<api::AppInfo, ApiErr> {
    let envs = environments(s, &a.name).await?;
    let last = envs.last();
    Ok(api::AppInfo {
        webhook_secret: None,
        name: a.name.clone(),
        repo: a.repo.clone(),
        branch: a.branch.clone(),
        host: last.map(|e| e.host.clone()).unwrap_or_default(),
        live_release: last.and_then(|e| e.live_release.clone()),
        environments: envs,
        error: None,
    })
}

async fn add_app(State(s): S, Json(req): Json<api::AddAppRequest>) -> R<api::AppInfo> {
    let rec = pipeline::add_app(&s, &req.repo, req.branch.as_deref()).await?;
    let mut info = app_info(&s, &rec).await?;
    // Shown once, to whoever registered the app.
    info.webhook_secret = rec.webhook_secret.clone();
    Ok(Json(info))
}

async fn list_apps(State(s): S) -> R<Vec<api::AppInfo>> {
    let mut out = Vec::new();
    for a in s.store.list_apps().await? {
        out.push(app_info_or_error(&s, &a).await);
    }
    Ok(Json(out))
}

/// The app's summary; one whose stored records cannot be read is listed
/// with the reason instead, so the others still show.
pub async fn app_info_or_error(s: &Server, a: &drover_store::AppRecord) -> api::AppInfo {
    match app_info(s, a).await {
        Ok(info) => info,
        Err(e) => api::AppInfo {
            webhook_secret: None,
            name: a.name.clone(),
            repo: a.repo.clone(),
            branch: a.branch.clone(),
            host: String::new(),
            live_release: None,
            environments: Vec::new(),
            error: Some(format!(
                "{} is in error: {e}; other apps are unaffected",
                a.name
            )),
        },
    }
}

/// Builds a commit (default: the branch tip) as a manual run and starts its
/// rollout; answers when the rollout has started (or the run failed).
async fn deploy(
    State(s): S,
    Path(app): Path<String>,
    Json(req): Json<api::DeployRequest>,
) -> R<api::DeployResponse> {
    let app_rec = s.store.get_app(&app).await?;
    let mirror = git::mirror_path(&s.data_dir, &app);
    git::sync_mirror(&app_rec.repo, &mirror)
        .await
        .map_err(|e| ApiErr::Failed(format!("cannot fetch {}: {e}", app_rec.repo)))?;
    let git_ref = match &req.git_ref {
        Some(r) => {
            git::validate_ref(r).map_err(|e| ApiErr::BadInput(e.to_string()))?;
            r.clone()
        }
        None => format!("refs/heads/{}", app_rec.branch),
    };
    let commit = git::resolve(&mirror, &git_ref)
        .await
        .map_err(|e| ApiErr::BadInput(e.to_string()))?;
    let (_run, started) =
        pipeline::start_run(&s, &app_rec, &commit, &git_ref, "manual", None).await?;
    let out = started
        .await
        .map_err(|_| ApiErr::Internal("the run ended without an answer".into()))??;
    Ok(Json(api::DeployResponse {
        release: out.release.name(),
        commit: out.release.commit,
        env: out
            .rollout
            .as_ref()
            .map(|r| r.env.clone())
            .unwrap_or_default(),
        rollout_id: out.rollout.map(|r| r.id).unwrap_or(0),
        run_id: Some(out.run.id),
        reverts: false,
    }))
}

async fn rollback(
    State(s): S,
    Path(app): Path<String>,
    Json(req): Json<api::RollbackRequest>,
) -> R<api::DeployResponse> {
    let lock = s.deploy_lock(&app).await;
    let _held = lock.lock().await;
    s.store.get_app(&app).await?;
    let envs = environments(&s, &app).await?;
    let env = pick_env(&app, &envs, req.env.as_deref())?;
    // Mid-rollout, "roll back" means back to where it started: the active
    // rollout reverts (a canary's or blue/green's flip, no new rollout).
    let active = s
        .store
        .latest_rollout(&app, &env)
        .await?
        .filter(|r| !r.state.is_final() && !r.reverting && r.from.is_some());
    if let Some(r) = active.filter(|r| req.to.is_none() || req.to == r.from) {
        let from = r.from.clone().unwrap_or_default();
        let r = s.engine.control(&app, &env, Control::Abort).await?;
        let commit = match view::parse_release_name(&from) {
            Some(n) => s.store.get_release(&app, n).await?.commit,
            None => String::new(),
        };
        return Ok(Json(api::DeployResponse {
            release: from,
            commit,
            env,
            rollout_id: r.id,
            run_id: None,
            reverts: true,
        }));
    }
    let prev = s
        .store
        .get_deployment(&app, &env)
        .await?
        .and_then(|d| d.prev_release);
    let to = match req.to.or(prev) {
        Some(t) => t,
        None => return Err(ApiErr::BadInput(format!("{app} has no earlier live release{} to roll back to; pass --to rN (see `drover releases {app}`)", view::in_env(&env)))),
    };
    let n = view::parse_release_name(&to)
        .ok_or_else(|| ApiErr::BadInput(format!("{to:?} is not a release name such as r3")))?;
    let release = s.store.get_release(&app, n).await?;
    if release.status == "pruned" {
        return Err(ApiErr::BadInput(format!("the artifact of {to} was pruned by retention (the server keeps the newest releases, the live one and the rollback target); deploy its commit {} again instead", &release.commit[..12])));
    }
    if release.status == "failed" {
        return Err(ApiErr::BadInput(format!("{to} failed its [release] command and was never deployed; pick another release (see `drover releases {app}`)")));
    }
    let r = s
        .engine
        .start_rollout(&app, &env, &to, crate::engine::Start::Rollback)
        .await?;
    Ok(Json(api::DeployResponse {
        release: to,
        commit: release.commit,
        env,
        rollout_id: r.id,
        run_id: None,
        reverts: false,
    }))
}

#[derive(Deserialize)]
struct PlanQuery {
    env: Option<String>,
    to: Option<String>,
}

/// A dry run of moving an environment to a release (default: the newest
/// good release not live there), by the real planner on a simulated cluster.
async fn plan_dry_run(
    State(s): S,
    Path(app): Path<String>,
    Query(q): Query<PlanQuery>,
) -> R<api::PlanInfo> {
    s.store.get_app(&app).await?;
    let envs = environments(&s, &app).await?;
    let env = pick_env(&app, &envs, q.env.as_deref())?;
    let live = envs
        .iter()
        .find(|e| e.name == env)
        .and_then(|e| e.live_release.clone());
    let releases = s.store.list_releases(&app).await?; // newest first
    let target = match q.to {
        Some(t) => releases
            .into_iter()
            .find(|r| r.name() == t)
            .ok_or_else(|| ApiErr::NotFound(format!("release {t} of {app} not found")))?,
        None => releases
            .into_iter()
            .find(|r| r.status == "ok" && Some(r.name()) != live)
            .ok_or_else(|| {
                ApiErr::BadInput(format!(
                    "nothing to plan: no release of {app} other than the live {} is ready; pass --to rN",
                    live.as_deref().unwrap_or("(none)")
                ))
            })?,
    };
    let spec = view::release_spec(&target).map_err(ApiErr::Internal)?;
    let spec = spec
        .for_env(&env)
        .ok_or_else(|| ApiErr::BadInput(format!("{} has no environment {env:?}", target.name())))?;
    let now = now_ms();
    let node_records = s.store.list_nodes().await?;
    let ready = view::nodes_ready(&node_records, now);
    let nodes = view::env_nodes(&spec, &env, &node_records, &ready);
    let instances: Vec<drover_core::Instance> = s
        .store
        .list_instances(&app)
        .await?
        .iter()
        .filter(|i| i.env == env)
        .map(|i| view::to_core(i, ready.get(&i.node).copied().unwrap_or(false), false))
        .collect();
    // An instance starts in about half a second, then needs its checks.
    let timing = drover_core::dryrun::Timing {
        ready_ms: 500 + spec.health.interval_ms * u64::from(spec.health.healthy_after),
        drain_ms: 250,
    };
    let d = drover_core::dryrun::dry_run(
        &spec.deploy,
        live.as_deref(),
        &target.name(),
        &instances,
        &nodes,
        timing,
    );
    Ok(Json(api::PlanInfo {
        env,
        from: live,
        to: target.name(),
        strategy: spec.deploy.strategy.to_string(),
        steps: d
            .steps
            .into_iter()
            .map(|st| api::PlanStep {
                at_ms: st.at_ms,
                changes: st.changes,
                traffic: st.traffic,
                message: st.message,
            })
            .collect(),
        duration_ms: d.duration_ms,
        outcome: d.outcome,
        assumptions: format!(
            "every instance healthy {} after it is placed, drained {} after it leaves routing, canary analysis passing, pre-promotion checks passing",
            drover_core::duration::format_ms(timing.ready_ms),
            drover_core::duration::format_ms(timing.drain_ms)
        ),
    }))
}

async fn cancel_run(State(s): S, Path(id): Path<i64>) -> R<api::RunInfo> {
    Ok(Json(pipeline::cancel(&s, id).await?))
}

/// Promote: the active canary of the environment to its next step (or past
/// the last with `full`); otherwise the release waiting before an
/// environment with promote = "manual" goes on into it.
async fn promote(
    State(s): S,
    Path(app): Path<String>,
    body: Option<Json<api::ControlRequest>>,
) -> R<api::ControlResponse> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    s.store.get_app(&app).await?;
    let envs = environments(&s, &app).await?;
    let env = pick_env(&app, &envs, req.env.as_deref())?;
    let canary = s
        .store
        .latest_rollout(&app, &env)
        .await?
        .filter(|r| !r.state.is_final() && !r.reverting)
        .filter(|r| r.canary.is_some() || r.blue_green.is_some());
    if canary.is_some() {
        let r = s
            .engine
            .control(&app, &env, Control::Promote { full: req.full })
            .await?;
        return Ok(Json(api::ControlResponse {
            env,
            message: format!("rollout {}: {}", r.id, r.message),
            rollout_id: Some(r.id),
            run_id: None,
        }));
    }
    let (run, to) = pipeline::promote(&s, &app).await?;
    Ok(Json(api::ControlResponse {
        message: format!(
            "{} promoted to {to} (run {})",
            run.release.as_deref().unwrap_or("?"),
            run.id
        ),
        env: to,
        rollout_id: None,
        run_id: Some(run.id),
    }))
}

async fn control(
    s: &Server,
    app: &str,
    req: Option<Json<api::ControlRequest>>,
    c: Control,
) -> R<api::ControlResponse> {
    let req = req.map(|Json(b)| b).unwrap_or_default();
    s.store.get_app(app).await?;
    let envs = environments(s, app).await?;
    let env = pick_env(app, &envs, req.env.as_deref())?;
    let r = s.engine.control(app, &env, c).await?;
    Ok(Json(api::ControlResponse {
        env,
        message: format!("rollout {}: {}", r.id, r.message),
        rollout_id: Some(r.id),
        run_id: None,
    }))
}

async fn pause(
    State(s): S,
    Path(app): Path<String>,
    b: Option<Json<api::ControlRequest>>,
) -> R<api::ControlResponse> {
    control(&s, &app, b, Control::Pause).await
}

async fn resume(
    State(s): S,
    Path(app): Path<String>,
    b: Option<Json<api::ControlRequest>>,
) -> R<api::ControlResponse> {
    control(&s, &app, b, Control::Resume).await
}

async fn abort(
    State(s): S,
    Path(app): Path<String>,
    b: Option<Json<api::ControlRequest>>,
) -> R<api::ControlResponse> {
    control(&s, &app, b, Control::Abort).await
}

pub async fn app_status(
    s: &Server,
    app: &str,
    env: Option<&str>,
) -> Result<api::AppStatus, ApiErr> {
    s.store.get_app(app).await?;
    let envs = environments(s, app).await?;
    let env = pick_env(app, &envs, env)?;
    let live_release = envs
        .iter()
        .find(|e| e.name == env)
        .and_then(|e| e.live_release.clone());
    let rollout = s.store.latest_rollout(app, &env).await?;
    let ready = view::nodes_ready(&s.store.list_nodes().await?, now_ms());
    let instances: Vec<api::InstanceStatus> = s
        .store
        .list_instances(app)
        .await?
        .iter()
        .filter(|r| r.env == env)
        .map(|r| view::instance_status(r, ready.get(&r.node).copied().unwrap_or(false)))
        .collect();
    let runs = s.store.list_runs(app, 20).await?;
    let waiting = runs.iter().find(|r| r.state == "waiting").map(|r| {
        let info = pipeline::run_info(r);
        let at = pipeline::waiting_env(&info.steps).unwrap_or_default();
        format!(
            "{} (run {}) waits to enter {at}: run `drover promote {app}`",
            r.release.as_deref().unwrap_or("?"),
            r.id
        )
    });
    let mut canary_split = None;
    let rollout = match rollout {
        None => None,
        Some(r) => {
            let spec = view::target_spec(s, app, &r).await;
            let split = spec.as_ref().and_then(|sp| view::rollout_split(&r, sp));
            let steps_total = spec.as_ref().map_or(0, |s| s.deploy.steps.len());
            canary_split = split.clone();
            Some(api::RolloutStatus {
                canary_step: r
                    .canary
                    .as_ref()
                    .filter(|c| {
                        (c.step as usize) < steps_total && !r.reverting && !r.state.is_final()
                    })
                    .map(|c| format!("{}/{steps_total}", c.step + 1)),
                weight: split.map(|(_, w)| w),
                preview: spec
                    .as_ref()
                    .filter(|_| !r.state.is_final() && !r.reverting)
                    .and_then(|sp| sp.for_env(&env))
                    .and_then(|sp| view::preview_host(&sp)),
                analysis: r.canary.as_ref().and_then(|c| c.analysis.clone()),
                id: r.id,
                from: r.from.clone(),
                to: r.to.clone(),
                strategy: spec
                    .as_ref()
                    .map(|s| s.deploy.strategy.to_string())
                    .unwrap_or_default(),
                state: r.state.to_string(),
                step: r.step,
                steps: spec
                    .as_ref()
                    .and_then(|s| s.for_env(&env))
                    .map(|s| s.run.instances)
                    .unwrap_or(0),
                reverting: r.reverting,
                message: r.message.clone(),
                failure: r.failure.clone(),
                started_at_ms: r.started_at,
            })
        }
    };
    let figures = s
        .series
        .lock()
        .map(|series| {
            let samples = series.samples(app, &env, now_ms().saturating_sub(10_000));
            samples
                .last()
                .map(|smp| {
                    smp.points
                        .iter()
                        .map(|(release, p)| api::ReleaseFigures {
                            release: release.clone(),
                            rate: p.rate,
                            error_rate: p.error_rate,
                            p99_ms: p.p99_ms,
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    Ok(api::AppStatus {
        app: app.to_string(),
        environment: env,
        environments: envs,
        waiting,
        live_release,
        rollout,
        traffic: view::traffic(&instances, canary_split.as_ref()),
        instances,
        last_run: runs.first().map(pipeline::run_info),
        figures,
    })
}

#[derive(Deserialize)]
struct EnvQuery {
    env: Option<String>,
}

async fn status(
    State(s): S,
    Path(app): Path<String>,
    Query(q): Query<EnvQuery>,
) -> R<api::AppStatus> {
    Ok(Json(app_status(&s, &app, q.env.as_deref()).await?))
}

async fn releases(State(s): S, Path(app): Path<String>) -> R<Vec<api::ReleaseInfo>> {
    Ok(Json(release_list(&s, &app).await?))
}

/// The app's releases, newest first, with where each is live.
pub async fn release_list(s: &Server, app: &str) -> Result<Vec<api::ReleaseInfo>, ApiErr> {
    s.store.get_app(app).await?;
    let envs = environments(s, app).await?;
    let live = envs.last().and_then(|e| e.live_release.clone());
    let list = s.store.list_releases(app).await?;
    Ok(list
        .iter()
        .map(|r| api::ReleaseInfo {
            name: r.name(),
            commit: r.commit.clone(),
            artifact_sha256: r.artifact_sha256.clone(),
            artifact_size: r.artifact_size,
            image: r.image.clone(),
            image_ref: r.image_ref.clone(),
            created_at_ms: r.created_at,
            live: live.as_deref() == Some(&r.name()),
            status: r.status.clone(),
            live_in: envs
                .iter()
                .filter(|e| e.live_release.as_deref() == Some(&r.name()))
                .map(|e| e.name.clone())
                .collect(),
        })
        .collect())
}

#[derive(Deserialize)]
struct LogQuery {
    /// Show the build log instead of instance output.
    #[serde(default)]
    build: bool,
    release: Option<String>,
    instance: Option<String>,
    lines: Option<usize>,
}

fn instance_log_path(s: &Server, instance: &str) -> std::path::PathBuf {
    s.data_dir
        .join("logs")
        .join("instances")
        .join(format!("{instance}.log"))
}

fn tail_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Instance output shipped by the agents (default: the last lines of every
/// current instance, prefixed by its id), or a release's build log.
async fn app_logs(
    State(s): S,
    Path(app): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiErr> {
    let text_response =
        |t: String| ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response();
    let lines = q.lines.unwrap_or(50).min(10_000);
    if q.build || q.release.is_some() {
        let list = s.store.list_releases(&app).await?;
        let rel = match &q.release {
            Some(name) => list
                .iter()
                .find(|r| &r.name() == name)
                .ok_or_else(|| ApiErr::NotFound(format!("release {name} of {app} not found")))?,
            None => list
                .first()
                .ok_or_else(|| ApiErr::NotFound(format!("{app} has no release yet")))?,
        };
        let runs = s.store.list_runs(&app, 1000).await?;
        let run = runs
            .iter()
            .find(|r| r.release.as_deref() == Some(&rel.name()[..]))
            .ok_or_else(|| ApiErr::NotFound(format!("no run log for {}", rel.name())))?;
        let text = std::fs::read_to_string(pipeline::run_log_path(&s.data_dir, run.id))
            .unwrap_or_default();
        return Ok(text_response(text));
    }
    s.store.get_app(&app).await?;
    let ids: Vec<String> = match q.instance {
        Some(id) => {
            let valid = id.strip_prefix(&format!("{app}-")).is_some()
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid || !instance_log_path(&s, &id).exists() {
                return Err(ApiErr::NotFound(format!("no logs for instance {id:?} of {app}; see `drover status {app}` for instance ids")));
            }
            vec![id]
        }
        None => s
            .store
            .list_instances(&app)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect(),
    };
    let single = ids.len() == 1;
    let mut out = String::new();
    for id in ids {
        let text = std::fs::read(instance_log_path(&s, &id))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        for l in tail_lines(&text, lines) {
            if !single {
                out.push_str(&format!("[{id}] "));
            }
            out.push_str(l);
            out.push('\n');
        }
    }
    Ok(text_response(out))
}

async fn hook(
    State(s): S,
    Path(app): Path<String>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> Result<Response, ApiErr> {
    let (status, resp) = crate::source::handle_push(&s, &app, &headers, &body).await?;
    Ok((status, Json(resp)).into_response())
}

async fn runs(State(s): S, Path(app): Path<String>) -> R<Vec<api::RunInfo>> {
    s.store.get_app(&app).await?;
    Ok(Json(
        s.store
            .list_runs(&app, 50)
            .await?
            .iter()
            .map(pipeline::run_info)
            .collect(),
    ))
}

async fn run(State(s): S, Path(id): Path<i64>) -> R<api::RunInfo> {
    Ok(Json(pipeline::run_info(&s.store.get_run(id).await?)))
}

/// `?offset=N`: where in a run's log to go on from.
#[derive(Deserialize)]
pub struct OffsetQuery {
    pub offset: Option<u64>,
}

/// The run's log from byte `offset` (for `drover logs --run ID --follow`).
async fn run_log(
    State(s): S,
    Path(id): Path<i64>,
    Query(q): Query<OffsetQuery>,
) -> Result<Response, ApiErr> {
    s.store.get_run(id).await?;
    let (bytes, len) =
        pipeline::read_run_log(&s.data_dir, id, q.offset.unwrap_or(0), u64::MAX).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-drover-log-size"),
                len.to_string(),
            ),
        ],
        text,
    )
        .into_response())
}

/// Prometheus scrape: per-release traffic of every app and environment,
/// rollouts, instances, nodes, and what was observed (see [`crate::metrics`]).
async fn metrics(State(s): S) -> Result<Response, ApiErr> {
    let now = now_ms();
    let mut snap = crate::metrics::Snapshot::default();
    let nodes = s.store.list_nodes().await?;
    let ready = view::nodes_ready(&nodes, now);
    for n in &nodes {
        snap.nodes.push((
            n.name.clone(),
            ready.get(&n.name).copied().unwrap_or(false),
            now.saturating_sub(n.last_seen),
        ));
    }
    let mut counts: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    let mut apps = std::collections::BTreeSet::new();
    for d in s.store.list_deployments().await? {
        if let Some(r) = s.store.latest_rollout(&d.app, &d.env).await? {
            snap.rollouts.push(r);
        }
        apps.insert(d.app);
    }
    for app in apps {
        for rec in s.store.list_instances(&app).await? {
            let st = view::instance_status(&rec, ready.get(&rec.node).copied().unwrap_or(false));
            *counts
                .entry((rec.app, rec.env, rec.release, st.state))
                .or_default() += 1;
        }
    }
    snap.instances = counts.into_iter().collect();
    let traffic = s.traffic.lock().map(|t| t.all()).unwrap_or_default();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        crate::metrics::encode(traffic, &snap, &s.observed),
    )
        .into_response())
}

async fn nodes(State(s): S) -> R<Vec<api::NodeInfo>> {
    Ok(Json(node_list(&s).await?))
}

/// Every node: labels, readiness, heartbeat age, instances placed on it.
pub async fn node_list(s: &Server) -> Result<Vec<api::NodeInfo>, ApiErr> {
    let now = now_ms();
    let nodes = s.store.list_nodes().await?;
    let lease = crate::node_lease_ms(nodes.len());
    let mut out = Vec::new();
    for n in nodes {
        let count = s
            .store
            .list_node_instances(&n.name)
            .await?
            .iter()
            .filter(|i| i.desired != drover_core::Desired::Stop)
            .count() as u32;
        out.push(api::NodeInfo {
            ready: view::node_ready(&n, now, lease),
            last_seen_ms_ago: now.saturating_sub(n.last_seen),
            instances: count,
            name: n.name,
            labels: n.labels,
        });
    }
    Ok(out)
}

/// An app's webhook deliveries, newest first.
async fn deliveries(
    State(s): S,
    Path(app): Path<String>,
    Query(q): Query<EventsQuery>,
) -> R<Vec<api::DeliveryInfo>> {
    s.store.get_app(&app).await?;
    let d = s
        .store
        .list_deliveries(&app, q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(
        d.into_iter()
            .map(|d| api::DeliveryInfo {
                url: crate::notify::redact_url(&d.url),
                id: d.id,
                env: d.env,
                event: d.event,
                state: d.state,
                attempts: d.attempts,
                last_status: d.last_status,
                last_error: d.last_error,
                created_at_ms: d.created_at,
                updated_at_ms: d.updated_at,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
struct EventsQuery {
    app: Option<String>,
    limit: Option<u32>,
}

async fn events(State(s): S, Query(q): Query<EventsQuery>) -> R<Vec<api::EventInfo>> {
    let ev = s
        .store
        .list_events(q.app.as_deref(), q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(
        ev.into_iter()
            .map(|e| api::EventInfo {
                id: e.id,
                at_ms: e.at,
                app: e.app,
                kind: e.kind,
                message: e.message,
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------- agent ----

/// Registers an agent.
///
/// With the join token (API port): a new node, or one whose lease ran out
/// (a machine replaced), sends a CSR and gets a certificate for its name;
/// the node's older certificates are revoked. A node whose agent is alive
/// with a valid certificate cannot be taken over that way.
///
/// Over mutual TLS (agent port): as the certificate's node again; with a
/// CSR, a renewed certificate (every other certificate of the node but the
/// one in use is revoked).
async fn agent_register(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<api::RegisterRequest>,
) -> R<api::RegisterResponse> {
    use crate::auth;
    if !drover_core::spec::valid_name(&req.node) {
        return Err(ApiErr::BadInput(format!(
            "node name {:?} is not valid; use lowercase letters, digits and '-'",
            req.node
        )));
    }
    let now = now_ms();
    let mut ca_mac = None;
    // The certificate in use, kept valid beside a renewed one.
    let mut keep = None;
    let issued = match auth::bound_node(&caller) {
        Some(_) => {
            auth::check_node(&caller, &req.node)?;
            match &req.csr {
                Some(csr) => {
                    keep = caller.cert.as_ref().map(|c| c.serial.as_str());
                    Some(s.pki.issue_node(&req.node, csr).map_err(ApiErr::BadInput)?)
                }
                None => None,
            }
        }
        None => {
            let Some(csr) = &req.csr else {
                return Err(ApiErr::BadInput(
                    "registering with the join token needs a certificate signing request (csr): \
                     the node's calls after that are mutual TLS with the certificate issued for it; \
                     this agent is older than the server, upgrade it"
                        .into(),
                ));
            };
            // One node read, not all of them: thousands of agents register
            // at once after a server's first start.
            let lease = s.pace().lease_ms;
            let alive = s
                .store
                .get_node(&req.node)
                .await?
                .is_some_and(|n| view::node_ready(&n, now, lease));
            let certified = s
                .store
                .list_node_certs(&req.node)
                .await?
                .iter()
                .any(|c| c.revoked_at.is_none() && c.not_after > now);
            if alive && certified {
                return Err(ApiErr::Conflict(format!(
                    "node {} is registered and its agent is alive (it holds a certificate for \
                     the name); a second agent cannot take its name. If this machine replaces \
                     it, stop the old agent: its name is free {} s after its last report",
                    req.node,
                    lease / 1000
                )));
            }
            let issued = s.pki.issue_node(&req.node, csr).map_err(ApiErr::BadInput)?;
            if let Some(token) = auth::bearer(&headers) {
                ca_mac = Some(api::ca_mac(&token, s.pki.ca_pem()));
            }
            Some(issued)
        }
    };
    // The certificate, the others' revocation and the node: one commit.
    // Rows of certificates expired a day ago go at the same time.
    let day = 24 * 3600 * 1000;
    let cert = issued.as_ref().map(|i| drover_store::IssuedCert {
        record: drover_store::NodeCertRecord {
            serial: i.serial.clone(),
            node: req.node.clone(),
            issued_at: now,
            not_after: i.not_after_ms,
            revoked_at: None,
        },
        keep,
        prune_before: now.saturating_sub(day),
    });
    s.store
        .register_node(&req.node, &req.labels, cert.as_ref(), now)
        .await?;
    if cert.is_some() {
        s.node_certs.forget(&req.node);
    }
    s.nodes_changed
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(node = %req.node, certificate = issued.as_ref().map(|i| i.serial.as_str()),
        "agent registered");
    s.engine.poke();
    let pace = s.pace();
    Ok(Json(api::RegisterResponse {
        node: req.node,
        lease_ms: pace.lease_ms,
        report_interval_ms: pace.report_interval_ms,
        agent_port: s.agent_port,
        cert_not_after_ms: issued.as_ref().map(|i| i.not_after_ms),
        cert: issued.map(|i| i.pem),
        ca: s.pki.ca_pem().to_string(),
        ca_mac,
    }))
}

async fn agent_report(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Json(rep): Json<api::AgentReport>,
) -> R<api::ReportResponse> {
    crate::auth::check_node(&caller, &rep.node)?;
    let observed: Vec<(String, String)> = rep
        .instances
        .iter()
        .map(|i| {
            (
                i.instance.clone(),
                serde_json::to_string(i).unwrap_or_default(),
            )
        })
        .collect();
    // Also the heartbeat; NotFound when the node never registered. The
    // writer pokes the engine once per batch.
    s.heartbeats
        .record(drover_store::Observations {
            node: rep.node.clone(),
            observed,
            now: now_ms(),
        })
        .await
        .map_err(|e| unregistered(&rep.node, e))?;
    Ok(Json(s.pace()))
}

/// A store NotFound for an agent's node means it must register (again).
fn unregistered(node: &str, e: StoreError) -> ApiErr {
    match e {
        StoreError::NotFound(_) => {
            ApiErr::NotFound(format!("node {node} is not registered; register first"))
        }
        other => other.into(),
    }
}

#[derive(Deserialize)]
struct WaitQuery {
    node: Option<String>,
    index: Option<u64>,
    wait_ms: Option<u64>,
}

#[derive(Deserialize)]
struct DiscoveryQuery {
    env: Option<String>,
    index: Option<u64>,
    wait_ms: Option<u64>,
}

/// The app's serving instances by set; with `?index=I`, a blocking query.
async fn discovery(
    State(s): S,
    Path(app): Path<String>,
    Query(q): Query<DiscoveryQuery>,
) -> R<api::Discovery> {
    if q.index.is_some() {
        // Unknown app or environment: said at once, not after the wait.
        crate::discovery::environment(&s, &app, q.env.as_deref()).await?;
        wait_for_index(&s, q.index, q.wait_ms).await;
    }
    Ok(Json(
        crate::discovery::discover(&s, &app, q.env.as_deref()).await?,
    ))
}

/// Blocks until the index passes `index` or `wait_ms` (≤ 60 s) elapses.
async fn wait_for_index(s: &Server, index: Option<u64>, wait_ms: Option<u64>) {
    let Some(index) = index else { return };
    let mut rx = s.index.subscribe();
    let deadline = tokio::time::Instant::now() + long_poll_wait(wait_ms);
    while *rx.borrow_and_update() <= index {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
            _ = s.shutdown.cancelled() => return,
        }
    }
}

/// How long a blocking query waits for the index to move: `wait_ms`
/// (default 30 s, at most 60 s) plus up to a sixteenth more at random, as
/// Consul does: thousands of agents' long polls that started together
/// would otherwise all end, and come back, together.
fn long_poll_wait(wait_ms: Option<u64>) -> Duration {
    let wait = wait_ms.unwrap_or(30_000).min(60_000);
    Duration::from_millis(wait + rand::random::<u64>() % (wait / 16 + 1))
}

async fn agent_assignments(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Query(q): Query<WaitQuery>,
) -> R<api::AssignmentsResponse> {
    let node = q
        .node
        .ok_or_else(|| ApiErr::BadInput("missing ?node=".into()))?;
    crate::auth::check_node(&caller, &node)?;
    // The request's arrival is the heartbeat, not the end of its wait: a
    // long poll that a node cut off began earlier is answered into the void
    // (when the index moves, e.g. because that node was found lost) and
    // must not renew its lease. Written with the reports' batch: one
    // commit per poll was a write (and an fsync) per node every 30 s
    // competing with the batches.
    s.heartbeats
        .record(drover_store::Observations {
            node: node.clone(),
            observed: Vec::new(),
            now: now_ms(),
        })
        .await
        .map_err(|e| unregistered(&node, e))?;
    wait_for_index(&s, q.index, q.wait_ms).await;
    let index = *s.index.borrow();
    let mut out = Vec::new();
    // (app, env, release) → the release and its spec as it applies there.
    // Each release's spec as it applies there and the secrets it runs with.
    type Prepared = (
        drover_store::ReleaseRecord,
        drover_core::spec::AppSpec,
        Vec<(String, String)>,
    );
    let mut releases: BTreeMap<(String, String, String), Result<Prepared, String>> =
        BTreeMap::new();
    let mut unchanged = Vec::new();
    for rec in s.store.list_node_instances(&node).await? {
        let key = (rec.app.clone(), rec.env.clone(), rec.release.clone());
        if !releases.contains_key(&key) {
            let prepared = async {
                let n = view::parse_release_name(&rec.release).unwrap_or(0);
                let rel = s.store.get_release(&rec.app, n).await?;
                let spec = view::release_spec(&rel).map_err(ApiErr::Internal)?;
                let spec = spec.for_env(&rec.env).unwrap_or(spec);
                let secrets = release_secret_values(&s, &rec.app, n, &rec.env).await?;
                Ok::<Prepared, ApiErr>((rel, spec, secrets))
            }
            .await
            .map_err(|e| e.to_string());
            if let Err(e) = &prepared {
                tracing::warn!(node = %node, app = %rec.app, release = %rec.release, error = %e,
                    "cannot describe this release's instances; the agent keeps them as they are");
            }
            releases.insert(key.clone(), prepared);
        }
        match &releases[&key] {
            Ok((rel, spec, secrets)) => {
                let mut a = view::assignment(&rec, rel, spec);
                // The registry's password goes to the driver, not the app.
                let pw = spec
                    .registry
                    .as_ref()
                    .and_then(|r| r.password_secret.clone());
                a.run.env.extend(
                    secrets
                        .iter()
                        .filter(|(k, _)| Some(k) != pw.as_ref())
                        .cloned(),
                );
                if let (Some(reg), Some(_)) = (&spec.registry, &a.image_ref) {
                    if let (Some(user), Some(pw)) = (&reg.username, &pw) {
                        // A missing secret: the pull is refused and says so.
                        let password = secrets
                            .iter()
                            .find(|(k, _)| k == pw)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default();
                        a.registry_auth = Some(api::RegistryAuth {
                            username: user.clone(),
                            password,
                        });
                    }
                }
                out.push(a);
            }
            // The app is in error: its instances stay as they are.
            Err(_) => unchanged.push(rec.id.clone()),
        }
    }
    Ok(Json(api::AssignmentsResponse {
        index,
        assignments: out,
        unchanged,
    }))
}

/// Appends shipped output to the instance's log on the server (capped: past
/// 4 MiB the oldest half is dropped).
async fn agent_logs(
    State(s): S,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Json(chunk): Json<api::LogChunk>,
) -> Result<StatusCode, ApiErr> {
    crate::auth::check_node(&caller, &chunk.node)?;
    let owned = s
        .store
        .list_node_instances(&chunk.node)
        .await?
        .iter()
        .any(|i| i.id == chunk.instance);
    if !owned {
        return Err(ApiErr::NotFound(format!(
            "instance {} is not assigned to node {}",
            chunk.instance, chunk.node
        )));
    }
    let path = instance_log_path(&s, &chunk.instance);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(chunk.data.as_bytes())?;
        if f.metadata()?.len() > 4 * 1024 * 1024 {
            let all = std::fs::read(&path)?;
            let keep = &all[all.len() - 2 * 1024 * 1024..];
            let start = keep
                .iter()
                .position(|b| *b == b'\n')
                .map(|i| i + 1)
                .unwrap_or(0);
            let tmp = path.with_extension("log.tmp");
            std::fs::write(&tmp, &keep[start..])?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ApiErr::Internal(e.to_string()))?
    .map_err(|e| ApiErr::Unavailable(format!("cannot store instance logs: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn artifact(State(s): S, Path(sha): Path<String>) -> Result<Response, ApiErr> {
    if !crate::artifact::valid_sha256(&sha) {
        return Err(ApiErr::BadInput(
            "an artifact is named by its lowercase hex sha256".into(),
        ));
    }
    let path = s.data_dir.join("artifacts").join(format!("{sha}.tar.zst"));
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiErr::NotFound(format!("artifact {sha}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiErr::Internal(e.to_string()))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

// ---------------------------------------------------------------- proxy ----

pub async fn routing_table(s: &Server) -> Result<api::RoutesResponse, ApiErr> {
    let index = *s.index.borrow();
    let ready = view::nodes_ready(&s.store.list_nodes().await?, now_ms());
    let mut routes = Vec::new();
    let mut instances: BTreeMap<String, Vec<drover_store::InstanceRecord>> = BTreeMap::new();
    for d in s.store.list_deployments().await? {
        let rollout = s
            .store
            .latest_rollout(&d.app, &d.env)
            .await
            .ok()
            .flatten()
            .filter(|r| !r.state.is_final());
        let release = rollout
            .as_ref()
            .map(|r| r.to.clone())
            .or(d.live_release.clone());
        // The host comes from the release being rolled out (or live). An
        // app whose records cannot be read keeps the route it had (its
        // instances are left running; see `agent_assignments`).
        let Some(n) = release.as_deref().and_then(view::parse_release_name) else {
            continue;
        };
        let read = s
            .store
            .get_release(&d.app, n)
            .await
            .ok()
            .and_then(|r| view::release_spec(&r).ok())
            .and_then(|spec| spec.for_env(&d.env));
        let key = (d.app.clone(), d.env.clone());
        let spec = {
            let mut last = s.route_specs.lock().expect("route specs poisoned");
            match read {
                Some(spec) => {
                    last.insert(key, spec.clone());
                    spec
                }
                None => match last.get(&key) {
                    Some(spec) => spec.clone(),
                    None => continue,
                },
            }
        };
        if !instances.contains_key(&d.app) {
            instances.insert(d.app.clone(), s.store.list_instances(&d.app).await?);
        }
        let upstreams = instances[&d.app]
            .iter()
            .filter(|r| r.env == d.env)
            .filter_map(|r| {
                view::serves(r, ready.get(&r.node).copied().unwrap_or(false)).map(|addr| {
                    api::Upstream {
                        instance: r.id.clone(),
                        release: r.release.clone(),
                        address: addr,
                        weight: 1,
                    }
                })
            })
            .collect();
        // A canary splits users by key between its release and the rest;
        // blue/green sends all of them one way, with a preview of the new set.
        let split = rollout.as_ref().and_then(|r| {
            let (release, weight) = view::rollout_split(r, &spec)?;
            let preview = view::preview_host(&spec).filter(|_| !r.reverting);
            Some(api::Split {
                release,
                weight_permille: weight * 10,
                key: view::split_key(&spec.route.user_key),
                // Partial by listed users: exactly these keys, nobody else.
                values: spec.deploy.partial_users.clone(),
                preview_header: preview.as_ref().map(|_| view::PREVIEW_HEADER.to_string()),
                preview_host: preview,
                // Partial by node label: the proxies decide by their own labels
                // (none of them while rolling back).
                proxy_labels: match r.reverting {
                    true => BTreeMap::new(),
                    false => spec.deploy.partial_nodes.clone(),
                },
            })
        });
        routes.push(api::Route {
            app: d.app.clone(),
            env: d.env.clone(),
            host: spec.route.host.clone(),
            upstreams,
            split,
        });
    }
    Ok(api::RoutesResponse { index, routes })
}

async fn routes(State(s): S, Query(q): Query<WaitQuery>) -> R<api::RoutesResponse> {
    wait_for_index(&s, q.index, q.wait_ms).await;
    Ok(Json(routing_table(&s).await?))
}

async fn proxy_report(
    State(s): S,
    Json(rep): Json<api::ProxyReport>,
) -> Result<StatusCode, ApiErr> {
    s.store
        .upsert_proxy(&ProxyRecord {
            name: rep.proxy.clone(),
            applied_index: rep.applied_index,
            oldest_live_index: rep.oldest_live_index,
            last_seen: now_ms(),
        })
        .await?;
    if let Ok(mut t) = s.traffic.lock() {
        t.record(&rep.proxy, &rep.stats);
    }
    s.engine.poke();
    Ok(StatusCode::NO_CONTENT)
}
