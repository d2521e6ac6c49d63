//! Artifact retention: keep the artifacts of the newest `keep` releases of
//! each app, and always those of the live release and the rollback target
//! (previous live) of each environment, any release in an active rollout and any release with
//! instances. Older ones lose their artifact and are marked `pruned`; the
//! release record itself stays (history is never deleted).

use crate::view;
use crate::Server;
use drover_store::Store;
use std::collections::BTreeSet;

/// A pruned image release's tags on the server's engine go too (the image
/// with them, unless a kept release of the same commit still has it).
/// Best effort: the artifact, not the engine, is what releases run from.
async fn untag_image(
    d: &drover_docker::Docker,
    app: &str,
    release: &str,
    commit: &str,
    releases: &[drover_store::ReleaseRecord],
    protected: &BTreeSet<String>,
) {
    let repo = crate::pipeline::image_repo(app);
    let mut tags = vec![format!("{repo}:{release}")];
    let commit_kept = releases
        .iter()
        .any(|o| o.commit == commit && protected.contains(&o.name()));
    if !commit_kept {
        tags.push(format!("{repo}:{}", &commit[..12.min(commit.len())]));
    }
    for t in tags {
        if let Err(e) = drover_docker::untag(d, &t).await {
            tracing::warn!(app, release, error = %e, "cannot remove a pruned release's image tag");
        }
    }
}

pub async fn prune(
    server: &Server,
    app: &str,
    keep: usize,
) -> Result<Vec<String>, drover_store::StoreError> {
    let store: &dyn Store = &*server.store;
    let releases = store.list_releases(app).await?; // newest first
    let mut protected: BTreeSet<String> = releases.iter().take(keep).map(|r| r.name()).collect();
    // In every environment of the app.
    for d in store.list_deployments().await? {
        if d.app != app {
            continue;
        }
        protected.extend(d.live_release.clone());
        protected.extend(d.prev_release.clone());
        if let Some(r) = store
            .latest_rollout(app, &d.env)
            .await?
            .filter(|r| !r.state.is_final())
        {
            protected.insert(r.to.clone());
            protected.extend(r.from.clone());
        }
    }
    for i in store.list_instances(app).await? {
        protected.insert(i.release);
    }
    // Digests still needed by a protected release (identical builds share one).
    let needed: BTreeSet<String> = releases
        .iter()
        .filter(|r| protected.contains(&r.name()))
        .map(|r| r.artifact_sha256.clone())
        .collect();
    let mut pruned = Vec::new();
    // The server's engine, connected at the first pruned image release.
    let mut docker: Option<Option<drover_docker::Docker>> = None;
    for r in releases
        .iter()
        .filter(|r| !protected.contains(&r.name()) && r.status != "pruned")
    {
        if !needed.contains(&r.artifact_sha256) {
            let path = server
                .data_dir
                .join("artifacts")
                .join(format!("{}.tar.zst", r.artifact_sha256));
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(app, release = %r.name(), error = %e, "cannot remove artifact");
                    continue;
                }
            }
        }
        if r.image.is_some() {
            if docker.is_none() {
                docker = Some(drover_docker::connect().await.ok());
            }
            if let Some(Some(d)) = &docker {
                untag_image(d, app, &r.name(), &r.commit, &releases, &protected).await;
            }
        }
        let n = view::parse_release_name(&r.name()).unwrap_or(r.number);
        store.set_release_status(app, n, "pruned").await?;
        pruned.push(r.name());
    }
    if !pruned.is_empty() {
        let msg = format!("artifacts of {} pruned (keeping the newest {keep}, the live release and the rollback target)", pruned.join(", "));
        store
            .add_event(Some(app), "release.pruned", &msg, crate::now_ms())
            .await?;
        tracing::info!(app, releases = %pruned.join(","), "artifacts pruned");
    }
    Ok(pruned)
}
