//! The web dashboard, served by the server at its API address: an apps
//! overview (`/`), an app page (`/apps/{app}`: each environment's rollout,
//! traffic, instances and live chart, releases, runs, operator actions), a
//! run page with its live log (`/runs/{id}`) and the nodes (`/nodes`).
//!
//! Pages are rendered on the server by askama templates
//! (`templates/`, checked at compile time, HTML-escaped). Each page is
//! made of *parts* (elements with an id); a page's event stream
//! (`/ui/events/…`, server-sent events) sends the parts whose rendering
//! changed — at every change of the global index and once a second (for
//! health, heartbeats, messages and the chart) — and `static/dash.js`
//! swaps them in. Actions call the JSON API (`POST /v1/apps/{app}/…`),
//! exactly as the CLI does.
//!
//! It reads through the API's own functions (`api::app_status`,
//! `api::release_list`, `api::node_list`, `pipeline::run_info`), so the
//! dashboard shows what `drover status` shows. Streams end when the
//! server shuts down (graceful shutdown would otherwise wait on them).

pub mod chart;
pub mod views;

use crate::api::{self, ApiErr};
use crate::auth::{Caller, Need};
use crate::{now_ms, pipeline, Server};
use askama::Template;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use views::*;

type S = State<Arc<Server>>;

/// How much of a run's log the run page shows at first (its end).
const LOG_FIRST: u64 = 256 * 1024;
/// The most log text sent in one event.
const LOG_CHUNK: u64 = 64 * 1024;
/// The most log text queued at one refresh of a stream.
const LOG_PER_REFRESH: u64 = 1024 * 1024;
/// Streams re-render at least this often (health, heartbeats, the chart).
const REFRESH: Duration = Duration::from_secs(1);

/// The dashboard's routes, each with the role it needs (like the API's):
/// pages and their streams need a viewer token (the `drover_token` cookie
/// set by `/login`, or a bearer token); the script and style sheet are
/// public. A page asked for without a valid token sends the browser to
/// `/login`.
pub fn router(server: Arc<Server>) -> Router {
    use crate::auth::{Guarded, Need::*};
    Guarded::new(server.clone())
        .route("/", Viewer, get(overview_page))
        .route("/apps/{app}", Viewer, get(app_page))
        .route("/runs/{id}", Viewer, get(run_page))
        .route("/nodes", Viewer, get(nodes_page))
        .route("/ui/events/overview", Viewer, get(overview_events))
        .route("/ui/events/apps/{app}", Viewer, get(app_events))
        .route("/ui/events/runs/{id}", Viewer, get(run_events))
        .route("/ui/events/nodes", Viewer, get(nodes_events))
        .route("/ui/dash.css", Public, get(css))
        .route("/ui/dash.js", Public, get(js))
        .into_router()
        .layer(axum::middleware::from_fn(sign_in_first))
        .with_state(server)
}

/// A page refused for want of a (valid) token: go and sign in. Streams and
/// assets keep their status (an event stream's script says what happened).
async fn sign_in_first(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let page = !req.uri().path().starts_with("/ui/");
    let resp = next.run(req).await;
    if page && resp.status() == StatusCode::UNAUTHORIZED {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    }
    resp
}

/// The signed-in caller, as the access check found them.
type Who = Extension<Caller>;

/// Whether the caller may use the operator actions (promote, pause,
/// resume, abort, rollback): a deployer or admin. A viewer gets no
/// buttons; the API checks the role again on every action.
fn can_act(who: &Caller) -> bool {
    who.role.allows(Need::Deployer)
}

/// "ci (deployer)", for the page header.
fn who_text(who: &Caller) -> String {
    format!("{} ({})", who.name, who.role.as_str())
}

/// The pages of the dashboard and what their live parts depend on.
#[derive(Debug, Clone, PartialEq)]
pub enum Page {
    Overview,
    App(String),
    Run(i64),
    Nodes,
}

impl Page {
    fn stream(&self) -> String {
        match self {
            Page::Overview => "/ui/events/overview".into(),
            Page::App(app) => format!("/ui/events/apps/{}", drover_api::encode_query(app)),
            Page::Run(id) => format!("/ui/events/runs/{id}"),
            Page::Nodes => "/ui/events/nodes".into(),
        }
    }
}

fn render(t: &impl Template) -> Result<String, ApiErr> {
    t.render()
        .map_err(|e| ApiErr::Internal(format!("template: {e}")))
}

