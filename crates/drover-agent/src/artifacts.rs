//! Release artifacts: download (`GET {server}{artifact.path}`) into
//! `data_dir/artifacts/<sha256>.tar.zst`, verify size and sha256, unpack
//! into `data_dir/releases/<app>/<release>-<sha256[..12]>/` (read-only).
//!
//! One download per digest even when several instances want it at once
//! (a per-digest lock); transient failures (unreachable, 5xx, short body)
//! are retried with backoff; a checksum mismatch is final.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::Assignment;
use sha2::{Digest, Sha256};

use crate::client::{ClientError, ControlClient};
use crate::unpack::{self, UnpackLimits};

/// Why a release could not be prepared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0}")]
    Invalid(String),
    #[error("artifact sha256 mismatch: expected {expected}, got {actual}")]
    Mismatch { expected: String, actual: String },
    #[error("artifact download failed: {message}")]
    Download { message: String, transient: bool },
    #[error("artifact unpack failed: {0}")]
    Unpack(String),
    #[error("{0}")]
    Io(String),
}

impl ArtifactError {
    /// Whether trying again later may help (server down, disk full…).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ArtifactError::Download {
                transient: true,
                ..
            } | ArtifactError::Io(_)
        )
    }
}

/// Delays between download attempts (so attempts = len + 1).
pub const RETRY_DELAYS_MS: [u64; 5] = [500, 1000, 2000, 4000, 8000];

