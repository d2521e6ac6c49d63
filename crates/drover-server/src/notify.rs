//! Rollout notifications: `[[notify]]` webhooks of the app's newest spec are
//! called with a signed JSON body on rollout events (started, step,
//! switched, paused, resumed, promoted, succeeded, failed, rolling_back,
//! rolled_back, aborted).
//!
//! The engine adds a delivery to the store's outbox ([`enqueue`]) beside the
//! event; [`run`] posts due deliveries, retrying with backoff (1 s doubling
//! to 5 min, [`MAX_ATTEMPTS`] attempts) across server restarts: at least
//! once, the same `id` on every attempt so a receiver can drop duplicates.
//!
//! Each request carries `X-Drover-Event`, `X-Drover-Delivery` and
//! `X-Drover-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, keyed by
//! the app's secret named in `secret` (the same form GitHub uses, and the
//! one drover's own webhook endpoint accepts). The URL is shown only as
//! scheme, host and "…" (webhook URLs often hold tokens).

use crate::{now_ms, view, Server};
use drover_core::spec::AppSpec;
use drover_core::Rollout;
use drover_store::DeliveryRecord;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Attempts before a delivery is given up (about 17 min of backoff).
pub const MAX_ATTEMPTS: u32 = 10;
/// Each attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries posted at once.
const MAX_IN_FLIGHT: usize = 32;
/// Ended deliveries are kept this long (for `drover notifications`).
const KEEP_MS: u64 = 7 * 24 * 3600 * 1000;

/// Adds a delivery per webhook of `app` that wants `event` (`rollout.<event>`)
/// of rollout `r`; `target` is the spec of the rollout's target release (for
/// its strategy and steps). Never fails the caller: a problem is logged.
pub async fn enqueue(
    server: &Server,
    r: &Rollout,
    target: &AppSpec,
    event: &str,
    message: &str,
    now: u64,
) {
    let hooks = match view::current_spec(server, &r.app).await {
        Ok(spec) => spec.notify,
        Err(e) => {
            tracing::warn!(app = %r.app, error = %e, "cannot read the app's webhooks");
            return;
        }
    };
    let kind = format!("rollout.{event}");
    let rows: Vec<DeliveryRecord> = hooks
        .iter()
        .filter(|h| h.wants(event))
        .map(|h| {
            let id = format!("dlv_{:032x}", rand::random::<u128>());
            let body = body(&id, &kind, r, target, message, now);
            DeliveryRecord {
                id,
                app: r.app.clone(),
                env: r.env.clone(),
                event: kind.clone(),
                url: h.url.clone(),
                secret: h.secret.clone(),
                body,
                state: "pending".into(),
                attempts: 0,
                next_at: now,
                last_status: None,
                last_error: None,
                created_at: now,
                updated_at: now,
            }
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    if let Err(e) = server
        .store
        .add_deliveries(&rows, now.saturating_sub(KEEP_MS))
        .await
    {
        tracing::warn!(app = %r.app, event = %kind, error = %e, "cannot queue webhook deliveries");
    }
}

/// The JSON body of one delivery.
fn body(id: &str, kind: &str, r: &Rollout, target: &AppSpec, message: &str, now: u64) -> String {
    let steps = target.deploy.steps.len();
    json!({
        "id": id,
        "event": kind,
        "at": now,
        "app": r.app,
        "env": r.env,
        "message": message,
        "rollout": {
            "id": r.id,
            "from": r.from,
            "to": r.to,
            "strategy": target.deploy.strategy.to_string(),
            "state": r.state.as_str(),
            "reverting": r.reverting,
            "step": r.canary.as_ref().map(|c| c.step).unwrap_or(r.step),
            "steps": steps,
            "weight": r.canary.as_ref().map(|c| c.weight),
            "message": r.message,
            "failure": r.failure,
            "started_at": r.started_at,
        },
    })
    .to_string()
}

/// `sha256=<hex>` of `body` keyed by `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The URL as shown in events, logs and the API: scheme and host only.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if rest.len() > host.len() && rest != format!("{host}/") {
        format!("{scheme}://{host}/…")
    } else {
        format!("{scheme}://{host}")
    }
}

/// Delay before attempt `attempts + 1` after `attempts` failed ones.
fn backoff_ms(attempts: u32) -> u64 {
    (1000u64 << attempts.saturating_sub(1).min(9)).min(300_000)
}