fn slot(id: impl Into<String>, t: &impl Template) -> Result<Slot, ApiErr> {
    Ok(Slot {
        id: id.into(),
        html: render(t)?,
    })
}

/// Release name → commit, for showing live commits.
async fn commits(s: &Server, app: &str) -> Result<BTreeMap<String, String>, ApiErr> {
    Ok(s.store
        .list_releases(app)
        .await?
        .into_iter()
        .map(|r| (r.name(), r.commit))
        .collect())
}

async fn apps_part(s: &Server) -> Result<AppsPart, ApiErr> {
    let mut apps = Vec::new();
    for a in s.store.list_apps().await? {
        // One app in error shows as such; the others still do.
        let row = async {
            let info = api::app_info(s, &a).await?;
            let mut statuses = Vec::new();
            for e in &info.environments {
                statuses.push(api::app_status(s, &a.name, Some(&e.name)).await?);
            }
            Ok::<_, ApiErr>(app_row(&info, &statuses, &commits(s, &a.name).await?))
        };
        apps.push(match row.await {
            Ok(r) => r,
            Err(_) => app_row(&api::app_info_or_error(s, &a).await, &[], &BTreeMap::new()),
        });
    }
    Ok(AppsPart { apps })
}

/// The app page's parts, in page order.
async fn app_slots(s: &Server, app: &str, can_act: bool) -> Result<AppSlots, ApiErr> {
    let rec = s.store.get_app(app).await?;
    let envs = api::environments(s, app).await?;
    let commits = commits(s, app).await?;
    let runs: Vec<drover_api::RunInfo> = s
        .store
        .list_runs(app, 20)
        .await?
        .iter()
        .map(pipeline::run_info)
        .collect();
    let waiting_for = runs
        .iter()
        .find(|r| r.state == "waiting")
        .and_then(|r| pipeline::waiting_env(&r.steps));
    let now = now_ms();
    let mut env_slots = Vec::new();
    let mut waiting = None;
    for e in &envs {
        let st = api::app_status(s, app, Some(&e.name)).await?;
        waiting = st.waiting.clone();
        let key = env_key(&e.name);
        let samples = s
            .series
            .lock()
            .map(|t| t.samples(app, &e.name, now.saturating_sub(chart::SPAN_MS)))
            .unwrap_or_default();
        env_slots.push(EnvSlots {
            env: e.name.clone(),
            title: env_title(&e.name),
            state: slot(format!("env-{key}"), &env_part(&st, &commits))?,
            actions: slot(
                format!("actions-{key}"),
                &ActionsPart {
                    app: app.to_string(),
                    env: e.name.clone(),
                    can_act,
                    actions: actions(app, &st, waiting_for),
                },
            )?,
            instances: slot(format!("instances-{key}"), &instances_part(&st))?,
            chart: slot(
                format!("chart-{key}"),
                &ChartPart {
                    env: e.name.clone(),
                    chart: chart::build(&st.traffic, &samples, now),
                },
            )?,
        });
    }
    Ok(AppSlots {
        repo: rec.repo,
        branch: rec.branch,
        head: slot(
            "head",
            &HeadPart {
                waiting,
                last_run: runs.first().map(run_row),
            },
        )?,
        envs: env_slots,
        releases: slot(
            "releases",
            &ReleasesPart {
                releases: release_rows(&api::release_list(s, app).await?),
            },
        )?,
        runs: slot(
            "runs",
            &RunsPart {
                runs: runs.iter().map(run_row).collect(),
            },
        )?,
    })
}

struct AppSlots {
    repo: String,
    branch: String,
    head: Slot,
    envs: Vec<EnvSlots>,
    releases: Slot,
    runs: Slot,
}

async fn run_slot(s: &Server, id: i64) -> Result<(drover_api::RunInfo, Slot), ApiErr> {
    let info = pipeline::run_info(&s.store.get_run(id).await?);
    let part = slot("run", &run_part(&info))?;
    Ok((info, part))
}

async fn nodes_slot(s: &Server) -> Result<Slot, ApiErr> {
    slot(
        "nodes",
        &NodesPart {
            nodes: node_rows(&api::node_list(s).await?),
        },
    )
}

/// Every live part of a page: element id → HTML.
async fn parts(s: &Server, page: &Page, can_act: bool) -> Result<Vec<Slot>, ApiErr> {
    Ok(match page {
        Page::Overview => vec![slot("apps", &apps_part(s).await?)?],
        Page::App(app) => {
            let a = app_slots(s, app, can_act).await?;
            let mut out = vec![a.head];
            for e in a.envs {
                out.extend([e.state, e.actions, e.chart, e.instances]);
            }
            out.extend([a.releases, a.runs]);
            out
        }
        Page::Run(id) => vec![run_slot(s, *id).await?.1],
        Page::Nodes => vec![nodes_slot(s).await?],
    })
}

