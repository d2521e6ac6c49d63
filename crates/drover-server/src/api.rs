//! The HTTP/JSON API: CLI endpoints, the agent protocol, the proxy protocol
//! and artifact downloads.
//!
//! *API Boundary*: errors become HTTP statuses only here, in
//! [`ApiErr::into_response`]; bodies are `{"error": "..."}` and say what to do.

use crate::{git, now_ms, pipeline, view, Server, NODE_LEASE_MS, REPORT_INTERVAL_MS};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api as api;
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
            StoreError::NoSpace(_) => ApiErr::Unavailable(e.to_string()),
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
    Router::new()
        .route("/v1/health", get(|| async { "ok\n" }))
        .route("/v1/apps", post(add_app).get(list_apps))
        .route("/v1/apps/{app}/deploy", post(deploy))
        .route("/v1/apps/{app}/rollback", post(rollback))
        .route("/v1/apps/{app}/status", get(status))
        .route("/v1/apps/{app}/releases", get(releases))
        .route("/v1/apps/{app}/logs", get(app_logs))
        .route("/v1/apps/{app}/runs", get(runs))
        .route("/v1/runs/{id}", get(run))
        .route("/v1/runs/{id}/log", get(run_log))
        .route("/v1/nodes", get(nodes))
        .route("/v1/events", get(events))
        .route("/v1/agent/register", post(agent_register))
        .route("/v1/agent/report", post(agent_report))
        .route("/v1/agent/assignments", get(agent_assignments))
        .route("/v1/agent/logs", post(agent_logs))
        .route("/v1/routes", get(routes))
        .route("/v1/proxy/report", post(proxy_report))
        .route("/v1/artifacts/{sha256}", get(artifact))
        .route(
            "/v1/hooks/{app}",
            post(hook).layer(DefaultBodyLimit::max(crate::source::HOOK_BODY_LIMIT)),
        )
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .with_state(server)
}

// ------------------------------------------------------------------ CLI ----

fn app_info(a: &drover_store::AppRecord) -> api::AppInfo {
    let host = serde_json::from_str::<drover_core::spec::AppSpec>(&a.spec)
        .map(|s| s.route.host)
        .unwrap_or_default();
    api::AppInfo {
        webhook_secret: None,
        name: a.name.clone(),
        repo: a.repo.clone(),
        branch: a.branch.clone(),
        host,
        live_release: a.live_release.clone(),
    }
}

async fn add_app(State(s): S, Json(req): Json<api::AddAppRequest>) -> R<api::AppInfo> {
    let rec = pipeline::add_app(&s, &req.repo, req.branch.as_deref()).await?;
    let mut info = app_info(&rec);
    // Shown once, to whoever registered the app.
    info.webhook_secret = rec.webhook_secret.clone();
    Ok(Json(info))
}

async fn list_apps(State(s): S) -> R<Vec<api::AppInfo>> {
    Ok(Json(
        s.store.list_apps().await?.iter().map(app_info).collect(),
    ))
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
    let (_run, handle) =
        pipeline::start_run(&s, &app_rec, &commit, &git_ref, "manual", None).await?;
    let out = handle
        .await
        .map_err(|e| ApiErr::Internal(e.to_string()))??;
    Ok(Json(api::DeployResponse {
        release: out.release.name(),
        commit: out.release.commit,
        rollout_id: out.rollout.id,
        run_id: Some(out.run.id),
    }))
}

