//! Log shipping: every second, the new bytes of each instance's log file go
//! to the control plane (`POST /v1/agent/logs`), so `drover logs` can show
//! them without access to this machine.
//!
//! Offsets live in memory. A file seen for the first time (agent start) is
//! shipped from its last 64 KiB, so an agent restart may repeat up to that
//! much; a file that shrank (rotated by copy-truncate) is shipped from 0.
//! Shipping never blocks or slows the apps: the files are read, not piped.

use crate::client::ControlClient;
use crate::supervisor::Supervisor;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const FIRST_TAIL: u64 = 64 * 1024;
const MAX_CHUNK: u64 = 256 * 1024;

/// Reads what was appended to `path` since `*offset` (at most MAX_CHUNK).
pub fn read_new(path: &Path, offset: &mut Option<u64>) -> std::io::Result<Option<String>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = match *offset {
        None => len.saturating_sub(FIRST_TAIL),
        Some(o) if o > len => 0,
        Some(o) => o,
    };
    if start == len {
        *offset = Some(len);
        return Ok(None);
    }
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(MAX_CHUNK).read_to_end(&mut buf)?;
    *offset = Some(start + buf.len() as u64);
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

pub async fn ship_loop(
    node: String,
    client: ControlClient,
    sup: Arc<Supervisor>,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) {
    // Instance id → bytes of its log already shipped (absent: not seen yet).
    let mut offsets: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ids: Vec<String> = sup.reports().into_iter().map(|r| r.instance).collect();
        offsets.retain(|k, _| ids.contains(k));
        for id in ids {
            let path = crate::logs::log_path(&data_dir, &id);
            let mut off = offsets.get(&id).copied();
            match read_new(&path, &mut off) {
                Ok(Some(data)) => {
                    let chunk = drover_api::LogChunk {
                        node: node.clone(),
                        instance: id.clone(),
                        data,
                    };
                    // On failure the offset stays, so the bytes go with the next try.
                    if client.ship_logs(&chunk).await.is_ok() {
                        if let Some(o) = off {
                            offsets.insert(id, o);
                        }
                    }
                }
                Ok(None) => {
                    if let Some(o) = off {
                        offsets.insert(id, o);
                    }
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn new_bytes_are_read_once_and_a_truncated_file_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        std::fs::write(&p, "one\n").unwrap();
        let mut off = None;
        assert_eq!(read_new(&p, &mut off).unwrap().as_deref(), Some("one\n"));
        assert_eq!(read_new(&p, &mut off).unwrap(), None);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        assert_eq!(read_new(&p, &mut off).unwrap().as_deref(), Some("two\n"));
        std::fs::write(&p, "x\n").unwrap(); // truncated (rotated)
        assert_eq!(read_new(&p, &mut off).unwrap().as_deref(), Some("x\n"));
    }
}
