//! The agent's state file, `data_dir/agent-state.json`: what it started
//! (pid + process start time, port, release dir, restart count) so that a
//! restarted agent re-adopts its apps instead of restarting them.
//!
//! Written atomically (tmp file + fsync + rename + fsync of the directory),
//! mode 0600 (assignments carry the run environment). A corrupt, truncated,
//! zeroed or missing file is never fatal: [`load`] returns an empty state and
//! says what was wrong; a corrupt file is kept beside it for inspection.
//! The running instances it listed are then found by their environment
//! (`process::find_orphans`) and re-adopted if the control plane still
//! assigns them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use drover_api::{Assignment, InstanceState};
use serde::{Deserialize, Serialize};

/// File name of the state file inside the data dir.
pub const STATE_FILE: &str = "agent-state.json";

/// Current format version.
pub const VERSION: u32 = 1;

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub version: u32,
    /// Where the next port search starts.
    #[serde(default)]
    pub port_cursor: Option<u16>,
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceRecord>,
}

/// One instance as the agent last knew it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: String,
    pub assignment: Assignment,
    /// Process group leader, while a process runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): with the
    /// pid, identifies the process across pid reuse.
    #[serde(default)]
    pub start_time: Option<u64>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub release_dir: Option<PathBuf>,
    /// Restarts after unexpected exits; only grows.
    #[serde(default)]
    pub restarts: u32,
    /// Consecutive crashes without 60 s of health in between (backoff step).
    #[serde(default)]
    pub crash_streak: u32,
    /// Last health verdict (starting/healthy/unhealthy), resumed on adoption
    /// so an agent restart does not make a healthy instance look new.
    #[serde(default)]
    pub health: Option<InstanceState>,
    /// The container id, while a container (docker driver) exists for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl InstanceRecord {
    /// A record for an instance that has not been started yet.
    pub fn new(assignment: Assignment) -> Self {
        InstanceRecord {
            instance: assignment.instance.clone(),
            assignment,
            pid: None,
            start_time: None,
            port: None,
            release_dir: None,
            restarts: 0,
            crash_streak: 0,
            health: None,
            container: None,
        }
    }
}

/// Result of [`load`].
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub state: AgentState,
    /// Why the state is empty although it perhaps should not be (missing,
    /// unreadable or corrupt file), as one sentence for the log.
    pub problem: Option<String>,
    /// Whether the problem is a damaged file (vs. simply absent).
    pub corrupt: bool,
}

/// `data_dir/agent-state.json`.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}

/// Reads the state file. Never fails: problems give an empty state and a
/// message. A damaged file is renamed to `agent-state.json.corrupt`.
pub fn load(path: &Path) -> Loaded {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Loaded {
                state: AgentState::default(),
                problem: Some(format!(
                    "no agent state file at {} (first start, or it was deleted): starting with \
                     empty state; running instances of this agent are found by their environment \
                     and re-adopted if still assigned, the rest started from the control plane's \
                     assignments",
                    path.display()
                )),
                corrupt: false,
            }
        }
        Err(e) => {
            return Loaded {
                state: AgentState::default(),
                problem: Some(format!(
                    "cannot read agent state file {}: {e}; starting with empty state",
                    path.display()
                )),
                corrupt: true,
            }
        }
    };
    let parsed = if bytes.iter().all(|b| *b == 0) {
        Err(if bytes.is_empty() {
            "the file is empty".to_string()
        } else {
            format!("the file is {} zero bytes", bytes.len())
        })
    } else {
        serde_json::from_slice::<AgentState>(&bytes).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(state) if state.version == VERSION => {
            let mut state = state;
            // Keys are the instance ids; trust the key.
            for (k, r) in state.instances.iter_mut() {
                r.instance = k.clone();
            }
            Loaded {
                state,
                problem: None,
                corrupt: false,
            }
        }
        Ok(state) => Loaded {
            state: AgentState::default(),
            problem: Some(format!(
                "agent state file {} has unknown version {} (expected {VERSION}); starting with \
                 empty state",
                path.display(),
                state.version
            )),
            corrupt: true,
        },
        Err(why) => {
            let keep = path.with_extension("json.corrupt");
            let kept = fs::rename(path, &keep).is_ok();
            Loaded {
                state: AgentState::default(),
                problem: Some(format!(
                    "agent state file {} is corrupt ({why}){}; starting with empty state — \
                     running instances of this agent are found by their environment and \
                     re-adopted if still assigned, the rest started from the control plane's \
                     assignments",
                    path.display(),
                    if kept {
                        format!(", kept as {}", keep.display())
                    } else {
                        String::new()
                    }
                )),
                corrupt: true,
            }
        }
    }
}

/// Writes the state atomically: `<path>.tmp`, fsync, rename, fsync dir.
pub fn save(path: &Path, state: &AgentState) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    write_private(path, &bytes)
}

/// Replaces `path` with `bytes` atomically (tmp file, fsync, rename, fsync
/// of the directory), readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