async fn rollback(
    State(s): S,
    Path(app): Path<String>,
    Json(req): Json<api::RollbackRequest>,
) -> R<api::DeployResponse> {
    let lock = s.deploy_lock(&app).await;
    let _held = lock.lock().await;
    let app_rec = s.store.get_app(&app).await?;
    let to = match req.to.or(app_rec.prev_release.clone()) {
        Some(t) => t,
        None => return Err(ApiErr::BadInput(format!("{app} has no earlier live release to roll back to; pass --to rN (see `drover releases {app}`)"))),
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
    let r = s.engine.start_rollout(&app, &to, "rollback").await?;
    Ok(Json(api::DeployResponse {
        release: to,
        commit: release.commit,
        rollout_id: r.id,
        run_id: None,
    }))
}

pub async fn app_status(s: &Server, app: &str) -> Result<api::AppStatus, ApiErr> {
    let app_rec = s.store.get_app(app).await?;
    let rollout = s.store.latest_rollout(app).await?;
    let ready = view::nodes_ready(&s.store.list_nodes().await?, now_ms());
    let instances: Vec<api::InstanceStatus> = s
        .store
        .list_instances(app)
        .await?
        .iter()
        .map(|r| view::instance_status(r, ready.get(&r.node).copied().unwrap_or(false)))
        .collect();
    let rollout = match rollout {
        None => None,
        Some(r) => {
            let n = view::parse_release_name(&r.to).unwrap_or(0);
            let spec = s
                .store
                .get_release(app, n)
                .await
                .ok()
                .and_then(|rel| view::release_spec(&rel).ok());
            Some(api::RolloutStatus {
                id: r.id,
                from: r.from.clone(),
                to: r.to.clone(),
                strategy: spec
                    .as_ref()
                    .map(|s| s.deploy.strategy.to_string())
                    .unwrap_or_default(),
                state: r.state.to_string(),
                step: r.step,
                steps: spec.as_ref().map(|s| s.run.instances).unwrap_or(0),
                reverting: r.reverting,
                message: r.message.clone(),
                failure: r.failure.clone(),
                started_at_ms: r.started_at,
            })
        }
    };
    Ok(api::AppStatus {
        app: app.to_string(),
        environment: "production".into(),
        live_release: app_rec.live_release,
        rollout,
        traffic: view::traffic(&instances),
        instances,
        last_run: s
            .store
            .list_runs(app, 1)
            .await?
            .first()
            .map(pipeline::run_info),
    })
}

async fn status(State(s): S, Path(app): Path<String>) -> R<api::AppStatus> {
    Ok(Json(app_status(&s, &app).await?))
}

async fn releases(State(s): S, Path(app): Path<String>) -> R<Vec<api::ReleaseInfo>> {
    let live = s.store.get_app(&app).await?.live_release;
    let list = s.store.list_releases(&app).await?;
    Ok(Json(
        list.iter()
            .map(|r| api::ReleaseInfo {
                name: r.name(),
                commit: r.commit.clone(),
                artifact_sha256: r.artifact_sha256.clone(),
                artifact_size: r.artifact_size,
                created_at_ms: r.created_at,
                live: live.as_deref() == Some(&r.name()),
                status: r.status.clone(),
            })
            .collect(),
    ))
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

#[derive(Deserialize)]
struct OffsetQuery {
    offset: Option<u64>,
}

/// The run's log from byte `offset` (for `drover logs --run ID --follow`).
async fn run_log(
    State(s): S,
    Path(id): Path<i64>,
    Query(q): Query<OffsetQuery>,
) -> Result<Response, ApiErr> {
    s.store.get_run(id).await?;
    let bytes = std::fs::read(pipeline::run_log_path(&s.data_dir, id)).unwrap_or_default();
    let from = (q.offset.unwrap_or(0) as usize).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]).into_owned();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-drover-log-size"),
                bytes.len().to_string(),
            ),
        ],
        text,
    )
        .into_response())
}

async fn nodes(State(s): S) -> R<Vec<api::NodeInfo>> {
    let now = now_ms();
    let nodes = s.store.list_nodes().await?;
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
            ready: view::node_ready(&n, now),
            last_seen_ms_ago: now.saturating_sub(n.last_seen),
            instances: count,
            name: n.name,
            labels: n.labels,
        });
    }
    Ok(Json(out))
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

