//! Hostile and good archives against the hardened unpacker: nothing is
//! ever written outside the destination.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use drover_agent::unpack::{make_read_only, unpack_tar, unpack_tar_zst, UnpackError, UnpackLimits};
use tar::{EntryType, Header};

/// Appends one entry with raw (unvalidated) name and link name.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: EntryType, link: &[u8], data: &[u8], mode: u32) {
    let mut h = Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// Unpacks into `root/dest`; returns the result and asserts that nothing
/// but `dest` exists in `root` afterwards.
fn try_unpack(
    archive: &[u8],
    limits: UnpackLimits,
) -> (Result<(), UnpackError>, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let r = unpack_tar(archive, &dest, limits).map(|_| ());
    let names: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["dest".to_string()], "written outside dest");
    (r, root)
}

fn assert_refused(archive: Vec<u8>, needle: &str) {
    let (r, _root) = try_unpack(&archive, UnpackLimits::default());
    let err = r.expect_err("hostile archive was accepted").to_string();
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
}

#[test]
fn parent_dir_components_are_refused() {
    let mut a = Vec::new();
    raw_entry(&mut a, b"../x", EntryType::Regular, b"", b"evil", 0o644);
    assert_refused(finish(a), "`..`");
    let mut a = Vec::new();
    raw_entry(
        &mut a,
        b"ok/../../x",
        EntryType::Regular,
        b"",
        b"evil",
        0o644,
    );
    assert_refused(finish(a), "`..`");
}

#[test]
fn absolute_paths_are_refused() {
    let target = tempfile::tempdir().unwrap();
    let abs = target.path().join("x");
    let mut a = Vec::new();
    raw_entry(
        &mut a,
        abs.to_str().unwrap().as_bytes(),
        EntryType::Regular,
        b"",
        b"evil",
        0o644,
    );
    assert_refused(finish(a), "absolute");
    assert!(!abs.exists());
    let mut a = Vec::new();
    raw_entry(&mut a, b"/etc/x", EntryType::Regular, b"", b"evil", 0o644);
    assert_refused(finish(a), "absolute");
}

#[test]
fn escaping_symlinks_are_refused() {
    let mut a = Vec::new();
    raw_entry(&mut a, b"l", EntryType::Symlink, b"../outside", b"", 0o777);
    assert_refused(finish(a), "outside");
    let mut a = Vec::new();
    raw_entry(&mut a, b"l", EntryType::Symlink, b"/etc", b"", 0o777);
    assert_refused(finish(a), "absolute");
    let mut a = Vec::new();
    raw_entry(&mut a, b"sub/l", EntryType::Symlink, b"../../x", b"", 0o777);
    assert_refused(finish(a), "outside");
}

#[test]
fn symlink_chains_that_escape_are_refused() {
    // c → b/.. looks inside lexically, but b → . makes it the parent.
    let mut a = Vec::new();
    raw_entry(&mut a, b"c", EntryType::Symlink, b"b/..", b"", 0o777);
    raw_entry(&mut a, b"b", EntryType::Symlink, b".", b"", 0o777);
    assert_refused(finish(a), "resolves outside");
}

#[test]
fn writing_through_a_symlink_is_refused() {
    // An inside link to a dir, then a file "through" it.
    let mut a = Vec::new();
    raw_entry(&mut a, b"real/", EntryType::Directory, b"", b"", 0o755);
    raw_entry(&mut a, b"d", EntryType::Symlink, b"real", b"", 0o777);
    raw_entry(&mut a, b"d/x", EntryType::Regular, b"", b"data", 0o644);
    assert_refused(finish(a), "symlink");
    // A file replacing an existing symlink.
    let mut a = Vec::new();
    raw_entry(&mut a, b"f", EntryType::Symlink, b"g", b"", 0o777);
    raw_entry(&mut a, b"f", EntryType::Regular, b"", b"data", 0o644);
    assert_refused(finish(a), "symlink");
}

