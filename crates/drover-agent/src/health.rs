//! HTTP health checks: one probe (`GET http://127.0.0.1:<port><path>`,
//! 2xx = success) and the threshold state machine
//! (Starting → Healthy after `healthy_after` successes, Healthy → Unhealthy
//! after `unhealthy_after` failures, Unhealthy → Healthy again after
//! `healthy_after` successes).

use std::time::Duration;

use drover_api::{HealthReport, HealthSpec, InstanceState};

use crate::client::{is_connection_refused, snippet};

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    /// e.g. `GET /healthz → 200`, `GET /healthz → 503 "db down"`,
    /// `GET /healthz → connection refused`.
    pub description: String,
}

/// The client used for probes: no proxy, no redirects followed.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("building a plain HTTP client cannot fail")
}

/// Runs one health check against 127.0.0.1:`port`.
pub async fn probe(client: &reqwest::Client, port: u16, spec: &HealthSpec) -> Probe {
    let path = if spec.path.starts_with('/') {
        spec.path.clone()
    } else {
        format!("/{}", spec.path)
    };
    let url = format!("http://127.0.0.1:{port}{path}");
    let timeout = Duration::from_millis(spec.timeout_ms.max(1));
    let attempt = async {
        let resp = client.get(&url).send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok((true, format!("GET {path} → {}", status.as_u16())));
        }
        // Only the start of the body matters.
        let mut body = Vec::new();
        let mut resp = resp;
        while body.len() < 1024 {
            match resp.chunk().await? {
                Some(c) => body.extend_from_slice(&c),
                None => break,
            }
        }
        let text = snippet(&String::from_utf8_lossy(&body), 80);
        Ok::<_, reqwest::Error>(if text.is_empty() {
            (false, format!("GET {path} → {}", status.as_u16()))
        } else {
            (false, format!("GET {path} → {} {text:?}", status.as_u16()))
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((ok, description))) => Probe { ok, description },
        Ok(Err(e)) => Probe {
            ok: false,
            description: if is_connection_refused(&e) {
                format!("GET {path} → connection refused")
            } else if e.is_timeout() {
                format!("GET {path} → timed out after {} ms", spec.timeout_ms)
            } else {
                format!("GET {path} → {}", crate::client::error_chain(&e))
            },
        },
        Err(_) => Probe {
            ok: false,
            description: format!("GET {path} → timed out after {} ms", spec.timeout_ms),
        },
    }
}

/// Threshold state machine over probe results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTracker {
    /// Starting, Healthy or Unhealthy.
    pub state: InstanceState,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub last_response: Option<String>,
}

impl HealthTracker {
    /// A tracker in `state` (Starting for a fresh process; the persisted
    /// verdict for an adopted one) with zero counters.
    pub fn new(state: InstanceState) -> Self {
        let state = match state {
            InstanceState::Healthy | InstanceState::Unhealthy => state,
            _ => InstanceState::Starting,
        };
        HealthTracker {
            state,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_response: None,
        }
    }

    /// Applies one probe; returns the new state if it changed.
    pub fn record(&mut self, probe: &Probe, spec: &HealthSpec) -> Option<InstanceState> {
        self.last_response = Some(probe.description.clone());
        let before = self.state;
        if probe.ok {
            self.consecutive_ok = self.consecutive_ok.saturating_add(1);
            self.consecutive_fail = 0;
            if self.state != InstanceState::Healthy
                && self.consecutive_ok >= spec.healthy_after.max(1)
            {
                self.state = InstanceState::Healthy;
            }
        } else {
            self.consecutive_fail = self.consecutive_fail.saturating_add(1);
            self.consecutive_ok = 0;
            if self.state == InstanceState::Healthy
                && self.consecutive_fail >= spec.unhealthy_after.max(1)
            {
                self.state = InstanceState::Unhealthy;
            }
        }
        (self.state != before).then_some(self.state)
    }

    /// The wire form of the counters.
    pub fn report(&self) -> HealthReport {
        HealthReport {
            consecutive_ok: self.consecutive_ok,
            consecutive_fail: self.consecutive_fail,
            last_response: self.last_response.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthSpec {
        HealthSpec {
            path: "/healthz".into(),
            interval_ms: 100,
            timeout_ms: 100,
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }

    fn p(ok: bool) -> Probe {
        Probe {
            ok,
            description: String::new(),
        }
    }

    #[test]
    fn thresholds() {
        use InstanceState::*;
        let s = spec();
        let mut t = HealthTracker::new(Starting);
        assert_eq!(t.record(&p(true), &s), None);
        assert_eq!(t.record(&p(false), &s), None); // resets the streak
        assert_eq!(t.record(&p(false), &s), None); // starting stays starting
        assert_eq!(t.record(&p(true), &s), None);
        assert_eq!(t.record(&p(true), &s), Some(Healthy));
        assert_eq!(t.record(&p(false), &s), None);
        assert_eq!(t.record(&p(false), &s), None);
        assert_eq!(t.record(&p(true), &s), None); // flap resets failures
        for _ in 0..2 {
            assert_eq!(t.record(&p(false), &s), None);
        }
        assert_eq!(t.record(&p(false), &s), Some(Unhealthy));
        assert_eq!(t.record(&p(true), &s), None);
        assert_eq!(t.record(&p(true), &s), Some(Healthy));
        assert_eq!(t.report().consecutive_ok, 2);
    }
}
