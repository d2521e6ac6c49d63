//! Sources: how new commits on an app's tracked branch are found.
//!
//! - **Polling**: every `poll_interval`, fetch each app's mirror and compare
//!   the branch tip with the tip seen last; a new tip starts a run.
//! - **Push webhooks** (`POST /v1/hooks/<app>`, GitHub-, Gitea- and
//!   GitLab-style payloads): the body is capped before it is read (256 KiB),
//!   the HMAC-SHA256 signature over the raw body is verified in constant time
//!   before anything else is looked at, and a delivery id starts at most one
//!   run (a unique index in the store, so two copies arriving at once make
//!   one run).
//!
//! Either way, one automatic run per commit, and the pipeline never deploys
//! a commit older than the live release's.

use crate::api::ApiErr;
use crate::{git, pipeline, Server};
use axum::http::HeaderMap;
use drover_api as api;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest webhook body read.
pub const HOOK_BODY_LIMIT: usize = 256 * 1024;

/// Polls tracked branches until `term` (the leader's term) ends.
pub async fn poll_loop(server: Arc<Server>, interval: Duration, term: CancellationToken) {
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let apps = match server.store.list_apps().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "poller cannot list apps");
                continue;
            }
        };
        for app in apps {
            if let Err(e) = poll_app(&server, &app).await {
                tracing::warn!(app = %app.name, error = %e, "polling failed; will retry");
            }
        }
    }
}