// -------------------------------------------------------------- pages ----

/// An HTML answer with headers that keep the page to itself: no framing
/// (the action buttons must not be clickjacked), scripts and styles only
/// from this server.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A page, or an error page saying what went wrong (with the API's status).
fn page(who: &Caller, result: Result<String, ApiErr>) -> Response {
    match result {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => {
            let message = e.to_string();
            let status = e.into_response().status();
            let body = ErrorPage {
                title: if status == StatusCode::NOT_FOUND {
                    "Not found".into()
                } else {
                    "Error".into()
                },
                stream: String::new(),
                who: who_text(who),
                message: message.clone(),
            }
            .render()
            .unwrap_or(message);
            html(status, body)
        }
    }
}

async fn overview_page(State(s): S, Extension(who): Who) -> Response {
    page(
        &who,
        async {
            render(&OverviewPage {
                title: "Apps".into(),
                who: who_text(&who),
                stream: Page::Overview.stream(),
                apps: slot("apps", &apps_part(&s).await?)?,
            })
        }
        .await,
    )
}

async fn app_page(State(s): S, Path(app): Path<String>, Extension(who): Who) -> Response {
    page(
        &who,
        async {
            let a = app_slots(&s, &app, can_act(&who)).await?;
            render(&AppPage {
                title: app.clone(),
                who: who_text(&who),
                stream: Page::App(app.clone()).stream(),
                app: app.clone(),
                repo: a.repo,
                branch: a.branch,
                head: a.head,
                envs: a.envs,
                releases: a.releases,
                runs: a.runs,
            })
        }
        .await,
    )
}

async fn run_page(State(s): S, Path(id): Path<i64>, Extension(who): Who) -> Response {
    page(
        &who,
        async {
            let (info, run) = run_slot(&s, id).await?;
            let from = pipeline::run_log_len(&s.data_dir, id)
                .await
                .saturating_sub(LOG_FIRST);
            let (bytes, _) = pipeline::read_run_log(&s.data_dir, id, from, LOG_FIRST).await;
            let shown = from + bytes.len() as u64;
            render(&RunPage {
                title: format!("Run {id} of {}", info.app),
                who: who_text(&who),
                // The live log goes on from where this page's copy ends.
                stream: format!("{}?offset={shown}", Page::Run(id).stream()),
                app: info.app.clone(),
                id,
                run,
                log: String::from_utf8_lossy(&bytes).into_owned(),
                log_offset: shown,
                log_cut: from > 0,
            })
        }
        .await,
    )
}

async fn nodes_page(State(s): S, Extension(who): Who) -> Response {
    page(
        &who,
        async {
            render(&NodesPage {
                title: "Nodes".into(),
                who: who_text(&who),
                stream: Page::Nodes.stream(),
                nodes: nodes_slot(&s).await?,
            })
        }
        .await,
    )
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/dash.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/dash.js"),
    )
        .into_response()
}

// ------------------------------------------------------------- events ----

async fn overview_events(State(s): S, Extension(who): Who) -> Response {
    events(s, Page::Overview, who, None).await
}

async fn app_events(State(s): S, Path(app): Path<String>, Extension(who): Who) -> Response {
    events(s, Page::App(app), who, None).await
}

async fn run_events(
    State(s): S,
    Path(id): Path<i64>,
    Query(q): Query<crate::api::OffsetQuery>,
    Extension(who): Who,
    headers: HeaderMap,
) -> Response {
    // A reconnecting browser says how far it got (each log event's id is
    // the offset after it); a fresh page starts after what it was served.
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let from = match resumed.or(q.offset) {
        Some(o) => o,
        None => pipeline::run_log_len(&s.data_dir, id).await,
    };
    events(s, Page::Run(id), who, Some(from)).await
}

async fn nodes_events(State(s): S, Extension(who): Who) -> Response {
    events(s, Page::Nodes, who, None).await
}

