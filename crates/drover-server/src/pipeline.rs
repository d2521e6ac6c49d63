//! The pipeline: a commit becomes a release, as a recorded *run*.
//!
//! ```text
//! trigger (manual deploy | poll | webhook) ─► run (queued)
//!   ─► checkout: fetch the mirror, `git archive` the commit into a fresh dir, parse drover.toml
//!   ─► build:    [build] command (sh -c, timeout)
//!   ─► test:     [test] command — a failure means no release
//!   ─► pack:     [build] artifact paths → tar.zst, sha256 → release rN
//!   ─► release:  [release] command (migrations), once, under the deploy lock;
//!                a failure marks rN failed and nothing moves
//!   ─► deploy:   per environment in order (one unnamed one without
//!                [environments]): roll rN out there and wait for it,
//!                then its smoke_test (DROVER_URL = an instance of rN);
//!                an environment with promote = "manual" ends the run as
//!                `waiting` until `drover promote APP` resumes it
//! ```
//!
//! Building (checkout to release command) is serialized per app by its
//! deploy lock, with at most [`MAX_CONCURRENT_RUNS`] building at once;
//! starting each rollout takes the lock again, waiting for one does not. An
//! automatic run that a newer one of the same app has overtaken is
//! *superseded* instead of deployed, and an automatic run never replaces a
//! newer release in any environment. A new release entering the first
//! environment supersedes runs waiting to promote an older one.
//!
//! The step commands come from the app's own repository (like any CI job);
//! branch names, commit ids and messages never reach a shell.

use crate::api::ApiErr;
use crate::{artifact, git, now_ms, view, Server};
use drover_api as api;
use drover_core::spec::{parse_spec, AppSpec, Promote};
use drover_core::{Rollout, RolloutState};
use drover_store::{AppRecord, NewRelease, ReleaseRecord, RunRecord};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub const SPEC_FILE: &str = "drover.toml";
/// Name prefix of the step a run waits at for `drover promote`.
const PROMOTE_STEP: &str = "promote ";

/// The environment a waiting run waits to enter.
pub fn waiting_env(steps: &[api::RunStep]) -> Option<&str> {
    steps
        .iter()
        .rev()
        .find(|s| s.state == "waiting")?
        .name
        .strip_prefix(PROMOTE_STEP)
}
pub const MAX_CONCURRENT_RUNS: usize = 2;

/// Registers the app whose `drover.toml` is at the root of `repo`. Returns
/// the record (with its webhook secret, shown to the caller once).
pub async fn add_app(
    server: &Server,
    repo: &str,
    branch: Option<&str>,
) -> Result<AppRecord, ApiErr> {
    let branch = branch.unwrap_or("main");
    git::validate_ref(branch).map_err(|e| ApiErr::BadInput(e.to_string()))?;
    let staging = server
        .data_dir
        .join("repos")
        .join(format!(".new-{}.git", rand::random::<u64>()));
    git::sync_mirror(repo, &staging)
        .await
        .map_err(|e| ApiErr::BadInput(format!("cannot read repository {repo:?}: {e}")))?;
    let result = async {
        let commit = git::resolve(&staging, &format!("refs/heads/{branch}"))
            .await
            .map_err(|_| {
                ApiErr::BadInput(format!(
                    "branch {branch:?} not found in {repo:?}; pass --branch"
                ))
            })?;
        let src = git::show_file(&staging, &commit, SPEC_FILE)
            .await
            .map_err(|e| ApiErr::BadInput(e.to_string()))?;
        let spec = parse_spec(SPEC_FILE, &src).map_err(|e| ApiErr::BadInput(e.to_string()))?;
        Ok::<_, ApiErr>((spec, commit))
    }
    .await;
    let (spec, commit) = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let record = AppRecord {
        name: spec.name.clone(),
        repo: repo.to_string(),
        branch: branch.to_string(),
        spec: serde_json::to_string(&spec).map_err(|e| ApiErr::Internal(e.to_string()))?,
        created_at: now_ms(),
        // Registering does not deploy; commits after this one do.
        polled_commit: Some(commit),
        webhook_secret: Some(hex_secret()),
    };
    if let Err(e) = server.store.insert_app(&record).await {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    let dest = git::mirror_path(&server.data_dir, &spec.name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&staging, &dest)
        .map_err(|e| ApiErr::Internal(format!("cannot store the mirror: {e}")))?;
    server
        .store
        .add_event(
            Some(&spec.name),
            "app.added",
            &format!("app {} added from {repo} ({branch})", spec.name),
            now_ms(),
        )
        .await?;
    Ok(record)
}

fn hex_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// What a finished run produced.
pub struct RunOutcome {
    pub run: RunRecord,
    pub release: ReleaseRecord,
    /// The rollout started last (None: the run ended before one started).
    pub rollout: Option<Rollout>,
}

/// Records a run of `commit` and starts it in the background. Conflict when
/// the webhook delivery was seen before or an automatic run of that commit
/// exists.
pub async fn start_run(
    server: &Arc<Server>,
    app: &AppRecord,
    commit: &str,
    git_ref: &str,
    trigger: &str,
    delivery: Option<String>,
) -> Result<(RunRecord, oneshot::Receiver<Result<RunOutcome, ApiErr>>), ApiErr> {
    let now = now_ms();
    let run = server
        .store
        .create_run(&RunRecord {
            id: 0,
            app: app.name.clone(),
            commit: commit.to_string(),
            git_ref: git_ref.to_string(),
            trigger: trigger.to_string(),
            delivery,
            state: "queued".into(),
            steps: "[]".into(),
            release: None,
            rollout_id: None,
            error: None,
            created_at: now,
            updated_at: now,
        })
        .await?;
    server
        .store
        .add_event(
            Some(&app.name),
            "run.queued",
            &format!(
                "run {} of {} ({trigger})",
                run.id,
                &commit[..12.min(commit.len())]
            ),
            now,
        )
        .await?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(execute(server.clone(), app.clone(), run.clone(), tx));
    Ok((run, rx))
}

pub fn run_log_path(data_dir: &Path, run_id: i64) -> PathBuf {
    data_dir.join("logs").join(format!("run-{run_id}.log"))
}

/// Up to `max` bytes of a run's log from byte `from`, cut before a UTF-8
/// character that is not complete yet; and the log's length (0 before the
/// log exists).
/// The length of a run's log (0 before it exists).
pub async fn run_log_len(data_dir: &Path, id: i64) -> u64 {
    tokio::fs::metadata(run_log_path(data_dir, id))
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

pub async fn read_run_log(data_dir: &Path, id: i64, from: u64, max: u64) -> (Vec<u8>, u64) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(run_log_path(data_dir, id)).await else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if from < len && f.seek(std::io::SeekFrom::Start(from)).await.is_ok() {
        let _ = f.take(max).read_to_end(&mut buf).await;
    }
    if let Err(e) = std::str::from_utf8(&buf) {
        if e.error_len().is_none() {
            buf.truncate(e.valid_up_to());
        }
    }
    (buf, len)
}

/// A run in progress: its record, steps and log.
struct Running {
    server: Arc<Server>,
    run: RunRecord,
    steps: Vec<api::RunStep>,
    log: PathBuf,
    /// Answered once: when the first rollout started, or when the run ended
    /// before one did.
    started: Option<oneshot::Sender<Result<RunOutcome, ApiErr>>>,
    /// `drover cancel`: kills the running step, stops the run.
    cancel: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut m) = self.server.run_cancels.lock() {
            m.remove(&self.run.id);
        }
    }
}

