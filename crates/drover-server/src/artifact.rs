//! Release artifacts: a deterministic tar (sorted entries, zero times and
//! owners) compressed with zstd, addressed by its sha256.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub struct Packed {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

/// Packs `paths` (relative to `root`; `.` = all of it) into
/// `<artifacts_dir>/<sha256>.tar.zst`.
pub fn pack(root: &Path, paths: &[String], artifacts_dir: &Path) -> Result<Packed, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    for p in paths {
        let full = root.join(p);
        let meta = std::fs::symlink_metadata(&full).map_err(|_| {
            format!("artifact path {p:?} does not exist after the build; check [build] artifact")
        })?;
        if meta.is_dir() {
            walk(root, &full, &mut files).map_err(|e| format!("cannot read {p}: {e}"))?;
        } else {
            files.push(PathBuf::from(p.trim_start_matches("./")));
        }
    }
    files.sort();
    files.dedup();
    let tmp = artifacts_dir.join(format!(".pack-{}", rand::random::<u64>()));
    let res = (|| -> io::Result<()> {
        let out = BufWriter::new(File::create(&tmp)?);
        let enc = zstd::Encoder::new(out, 3)?;
        let mut builder = tar::Builder::new(enc);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        for rel in &files {
            let full = root.join(rel);
            let meta = std::fs::symlink_metadata(&full)?;
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&full)?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                builder.append_link(&mut h, rel, target)?;
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let exec = meta.permissions().mode() & 0o111 != 0;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                h.set_mode(if exec { 0o755 } else { 0o644 });
                builder.append_data(&mut h, rel, File::open(&full)?)?;
            }
        }
        let enc = builder.into_inner()?;
        let mut out = enc.finish()?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot pack the artifact: {e}"));
    }
    let (sha256, size) = sha256_file(&tmp).map_err(|e| format!("cannot hash the artifact: {e}"))?;
    let path = artifacts_dir.join(format!("{sha256}.tar.zst"));
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot store the artifact: {e}"))?;
    Ok(Packed { sha256, size, path })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let ft = entry.file_type()?;
        if ft.is_dir() {
            if entry.file_name() == ".git" {
                continue;
            }
            walk(root, &path, out)?;
        } else {
            out.push(
                path.strip_prefix(root)
                    .map_err(io::Error::other)?
                    .to_path_buf(),
            );
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_the_same_tree_twice_gives_the_same_digest() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/app"), "#!/bin/sh\n").unwrap();
        std::fs::write(src.path().join("README"), "hi").unwrap();
        let out = tempfile::tempdir().unwrap();
        let a = pack(src.path(), &[".".into()], out.path()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(src.path().join("README"), "hi").unwrap(); // new mtime, same content
        let b = pack(src.path(), &["README".into(), "bin".into()], out.path()).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert!(valid_sha256(&a.sha256));
    }

    #[test]
    fn a_missing_artifact_path_is_named() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let e = pack(src.path(), &["target/app".into()], out.path())
            .err()
            .unwrap();
        assert!(e.contains("target/app"), "{e}");
    }
}