/// A page's event stream. Events: `parts` (the changed parts, JSON object
/// id → HTML), `log` (run page: `{"text": …}`, id = log offset after it)
/// and `failure` (`{"error": …}` when the page's data cannot be read, e.g.
/// the app is gone, or the caller's token was revoked or expired, which
/// also ends the stream).
async fn events(s: Arc<Server>, page: Page, who: Caller, log_offset: Option<u64>) -> Response {
    let state = Stream {
        rx: s.index.subscribe(),
        s,
        page,
        can_act: can_act(&who),
        who,
        sent: BTreeMap::new(),
        first: true,
        ended: false,
        log_offset,
        queue: VecDeque::new(),
        failed: None,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.ended || (!st.first && !st.wait().await) {
                return None;
            }
            st.first = false;
            if st.still_allowed().await {
                st.refresh().await;
            }
        }
    });
    // Frequent keep-alives also find closed connections soon (a stream
    // with nothing new writes nothing else).
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}

struct Stream {
    s: Arc<Server>,
    rx: tokio::sync::watch::Receiver<u64>,
    page: Page,
    /// Who watches: their token is checked again at every refresh.
    who: Caller,
    can_act: bool,
    /// The caller's token no longer holds: the stream ends.
    ended: bool,
    /// What the browser has of each part.
    sent: BTreeMap<String, String>,
    first: bool,
    log_offset: Option<u64>,
    queue: VecDeque<Event>,
    /// The last failure sent (not repeated every second).
    failed: Option<String>,
}

impl Stream {
    /// Waits for a change of the index or the refresh interval; false once
    /// the server shuts down (ending the stream, so graceful shutdown does
    /// not wait on it).
    async fn wait(&mut self) -> bool {
        tokio::select! {
            r = self.rx.changed() => {
                if r.is_err() {
                    return false;
                }
                // Several writes often follow each other: show them together.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => true,
                    _ = self.s.shutdown.cancelled() => false,
                }
            }
            _ = tokio::time::sleep(REFRESH) => true,
            _ = self.s.shutdown.cancelled() => false,
        }
    }

    /// Whether the caller's token still holds (not revoked, not expired);
    /// otherwise queues a last `failure` and ends the stream.
    async fn still_allowed(&mut self) -> bool {
        let now = now_ms();
        let why = match self.s.store.get_token(&self.who.token_id).await {
            Ok(t) if t.revoked_at.is_some() => "was revoked",
            Ok(t) if t.expires_at.is_some_and(|e| e <= now) => "has expired",
            Ok(_) => return true,
            Err(drover_store::StoreError::NotFound(_)) => "no longer exists",
            // The store is unavailable: keep the stream, try again later.
            Err(_) => return false,
        };
        let msg = format!(
            "your token {} ({}) {why}: sign in again",
            self.who.token_id, self.who.name
        );
        if let Ok(ev) = Event::default()
            .event("failure")
            .json_data(serde_json::json!({ "error": msg }))
        {
            self.queue.push_back(ev);
        }
        self.ended = true;
        false
    }

    async fn refresh(&mut self) {
        self.rx.borrow_and_update();
        match parts(&self.s, &self.page, self.can_act).await {
            Ok(parts) => {
                self.failed = None;
                let changed: BTreeMap<String, String> = parts
                    .into_iter()
                    .filter(|p| self.sent.get(&p.id) != Some(&p.html))
                    .map(|p| (p.id, p.html))
                    .collect();
                if !changed.is_empty() {
                    if let Ok(ev) = Event::default().event("parts").json_data(&changed) {
                        self.queue.push_back(ev);
                    }
                    self.sent.extend(changed);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if self.failed.as_ref() != Some(&msg) {
                    if let Ok(ev) = Event::default()
                        .event("failure")
                        .json_data(serde_json::json!({ "error": msg }))
                    {
                        self.queue.push_back(ev);
                    }
                    self.failed = Some(msg);
                }
            }
        }
        if let (Page::Run(id), Some(offset)) = (&self.page, self.log_offset) {
            // New output, in events of at most LOG_CHUNK, at most
            // LOG_PER_REFRESH now (the rest follows at the next refresh).
            let mut at = offset;
            while at < offset + LOG_PER_REFRESH {
                let (bytes, len) =
                    pipeline::read_run_log(&self.s.data_dir, *id, at, LOG_CHUNK).await;
                if bytes.is_empty() {
                    // Nothing new (or the log shrank: go on from its end).
                    at = at.min(len);
                    break;
                }
                at += bytes.len() as u64;
                if let Ok(ev) = Event::default()
                    .event("log")
                    .id(at.to_string())
                    .json_data(serde_json::json!({ "text": String::from_utf8_lossy(&bytes) }))
                {
                    self.queue.push_back(ev);
                }
            }
            self.log_offset = Some(at);
        }
    }
}

#[cfg(test)]
mod tests;