async fn poll_app(server: &Arc<Server>, app: &drover_store::AppRecord) -> Result<(), ApiErr> {
    let mirror = git::mirror_path(&server.data_dir, &app.name);
    git::sync_mirror(&app.repo, &mirror)
        .await
        .map_err(|e| ApiErr::Failed(e.to_string()))?;
    let git_ref = format!("refs/heads/{}", app.branch);
    let tip = git::resolve(&mirror, &git_ref)
        .await
        .map_err(|e| ApiErr::Failed(e.to_string()))?;
    if app.polled_commit.as_deref() == Some(tip.as_str()) {
        return Ok(());
    }
    server.store.set_polled_commit(&app.name, &tip).await?;
    if server.store.has_run_for_commit(&app.name, &tip).await? {
        return Ok(());
    }
    tracing::info!(app = %app.name, commit = %&tip[..12], "new commit found by polling");
    match pipeline::start_run(server, app, &tip, &git_ref, "poll", None).await {
        Ok(_) | Err(ApiErr::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A header's value as trimmed text, if present and text.
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Checks the signature headers against an HMAC-SHA256 of `body`.
/// Accepted: `X-Hub-Signature-256: sha256=<hex>` (GitHub, Gitea),
/// `X-Gitea-Signature: <hex>`, `X-Drover-Signature-256: sha256=<hex>`.
pub fn verify_signature(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let sig_hex = if let Some(v) =
        header(headers, "x-hub-signature-256").or(header(headers, "x-drover-signature-256"))
    {
        v.strip_prefix("sha256=")
            .ok_or("the signature header must look like sha256=<hex>")?
    } else if let Some(v) = header(headers, "x-gitea-signature") {
        v
    } else if header(headers, "x-hub-signature").is_some() {
        return Err(
            "SHA-1 signatures (X-Hub-Signature) are not accepted; send X-Hub-Signature-256".into(),
        );
    } else {
        return Err(
            "missing signature: send X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>".into(),
        );
    };
    let sig = hex::decode(sig_hex).map_err(|_| "the signature is not hex")?;
    if sig.len() != 32 {
        return Err("the signature is not a full SHA-256 HMAC".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad webhook secret")?;
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| "signature mismatch".to_string())
}

/// Handles a push delivery for `app`. Errors: 401 (unknown app or bad
/// signature, no side effect), 400 (bad payload).
pub async fn handle_push(
    server: &Arc<Server>,
    app_name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(axum::http::StatusCode, api::HookResponse), ApiErr> {
    use axum::http::StatusCode;
    let app = server
        .store
        .get_app(app_name)
        .await
        .map_err(|_| ApiErr::Unauthorized("webhook rejected".into()))?;
    let secret = app
        .webhook_secret
        .clone()
        .ok_or_else(|| ApiErr::Unauthorized("webhook rejected".into()))?;
    if let Err(why) = verify_signature(secret.as_bytes(), headers, body) {
        tracing::warn!(app = app_name, reason = %why, "webhook rejected");
        return Err(ApiErr::Unauthorized(format!("webhook rejected: {why}")));
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiErr::BadInput(format!("the payload is not JSON: {e}")))?;
    let git_ref = v["ref"].as_str().unwrap_or_default();
    let after = v["after"]
        .as_str()
        .or(v["checkout_sha"].as_str())
        .unwrap_or_default();
    let wanted = format!("refs/heads/{}", app.branch);
    if git_ref != wanted {
        let msg = format!(
            "push to {:?} ignored: {} tracks {wanted}",
            git_ref.chars().take(100).collect::<String>(),
            app.name
        );
        return Ok((
            StatusCode::ACCEPTED,
            api::HookResponse {
                outcome: "ignored".into(),
                run_id: None,
                message: msg,
            },
        ));
    }
    if after.chars().all(|c| c == '0') {
        return Ok((
            StatusCode::ACCEPTED,
            api::HookResponse {
                outcome: "ignored".into(),
                run_id: None,
                message: "branch deleted".into(),
            },
        ));
    }
    if after.len() != 40 || !after.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiErr::BadInput(
            "the payload's \"after\" is not a commit id".into(),
        ));
    }
    let after = after.to_ascii_lowercase();
    let delivery = header(headers, "x-github-delivery")
        .or(header(headers, "x-gitea-delivery"))
        .or(header(headers, "x-gitlab-event-uuid"))
        .or(header(headers, "x-drover-delivery"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("body-{}", hex::encode(Sha256::digest(body))));
    let delivery: String = delivery
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(200)
        .collect();
    match pipeline::start_run(server, &app, &after, &wanted, "webhook", Some(delivery)).await {
        Ok((run, _)) => Ok((
            StatusCode::ACCEPTED,
            api::HookResponse {
                outcome: "run_started".into(),
                run_id: Some(run.id),
                message: format!("run {} of {}", run.id, &after[..12]),
            },
        )),
        Err(ApiErr::Conflict(_)) => Ok((
            StatusCode::OK,
            api::HookResponse {
                outcome: "duplicate".into(),
                run_id: None,
                message: "this delivery or commit already has a run".into(),
            },
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(body);
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    }

    fn with(name: &'static str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn only_a_full_sha256_hmac_of_the_raw_body_is_accepted() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        assert!(
            verify_signature(b"k", &with("x-hub-signature-256", &sign("k", body)), body).is_ok()
        );
        assert!(
            verify_signature(
                b"k",
                &with("x-hub-signature-256", &sign("other", body)),
                body
            )
            .is_err(),
            "wrong key"
        );
        assert!(
            verify_signature(b"k", &with("x-hub-signature-256", &sign("k", b"{}")), body).is_err(),
            "other body"
        );
        let truncated = &sign("k", body)[..40];
        assert!(
            verify_signature(b"k", &with("x-hub-signature-256", truncated), body).is_err(),
            "truncated"
        );
        assert!(verify_signature(b"k", &HeaderMap::new(), body)
            .unwrap_err()
            .contains("missing"));
        assert!(
            verify_signature(b"k", &with("x-hub-signature", "sha1=abcd"), body)
                .unwrap_err()
                .contains("SHA-1")
        );
        let gitea = sign("k", body).trim_start_matches("sha256=").to_string();
        assert!(verify_signature(b"k", &with("x-gitea-signature", &gitea), body).is_ok());
    }
}