impl Running {
    fn new(
        server: Arc<Server>,
        run: RunRecord,
        steps: Vec<api::RunStep>,
        started: Option<oneshot::Sender<Result<RunOutcome, ApiErr>>>,
    ) -> Self {
        let log = run_log_path(&server.data_dir, run.id);
        let cancel = server.shutdown.child_token();
        if let Ok(mut m) = server.run_cancels.lock() {
            m.insert(run.id, cancel.clone());
        }
        Running {
            server,
            run,
            steps,
            log,
            started,
            cancel,
        }
    }

    /// Runs a pipeline command as a step of this run (killed on cancel).
    async fn command(
        &self,
        step: &str,
        command: &str,
        dir: &Path,
        timeout_ms: u64,
        env: &[(String, String)],
    ) -> Result<(), ApiErr> {
        run_step(step, command, dir, timeout_ms, env, &self.log, &self.cancel).await
    }

    /// Waits for `fut` unless the run is cancelled first.
    async fn unless_cancelled<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, ApiErr> {
        tokio::select! {
            v = fut => Ok(v),
            _ = self.cancel.cancelled() => Err(cancelled()),
        }
    }

    fn answer(&mut self, res: Result<RunOutcome, ApiErr>) {
        if let Some(tx) = self.started.take() {
            let _ = tx.send(res);
        }
    }

    fn outcome(&self, release: &ReleaseRecord, rollout: Option<Rollout>) -> RunOutcome {
        RunOutcome {
            run: self.run.clone(),
            release: release.clone(),
            rollout,
        }
    }

    /// Marks the run superseded; returns the error to end it with.
    async fn supersede(&mut self, reason: String) -> ApiErr {
        self.finish("superseded", Some(reason.clone())).await;
        ApiErr::Conflict(reason)
    }

    /// Records the end of the run (a failure unless it was already settled)
    /// and answers whoever waits for its start.
    async fn conclude(&mut self, result: Result<RunOutcome, ApiErr>) {
        if let Err(e) = &result {
            if self.cancel.is_cancelled() && !self.server.shutdown.is_cancelled() {
                for s in self.steps.iter_mut().filter(|s| s.state == "running") {
                    s.state = "cancelled".into();
                    s.duration_ms = Some(now_ms().saturating_sub(s.started_at_ms));
                }
                self.finish("cancelled", Some(e.to_string())).await;
            } else if !matches!(self.run.state.as_str(), "superseded" | "failed") {
                self.finish("failed", Some(e.to_string())).await;
            }
        }
        self.answer(result);
    }

    /// A step that waits for someone (promotion).
    async fn wait_step(&mut self, name: &str) {
        self.steps.push(api::RunStep {
            name: name.into(),
            state: "waiting".into(),
            started_at_ms: now_ms(),
            duration_ms: None,
            log_tail: None,
        });
        self.save().await;
    }

    async fn save(&mut self) {
        self.run.steps = serde_json::to_string(&self.steps).unwrap_or_else(|_| "[]".into());
        self.run.updated_at = now_ms();
        if let Err(e) = self.server.store.update_run(&self.run).await {
            tracing::warn!(run = self.run.id, error = %e, "cannot save run progress");
        }
    }

