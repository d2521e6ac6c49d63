//! Artifact download, verification and unpacking against a real (tiny)
//! HTTP server: one download per digest, retries of transient failures,
//! checksum mismatch and hostile archives reported as Failed.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use common::*;
use drover_agent::artifacts::release_dir;
use drover_api::{ArtifactRef, Assignment, InstanceState};
use sha2::{Digest, Sha256};

fn tar_zst(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        for (path, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.finish().unwrap();
    }
    zstd::encode_all(&tar[..], 3).unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Statuses answered first (one per request), then the body with 200.
type Blob = (Vec<u16>, Vec<u8>);

struct Blobs {
    /// path → blob
    blobs: Mutex<HashMap<String, Blob>>,
    hits: Mutex<HashMap<String, usize>>,
}

async fn artifact_server(blobs: Arc<Blobs>) -> TestServer {
    serve_tls(
        0,
        Arc::new(move |req: &Req| {
            *blobs
                .hits
                .lock()
                .unwrap()
                .entry(req.path.clone())
                .or_default() += 1;
            let mut map = blobs.blobs.lock().unwrap();
            match map.get_mut(&req.path) {
                Some((statuses, body)) => {
                    if !statuses.is_empty() {
                        let st = statuses.remove(0);
                        return Resp::new(st, "try later");
                    }
                    Resp::new(200, body.clone())
                }
                None => Resp::new(404, "no such artifact"),
            }
        }),
    )
    .await
}

fn with_artifact(mut a: Assignment, digest: &str, size: u64) -> Assignment {
    a.artifact = ArtifactRef {
        sha256: digest.to_string(),
        size,
        path: format!("/v1/artifacts/{digest}"),
    };
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_once_verifies_unpacks_read_only_and_runs() {
    init_tracing();
    let archive = tar_zst(&[
        (
            "run.sh",
            b"#!/bin/sh\necho \"hi from $DROVER_INSTANCE\"\nexec sleep 30\n",
            0o755,
        ),
        ("data.txt", b"data", 0o644),
    ]);
    let digest = sha(&archive);
    let blobs = Arc::new(Blobs {
        blobs: Mutex::new(HashMap::from([(
            format!("/v1/artifacts/{digest}"),
            (vec![503, 502], archive.clone()),
        )])),
        hits: Mutex::new(HashMap::new()),
    });
    let srv = artifact_server(blobs.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), (31100, 31199), Some(&srv.url()));
    let a = with_artifact(
        assignment("hello-r1-one", "./run.sh"),
        &digest,
        archive.len() as u64,
    );
    let b = with_artifact(
        assignment("hello-r1-two", "./run.sh"),
        &digest,
        archive.len() as u64,
    );
    sup.reconcile(&[a.clone(), b.clone()]);
    let pa = wait_for(15, "one started", || report(&sup, "hello-r1-one")?.pid).await;
    let pb = wait_for(15, "two started", || report(&sup, "hello-r1-two")?.pid).await;
    // Two transient failures, then one successful download for both.
    assert_eq!(
        blobs.hits.lock().unwrap()[&format!("/v1/artifacts/{digest}")],
        3
    );
    let rel = release_dir(dir.path(), "hello", "r1", &digest);
    assert!(rel.ends_with(format!("releases/hello/r1-{}", &digest[..12])));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&rel.join("run.sh")), 0o555);
    assert_eq!(mode(&rel.join("data.txt")), 0o444);
    assert_eq!(mode(&rel), 0o555);
    assert!(dir
        .path()
        .join(format!("artifacts/{digest}.tar.zst"))
        .is_file());
    assert!(!dir
        .path()
        .join(format!("artifacts/{digest}.tar.zst.partial"))
        .exists());
    let log = dir.path().join("logs/hello-r1-one.log");
    wait_for(5, "app output", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("hi from hello-r1-one")
            .then_some(())
    })
    .await;
    kill_group(pa);
    kill_group(pb);
    drover_agent::unpack::make_writable(dir.path()).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_mismatch_and_missing_artifacts_fail_with_the_cause() {
    init_tracing();
    let archive = tar_zst(&[("run.sh", b"#!/bin/sh\nexec sleep 30\n", 0o755)]);
    let actual = sha(&archive);
    let claimed = sha(b"something else");
    let blobs = Arc::new(Blobs {
        blobs: Mutex::new(HashMap::from([(
            format!("/v1/artifacts/{claimed}"),
            (vec![], archive.clone()),
        )])),
        hits: Mutex::new(HashMap::new()),
    });
    let srv = artifact_server(blobs.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), (31200, 31299), Some(&srv.url()));
    let bad = with_artifact(
        assignment("hello-r1-bad", "./run.sh"),
        &claimed,
        archive.len() as u64,
    );
    let missing_digest = sha(b"nowhere");
    let mut missing = with_artifact(
        assignment("hello-r1-missing", "./run.sh"),
        &missing_digest,
        10,
    );
    missing.release = "r9".into();
    sup.reconcile(&[bad, missing]);
    let r = wait_for(10, "mismatch reported", || {
        report(&sup, "hello-r1-bad").filter(|r| r.state == InstanceState::Failed)
    })
    .await;
    assert_eq!(
        r.message.as_deref(),
        Some(format!("artifact sha256 mismatch: expected {claimed}, got {actual}").as_str())
    );
    assert_eq!(r.pid, None);
    let r = wait_for(10, "404 reported", || {
        report(&sup, "hello-r1-missing").filter(|r| r.state == InstanceState::Failed)
    })
    .await;
    assert!(r.message.unwrap().contains("404"));
    // Nothing half-done is left behind.
    assert!(!release_dir(dir.path(), "hello", "r1", &claimed).exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("artifacts"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archive_from_the_server_fails_and_writes_nothing_outside() {
    init_tracing();
    // A link pointing out of the release, then a file through it.
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_cksum();
        b.append_link(&mut h, "up", "../../../../").unwrap();
        b.finish().unwrap();
    }
    let archive = zstd::encode_all(&tar[..], 3).unwrap();
    let digest = sha(&archive);
    let blobs = Arc::new(Blobs {
        blobs: Mutex::new(HashMap::from([(
            format!("/v1/artifacts/{digest}"),
            (vec![], archive.clone()),
        )])),
        hits: Mutex::new(HashMap::new()),
    });
    let srv = artifact_server(blobs).await;
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), (31300, 31399), Some(&srv.url()));
    let a = with_artifact(
        assignment("hello-r1-evil", "true"),
        &digest,
        archive.len() as u64,
    );
    sup.reconcile(&[a]);
    let r = wait_for(10, "refused", || {
        report(&sup, "hello-r1-evil").filter(|r| r.state == InstanceState::Failed)
    })
    .await;
    let msg = r.message.unwrap();
    assert!(msg.contains("refused archive entry"), "{msg}");
    assert!(!release_dir(dir.path(), "hello", "r1", &digest).exists());
    // No temp dirs left in releases/.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".unpack"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
