//! Live traffic figures per (app, environment, release), from the proxies'
//! reports: the raw material of canary analysis.
//!
//! Proxies report cumulative counters since they started. This keeps each
//! proxy's last report and adds only the difference to monotonic totals, so
//! a proxy that restarts (its counters drop to zero) never makes a total go
//! backwards. Held in memory: after a server restart, analysis windows start
//! again from the next reports (a step is judged on fresh figures).

use drover_api::ReleaseStats;
use drover_core::analysis::Window;
use std::collections::HashMap;

pub type Key = (String, String, String);

#[derive(Default)]
pub struct Traffic {
    last: HashMap<(String, Key), ReleaseStats>,
    totals: HashMap<Key, Window>,
}

impl Traffic {
    /// Adds what is new in one proxy's report.
    pub fn record(&mut self, proxy: &str, stats: &[ReleaseStats]) {
        for st in stats {
            let key = (st.app.clone(), st.env.clone(), st.release.clone());
            let prev = self.last.get(&(proxy.to_string(), key.clone()));
            // Counters went down: the proxy restarted; all of it is new.
            let restarted = prev.is_some_and(|p| st.requests < p.requests);
            let total = self.totals.entry(key.clone()).or_default();
            let (dr, de) = match prev {
                Some(p) if !restarted => {
                    (st.requests - p.requests, st.errors.saturating_sub(p.errors))
                }
                _ => (st.requests, st.errors),
            };
            total.requests += dr;
            total.errors += de;
            total.latency_sum_us += match prev {
                Some(p) if !restarted => st.latency_sum_us.saturating_sub(p.latency_sum_us),
                _ => st.latency_sum_us,
            };
            if total.latency_buckets.len() < st.latency_buckets.len() {
                total.latency_buckets.resize(st.latency_buckets.len(), 0);
            }
            for (i, c) in st.latency_buckets.iter().enumerate() {
                let before = match prev {
                    Some(p) if !restarted => p.latency_buckets.get(i).copied().unwrap_or(0),
                    _ => 0,
                };
                total.latency_buckets[i] += c.saturating_sub(before);
            }
            self.last.insert((proxy.to_string(), key), st.clone());
        }
    }

    /// Every (app, env, release) with its totals, in order (for `/metrics`).
    pub fn all(&self) -> Vec<(Key, Window)> {
        let mut v: Vec<_> = self
            .totals
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Everything seen of (app, env, release) so far.
    pub fn total(&self, app: &str, env: &str, release: &str) -> Window {
        self.totals
            .get(&(app.to_string(), env.to_string(), release.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

/// `now - base`: the traffic of a window that started at `base`.
pub fn since(now: &Window, base: &Window) -> Window {
    Window {
        requests: now.requests.saturating_sub(base.requests),
        errors: now.errors.saturating_sub(base.errors),
        latency_buckets: now
            .latency_buckets
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(base.latency_buckets.get(i).copied().unwrap_or(0)))
            .collect(),
        latency_sum_us: now.latency_sum_us.saturating_sub(base.latency_sum_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(requests: u64, errors: u64) -> ReleaseStats {
        ReleaseStats {
            app: "web".into(),
            env: String::new(),
            release: "r2".into(),
            requests,
            errors,
            latency_buckets: vec![requests, 0],
            latency_sum_us: requests * 100,
        }
    }

    #[test]
    fn totals_add_differences_across_proxies_and_survive_a_proxy_restart() {
        let mut t = Traffic::default();
        t.record("p1", &[st(10, 1)]);
        t.record("p2", &[st(5, 0)]);
        t.record("p1", &[st(15, 2)]);
        let w = t.total("web", "", "r2");
        assert_eq!(
            (w.requests, w.errors, w.latency_buckets.clone()),
            (20, 2, vec![20, 0])
        );
        // p1 restarts: its counters start over; the total keeps growing.
        t.record("p1", &[st(3, 3)]);
        let w2 = t.total("web", "", "r2");
        assert_eq!((w2.requests, w2.errors), (23, 5));
        let d = since(&w2, &w);
        assert_eq!(
            (d.requests, d.errors, d.latency_buckets),
            (3, 3, vec![3, 0])
        );
        assert_eq!(t.total("web", "staging", "r2"), Window::default());
    }
}