    async fn begin(&mut self, name: &str) {
        self.steps.push(api::RunStep {
            name: name.into(),
            state: "running".into(),
            started_at_ms: now_ms(),
            duration_ms: None,
            log_tail: None,
        });
        self.save().await;
    }

    async fn end(&mut self, ok: bool) {
        let tail = (!ok).then(|| tail(&self.log));
        if let Some(s) = self.steps.last_mut() {
            s.state = if ok {
                "succeeded"
            } else if self.cancel.is_cancelled() {
                "cancelled"
            } else {
                "failed"
            }
            .into();
            s.duration_ms = Some(now_ms().saturating_sub(s.started_at_ms));
            s.log_tail = tail;
        }
        self.save().await;
    }

    async fn finish(&mut self, state: &str, error: Option<String>) {
        self.run.state = state.into();
        self.run.error = error.clone();
        self.save().await;
        self.server.observed.run(
            &self.run.app,
            state,
            now_ms().saturating_sub(self.run.created_at),
        );
        let msg = match &error {
            Some(e) => format!("run {} {state}: {e}", self.run.id),
            None => format!("run {} {state}", self.run.id),
        };
        let _ = self
            .server
            .store
            .add_event(Some(&self.run.app), &format!("run.{state}"), &msg, now_ms())
            .await;
    }