async fn agent_register(
    State(s): S,
    Json(req): Json<api::RegisterRequest>,
) -> R<api::RegisterResponse> {
    if !drover_core::spec::valid_name(&req.node) {
        return Err(ApiErr::BadInput(format!(
            "node name {:?} is not valid; use lowercase letters, digits and '-'",
            req.node
        )));
    }
    s.store
        .upsert_node(&req.node, &req.labels, now_ms())
        .await?;
    tracing::info!(node = %req.node, "agent registered");
    s.engine.poke();
    Ok(Json(api::RegisterResponse {
        node: req.node,
        lease_ms: NODE_LEASE_MS,
        report_interval_ms: REPORT_INTERVAL_MS,
    }))
}

async fn agent_report(
    State(s): S,
    Json(rep): Json<api::AgentReport>,
) -> Result<StatusCode, ApiErr> {
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
    // Also the heartbeat; NotFound when the node never registered.
    s.store
        .record_observations(&rep.node, &observed, now_ms())
        .await
        .map_err(|e| unregistered(&rep.node, e))?;
    s.engine.poke();
    Ok(StatusCode::NO_CONTENT)
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

/// Blocks until the index passes `index` or `wait_ms` (≤ 60 s) elapses.
async fn wait_for_index(s: &Server, index: Option<u64>, wait_ms: Option<u64>) {
    let Some(index) = index else { return };
    let mut rx = s.index.subscribe();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(wait_ms.unwrap_or(30_000).min(60_000));
    while *rx.borrow_and_update() <= index {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
            _ = s.shutdown.cancelled() => return,
        }
    }
}

async fn agent_assignments(State(s): S, Query(q): Query<WaitQuery>) -> R<api::AssignmentsResponse> {
    let node = q
        .node
        .ok_or_else(|| ApiErr::BadInput("missing ?node=".into()))?;
    wait_for_index(&s, q.index, q.wait_ms).await;
    let index = *s.index.borrow();
    s.store
        .touch_node(&node, now_ms())
        .await
        .map_err(|e| unregistered(&node, e))?;
    let mut out = Vec::new();
    let mut releases: BTreeMap<
        (String, String),
        (drover_store::ReleaseRecord, drover_core::spec::AppSpec),
    > = BTreeMap::new();
    for rec in s.store.list_node_instances(&node).await? {
        let key = (rec.app.clone(), rec.release.clone());
        if !releases.contains_key(&key) {
            let n = view::parse_release_name(&rec.release).unwrap_or(0);
            let rel = s.store.get_release(&rec.app, n).await?;
            let spec = view::release_spec(&rel).map_err(ApiErr::Internal)?;
            releases.insert(key.clone(), (rel, spec));
        }
        let (rel, spec) = &releases[&key];
        out.push(view::assignment(&rec, rel, spec));
    }
    Ok(Json(api::AssignmentsResponse {
        index,
        assignments: out,
    }))
}

/// Appends shipped output to the instance's log on the server (capped: past
/// 4 MiB the oldest half is dropped).
async fn agent_logs(State(s): S, Json(chunk): Json<api::LogChunk>) -> Result<StatusCode, ApiErr> {
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
    for app in s.store.list_apps().await? {
        let rollout = s.store.latest_rollout(&app.name).await.ok().flatten();
        let release = rollout
            .filter(|r| !r.state.is_final())
            .map(|r| r.to)
            .or(app.live_release.clone());
        let spec = match release.as_deref().and_then(view::parse_release_name) {
            Some(n) => match s
                .store
                .get_release(&app.name, n)
                .await
                .ok()
                .and_then(|r| view::release_spec(&r).ok())
            {
                Some(spec) => spec,
                None => continue,
            },
            None => continue,
        };
        let upstreams = s
            .store
            .list_instances(&app.name)
            .await?
            .iter()
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
        routes.push(api::Route {
            app: app.name.clone(),
            env: String::new(),
            host: spec.route.host.clone(),
            upstreams,
            split: None,
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
    s.engine.poke();
    Ok(StatusCode::NO_CONTENT)
}