/// Downloads and unpacks releases for one data dir.
#[derive(Debug)]
pub struct ArtifactStore {
    data_dir: PathBuf,
    client: ControlClient,
    limits: UnpackLimits,
    retry_delays: Vec<Duration>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// `[A-Za-z0-9._-]`, 1–128 chars, not starting with `.`: safe as one path
/// component.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `data_dir/releases/<app>/<release>-<sha256[..12]>`.
pub fn release_dir(data_dir: &Path, app: &str, release: &str, sha256: &str) -> PathBuf {
    data_dir
        .join("releases")
        .join(app)
        .join(format!("{release}-{}", &sha256[..12.min(sha256.len())]))
}

impl ArtifactStore {
    pub fn new(data_dir: PathBuf, client: ControlClient) -> Self {
        ArtifactStore {
            data_dir,
            client,
            limits: UnpackLimits::default(),
            retry_delays: RETRY_DELAYS_MS
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the unpack caps.
    pub fn with_limits(mut self, limits: UnpackLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Overrides the delays between download attempts.
    pub fn with_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        self.retry_delays = delays;
        self
    }

    /// The unpacked release directory for `a`, downloading and unpacking
    /// it first if needed.
    pub async fn ensure_release(&self, a: &Assignment) -> Result<PathBuf, ArtifactError> {
        self.ensure_release_reporting(a, &|_| {}).await
    }

    /// [`Self::ensure_release`], telling `retrying` why each failed
    /// download attempt failed and when the next one is (so the instance's
    /// status names the cause while it retries).
    pub async fn ensure_release_reporting(
        &self,
        a: &Assignment,
        retrying: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, ArtifactError> {
        let sha = a.artifact.sha256.to_ascii_lowercase();
        if !is_safe_name(&a.app) || !is_safe_name(&a.release) {
            return Err(ArtifactError::Invalid(format!(
                "app {:?} / release {:?} is not a safe directory name",
                a.app, a.release
            )));
        }
        if !is_sha256_hex(&sha) {
            return Err(ArtifactError::Invalid(format!(
                "artifact digest {:?} is not a sha256 hex string",
                a.artifact.sha256
            )));
        }
        let dir = release_dir(&self.data_dir, &a.app, &a.release, &sha);
        if dir.is_dir() {
            return Ok(dir);
        }
        let lock = self.digest_lock(&sha);
        let _guard = lock.lock().await;
        if dir.is_dir() {
            return Ok(dir);
        }
        let archive = self.ensure_archive(a, &sha, retrying).await?;
        let releases = self.data_dir.join("releases");
        let limits = self.limits;
        let target = dir.clone();
        let app = a.app.clone();
        tokio::task::spawn_blocking(move || {
            unpack_into(&archive, &releases, &app, &target, limits)
        })
        .await
        .map_err(|e| ArtifactError::Io(format!("unpack task failed: {e}")))??;
        tracing::info!(app = %a.app, release = %a.release, dir = %dir.display(), "release unpacked");
        Ok(dir)
    }

    /// The archive of a container image release (a compressed `docker
    /// save`), downloaded and verified if absent; the caller loads it into
    /// the engine. One download per digest at once.
    pub async fn ensure_image_archive(
        &self,
        a: &Assignment,
        retrying: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, ArtifactError> {
        let sha = a.artifact.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&sha) {
            return Err(ArtifactError::Invalid(format!(
                "artifact digest {:?} is not a sha256 hex string",
                a.artifact.sha256
            )));
        }
        let lock = self.digest_lock(&sha);
        let _guard = lock.lock().await;
        self.ensure_archive(a, &sha, retrying).await
    }

    /// One download (and unpack) per digest at a time.
    fn digest_lock(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("locks poisoned");
        locks.entry(sha.to_string()).or_default().clone()
    }

    /// `data_dir/artifacts/<sha>.tar.zst`, downloaded and verified if absent.
    async fn ensure_archive(
        &self,
        a: &Assignment,
        sha: &str,
        retrying: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, ArtifactError> {
        let dir = self.data_dir.join("artifacts");
        let path = dir.join(format!("{sha}.tar.zst"));
        if path.is_file() {
            return Ok(path);
        }
        fs::create_dir_all(&dir)
            .map_err(|e| ArtifactError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let partial = dir.join(format!("{sha}.tar.zst.partial"));
        let mut attempt = 0usize;
        loop {
            match self.download(a, sha, &partial).await {
                Ok(()) => break,
                Err(e) => {
                    let _ = fs::remove_file(&partial);
                    let delay = self.retry_delays.get(attempt).copied();
                    match (e.is_retryable(), delay) {
                        (true, Some(d)) => {
                            tracing::warn!(app = %a.app, release = %a.release, error = %e,
                                "artifact download failed; retrying in {d:?}");
                            retrying(format!("{e}; retrying in {d:?}"));
                            tokio::time::sleep(d).await;
                            attempt += 1;
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
        fs::rename(&partial, &path)
            .map_err(|e| ArtifactError::Io(format!("cannot rename {}: {e}", partial.display())))?;
        tracing::info!(app = %a.app, release = %a.release, sha256 = %sha, "artifact downloaded");
        Ok(path)
    }

    async fn download(
        &self,
        a: &Assignment,
        sha: &str,
        partial: &Path,
    ) -> Result<(), ArtifactError> {
        let transient = |message: String| ArtifactError::Download {
            message,
            transient: true,
        };
        let mut resp = self
            .client
            .get(&a.artifact.path)
            .await
            .map_err(|e| match e {
                ClientError::NotFound => ArtifactError::Download {
                    message: format!("{} answered 404 Not Found", a.artifact.path),
                    transient: false,
                },
                e => ArtifactError::Download {
                    transient: e.is_transient(),
                    message: format!("GET {}: {e}", a.artifact.path),
                },
            })?;
        let mut file = fs::File::create(partial)
            .map_err(|e| ArtifactError::Io(format!("cannot create {}: {e}", partial.display())))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let expected_size = a.artifact.size;
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
                .await
                .map_err(|_| transient("no data for 60 s".to_string()))?
                .map_err(|e| {
                    transient(format!(
                        "reading body: {}",
                        crate::client::describe_error(&e)
                    ))
                })?;
            let Some(chunk) = chunk else { break };
            size += chunk.len() as u64;
            if size > expected_size {
                return Err(ArtifactError::Download {
                    message: format!(
                        "artifact size mismatch: expected {expected_size} bytes, got more"
                    ),
                    transient: false,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| ArtifactError::Io(format!("writing {}: {e}", partial.display())))?;
        }
        if size != expected_size {
            return Err(transient(format!(
                "artifact size mismatch: expected {expected_size} bytes, got {size}"
            )));
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha {
            return Err(ArtifactError::Mismatch {
                expected: sha.to_string(),
                actual,
            });
        }
        file.sync_all()
            .map_err(|e| ArtifactError::Io(format!("syncing {}: {e}", partial.display())))?;
        Ok(())
    }
}

/// Unpacks into a fresh temp dir under `releases/`, makes it read-only and
/// renames it to `target`.
fn unpack_into(
    archive: &Path,
    releases: &Path,
    app: &str,
    target: &Path,
    limits: UnpackLimits,
) -> Result<(), ArtifactError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        ArtifactError::Io(format!("{what} {}: {e}", p.display()))
    };
    let app_dir = releases.join(app);
    fs::create_dir_all(&app_dir).map_err(|e| io("cannot create", &app_dir, e))?;
    let tmp = releases.join(format!(
        ".unpack-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    fs::create_dir(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    let cleanup = |tmp: &Path| {
        let _ = unpack::make_writable(tmp);
        let _ = fs::remove_dir_all(tmp);
    };
    if let Err(e) = unpack::unpack_tar_zst(archive, &tmp, limits) {
        cleanup(&tmp);
        return Err(ArtifactError::Unpack(e.to_string()));
    }
    // Make the insides read-only, move (needs the moved dir writable), then
    // the top dir itself.
    let ro = unpack::make_read_only(&tmp)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        })
        .map_err(|e| io("cannot make read-only", &tmp, e));
    if let Err(e) = ro {
        cleanup(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, target) {
        cleanup(&tmp);
        return Err(io("cannot rename to", target, e));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(target, fs::Permissions::from_mode(0o555))
            .map_err(|e| io("cannot make read-only", target, e))?;
    }
    Ok(())
}
