//! Instance log files, `data_dir/logs/<instance>.log`, and their rotation.
//!
//! The app writes to the file directly (it is its stdout/stderr, opened with
//! O_APPEND), so it keeps logging while the agent is down. Rotation is
//! copy-and-truncate: `.2`→`.3`, `.1`→`.2`, copy to `.1`, truncate the
//! original. With O_APPEND the app's next write lands at the new end.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Rotate when a log grows past this.
pub const MAX_LOG_BYTES: u64 = 10 << 20;
/// Rotated copies kept (`.1` … `.3`).
pub const KEEP: u32 = 3;

/// `data_dir/logs`.
pub fn logs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// `data_dir/logs/<instance>.log`.
pub fn log_path(data_dir: &Path, instance: &str) -> PathBuf {
    logs_dir(data_dir).join(format!("{instance}.log"))
}

/// Opens (creating) a log file for appending.
pub fn open_log(path: &Path) -> io::Result<fs::File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Appends one line written by the agent itself (e.g. "starting …").
pub fn agent_line(file: &mut fs::File, line: &str) -> io::Result<()> {
    writeln!(file, "--- drover-agent: {line}")
}

/// Rotates `path` if it is larger than `max_bytes`, keeping `keep` copies.
/// Returns whether it rotated.
pub fn rotate_if_needed(path: &Path, max_bytes: u64, keep: u32) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes || keep == 0 {
        return Ok(false);
    }
    let numbered = |n: u32| {
        let mut s = path.as_os_str().to_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    };
    let _ = fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            fs::rename(&from, numbered(n + 1))?;
        }
    }
    fs::copy(path, numbered(1))?;
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// Rotates every `*.log` in `dir` that needs it; errors are logged.
pub fn rotate_all(dir: &Path, max_bytes: u64, keep: u32) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "log") {
            match rotate_if_needed(&path, max_bytes, keep) {
                Ok(true) => tracing::info!(log = %path.display(), "rotated instance log"),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(log = %path.display(), error = %err, "cannot rotate log")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_keeping_three_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut app = open_log(&path).unwrap();
        for round in 0..5u8 {
            app.write_all(&[b'0' + round; 100]).unwrap();
            assert!(rotate_if_needed(&path, 50, 3).unwrap());
            assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        }
        // The app's O_APPEND handle keeps writing at the (new) end.
        app.write_all(b"tail").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"tail");
        assert_eq!(fs::read(dir.path().join("a.log.1")).unwrap(), [b'4'; 100]);
        assert_eq!(fs::read(dir.path().join("a.log.2")).unwrap(), [b'3'; 100]);
        assert_eq!(fs::read(dir.path().join("a.log.3")).unwrap(), [b'2'; 100]);
        assert!(!dir.path().join("a.log.4").exists());
        assert!(!rotate_if_needed(&path, 50, 3).unwrap());
    }
}
