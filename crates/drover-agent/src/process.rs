//! The `process` driver's primitives: spawning an instance in its own
//! process group with its log file as stdout/stderr, identifying a process
//! by pid + start time (`/proc/<pid>/stat` field 22), and signalling its
//! group without ever hitting a recycled pid.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// What `/proc/<pid>/stat` tells about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z (zombie), X (dead), …
    pub state: char,
    /// Field 5: process group id.
    pub pgrp: i32,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

/// Reads and parses `/proc/<pid>/stat`; `None` if there is no such process.
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the contents of a `/proc/<pid>/stat` file. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted from the
/// last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(5 - 3)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat {
        state,
        pgrp,
        start_time,
    })
}

/// Start time of a live (non-zombie) process.
pub fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid)
        .filter(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
        .map(|s| s.start_time)
}

/// Whether `pid` is alive, not a zombie, and is the process that started at
/// `start_time` (not a later process that got the same pid).
pub fn is_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Whether any live (non-zombie) process is in process group `pgid`.
/// Zombies do not count: they hold nothing but a pid until reaped.
pub fn group_exists(pgid: u32) -> bool {
    let Ok(p) = i32::try_from(pgid) else {
        return false;
    };
    if matches!(
        killpg(Pid::from_raw(p), None),
        Err(nix::errno::Errno::ESRCH)
    ) {
        return false;
    }
    let Ok(dir) = fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .any(|st| st.pgrp == p && !matches!(st.state, 'Z' | 'X' | 'x'))
}

/// Sends `sig` to the process group led by `pid`, unless `pid` now belongs
/// to a different process (a recycled pid leading its own group). While
/// the group still has members its id cannot be reused, so signalling a
/// group whose leader already exited is safe. Returns whether it was sent.
pub fn signal_group(pid: u32, start: u64, sig: Signal) -> bool {
    if let Some(st) = read_stat(pid) {
        if st.start_time != start {
            return false;
        }
    }
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 1 {
        return false;
    }
    killpg(Pid::from_raw(p), sig).is_ok()
}

/// Set on every instance process: the (canonical) data dir of the agent
/// that started it, so that an agent whose state file was lost can still
/// find its own instances in `/proc` ([`find_orphans`]).
pub const AGENT_DIR_ENV: &str = "DROVER_AGENT_DIR";

/// An instance process found by its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub instance: String,
    pub pid: u32,
    pub start: u64,
    pub port: u16,
}

/// The live process group leaders that the agent with data dir `agent_dir`
/// started (their environment names it, with their instance and port).
pub fn find_orphans(agent_dir: &str) -> Vec<Orphan> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Some(st) = read_stat(pid) else { continue };
        if st.pgrp as i64 != pid as i64 || matches!(st.state, 'Z' | 'X' | 'x') {
            continue;
        }
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut vars: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
        for kv in env.split(|b| *b == 0) {
            if let Some(eq) = kv.iter().position(|b| *b == b'=') {
                vars.insert(&kv[..eq], &kv[eq + 1..]);
            }
        }
        if vars.get(AGENT_DIR_ENV.as_bytes()) != Some(&agent_dir.as_bytes()) {
            continue;
        }
        let text = |k: &str| {
            vars.get(k.as_bytes())
                .and_then(|v| std::str::from_utf8(v).ok())
        };
        if let (Some(instance), Some(port)) = (
            text("DROVER_INSTANCE"),
            text("PORT").and_then(|p| p.parse().ok()),
        ) {
            out.push(Orphan {
                instance: instance.to_string(),
                pid,
                start: st.start_time,
                port,
            });
        }
    }
    out
}

/// What to run for one instance.
#[derive(Debug, Clone)]
pub struct SpawnSpec<'a> {
    pub command: &'a str,
    pub dir: &'a Path,
    pub env: &'a BTreeMap<String, String>,
    pub port: u16,
    /// The address the app should listen on (`HOST`).
    pub host: &'a str,
    /// The agent's canonical data dir ([`AGENT_DIR_ENV`]).
    pub agent_dir: &'a str,
    pub app: &'a str,
    pub release: &'a str,
    pub instance: &'a str,
    /// Opened for append; handed to the child as stdout and stderr.
    pub log: &'a fs::File,
}

/// A process just started.
#[derive(Debug)]
pub struct Spawned {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub start_time: u64,
}

/// Starts `sh -c <command>` in its own process group, stdin from
/// /dev/null, stdout and stderr into the log file. Not killed on drop: the
/// app outlives the agent.
pub fn spawn(spec: &SpawnSpec<'_>) -> std::io::Result<Spawned> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(spec.command)
        .current_dir(spec.dir)
        .envs(spec.env)
        .env("PORT", spec.port.to_string())
        .env("HOST", spec.host)
        .env(AGENT_DIR_ENV, spec.agent_dir)
        .env("DROVER_APP", spec.app)
        .env("DROVER_RELEASE", spec.release)
        .env("DROVER_INSTANCE", spec.instance)
        .stdin(Stdio::null())
        .stdout(Stdio::from(spec.log.try_clone()?))
        .stderr(Stdio::from(spec.log.try_clone()?))
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("spawned process has no pid"))?;
    // The child exists from fork on; exec does not change its start time.
    let start_time = read_stat(pid)
        .map(|s| s.start_time)
        .ok_or_else(|| std::io::Error::other(format!("cannot read /proc/{pid}/stat")))?;
    Ok(Spawned {
        child,
        pid,
        start_time,
    })
}

/// `exit status 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        status.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (we ird) (name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        let st = parse_stat(line).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.pgrp, 1234);
        assert_eq!(st.start_time, 987654);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id();
        let st = start_time(me).unwrap();
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
    }
}
