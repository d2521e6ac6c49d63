//! The pipeline: a commit becomes a release.
//!
//! ```text
//! ref ─► resolve in the app's mirror ─► fresh checkout (git archive)
//!     ─► parse drover.toml of that commit ─► [build] command (sh -c, timeout)
//!     ─► pack [build] artifact paths (tar.zst, sha256) ─► release rN
//! ```
//!
//! The build command comes from the app's own repository (like any CI job);
//! branch names, commit ids and messages never reach a shell.

use crate::api::ApiErr;
use crate::{artifact, git, now_ms, Server};
use drover_core::spec::{parse_spec, AppSpec};
use drover_store::{AppRecord, ReleaseRecord};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub const SPEC_FILE: &str = "drover.toml";

/// Registers the app whose `drover.toml` is at the root of `repo`.
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
        Ok::<_, ApiErr>(spec)
    }
    .await;
    let spec = match result {
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

/// Builds `git_ref` (default: the tracked branch) of `app` into a new release.
pub async fn build_release(
    server: &Arc<Server>,
    app: &AppRecord,
    git_ref: Option<&str>,
) -> Result<(ReleaseRecord, AppSpec), ApiErr> {
    let mirror = git::mirror_path(&server.data_dir, &app.name);
    git::sync_mirror(&app.repo, &mirror)
        .await
        .map_err(|e| ApiErr::Failed(format!("cannot fetch {}: {e}", app.repo)))?;
    let r = match git_ref {
        Some(r) => {
            git::validate_ref(r).map_err(|e| ApiErr::BadInput(e.to_string()))?;
            r.to_string()
        }
        None => format!("refs/heads/{}", app.branch),
    };
    let commit = git::resolve(&mirror, &r)
        .await
        .map_err(|e| ApiErr::BadInput(e.to_string()))?;
    let work = server.data_dir.join("work").join(format!(
        "{}-{}-{}",
        app.name,
        &commit[..12],
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&work)
        .map_err(|e| ApiErr::Internal(format!("cannot create {}: {e}", work.display())))?;
    let res = build_in(server, app, &commit, &work).await;
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&work)).await;
    res
}

async fn build_in(
    server: &Arc<Server>,
    app: &AppRecord,
    commit: &str,
    work: &Path,
) -> Result<(ReleaseRecord, AppSpec), ApiErr> {
    git::checkout(&git::mirror_path(&server.data_dir, &app.name), commit, work)
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
    let log_path =
        server
            .data_dir
            .join("logs")
            .join(format!("build-{}-{}.log", app.name, &commit[..12]));
    if let Some(cmd) = &spec.build.command {
        run_step(
            "build",
            cmd,
            work,
            spec.build.timeout_ms,
            &[("DROVER_APP", &app.name), ("DROVER_COMMIT", commit)],
            &log_path,
        )
        .await?;
    }
    let artifacts = server.data_dir.join("artifacts");
    let paths = spec.build.artifact.clone();
    let work2 = work.to_path_buf();
    let packed = tokio::task::spawn_blocking(move || artifact::pack(&work2, &paths, &artifacts))
        .await
        .map_err(|e| ApiErr::Internal(e.to_string()))?
        .map_err(ApiErr::Failed)?;
    let spec_json = serde_json::to_string(&spec).map_err(|e| ApiErr::Internal(e.to_string()))?;
    let release = server
        .store
        .create_release(
            &app.name,
            commit,
            &packed.sha256,
            packed.size,
            &spec_json,
            now_ms(),
        )
        .await?;
    server
        .store
        .add_event(
            Some(&app.name),
            "release.created",
            &format!(
                "{} built from {} (artifact sha256 {}, {} bytes)",
                release.name(),
                &commit[..12],
                &packed.sha256[..12],
                packed.size
            ),
            now_ms(),
        )
        .await?;
    Ok((release, spec))
}

/// Runs one pipeline command with `sh -c` in `dir`, output appended to `log`.
async fn run_step(
    step: &str,
    command: &str,
    dir: &Path,
    timeout_ms: u64,
    env: &[(&str, &str)],
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
                "{step} timed out after {}; log: {}",
                drover_core::duration::format_ms(timeout_ms),
                tail(log)
            )));
        }
    };
    if !status.success() {
        return Err(ApiErr::Failed(format!(
            "{step} failed ({status}); last lines of its log:\n{}",
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
