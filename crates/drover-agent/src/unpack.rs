//! Hardened unpacking of release archives (`.tar.zst`).
//!
//! Nothing is ever written outside the destination directory: absolute
//! paths, `..` components, hardlinks, device and fifo entries are refused;
//! symlinks are allowed only with a relative target that resolves inside the
//! destination (checked lexically when created and again, following every
//! link, once all entries are out); no entry is ever written through an
//! existing symlink. Total bytes and entry count are capped (decompression
//! bombs). Regular files keep their exec bits; [`make_read_only`] removes
//! write bits afterwards.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Caps applied while unpacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total bytes of file contents.
    pub max_bytes: u64,
    /// Number of archive entries of any kind.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("refused archive entry {path:?}: {reason}")]
    Unsafe { path: String, reason: String },
    #[error("archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("cannot read archive: {0}")]
    Read(io::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What was unpacked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Unpacks the zstd-compressed tar file `archive` into `dest` (which must
/// exist and should be empty).
pub fn unpack_tar_zst(
    archive: &Path,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackError> {
    let file = fs::File::open(archive).map_err(UnpackError::Read)?;
    let decoder = zstd::stream::read::Decoder::new(file).map_err(UnpackError::Read)?;
    unpack_tar(decoder, dest, limits)
}

/// Unpacks an uncompressed tar stream into `dest` (see the module docs for
/// what is refused).
pub fn unpack_tar<R: Read>(
    reader: R,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackError> {
    // Bound what the tar reader may pull out of the decompressor, headers
    // and long names included, so a bomb cannot run on forever.
    let bounded = reader.take(limits.max_bytes.saturating_add(64 << 20));
    let mut archive = tar::Archive::new(bounded);
    let mut stats = UnpackStats::default();
    let mut links: Vec<Vec<OsString>> = Vec::new();
    let mut count = 0u64;
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(UnpackError::Read)?;
        count += 1;
        if count > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |reason: &str| UnpackError::Unsafe {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let rel = relative_components(&raw).map_err(&unsafe_entry)?;
        match kind {
            tar::EntryType::Directory => {
                ensure_dirs(dest, &rel).map_err(|r| unsafe_entry(&r))?;
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.is_empty() {
                    return Err(unsafe_entry("a file entry without a name"));
                }
                ensure_dirs(dest, &rel[..rel.len() - 1]).map_err(|r| unsafe_entry(&r))?;
                let path = join(dest, &rel);
                replace_plain_file(&path).map_err(|r| unsafe_entry(&r))?;
                let exec = entry.header().mode().unwrap_or(0o644) & 0o111 != 0;
                let mode = if exec { 0o755 } else { 0o644 };
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|source| UnpackError::Write {
                        path: path.clone(),
                        source,
                    })?;
                let remaining = limits.max_bytes - stats.bytes;
                let copied = io::copy(&mut (&mut entry).take(remaining + 1), &mut out)
                    .map_err(UnpackError::Read)?;
                if copied > remaining {
                    return Err(UnpackError::TooLarge {
                        limit: limits.max_bytes,
                    });
                }
                out.flush().map_err(|source| UnpackError::Write {
                    path: path.clone(),
                    source,
                })?;
                // Ensure the mode even under a restrictive umask.
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|source| {
                    UnpackError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                stats.bytes += copied;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                if rel.is_empty() {
                    return Err(unsafe_entry("a symlink without a name"));
                }
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("a symlink without a target"))?
                    .into_owned();
                let target = Path::new(OsStr::from_bytes(&target_raw));
                if target.as_os_str().is_empty() {
                    return Err(unsafe_entry("a symlink with an empty target"));
                }
                if target.is_absolute() {
                    return Err(unsafe_entry("symlink target is absolute"));
                }
                if !lexically_inside(&rel[..rel.len() - 1], target) {
                    return Err(unsafe_entry("symlink target points outside the release"));
                }
                ensure_dirs(dest, &rel[..rel.len() - 1]).map_err(|r| unsafe_entry(&r))?;
                let path = join(dest, &rel);
                if fs::symlink_metadata(&path).is_ok() {
                    return Err(unsafe_entry("symlink would replace an existing entry"));
                }
                std::os::unix::fs::symlink(target, &path)
                    .map_err(|source| UnpackError::Write { path, source })?;
                links.push(rel);
                stats.symlinks += 1;
            }
            tar::EntryType::Link => return Err(unsafe_entry("hardlinks are not allowed")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(unsafe_entry("device files are not allowed"))
            }
            tar::EntryType::Fifo => return Err(unsafe_entry("fifos are not allowed")),
            other => {
                return Err(unsafe_entry(&format!(
                    "entry type {other:?} is not allowed"
                )))
            }
        }
    }
    // Links created later may change where earlier ones lead: check every
    // link again now, following links.
    for rel in &links {
        if !resolves_inside(dest, rel) {
            return Err(UnpackError::Unsafe {
                path: join(Path::new(""), rel).display().to_string(),
                reason: "symlink resolves outside the release".to_string(),
            });
        }
    }
    Ok(stats)
}

/// Splits an entry path into normal components; refuses absolute paths and
/// `..`. `.` components are dropped (so `./` is the root itself).
fn relative_components(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw.contains(&0) {
        return Err("NUL in path");
    }
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

fn join(base: &Path, rel: &[OsString]) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in rel {
        p.push(c);
    }
    p
}

/// Creates the directories `dest/rel…` one level at a time, refusing to go
/// through anything that is not a real directory (a symlink in particular).
fn ensure_dirs(dest: &Path, rel: &[OsString]) -> Result<(), String> {
    let mut p = dest.to_path_buf();
    for c in rel {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("goes through the symlink {}", p.display()))
            }
            Ok(_) => return Err(format!("{} is not a directory", p.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", p.display())),
        }
    }
    Ok(())
}

/// A later entry with the same name replaces an earlier regular file; it
/// may never replace a directory or a symlink.
fn replace_plain_file(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {
            fs::remove_file(path).map_err(|e| format!("cannot replace: {e}"))
        }
        Ok(_) => Err("would replace a directory or symlink".to_string()),
        Err(_) => Ok(()),
    }
}

/// Whether `target`, taken relative to the directory `parent` (components
/// below the release root), stays inside the root without following links.
fn lexically_inside(parent: &[OsString], target: &Path) -> bool {
    let mut depth = parent.len();
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Follows the link at `dest/rel` (and every link met on the way) and tells
/// whether it stays inside `dest`. Dangling remainders are checked lexically.
fn resolves_inside(dest: &Path, rel: &[OsString]) -> bool {
    let mut stack: Vec<OsString> = rel.to_vec();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    let mut hops = 0;
    // Start by expanding the link itself.
    let Some(_) = stack.last() else {
        return true;
    };
    let link = join(dest, &stack);
    let Ok(target) = fs::read_link(&link) else {
        return true;
    };
    stack.pop();
    if !push_target(&mut pending, &target) {
        return false;
    }
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if stack.pop().is_none() {
                return false;
            }
            continue;
        }
        stack.push(c);
        let p = join(dest, &stack);
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    return false;
                }
                let Ok(t) = fs::read_link(&p) else {
                    return false;
                };
                stack.pop();
                let mut rest: VecDeque<OsString> = VecDeque::new();
                if !push_target(&mut rest, &t) {
                    return false;
                }
                rest.extend(pending.drain(..));
                pending = rest;
            }
        }
    }
    true
}