#[test]
fn hardlinks_and_special_files_are_refused() {
    let mut a = Vec::new();
    raw_entry(&mut a, b"h", EntryType::Link, b"/etc/passwd", b"", 0o644);
    assert_refused(finish(a), "hardlink");
    let mut a = Vec::new();
    raw_entry(&mut a, b"h", EntryType::Link, b"inside", b"", 0o644);
    assert_refused(finish(a), "hardlink");
    let mut a = Vec::new();
    raw_entry(&mut a, b"dev", EntryType::Char, b"", b"", 0o644);
    assert_refused(finish(a), "device");
    let mut a = Vec::new();
    raw_entry(&mut a, b"dev", EntryType::Block, b"", b"", 0o644);
    assert_refused(finish(a), "device");
    let mut a = Vec::new();
    raw_entry(&mut a, b"fifo", EntryType::Fifo, b"", b"", 0o644);
    assert_refused(finish(a), "fifo");
}

#[test]
fn size_and_entry_caps_hold() {
    let mut a = Vec::new();
    raw_entry(&mut a, b"big", EntryType::Regular, b"", &[7u8; 5000], 0o644);
    let (r, _root) = try_unpack(
        &finish(a),
        UnpackLimits {
            max_bytes: 4096,
            max_entries: 100,
        },
    );
    assert!(matches!(r, Err(UnpackError::TooLarge { .. })), "{r:?}");

    let mut a = Vec::new();
    for i in 0..20 {
        raw_entry(
            &mut a,
            format!("d{i}/").as_bytes(),
            EntryType::Directory,
            b"",
            b"",
            0o755,
        );
    }
    let (r, _root) = try_unpack(
        &finish(a),
        UnpackLimits {
            max_bytes: 4096,
            max_entries: 10,
        },
    );
    assert!(
        matches!(r, Err(UnpackError::TooManyEntries { .. })),
        "{r:?}"
    );
}

#[test]
fn zstd_bomb_is_capped() {
    // 64 MiB of zeros compress to a few KiB.
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = Header::new_gnu();
        h.set_size(64 << 20);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "zeros", std::io::repeat(0).take_n(64 << 20))
            .unwrap();
        b.finish().unwrap();
    }
    let compressed = zstd::encode_all(&tar[..], 3).unwrap();
    assert!(compressed.len() < 1 << 20);
    let root = tempfile::tempdir().unwrap();
    let archive = root.path().join("a.tar.zst");
    fs::write(&archive, &compressed).unwrap();
    let dest = root.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let r = unpack_tar_zst(
        &archive,
        &dest,
        UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 10,
        },
    );
    assert!(matches!(r, Err(UnpackError::TooLarge { .. })), "{r:?}");
}

trait TakeN: std::io::Read + Sized {
    fn take_n(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeN for R {}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn good_archive_unpacks_read_only_with_exec_bits() {
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut add = |path: &str, data: &[u8], mode: u32, kind: EntryType| {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        add("bin/", b"", 0o755, EntryType::Directory);
        add(
            "bin/app",
            b"#!/bin/sh\necho hi\n",
            0o755,
            EntryType::Regular,
        );
        add(
            "static/index.html",
            b"<h1>hi</h1>",
            0o644,
            EntryType::Regular,
        );
        add("./README", b"readme", 0o600, EntryType::Regular);
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_cksum();
        b.append_link(&mut h, "static/app", "../bin/app").unwrap();
        b.finish().unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let archive = root.path().join("a.tar.zst");
    let mut f = fs::File::create(&archive).unwrap();
    f.write_all(&zstd::encode_all(&tar[..], 3).unwrap())
        .unwrap();
    drop(f);
    let dest = root.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let stats = unpack_tar_zst(&archive, &dest, UnpackLimits::default()).unwrap();
    assert_eq!(stats.files, 3);
    assert_eq!(stats.symlinks, 1);
    make_read_only(&dest).unwrap();
    assert_eq!(mode(&dest.join("bin/app")), 0o555);
    assert_eq!(mode(&dest.join("static/index.html")), 0o444);
    assert_eq!(mode(&dest.join("README")), 0o444);
    assert_eq!(mode(&dest.join("bin")), 0o555);
    assert_eq!(mode(&dest), 0o555);
    assert_eq!(
        fs::read_link(dest.join("static/app")).unwrap(),
        Path::new("../bin/app")
    );
    assert_eq!(
        fs::read_to_string(dest.join("static/app")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    // Runs (exec bit kept).
    let out = std::process::Command::new(dest.join("bin/app"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    drover_agent::unpack::make_writable(&dest).unwrap();
}
