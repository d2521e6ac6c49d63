//! The git CLI, called with argument vectors (never a shell) and validated
//! refs (SCENARIOS.md 19). Each app has a bare mirror under
//! `<data>/repos/<app>.git`; checkouts are `git archive` of one commit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("invalid git ref {0:?}: {1}")]
    BadRef(String, &'static str),
    #[error("{0}")]
    Failed(String),
}

/// Accepts branch and tag names and commit ids; refuses anything that could
/// be read as an option or that git itself would refuse.
pub fn validate_ref(r: &str) -> Result<(), GitError> {
    let bad = |why| Err(GitError::BadRef(r.chars().take(80).collect(), why));
    if r.is_empty() || r.len() > 200 {
        return bad("must be 1 to 200 characters");
    }
    if r.starts_with('-') {
        return bad("must not start with '-'");
    }
    if r.contains("..")
        || r.contains("@{")
        || r.ends_with('/')
        || r.ends_with(".lock")
        || r.starts_with('/')
    {
        return bad("contains a sequence git does not allow in ref names");
    }
    if !r
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
    {
        return bad("use only letters, digits, '/', '.', '_' and '-'");
    }
    Ok(())
}

/// Runs git with `args` (no shell, no prompts, bounded in time).
async fn git_output(args: &[&str]) -> Result<std::process::Output, GitError> {
    let mut cmd = Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = args
        .iter()
        .find(|a| !a.starts_with('-') && !a.contains('/'))
        .unwrap_or(&"");
    tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .map_err(|_| GitError::Failed(format!("git {what} timed out after 300s")))?
        .map_err(|e| GitError::Failed(format!("cannot run git: {e}; install git")))
}

fn failed(args: &[&str], out: &std::process::Output) -> GitError {
    let what = args
        .iter()
        .find(|a| !a.starts_with('-') && !a.contains('/'))
        .unwrap_or(&"");
    let err = String::from_utf8_lossy(&out.stderr);
    GitError::Failed(format!(
        "git {what} failed: {}",
        err.trim().chars().take(500).collect::<String>()
    ))
}

/// Runs git; its stdout, or an error with its stderr.
async fn git(args: &[&str]) -> Result<Vec<u8>, GitError> {
    let out = git_output(args).await?;
    if !out.status.success() {
        return Err(failed(args, &out));
    }
    Ok(out.stdout)
}

pub fn mirror_path(data_dir: &Path, app: &str) -> PathBuf {
    data_dir.join("repos").join(format!("{app}.git"))
}

/// The lock of one mirror: fetches into the same mirror at once (a webhook,
/// a CLI deploy and an API deploy arriving together) would race for its ref
/// locks and fail.
fn mirror_lock(dest: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    type Locks = std::collections::HashMap<PathBuf, std::sync::Arc<tokio::sync::Mutex<()>>>;
    static LOCKS: std::sync::LazyLock<std::sync::Mutex<Locks>> =
        std::sync::LazyLock::new(Default::default);
    LOCKS
        .lock()
        .expect("mirror locks")
        .entry(dest.to_path_buf())
        .or_default()
        .clone()
}

/// Clones `repo` (path or URL) as a bare mirror at `dest`, or fetches if it
/// exists; one at a time per mirror.
pub async fn sync_mirror(repo: &str, dest: &Path) -> Result<(), GitError> {
    let lock = mirror_lock(dest);
    let _held = lock.lock().await;
    if dest.join("HEAD").exists() {
        git(&[
            "--git-dir",
            &dest.to_string_lossy(),
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "origin",
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ])
        .await?;
        return Ok(());
    }
    if repo.starts_with('-') {
        return Err(GitError::Failed(format!(
            "repository {repo:?} must not start with '-'"
        )));
    }
    let tmp = dest.with_extension(format!("tmp{}", rand::random::<u32>()));
    let res = git(&[
        "clone",
        "--quiet",
        "--mirror",
        "--",
        repo,
        &tmp.to_string_lossy(),
    ])
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest)
        .map_err(|e| GitError::Failed(format!("cannot move mirror into place: {e}")))?;
    Ok(())
}

/// Resolves a branch, tag or commit to a full commit id.
pub async fn resolve(mirror: &Path, r: &str) -> Result<String, GitError> {
    validate_ref(r)?;
    let spec = format!("{r}^{{commit}}");
    let out = git(&[
        "--git-dir",
        &mirror.to_string_lossy(),
        "rev-parse",
        "--verify",
        "--quiet",
        "--end-of-options",
        &spec,
    ])
    .await
    .map_err(|_| {
        GitError::Failed(format!(
            "ref {r:?} does not name a commit in the repository"
        ))
    })?;
    let sha = String::from_utf8_lossy(&out).trim().to_string();
    if sha.len() != 40 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(GitError::Failed(format!(
            "git rev-parse gave an unexpected answer for {r:?}"
        )));
    }
    Ok(sha)
}

/// Whether `a` is an ancestor of (or equal to) `b`.
/// Whether the mirror already has `commit`.
pub async fn has_commit(mirror: &Path, commit: &str) -> bool {
    let spec = format!("{commit}^{{commit}}");
    let mirror = mirror.to_string_lossy();
    git(&[
        "--git-dir",
        &mirror,
        "cat-file",
        "-e",
        "--end-of-options",
        &spec,
    ])
    .await
    .is_ok()
}

pub async fn is_ancestor(mirror: &Path, a: &str, b: &str) -> Result<bool, GitError> {
    let mirror = mirror.to_string_lossy();
    let args = [
        "--git-dir",
        &mirror,
        "merge-base",
        "--is-ancestor",
        "--end-of-options",
        a,
        b,
    ];
    let out = git_output(&args).await?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(&args, &out)),
    }
}

/// Reads one file of a commit.
pub async fn show_file(mirror: &Path, commit: &str, path: &str) -> Result<String, GitError> {
    let spec = format!("{commit}:{path}");
    let out = git(&[
        "--git-dir",
        &mirror.to_string_lossy(),
        "show",
        "--end-of-options",
        &spec,
    ])
    .await
    .map_err(|_| {
        GitError::Failed(format!(
            "{path} not found at the root of the repository at commit {}",
            &commit[..commit.len().min(12)]
        ))
    })?;
    String::from_utf8(out).map_err(|_| GitError::Failed(format!("{path} is not valid UTF-8")))
}

/// Writes the tree of `commit` into the empty directory `dest`.
pub async fn checkout(mirror: &Path, commit: &str, dest: &Path) -> Result<(), GitError> {
    let bytes = git(&[
        "--git-dir",
        &mirror.to_string_lossy(),
        "archive",
        "--format=tar",
        commit,
    ])
    .await?;
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut ar = tar::Archive::new(std::io::Cursor::new(bytes));
        ar.set_preserve_permissions(true);
        ar.set_overwrite(false);
        // tar::Archive::unpack refuses paths escaping dest.
        ar.unpack(&dest)
            .map_err(|e| GitError::Failed(format!("cannot write checkout: {e}")))
    })
    .await
    .map_err(|e| GitError::Failed(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_that_could_be_options_or_shell_are_refused() {
        for bad in [
            "-x",
            "--upload-pack=evil",
            "$(rm -rf /)",
            "a;b",
            "a\nb",
            "a..b",
            "",
            "a b",
            "\u{1b}[31m",
            "x@{1}",
        ] {
            assert!(validate_ref(bad).is_err(), "{bad:?}");
        }
        for good in ["main", "feature/x-1", "v1.2.3", "0123abcd", "release_2"] {
            assert!(validate_ref(good).is_ok(), "{good:?}");
        }
    }
}