/// Queues the components of a relative link target (`..` kept as is);
/// false for an absolute target.
fn push_target(q: &mut VecDeque<OsString>, target: &Path) -> bool {
    for c in target.components() {
        match c {
            Component::Normal(n) => q.push_back(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => q.push_back(OsString::from("..")),
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Removes the write bits of every file and directory under `dir`
/// (symlinks are left alone; their own mode means nothing on Linux).
/// `dir` itself is done last.
pub fn make_read_only(dir: &Path) -> io::Result<()> {
    set_write_bits(dir, false)
}

/// Gives the owner write permission again on everything under `dir`, e.g.
/// to delete an unpacked tree.
pub fn make_writable(dir: &Path) -> io::Result<()> {
    set_write_bits(dir, true)
}

fn set_write_bits(dir: &Path, writable: bool) -> io::Result<()> {
    let adjust = |path: &Path, m: &fs::Metadata| -> io::Result<()> {
        let mode = m.permissions().mode() & 0o7777;
        let new = if writable {
            mode | 0o200
        } else {
            mode & !0o222
        };
        if new != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(new))?;
        }
        Ok(())
    };
    let top = fs::symlink_metadata(dir)?;
    if writable {
        adjust(dir, &top)?;
    }
    if top.is_dir() {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d)? {
                let e = e?;
                let path = e.path();
                let m = fs::symlink_metadata(&path)?;
                if m.file_type().is_symlink() {
                    continue;
                }
                if m.is_dir() {
                    // chmod of entries inside a dir without write bits
                    // still works (it changes inodes, not the dir).
                    adjust(&path, &m)?;
                    stack.push(path);
                } else {
                    adjust(&path, &m)?;
                }
            }
        }
    }
    if !writable {
        adjust(dir, &top)?;
    }
    Ok(())
}
