//! The routing table: an immutable snapshot of the control plane's routes,
//! swapped atomically, plus the drain bookkeeping built on top of it.
//!
//! A [`Table`] is built once from a [`RoutesResponse`] and never changes. The
//! proxy keeps the current one in a [`Tables`] holder (an `ArcSwap`). Every
//! request takes a strong `Arc<Table>` when it starts and keeps it until it
//! ends, and picks its upstream only from that table. [`Tables`] also keeps a
//! weak reference to every table it ever installed, so it can tell the oldest
//! table index still referenced by an in-flight request
//! ([`Tables::oldest_live_index`]): the control plane stops an instance removed
//! at index `I` only once every proxy reports `oldest_live_index >= I`.
//!
//! Upstream selection is smooth weighted round robin (nginx's algorithm) over
//! the upstreams of a route that the request has not tried yet; weight 0 means
//! "never". The little mutable selection state lives in a per-route mutex held
//! for a few instructions.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use drover_api::{RoutesResponse, Upstream};

use crate::stats::{ReleaseCounters, Stats};

/// Most upstream attempts a single request may make (first try included).
pub const MAX_TRIES: usize = 3;

/// One routable instance, resolved and tied to its release's counters.
#[derive(Debug)]
pub struct UpstreamEntry {
    pub instance: String,
    pub release: String,
    /// The address as the control plane sent it (`host:port`).
    pub address: String,
    /// `address` resolved once when the table was built.
    pub socket_addr: SocketAddr,
    pub weight: u32,
    /// Per-(app, env, release) counters this upstream's requests are recorded in.
    pub counters: Arc<ReleaseCounters>,
}

/// Everything the proxy knows about one host.
#[derive(Debug)]
pub struct RouteEntry {
    pub app: String,
    pub upstreams: Vec<UpstreamEntry>,
    /// Smooth-WRR "current weight" per upstream (same order as `upstreams`).
    current: Mutex<Vec<i64>>,
}

impl RouteEntry {
    fn new(app: String, upstreams: Vec<UpstreamEntry>) -> Self {
        let current = Mutex::new(vec![0; upstreams.len()]);
        RouteEntry {
            app,
            upstreams,
            current,
        }
    }

    /// True when some upstream with a positive weight is not in `tried`.
    pub fn has_untried(&self, tried: &[usize]) -> bool {
        self.upstreams
            .iter()
            .enumerate()
            .any(|(i, u)| u.weight > 0 && !tried.contains(&i))
    }

    /// True when at least one upstream may ever be chosen.
    pub fn has_selectable(&self) -> bool {
        self.upstreams.iter().any(|u| u.weight > 0)
    }

    /// Picks an upstream by smooth weighted round robin among those with a
    /// positive weight that are not in `tried`. When every selectable upstream
    /// was tried already, falls back to all of them (a retry after a stale
    /// pooled connection may go to the same instance again). `None` when no
    /// upstream has a positive weight.
    pub fn select(&self, tried: &[usize]) -> Option<usize> {
        let eligible = |i: usize, u: &UpstreamEntry, skip_tried: bool| {
            u.weight > 0 && !(skip_tried && tried.contains(&i))
        };
        let skip_tried = self.has_untried(tried);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, u) in self.upstreams.iter().enumerate() {
            if !eligible(i, u, skip_tried) {
                continue;
            }
            let w = i64::from(u.weight);
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }
}

/// An immutable routing table, as of control-plane index `index`.
#[derive(Debug, Default)]
pub struct Table {
    pub index: u64,
    /// False only for the placeholder installed before the first fetch.
    pub loaded: bool,
    /// Keyed by lowercased host without port.
    pub routes_by_host: HashMap<String, RouteEntry>,
}

impl Table {
    /// Builds a table from the control plane's answer. Upstreams whose address
    /// cannot be resolved are left out (logged); they could not be reached.
    pub fn build(resp: &RoutesResponse, stats: &Stats) -> Table {
        let mut routes_by_host = HashMap::with_capacity(resp.routes.len());
        for route in &resp.routes {
            let upstreams = route
                .upstreams
                .iter()
                .filter_map(|u| build_upstream(&route.app, &route.env, u, stats))
                .collect();
            let host = normalize_host(&route.host);
            if routes_by_host.contains_key(&host) {
                tracing::warn!(
                    host,
                    app = route.app,
                    "duplicate route for host; keeping the first"
                );
                continue;
            }
            routes_by_host.insert(host, RouteEntry::new(route.app.clone(), upstreams));
        }
        Table {
            index: resp.index,
            loaded: true,
            routes_by_host,
        }
    }

    /// Looks a request's host up (any case, port ignored).
    pub fn route(&self, host: &str) -> Option<&RouteEntry> {
        self.routes_by_host.get(&normalize_host(host))
    }
}

fn build_upstream(app: &str, env: &str, u: &Upstream, stats: &Stats) -> Option<UpstreamEntry> {
    let socket_addr = match resolve(&u.address) {
        Some(a) => a,
        None => {
            tracing::warn!(
                instance = u.instance,
                address = u.address,
                "cannot resolve upstream address; leaving it out"
            );
            return None;
        }
    };
    Some(UpstreamEntry {
        instance: u.instance.clone(),
        release: u.release.clone(),
        address: u.address.clone(),
        socket_addr,
        weight: u.weight,
        counters: stats.counters(app, env, &u.release),
    })
}