/// Posts due deliveries until `term` (the leader's term) ends.
pub async fn run(server: Arc<Server>, term: tokio_util::sync::CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default();
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tick.tick() => {}
        }
        let busy = in_flight.lock().map(|s| s.len()).unwrap_or(0);
        if busy >= MAX_IN_FLIGHT {
            continue;
        }
        let due = match server
            .store
            .due_deliveries(now_ms(), (MAX_IN_FLIGHT + busy) as u32)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read webhook deliveries");
                continue;
            }
        };
        for d in due {
            {
                let mut set = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if set.len() >= MAX_IN_FLIGHT || !set.insert(d.id.clone()) {
                    continue;
                }
            }
            let (server, client, in_flight) = (server.clone(), client.clone(), in_flight.clone());
            tokio::spawn(async move {
                let id = d.id.clone();
                deliver(&server, &client, d).await;
                in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }
}

/// Why an attempt failed, and whether another may succeed.
struct Failed {
    status: Option<u16>,
    error: String,
    retry: bool,
}

/// One attempt at `d`, recorded in the store.
async fn deliver(server: &Server, client: &reqwest::Client, mut d: DeliveryRecord) {
    let outcome = attempt(server, client, &d).await;
    let now = now_ms();
    d.attempts += 1;
    d.updated_at = now;
    let shown = redact_url(&d.url);
    match outcome {
        Ok(status) => {
            d.state = "delivered".into();
            d.last_status = Some(status);
            d.last_error = None;
            server.observed.delivery(&d.app, "delivered");
            tracing::info!(app = %d.app, event = %d.event, delivery = %d.id, url = %shown, status, attempts = d.attempts, "webhook delivered");
        }
        Err(f) => {
            d.last_status = f.status;
            d.last_error = Some(f.error.clone());
            if f.retry && d.attempts < MAX_ATTEMPTS {
                d.next_at = now + backoff_ms(d.attempts);
                server.observed.delivery(&d.app, "retrying");
                tracing::warn!(app = %d.app, event = %d.event, delivery = %d.id, url = %shown, attempts = d.attempts, error = %f.error, "webhook failed; will retry");
            } else {
                d.state = "failed".into();
                server.observed.delivery(&d.app, "failed");
                let msg = format!(
                    "webhook {shown} for {} ({}) failed after {} attempt{}: {}",
                    d.event,
                    d.id,
                    d.attempts,
                    if d.attempts == 1 { "" } else { "s" },
                    f.error
                );
                tracing::warn!(app = %d.app, "{msg}");
                let _ = server
                    .store
                    .add_event(Some(&d.app), "notify.failed", &msg, now)
                    .await;
            }
        }
    }
    if let Err(e) = server.store.update_delivery(&d).await {
        tracing::warn!(delivery = %d.id, error = %e, "cannot record a webhook attempt");
    }
}

async fn attempt(
    server: &Server,
    client: &reqwest::Client,
    d: &DeliveryRecord,
) -> Result<u16, Failed> {
    let key = signing_key(server, d).await.map_err(|error| Failed {
        status: None,
        error,
        // Someone may set the secret yet.
        retry: true,
    })?;
    let res = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Drover-Event", &d.event)
        .header("X-Drover-Delivery", &d.id)
        .header(
            "X-Drover-Signature-256",
            signature(key.as_bytes(), d.body.as_bytes()),
        )
        .body(d.body.clone())
        .send()
        .await
        .map_err(|e| Failed {
            status: None,
            // Without the URL: it may hold a token.
            error: e.without_url().to_string(),
            retry: true,
        })?;
    let status = res.status().as_u16();
    if res.status().is_success() {
        return Ok(status);
    }
    // A receiver's 4xx is final, except "timeout" and "too many requests".
    let retry = !res.status().is_client_error() || matches!(status, 408 | 429);
    Err(Failed {
        status: Some(status),
        error: format!("the receiver answered {status}"),
        retry,
    })
}

/// The opened value of the secret that signs `d`.
async fn signing_key(server: &Server, d: &DeliveryRecord) -> Result<String, String> {
    let missing = || {
        format!(
            "secret {} is not set for {}{}; set it with `drover secrets set {}{} {}`",
            d.secret,
            d.app,
            view::in_env(&d.env),
            d.app,
            if d.env.is_empty() {
                String::new()
            } else {
                format!(" --env {}", d.env)
            },
            d.secret
        )
    };
    let rec = server
        .store
        .list_secrets(&d.app)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| s.env == d.env && s.name == d.secret)
        .ok_or_else(missing)?;
    server
        .secrets
        .open(&d.app, &d.env, &d.secret, &rec.ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_path_or_query() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/XXXX"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(redact_url("http://127.0.0.1:9/"), "http://127.0.0.1:9");
        assert_eq!(redact_url("http://h?token=1"), "http://h/…");
    }

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes() {
        let d: Vec<u64> = (1..=MAX_ATTEMPTS).map(backoff_ms).collect();
        assert_eq!(&d[..4], &[1000, 2000, 4000, 8000]);
        assert_eq!(*d.last().unwrap(), 300_000);
    }

    #[test]
    fn the_signature_is_github_style_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