    async fn log_line(&self, line: &str) {
        if let Ok(mut f) = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .await
        {
            let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

/// A fresh working directory for a run (removed when the run ends).
fn work_dir(server: &Server, run_id: i64) -> PathBuf {
    server.data_dir.join("work").join(format!("run-{run_id}"))
}

async fn execute(
    server: Arc<Server>,
    app: AppRecord,
    run: RunRecord,
    started: oneshot::Sender<Result<RunOutcome, ApiErr>>,
) {
    let mut r = Running::new(server.clone(), run, Vec::new(), Some(started));
    let work = work_dir(&server, r.run.id);
    let result = async {
        let (spec, release) = {
            let _slot = r
                .unless_cancelled(server.run_slots.acquire())
                .await?
                .map_err(|_| ApiErr::Unavailable("shutting down".into()))?;
            let lock = server.deploy_lock(&app.name).await;
            let _held = r.unless_cancelled(lock.lock()).await?;
            if let Some(reason) = superseded(&server, &app, &r.run).await {
                return Err(r.supersede(reason).await);
            }
            r.run.state = "running".into();
            r.save().await;
            build_release(&mut r, &app, &work).await?
        };
        // Waiting for rollouts and smoke tests holds neither a run slot nor
        // the deploy lock: a newer commit may build meanwhile.
        deliver(&mut r, &app, &spec, &release, &work, 0).await
    }
    .await;
    let w = work.clone();
    let _ = tokio::task::spawn_blocking(move || remove_tree(&w)).await;
    r.conclude(result).await;
}

/// Removes a checkout (made writable first: artifacts may be read-only).
fn remove_tree(p: &Path) {
    if std::fs::remove_dir_all(p).is_err() {
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+w", "--"])
            .arg(p)
            .status();
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Why an automatic run should not go on: a newer automatic run of the app
/// exists, or its commit is older than the live release's.
async fn superseded(server: &Server, app: &AppRecord, run: &RunRecord) -> Option<String> {
    if run.trigger == "manual" {
        return None;
    }
    let runs = server.store.list_runs(&app.name, 50).await.ok()?;
    if let Some(newer) = runs.iter().find(|o| {
        o.id > run.id && o.trigger != "manual" && !matches!(o.state.as_str(), "superseded")
    }) {
        return Some(format!(
            "superseded by run {} (commit {})",
            newer.id,
            &newer.commit[..12.min(newer.commit.len())]
        ));
    }
    let live = first_env_live_commit(server, app).await?;
    let mirror = git::mirror_path(&server.data_dir, &app.name);
    if live != run.commit
        && git::is_ancestor(&mirror, &run.commit, &live)
            .await
            .unwrap_or(false)
    {
        return Some(format!(
            "commit {} is older than the live release's commit {}",
            &run.commit[..12],
            &live[..12]
        ));
    }
    None
}

/// The commit live in the app's first environment (where new releases enter).
async fn first_env_live_commit(server: &Server, app: &AppRecord) -> Option<String> {
    let spec = view::current_spec(server, &app.name).await.ok()?;
    let env = spec.env_names().into_iter().next()?;
    let d = server.store.get_deployment(&app.name, &env).await.ok()??;
    let n = view::parse_release_name(d.live_release.as_deref()?)?;
    Some(server.store.get_release(&app.name, n).await.ok()?.commit)
}

/// checkout → build → test → pack → release command: the commit becomes a
/// release, or the run fails with no release (or a release marked failed).
async fn build_release(
    r: &mut Running,
    app: &AppRecord,
    work: &Path,
) -> Result<(AppSpec, ReleaseRecord), ApiErr> {
    let server = r.server.clone();
    let commit = r.run.commit.clone();
    let short = commit[..12.min(commit.len())].to_string();
    let mirror = git::mirror_path(&server.data_dir, &app.name);
    let env: Vec<(String, String)> = vec![
        ("DROVER_APP".into(), app.name.clone()),
        ("DROVER_COMMIT".into(), commit.clone()),
    ];

    r.begin("checkout").await;
    r.log_line(&format!("==> checkout {short} of {}", app.repo))
        .await;
    let spec: AppSpec = match checkout(app, &mirror, &commit, work).await {
        Ok(s) => {
            r.end(true).await;
            s
        }
        Err(e) => {
            r.log_line(&e.to_string()).await;
            r.end(false).await;
            return Err(e);
        }
    };
    if let Some(cmd) = &spec.build.command {
        r.begin("build").await;
        let res = r
            .command("build", cmd, work, spec.build.timeout_ms, &env)
            .await;
        r.end(res.is_ok()).await;
        res?;
    }
    if let Some(t) = &spec.test {
        r.begin("test").await;
        let res = r
            .command("test", &t.command, work, t.timeout_ms, &env)
            .await;
        r.end(res.is_ok()).await;
        res.map_err(|e| ApiErr::Failed(format!("tests failed, no release: {e}")))?;
    }
    if let Some(reason) = superseded(&server, app, &r.run).await {
        return Err(r.supersede(reason).await);
    }

    let has_dockerfile = work.join(&spec.build.dockerfile).is_file();
    let makes_image = spec.build.makes_image(has_dockerfile);
    let kind_problem = if makes_image && !has_dockerfile {
        Some(format!(
            "drover.toml: [build] image = true, but commit {short} has no {}; add it or set [build] dockerfile",
            spec.build.dockerfile
        ))
    } else if !makes_image && spec.run.command.is_empty() {
        Some(format!(
            "drover.toml: [run] command is missing, and commit {short} has no {} to build a container image from; add the command that starts the app, or a Dockerfile",
            spec.build.dockerfile
        ))
    } else {
        None
    };
    if let Some(p) = kind_problem {
        r.begin("pack").await;
        r.log_line(&p).await;
        r.end(false).await;
        return Err(ApiErr::Failed(p));
    }

    let (packed, image, image_ref) = if makes_image {
        r.begin("image").await;
        match build_image(r, app, &spec, work).await {
            Ok((packed, id, image_ref)) => (packed, Some(id), image_ref),
            Err(e) => {
                r.log_line(&e).await;
                r.end(false).await;
                return Err(ApiErr::Failed(e));
            }
        }
    } else {
        r.begin("pack").await;
        let artifacts = server.data_dir.join("artifacts");
        let paths = spec.build.artifact.clone();
        let w = work.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || artifact::pack(&w, &paths, &artifacts))
            .await
            .map_err(|e| ApiErr::Internal(e.to_string()))?;
        match packed {
            Ok(p) => (p, None, None),
            Err(e) => {
                r.log_line(&e).await;
                r.end(false).await;
                return Err(ApiErr::Failed(e));
            }
        }
    };
    let spec_json = serde_json::to_string(&spec).map_err(|e| ApiErr::Internal(e.to_string()))?;
    let release = server
        .store
        .create_release(
            NewRelease {
                app: &app.name,
                commit: &commit,
                sha256: &packed.sha256,
                size: packed.size,
                image: image.as_deref(),
                image_ref: image_ref.as_deref(),
                spec: &spec_json,
            },
            now_ms(),
        )
        .await?;
    if let Some(id) = &image {
        // Tagged by release too, for `docker images` on the server (and
        // in the registry: pulls go by digest, people by name).
        let tagged = async {
            let d = drover_docker::connect().await?;
            drover_docker::tag_image(&d, id, &image_repo(&app.name), &release.name()).await?;
            if let Some(reg) = &spec.registry {
                let login = registry_login(&server, &app.name, &spec).await?;
                drover_docker::push_image(
                    &d,
                    id,
                    &reg.image_repo(),
                    &release.name(),
                    login.as_ref(),
                    &mut |_| {},
                )
                .await?;
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(e) = tagged {
            r.log_line(&format!("warning: {e}")).await;
        }
        match &image_ref {
            Some(reference) => {
                r.log_line(&format!(
                    "==> {} is image {id}, pushed as {reference}",
                    release.name()
                ))
                .await
            }
            None => {
                r.log_line(&format!(
                    "==> {} is image {id} (archive sha256 {}, {} bytes)",
                    release.name(),
                    packed.sha256,
                    packed.size
                ))
                .await
            }
        }
    } else {
        r.log_line(&format!(
            "==> packed {} (sha256 {}, {} bytes)",
            release.name(),
            packed.sha256,
            packed.size
        ))
        .await;
    }
    r.run.release = Some(release.name());
    r.end(true).await;
    server
        .store
        .add_event(
            Some(&app.name),
            "release.created",
            &format!(
                "{} built from {short} (artifact sha256 {}, {} bytes)",
                release.name(),
                &packed.sha256[..12],
                packed.size
            ),
            now_ms(),
        )
        .await?;

    if let Some(rel_cmd) = &spec.release {
        r.begin("release").await;
        let mut env = env.clone();
        env.push(("DROVER_RELEASE".into(), release.name()));
        let res = r
            .command("release", &rel_cmd.command, work, rel_cmd.timeout_ms, &env)
            .await;
        r.end(res.is_ok()).await;
        if let Err(e) = res {
            server
                .store
                .set_release_status(&app.name, release.number, "failed")
                .await?;
            return Err(ApiErr::Failed(format!(
                "the [release] command of {} failed; {} is marked failed and nothing moved: {e}",
                release.name(),
                release.name()
            )));
        }
    }
    Ok((spec, release))
}

/// The image repository of an app's releases on the server's engine:
/// `drover/<app>`, tagged by commit when built and by release once made.
pub(crate) fn image_repo(app: &str) -> String {
    format!("drover/{app}")
}

/// The registry login of `spec`'s `[registry]`, its password the app's
/// secret in the first environment (where releases enter).
async fn registry_login(
    server: &Server,
    app: &str,
    spec: &AppSpec,
) -> Result<Option<drover_docker::Login>, String> {
    let Some(reg) = &spec.registry else {
        return Ok(None);
    };
    let (Some(user), Some(secret)) = (&reg.username, &reg.password_secret) else {
        return Ok(None);
    };
    let env = spec.env_names().into_iter().next().unwrap_or_default();
    let rec = server
        .store
        .list_secrets(app)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| s.env == env && &s.name == secret)
        .ok_or_else(|| {
            format!(
                "[registry] password_secret {secret} is not set for {app}{}; set it with `drover secrets set {app} {secret}`{}",
                view::in_env(&env),
                if env.is_empty() { String::new() } else { format!(" --env {env}") }
            )
        })?;
    let password = server.secrets.open(app, &env, secret, &rec.ciphertext)?;
    Ok(Some(drover_docker::Login {
        username: user.clone(),
        password,
    }))
}

/// `docker build` of the checkout through the Engine API (output into the
/// run log), then `docker save` of the image into the artifact store — or,
/// with a `[registry]`, `docker push` there. Returns the artifact (for a
/// pushed image: its manifest digest, no archive), the image id and the
/// pushed reference.
async fn build_image(
    r: &Running,
    app: &AppRecord,
    spec: &AppSpec,
    work: &Path,
) -> Result<(artifact::Packed, String, Option<String>), String> {
    let commit = &r.run.commit;
    let docker = drover_docker::connect().await.map_err(|e| {
        format!(
            "the commit builds a container image from {}, but {e} (or set [build] image = false)",
            spec.build.dockerfile
        )
    })?;
    let tag = format!(
        "{}:{}",
        image_repo(&app.name),
        &commit[..12.min(commit.len())]
    );
    r.log_line(&format!(
        "==> docker build -f {} -t {tag}",
        spec.build.dockerfile
    ))
    .await;
    let labels = std::collections::HashMap::from([
        (drover_docker::LABEL_APP.to_string(), app.name.clone()),
        (drover_docker::LABEL_COMMIT.to_string(), commit.clone()),
    ]);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&r.log)
        .ok();
    let mut write = |line: &str| {
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
    };
    let build = drover_docker::build_image(
        &docker,
        work,
        &spec.build.dockerfile,
        &tag,
        &labels,
        &mut write,
    );
    let id = tokio::select! {
        res = tokio::time::timeout(Duration::from_millis(spec.build.timeout_ms), build) => match res {
            Ok(res) => res?,
            Err(_) => return Err(format!("docker build timed out after {}", drover_core::duration::format_ms(spec.build.timeout_ms))),
        },
        _ = r.cancel.cancelled() => return Err("cancelled".to_string()),
    };
    if let Some(reg) = &spec.registry {
        let repo = reg.image_repo();
        let tag = &commit[..12.min(commit.len())];
        r.log_line(&format!("==> built image {id}; docker push {repo}:{tag}"))
            .await;
        let login = registry_login(&r.server, &app.name, spec).await?;
        let reference =
            drover_docker::push_image(&docker, &id, &repo, tag, login.as_ref(), &mut write).await?;
        let digest = reference
            .rsplit_once("@sha256:")
            .map(|(_, d)| d.to_string())
            .unwrap_or_default();
        let packed = artifact::Packed {
            sha256: digest,
            size: 0,
            path: PathBuf::new(),
        };
        return Ok((packed, id, Some(reference)));
    }
    r.log_line(&format!("==> built image {id}; saving it"))
        .await;
    let saved =
        drover_docker::save_image(&docker, &id, &r.server.data_dir.join("artifacts")).await?;
    let packed = artifact::Packed {
        sha256: saved.sha256,
        size: saved.size,
        path: saved.path,
    };
    Ok((packed, id, None))
}

/// Moves `release` through the app's environments, from the one at index
/// `from` on: per environment one rollout, awaited, then its smoke test. An
/// environment with `promote = "manual"` (other than `from`, which is being
/// promoted into) ends the run as `waiting` until `drover promote`.
async fn deliver(
    r: &mut Running,
    app: &AppRecord,
    spec: &AppSpec,
    release: &ReleaseRecord,
    work: &Path,
    from: usize,
) -> Result<RunOutcome, ApiErr> {
    let server = r.server.clone();
    let envs = spec.env_names();
    let short = release.commit[..12.min(release.commit.len())].to_string();
    let mut last: Option<Rollout> = None;
    for (i, env) in envs.iter().enumerate().skip(from) {
        let env_spec = spec.environment(env);
        if i > from && env_spec.is_some_and(|e| e.promote == Promote::Manual) {
            r.wait_step(&format!("{PROMOTE_STEP}{env}")).await;
            r.log_line(&format!(
                "==> {} passed {}; {env} takes it after `drover promote {}`",
                release.name(),
                envs[i - 1],
                app.name
            ))
            .await;
            r.finish("waiting", None).await;
            return Ok(r.outcome(release, last));
        }
        r.begin(&if env.is_empty() {
            "deploy".to_string()
        } else {
            format!("deploy {env}")
        })
        .await;
        let rollout = {
            let lock = server.deploy_lock(&app.name).await;
            let _held = r.unless_cancelled(lock.lock()).await?;
            if let Some(reason) = outdated(&server, &app.name, env, release, &r.run).await {
                r.end(false).await;
                return Err(r.supersede(reason).await);
            }
            let reason = format!("run {} of {short}", r.run.id);
            match server
                .engine
                .start_rollout(
                    &app.name,
                    env,
                    &release.name(),
                    crate::engine::Start::Run(reason),
                )
                .await
            {
                Ok(ro) => ro,
                Err(e) => {
                    r.end(false).await;
                    return Err(e);
                }
            }
        };
        if i == 0 {
            supersede_waiting(&server, &app.name, r.run.id, env, release).await;
        }
        r.run.rollout_id = Some(rollout.id);
        r.log_line(&format!(
            "==> rollout {} of {}{} started",
            rollout.id,
            release.name(),
            view::in_env(env)
        ))
        .await;
        let started = r.outcome(release, Some(rollout.clone()));
        r.answer(Ok(started));
        let waited = r
            .unless_cancelled(wait_rollout(&server, &app.name, env, rollout.id))
            .await;
        let done = match waited {
            Ok(Ok(done)) => done,
            // A newer rollout there took over.
            Ok(Err(ApiErr::Conflict(reason))) => {
                r.end(false).await;
                return Err(r.supersede(reason).await);
            }
            // Cancelled, or the store failed.
            Err(e) | Ok(Err(e)) => {
                r.end(false).await;
                return Err(e);
            }
        };
        if done.state != RolloutState::Succeeded {
            r.log_line(&format!("==> rollout {}: {}", done.id, done.message))
                .await;
            r.end(false).await;
            return Err(ApiErr::Failed(format!(
                "the rollout of {}{} ended {}: {}",
                release.name(),
                view::in_env(env),
                done.state,
                done.message
            )));
        }
        r.end(true).await;
        if let Some(smoke) = env_spec.and_then(|e| e.smoke_test.as_ref()) {
            r.begin(&format!("smoke {env}")).await;
            let host = spec.for_env(env).map(|s| s.route.host).unwrap_or_default();
            let url = instance_url(&server, &app.name, env, &release.name()).await;
            let vars: Vec<(String, String)> = vec![
                ("DROVER_APP".into(), app.name.clone()),
                ("DROVER_COMMIT".into(), release.commit.clone()),
                ("DROVER_RELEASE".into(), release.name()),
                ("DROVER_ENV".into(), env.clone()),
                ("DROVER_HOST".into(), host),
                ("DROVER_URL".into(), url.unwrap_or_default()),
            ];
            let step = format!("smoke test in {env}");
            let res = r
                .command(&step, &smoke.command, work, smoke.timeout_ms, &vars)
                .await;
            r.end(res.is_ok()).await;
            if let Err(e) = res {
                let rest = match envs.get(i + 1) {
                    Some(next) => format!("; it goes no further and {next} is unchanged"),
                    None => String::new(),
                };
                return Err(ApiErr::Failed(format!(
                    "{} failed the smoke test in {env}{rest}: {e}",
                    release.name()
                )));
            }
        }
        last = Some(done);
    }
    r.finish("succeeded", None).await;
    Ok(r.outcome(release, last))
}

/// Why a run should not start its rollout in `env` now: for an automatic
/// run, a newer release already runs (or is rolling out) there.
async fn outdated(
    server: &Server,
    app: &str,
    env: &str,
    release: &ReleaseRecord,
    run: &RunRecord,
) -> Option<String> {
    if run.trigger == "manual" {
        return None;
    }
    let rolling = server
        .store
        .latest_rollout(app, env)
        .await
        .ok()
        .flatten()
        .filter(|r| !r.state.is_final())
        .map(|r| r.to);
    let live = server
        .store
        .get_deployment(app, env)
        .await
        .ok()
        .flatten()
        .and_then(|d| d.live_release);
    let newest = [rolling, live]
        .into_iter()
        .flatten()
        .filter_map(|n| view::parse_release_name(&n))
        .max()?;
    (newest > release.number).then(|| {
        format!(
            "{} already has the newer r{newest}; {} does not replace it",
            if env.is_empty() { app } else { env },
            release.name()
        )
    })
}

/// Waits until rollout `id` of (app, env) is final. Conflict when a newer
/// rollout superseded it.
async fn wait_rollout(server: &Server, app: &str, env: &str, id: i64) -> Result<Rollout, ApiErr> {
    loop {
        match server.store.latest_rollout(app, env).await? {
            Some(ro) if ro.id == id && ro.state.is_final() => return Ok(ro),
            Some(ro) if ro.id != id => {
                return Err(ApiErr::Conflict(format!(
                    "superseded by rollout {} to {}{}",
                    ro.id,
                    ro.to,
                    view::in_env(env)
                )))
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = server.shutdown.cancelled() => {
                return Err(ApiErr::Unavailable("the server is shutting down".into()));
            }
        }
    }
}

/// A new release entered the first environment: runs waiting to promote an
/// older one are superseded by it.
async fn supersede_waiting(
    server: &Server,
    app: &str,
    run_id: i64,
    env: &str,
    release: &ReleaseRecord,
) {
    let Ok(runs) = server.store.list_runs(app, 50).await else {
        return;
    };
    for mut w in runs
        .into_iter()
        .filter(|o| o.state == "waiting" && o.id != run_id)
    {
        w.state = "superseded".into();
        w.error = Some(format!(
            "superseded by run {run_id}: {env} now gets {}",
            release.name()
        ));
        w.updated_at = now_ms();
        if server.store.update_run(&w).await.is_ok() {
            let msg = format!(
                "run {} superseded: {}",
                w.id,
                w.error.as_deref().unwrap_or("")
            );
            let _ = server
                .store
                .add_event(Some(app), "run.superseded", &msg, now_ms())
                .await;
        }
    }
}

/// `http://addr` of an instance of `release` serving in (app, env).
async fn instance_url(server: &Server, app: &str, env: &str, release: &str) -> Option<String> {
    let ready = view::nodes_ready(&server.store.list_nodes().await.ok()?, now_ms());
    server
        .store
        .list_instances(app)
        .await
        .ok()?
        .iter()
        .filter(|i| i.env == env && i.release == release)
        .find_map(|i| view::serves(i, ready.get(&i.node).copied().unwrap_or(false)))
        .map(|addr| format!("http://{addr}"))
}

/// `drover promote APP`: the run waiting at a `promote = "manual"`
/// environment goes on into it. Answers once it is under way.
/// Answers the resumed run and the environment it goes into.
pub async fn promote(server: &Arc<Server>, app: &str) -> Result<(api::RunInfo, String), ApiErr> {
    let app_rec = server.store.get_app(app).await?;
    let lock = server.deploy_lock(app).await;
    let held = lock.lock().await;
    let Some(mut run) = server
        .store
        .list_runs(app, 50)
        .await?
        .into_iter()
        .find(|r| r.state == "waiting")
    else {
        return Err(ApiErr::Conflict(format!(
            "nothing of {app} waits for promotion: a release waits once it passed the environment before one with promote = \"manual\" (see `drover runs {app}`)"
        )));
    };
    let mut steps: Vec<api::RunStep> = serde_json::from_str(&run.steps).unwrap_or_default();
    let env = waiting_env(&steps)
        .map(str::to_string)
        .ok_or_else(|| ApiErr::Internal(format!("run {} waits at no promote step", run.id)))?;
    let rel_name = run.release.clone().unwrap_or_default();
    let n = view::parse_release_name(&rel_name)
        .ok_or_else(|| ApiErr::Internal(format!("run {} has no release", run.id)))?;
    let release = server.store.get_release(app, n).await?;
    let spec = view::release_spec(&release).map_err(ApiErr::Internal)?;
    let names = spec.env_names();
    let from = names
        .iter()
        .position(|e| *e == env)
        .filter(|i| *i > 0)
        .ok_or_else(|| {
            ApiErr::Internal(format!(
                "{rel_name} has no environment {env:?} to promote to"
            ))
        })?;
    let before = &names[from - 1];
    let live = server
        .store
        .get_deployment(app, before)
        .await?
        .and_then(|d| d.live_release);
    if live.as_deref() != Some(rel_name.as_str()) {
        return Err(ApiErr::Conflict(format!(
            "{rel_name} is no longer live in {before} (it runs {}); nothing to promote",
            live.as_deref().unwrap_or("nothing")
        )));
    }
    if let Some(s) = steps.iter_mut().rev().find(|s| s.state == "waiting") {
        s.state = "succeeded".into();
        s.duration_ms = Some(now_ms().saturating_sub(s.started_at_ms));
    }
    run.state = "running".into();
    run.steps = serde_json::to_string(&steps).unwrap_or_else(|_| "[]".into());
    run.updated_at = now_ms();
    server.store.update_run(&run).await?;
    server
        .store
        .add_event(
            Some(app),
            "run.promoted",
            &format!(
                "{rel_name} promoted from {before} to {env} (run {})",
                run.id
            ),
            now_ms(),
        )
        .await?;
    drop(held);
    let info = run_info(&run);
    tokio::spawn(resume(
        server.clone(),
        app_rec,
        run,
        steps,
        spec,
        release,
        from,
    ));
    Ok((info, env))
}

/// Goes on with a promoted run from environment index `from`.
async fn resume(
    server: Arc<Server>,
    app: AppRecord,
    run: RunRecord,
    steps: Vec<api::RunStep>,
    spec: AppSpec,
    release: ReleaseRecord,
    from: usize,
) {
    let mut r = Running::new(server.clone(), run, steps, None);
    let work = work_dir(&server, r.run.id);
    let result = async {
        // Smoke tests run in the release's checkout.
        if spec.environments[from..]
            .iter()
            .any(|e| e.smoke_test.is_some())
        {
            r.begin("checkout").await;
            let mirror = git::mirror_path(&server.data_dir, &app.name);
            let res = checkout(&app, &mirror, &release.commit, &work).await;
            r.end(res.is_ok()).await;
            res?;
        }
        deliver(&mut r, &app, &spec, &release, &work, from).await
    }
    .await;
    let w = work.clone();
    let _ = tokio::task::spawn_blocking(move || remove_tree(&w)).await;
    r.conclude(result).await;
}

async fn checkout(
    app: &AppRecord,
    mirror: &Path,
    commit: &str,
    work: &Path,
) -> Result<AppSpec, ApiErr> {
    // The trigger (deploy, poll) usually fetched already; a webhook may
    // name a commit the mirror has not seen yet.
    if !git::has_commit(mirror, commit).await {
        git::sync_mirror(&app.repo, mirror)
            .await
            .map_err(|e| ApiErr::Failed(format!("cannot fetch {}: {e}", app.repo)))?;
    }
    std::fs::create_dir_all(work)
        .map_err(|e| ApiErr::Internal(format!("cannot create {}: {e}", work.display())))?;
    git::checkout(mirror, commit, work)
        .await
        .map_err(|e| ApiErr::Failed(e.to_string()))?;
    let src = std::fs::read_to_string(work.join(SPEC_FILE)).map_err(|_| {
        ApiErr::BadInput(format!(
            "{SPEC_FILE} not found at the root of commit {}",
            &commit[..12]
        ))
    })?;
    let spec = parse_spec(SPEC_FILE, &src)
        .map_err(|e| ApiErr::BadInput(format!("commit {}: {e}", &commit[..12])))?;
    if spec.name != app.name {
        return Err(ApiErr::BadInput(format!(
            "{SPEC_FILE} of commit {} names app {:?}, but this is app {:?}",
            &commit[..12],
            spec.name,
            app.name
        )));
    }
    Ok(spec)
}

/// Runs one pipeline command with `sh -c` in `dir`, output appended to `log`.
async fn run_step(
    step: &str,
    command: &str,
    dir: &Path,
    timeout_ms: u64,
    env: &[(String, String)],
    log: &Path,
    cancel: &CancellationToken,
) -> Result<(), ApiErr> {
    let mut logf = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .map_err(|e| ApiErr::Internal(format!("cannot open {}: {e}", log.display())))?;
    let _ = logf
        .write_all(format!("==> {step}: {command}\n").as_bytes())
        .await;
    let out = logf.into_std().await;
    let err = out
        .try_clone()
        .map_err(|e| ApiErr::Internal(e.to_string()))?;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ApiErr::Internal(format!("cannot start sh: {e}")))?;
    let pid = child.id();
    // The whole process group: the command's children go too.
    let kill_group = || {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    let status = tokio::select! {
        s = tokio::time::timeout(Duration::from_millis(timeout_ms), child.wait()) => match s {
            Ok(s) => s.map_err(|e| ApiErr::Internal(e.to_string()))?,
            Err(_) => {
                kill_group();
                return Err(ApiErr::Failed(format!(
                    "{step} timed out after {}",
                    drover_core::duration::format_ms(timeout_ms)
                )));
            }
        },
        _ = cancel.cancelled() => {
            kill_group();
            let _ = child.wait().await;
            return Err(cancelled());
        }
    };
    if !status.success() {
        return Err(ApiErr::Failed(format!(
            "{step} failed ({status}); last lines of its output:\n{}",
            tail(log)
        )));
    }
    Ok(())
}

fn cancelled() -> ApiErr {
    ApiErr::Conflict("cancelled by `drover cancel`".into())
}

/// `drover cancel RUN`: a queued or running run stops (its running command is
/// killed; a rollout it already started goes on — roll it back if need be);
/// a waiting run will not be promoted.
pub async fn cancel(server: &Server, id: i64) -> Result<api::RunInfo, ApiErr> {
    let mut run = server.store.get_run(id).await?;
    let token = server
        .run_cancels
        .lock()
        .ok()
        .and_then(|m| m.get(&id).cloned());
    match (run.state.as_str(), token) {
        ("queued" | "running", Some(t)) => {
            t.cancel();
            // The run task records the end; wait briefly for it.
            for _ in 0..100 {
                run = server.store.get_run(id).await?;
                if !matches!(run.state.as_str(), "queued" | "running") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ("waiting", _) => {
            let lock = server.deploy_lock(&run.app).await;
            let _held = lock.lock().await;
            run = server.store.get_run(id).await?;
            if run.state != "waiting" {
                return Err(ApiErr::Conflict(format!(
                    "run {id} is {} now; nothing to cancel",
                    run.state
                )));
            }
            run.state = "cancelled".into();
            run.error = Some("cancelled while waiting for promotion".into());
            run.updated_at = now_ms();
            server.store.update_run(&run).await?;
        }
        (state, _) => {
            return Err(ApiErr::Conflict(format!(
                "run {id} is {state}; only a queued, running or waiting run can be cancelled"
            )))
        }
    }
    server
        .store
        .add_event(
            Some(&run.app),
            "run.cancelled",
            &format!("run {id} cancelled"),
            now_ms(),
        )
        .await?;
    Ok(run_info(&run))
}

fn tail(path: &Path) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    let s = String::from_utf8_lossy(&s);
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(20);
    lines[start..]
        .iter()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run_info(r: &RunRecord) -> api::RunInfo {
    api::RunInfo {
        id: r.id,
        app: r.app.clone(),
        commit: r.commit.clone(),
        git_ref: r.git_ref.clone(),
        trigger: r.trigger.clone(),
        state: r.state.clone(),
        steps: serde_json::from_str(&r.steps).unwrap_or_default(),
        release: r.release.clone(),
        rollout_id: r.rollout_id,
        error: r.error.clone(),
        created_at_ms: r.created_at,
        updated_at_ms: r.updated_at,
    }
}