fn resolve(address: &str) -> Option<SocketAddr> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Some(a);
    }
    address.to_socket_addrs().ok()?.next()
}

/// Lowercases a host and strips a port (`Example.COM:8080` → `example.com`,
/// `[::1]:80` → `[::1]`), and a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        // IPv6 literal: keep up to the closing bracket.
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// Holder of the current table and the registry of every table installed.
pub struct Tables {
    current: ArcSwap<Table>,
    registry: Mutex<Vec<(u64, Weak<Table>)>>,
}

impl Default for Tables {
    fn default() -> Self {
        Self::new()
    }
}

impl Tables {
    /// Starts with an empty, not-yet-loaded table at index 0.
    pub fn new() -> Self {
        let first = Arc::new(Table::default());
        Tables {
            registry: Mutex::new(vec![(first.index, Arc::downgrade(&first))]),
            current: ArcSwap::new(first),
        }
    }

    /// The table new requests use, as a strong reference the caller keeps
    /// for the whole request.
    pub fn load(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// Index of the table new requests use.
    pub fn applied_index(&self) -> u64 {
        self.current.load().index
    }

    /// Installs a new table. It is registered before it becomes visible, so
    /// any request that can hold it is counted by [`Self::oldest_live_index`].
    pub fn install(&self, table: Table) {
        let table = Arc::new(table);
        {
            let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            reg.retain(|(_, w)| w.strong_count() > 0);
            reg.push((table.index, Arc::downgrade(&table)));
        }
        // The old table stays alive for as long as in-flight requests hold it.
        self.current.store(table);
    }

    /// The smallest index among tables still referenced (by the holder or
    /// by in-flight requests); the current index when nothing else is.
    pub fn oldest_live_index(&self) -> u64 {
        let current = self.applied_index();
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|(_, w)| w.strong_count() > 0);
        reg.iter().map(|(i, _)| *i).min().unwrap_or(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::Route;

    fn up(instance: &str, port: u16, weight: u32) -> Upstream {
        Upstream {
            instance: instance.into(),
            release: "r1".into(),
            address: format!("127.0.0.1:{port}"),
            weight,
        }
    }

    fn table(index: u64, upstreams: Vec<Upstream>) -> Table {
        let resp = RoutesResponse {
            index,
            routes: vec![Route {
                app: "hello".into(),
                env: String::new(),
                host: "Hello.Localhost".into(),
                upstreams,
                split: None,
            }],
        };
        Table::build(&resp, &Stats::default())
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM"), "example.com");
        assert_eq!(normalize_host("example.com:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1:80"), "127.0.0.1");
        let t = table(1, vec![up("a", 1, 1)]);
        assert!(t.route("hello.localhost").is_some());
        assert!(t.route("HELLO.localhost:8080").is_some());
        assert!(t.route("other.localhost").is_none());
    }

    #[test]
    fn round_robin_equal_weights() {
        let t = table(1, vec![up("a", 1, 1), up("b", 2, 1), up("c", 3, 1)]);
        let r = t.route("hello.localhost").unwrap();
        let picks: Vec<usize> = (0..6).map(|_| r.select(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_and_zero_weight() {
        let t = table(1, vec![up("a", 1, 3), up("b", 2, 1), up("z", 3, 0)]);
        let r = t.route("hello.localhost").unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..400 {
            counts[r.select(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn smooth_interleaving() {
        // nginx's example: weights 5,1,1 → a a b a c a a
        let t = table(1, vec![up("a", 1, 5), up("b", 2, 1), up("c", 3, 1)]);
        let r = t.route("hello.localhost").unwrap();
        let picks: Vec<usize> = (0..7).map(|_| r.select(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn selection_skips_tried() {
        let t = table(1, vec![up("a", 1, 1), up("b", 2, 1), up("c", 3, 1)]);
        let r = t.route("hello.localhost").unwrap();
        for _ in 0..10 {
            let p = r.select(&[0, 2]).unwrap();
            assert_eq!(p, 1);
        }
        assert!(r.has_untried(&[0, 2]));
        assert!(!r.has_untried(&[0, 1, 2]));
        // Everything tried: fall back to any selectable upstream.
        assert!(r.select(&[0, 1, 2]).is_some());
    }

    #[test]
    fn nothing_selectable() {
        let t = table(1, vec![up("z", 1, 0)]);
        let r = t.route("hello.localhost").unwrap();
        assert!(!r.has_selectable());
        assert_eq!(r.select(&[]), None);
        let empty = table(2, vec![]);
        assert_eq!(empty.route("hello.localhost").unwrap().select(&[]), None);
    }

    #[test]
    fn oldest_live_index_follows_arcs() {
        let tables = Tables::new();
        assert!(!tables.load().loaded);
        tables.install(table(5, vec![up("a", 1, 1)]));
        assert_eq!(tables.oldest_live_index(), 5);
        let held5 = tables.load();
        tables.install(table(7, vec![up("b", 2, 1)]));
        let held7 = tables.load();
        tables.install(table(9, vec![]));
        assert_eq!(tables.applied_index(), 9);
        assert_eq!(tables.oldest_live_index(), 5);
        drop(held5);
        assert_eq!(tables.oldest_live_index(), 7);
        drop(held7);
        assert_eq!(tables.oldest_live_index(), 9);
        // A request holding the current table does not lower it.
        let cur = tables.load();
        assert_eq!(tables.oldest_live_index(), 9);
        drop(cur);
        assert_eq!(tables.registry.lock().unwrap().len(), 1);
    }
}
