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
//!   ─► deploy:   start the rollout to rN
//! ```
//!
//! Runs of one app are serialized by its deploy lock; at most
//! [`MAX_CONCURRENT_RUNS`] run at once. An automatic run that a newer one of
//! the same app has overtaken is *superseded* instead of deployed, and an
//! automatic run never deploys a commit older than the live release's.
//!
//! The step commands come from the app's own repository (like any CI job);
//! branch names, commit ids and messages never reach a shell.

use crate::api::ApiErr;
use crate::{artifact, git, now_ms, view, Server};
use drover_api as api;
use drover_core::spec::{parse_spec, AppSpec};
use drover_core::Rollout;
use drover_store::{AppRecord, ReleaseRecord, RunRecord};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub const SPEC_FILE: &str = "drover.toml";
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
        live_release: None,
        prev_release: None,
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
    pub rollout: Rollout,
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
) -> Result<
    (
        RunRecord,
        tokio::task::JoinHandle<Result<RunOutcome, ApiErr>>,
    ),
    ApiErr,
> {
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
    let handle = tokio::spawn(execute(server.clone(), app.clone(), run.clone()));
    Ok((run, handle))
}

pub fn run_log_path(data_dir: &Path, run_id: i64) -> PathBuf {
    data_dir.join("logs").join(format!("run-{run_id}.log"))
}

/// A run in progress: its record, steps and log.
struct Running {
    server: Arc<Server>,
    run: RunRecord,
    steps: Vec<api::RunStep>,
    log: PathBuf,
}

impl Running {
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
            s.state = if ok { "succeeded" } else { "failed" }.into();
            s.duration_ms = Some(now_ms().saturating_sub(s.started_at_ms));
            s.log_tail = tail;
        }
        self.save().await;
    }

    async fn finish(&mut self, state: &str, error: Option<String>) {
        self.run.state = state.into();
        self.run.error = error.clone();
        self.save().await;
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

async fn execute(
    server: Arc<Server>,
    app: AppRecord,
    run: RunRecord,
) -> Result<RunOutcome, ApiErr> {
    let log = run_log_path(&server.data_dir, run.id);
    let mut r = Running {
        server: server.clone(),
        run,
        steps: Vec::new(),
        log,
    };
    let _slot = server
        .run_slots
        .acquire()
        .await
        .map_err(|_| ApiErr::Unavailable("shutting down".into()))?;
    let lock = server.deploy_lock(&app.name).await;
    let _held = lock.lock().await;
    if let Some(reason) = superseded(&server, &app, &r.run).await {
        r.finish("superseded", Some(reason.clone())).await;
        return Err(ApiErr::Conflict(reason));
    }
    r.run.state = "running".into();
    r.save().await;
    let work = server
        .data_dir
        .join("work")
        .join(format!("run-{}", r.run.id));
    let result = steps(&mut r, &app, &work).await;
    let w = work.clone();
    let _ = tokio::task::spawn_blocking(move || remove_tree(&w)).await;
    match result {
        Ok(out) => Ok(out),
        Err(e) => {
            if !matches!(r.run.state.as_str(), "superseded") {
                r.finish("failed", Some(e.to_string())).await;
            }
            Err(e)
        }
    }
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
    if let Some(newer) = runs
        .iter()
        .find(|o| o.id > run.id && o.trigger != "manual" && o.state != "superseded")
    {
        return Some(format!(
            "superseded by run {} (commit {})",
            newer.id,
            &newer.commit[..12.min(newer.commit.len())]
        ));
    }
    let live = app_live_commit(server, &app.name).await?;
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

async fn app_live_commit(server: &Server, app: &str) -> Option<String> {
    let a = server.store.get_app(app).await.ok()?;
    let n = view::parse_release_name(a.live_release.as_deref()?)?;
    Some(server.store.get_release(app, n).await.ok()?.commit)
}

async fn steps(r: &mut Running, app: &AppRecord, work: &Path) -> Result<RunOutcome, ApiErr> {
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
        let res = run_step("build", cmd, work, spec.build.timeout_ms, &env, &r.log).await;
        r.end(res.is_ok()).await;
        res?;
    }
    if let Some(t) = &spec.test {
        r.begin("test").await;
        let res = run_step("test", &t.command, work, t.timeout_ms, &env, &r.log).await;
        r.end(res.is_ok()).await;
        res.map_err(|e| ApiErr::Failed(format!("tests failed, no release: {e}")))?;
    }
    if let Some(reason) = superseded(&server, app, &r.run).await {
        r.finish("superseded", Some(reason.clone())).await;
        return Err(ApiErr::Conflict(reason));
    }

    r.begin("pack").await;
    let artifacts = server.data_dir.join("artifacts");
    let paths = spec.build.artifact.clone();
    let w = work.to_path_buf();
    let packed = tokio::task::spawn_blocking(move || artifact::pack(&w, &paths, &artifacts))
        .await
        .map_err(|e| ApiErr::Internal(e.to_string()))?;
    let packed = match packed {
        Ok(p) => p,
        Err(e) => {
            r.log_line(&e).await;
            r.end(false).await;
            return Err(ApiErr::Failed(e));
        }
    };
    let spec_json = serde_json::to_string(&spec).map_err(|e| ApiErr::Internal(e.to_string()))?;
    let release = server
        .store
        .create_release(
            &app.name,
            &commit,
            &packed.sha256,
            packed.size,
            &spec_json,
            now_ms(),
        )
        .await?;
    r.log_line(&format!(
        "==> packed {} (sha256 {}, {} bytes)",
        release.name(),
        packed.sha256,
        packed.size
    ))
    .await;
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
        let res = run_step(
            "release",
            &rel_cmd.command,
            work,
            rel_cmd.timeout_ms,
            &env,
            &r.log,
        )
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

    r.begin("deploy").await;
    let rollout = match server
        .engine
        .start_rollout(
            &app.name,
            &release.name(),
            &format!("run {} of {short}", r.run.id),
        )
        .await
    {
        Ok(ro) => ro,
        Err(e) => {
            r.end(false).await;
            return Err(e);
        }
    };
    r.run.rollout_id = Some(rollout.id);
    r.end(true).await;
    r.finish("succeeded", None).await;
    Ok(RunOutcome {
        run: r.run.clone(),
        release,
        rollout,
    })
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
    let status = match tokio::time::timeout(Duration::from_millis(timeout_ms), child.wait()).await {
        Ok(s) => s.map_err(|e| ApiErr::Internal(e.to_string()))?,
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(ApiErr::Failed(format!(
                "{step} timed out after {}",
                drover_core::duration::format_ms(timeout_ms)
            )));
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
