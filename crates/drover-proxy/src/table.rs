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
//!
//! Traffic splitting: a route may carry a [`drover_api::Split`]. Its upstreams
//! then fall into two groups, *new* (the split's release) and *stable* (every
//! other release), and each request is confined to one [`Group`]:
//! [`crate::split`] decides the side from the request (preview host or header,
//! listed user keys, or the user key's hash bucket against the weight), and
//! [`RouteEntry::group_for`] turns that into a group — the other side when the
//! decided one has no selectable upstream, except for preview requests, which
//! only ever reach the new release. Round robin and retries then run within
//! that group only; the groups are disjoint, so sharing one `current` vector
//! gives each group its own independent rotation. The split's preview host is
//! a second key of the same route in the table. A route without a split is
//! one group ([`Group::All`]) and costs nothing extra.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use drover_api::{RoutesResponse, Upstream};

use crate::split::{Decision, Side, SplitRule};
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
    /// Its group when the route has a split ([`Side::Stable`] otherwise).
    pub side: Side,
    /// Per-(app, env, release) counters this upstream's requests are recorded in.
    pub counters: Arc<ReleaseCounters>,
    /// `release` and `instance` as header values, made once per table
    /// rather than per response (None: not a valid header value).
    pub release_header: Option<http::HeaderValue>,
    pub instance_header: Option<http::HeaderValue>,
}

/// The upstreams of a route a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Every upstream: a route without a split.
    All,
    /// Only the upstreams on one side of the route's split.
    Only(Side),
}

impl Group {
    fn contains(self, u: &UpstreamEntry) -> bool {
        match self {
            Group::All => true,
            Group::Only(side) => u.side == side,
        }
    }
}

/// Everything the proxy knows about one route (its host and, with a split,
/// its preview host).
#[derive(Debug)]
pub struct RouteEntry {
    pub app: String,
    pub upstreams: Vec<UpstreamEntry>,
    /// How traffic is divided between the split's release and the rest.
    pub split: Option<SplitRule>,
    /// Smooth-WRR "current weight" per upstream (same order as `upstreams`).
    current: Mutex<Vec<i64>>,
}

impl RouteEntry {
    fn new(app: String, upstreams: Vec<UpstreamEntry>, split: Option<SplitRule>) -> Self {
        let current = Mutex::new(vec![0; upstreams.len()]);
        RouteEntry {
            app,
            upstreams,
            split,
            current,
        }
    }

    /// True when some upstream of `group` with a positive weight is not in
    /// `tried`.
    pub fn has_untried(&self, group: Group, tried: &[usize]) -> bool {
        self.upstreams
            .iter()
            .enumerate()
            .any(|(i, u)| u.weight > 0 && group.contains(u) && !tried.contains(&i))
    }

    /// True when at least one upstream of `group` may ever be chosen.
    pub fn has_selectable(&self, group: Group) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.weight > 0 && group.contains(u))
    }

    /// The group a request decided by the split goes to: the decided side,
    /// or the other side when the decided one has no selectable upstream.
    /// A preview request never falls back: `None` when the new release has
    /// no selectable upstream. (Both sides empty: the decided side, which
    /// then has nothing to select.)
    pub fn group_for(&self, decision: &Decision) -> Option<Group> {
        let decided = Group::Only(decision.side);
        if decision.preview {
            return self.has_selectable(decided).then_some(decided);
        }
        let other = Group::Only(decision.side.other());
        if !self.has_selectable(decided) && self.has_selectable(other) {
            return Some(other);
        }
        Some(decided)
    }

    /// Picks an upstream of `group` by smooth weighted round robin among
    /// those with a positive weight that are not in `tried`. When every
    /// selectable upstream of the group was tried already, falls back to all
    /// of them (a retry after a stale pooled connection may go to the same
    /// instance again); never to another group. `None` when no upstream of
    /// the group has a positive weight.
    pub fn select(&self, group: Group, tried: &[usize]) -> Option<usize> {
        let eligible = |i: usize, u: &UpstreamEntry, skip_tried: bool| {
            u.weight > 0 && group.contains(u) && !(skip_tried && tried.contains(&i))
        };
        let skip_tried = self.has_untried(group, tried);
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

/// A request [`Table::admit`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Its route, as an index into `Table::routes`.
    pub route: usize,
    /// The route's upstreams it may use.
    pub group: Group,
    /// A `Set-Cookie` value for the response: the split key drawn for a
    /// client that had none.
    pub set_cookie: Option<String>,
}

/// What a host leads to in a [`Table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMatch {
    /// Index into [`Table::routes`].
    pub route: usize,
    /// The host is the route's split preview host.
    pub preview: bool,
}

/// An immutable routing table, as of control-plane index `index`.
#[derive(Debug, Default)]
pub struct Table {
    pub index: u64,
    /// False only for the placeholder installed before the first fetch.
    pub loaded: bool,
    /// Every route, in the control plane's order (duplicates left out).
    pub routes: Vec<RouteEntry>,
    /// Lowercased host without port → route. A route with a split preview
    /// host is here twice: under its host and under its preview host.
    hosts: HashMap<String, HostMatch>,
}

impl Table {
    /// Builds a table from the control plane's answer. Upstreams whose address
    /// cannot be resolved are left out (logged); they could not be reached.
    /// When two routes claim a host (either as host or as preview host), the
    /// first keeps it.
    pub fn build(resp: &RoutesResponse, stats: &Stats) -> Table {
        let mut routes = Vec::with_capacity(resp.routes.len());
        let mut hosts = HashMap::with_capacity(resp.routes.len());
        for route in &resp.routes {
            let host = normalize_host(&route.host);
            if hosts.contains_key(&host) {
                tracing::warn!(
                    host,
                    app = route.app,
                    "duplicate route for host; keeping the first"
                );
                continue;
            }
            let index = routes.len();
            let split = route.split.as_ref();
            if let Some(preview_host) = split.and_then(|s| s.preview_host.as_deref()) {
                let preview_host = normalize_host(preview_host);
                if preview_host == host || hosts.contains_key(&preview_host) {
                    tracing::warn!(
                        host = preview_host,
                        app = route.app,
                        "split preview host is already routed; ignoring it"
                    );
                } else {
                    let m = HostMatch {
                        route: index,
                        preview: true,
                    };
                    hosts.insert(preview_host, m);
                }
            }
            let upstreams = route
                .upstreams
                .iter()
                .filter_map(|u| {
                    let side = match split {
                        Some(s) if u.release == s.release => Side::New,
                        _ => Side::Stable,
                    };
                    build_upstream(&route.app, &route.env, u, side, stats)
                })
                .collect();
            let rule = split.map(|s| SplitRule::new(&host, s));
            let m = HostMatch {
                route: index,
                preview: false,
            };
            hosts.insert(host, m);
            routes.push(RouteEntry::new(route.app.clone(), upstreams, rule));
        }
        Table {
            index: resp.index,
            loaded: true,
            routes,
            hosts,
        }
    }

    /// Looks up an already normalised host (see [`normalize_host`]).
    /// Where a request for `host` goes — its route, the group of upstreams
    /// it may use (its split side), a split cookie to set — or the answer
    /// the proxy gives itself (status and body): both engines admit
    /// requests here.
    pub fn admit<H: crate::split::RequestHeaders + ?Sized>(
        &self,
        host: &str,
        headers: &H,
        random: &mut impl FnMut() -> u64,
    ) -> Result<Admitted, (u16, String)> {
        if !self.loaded {
            return Err((503, "drover: routing table not loaded yet\n".into()));
        }
        let Some(found) = self.lookup(host) else {
            return Err((404, format!("drover: no route for host {host}\n")));
        };
        let route = &self.routes[found.route];
        let mut admitted = Admitted {
            route: found.route,
            group: Group::All,
            set_cookie: None,
        };
        if let Some(split) = &route.split {
            let decision = split.decide(found.preview, headers, random);
            // A preview must never be answered by the stable release.
            admitted.group = route.group_for(&decision).ok_or_else(|| {
                let (app, release) = (&route.app, &split.release);
                let body =
                    format!("drover: no healthy instance of {app} release {release} to preview\n");
                (503, body)
            })?;
            admitted.set_cookie = decision.set_cookie;
        }
        if !route.has_selectable(admitted.group) {
            return Err((
                503,
                format!("drover: no healthy instance of {}\n", route.app),
            ));
        }
        Ok(admitted)
    }

    pub fn lookup(&self, normalized_host: &str) -> Option<HostMatch> {
        self.hosts.get(normalized_host).copied()
    }

    /// Looks a request's host up (any case, port ignored).
    pub fn route(&self, host: &str) -> Option<&RouteEntry> {
        let m = self.lookup(&normalize_host(host))?;
        self.routes.get(m.route)
    }
}

fn build_upstream(
    app: &str,
    env: &str,
    u: &Upstream,
    side: Side,
    stats: &Stats,
) -> Option<UpstreamEntry> {
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
        side,
        counters: stats.counters(app, env, &u.release),
        release_header: http::HeaderValue::from_str(&u.release).ok(),
        instance_header: http::HeaderValue::from_str(&u.instance).ok(),
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
    use drover_api::{Route, Split, SplitKey};

    const ALL: Group = Group::All;

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
        let picks: Vec<usize> = (0..6).map(|_| r.select(ALL, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_and_zero_weight() {
        let t = table(1, vec![up("a", 1, 3), up("b", 2, 1), up("z", 3, 0)]);
        let r = t.route("hello.localhost").unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..400 {
            counts[r.select(ALL, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn smooth_interleaving() {
        // nginx's example: weights 5,1,1 → a a b a c a a
        let t = table(1, vec![up("a", 1, 5), up("b", 2, 1), up("c", 3, 1)]);
        let r = t.route("hello.localhost").unwrap();
        let picks: Vec<usize> = (0..7).map(|_| r.select(ALL, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn selection_skips_tried() {
        let t = table(1, vec![up("a", 1, 1), up("b", 2, 1), up("c", 3, 1)]);
        let r = t.route("hello.localhost").unwrap();
        for _ in 0..10 {
            let p = r.select(ALL, &[0, 2]).unwrap();
            assert_eq!(p, 1);
        }
        assert!(r.has_untried(ALL, &[0, 2]));
        assert!(!r.has_untried(ALL, &[0, 1, 2]));
        // Everything tried: fall back to any selectable upstream.
        assert!(r.select(ALL, &[0, 1, 2]).is_some());
    }

    #[test]
    fn nothing_selectable() {
        let t = table(1, vec![up("z", 1, 0)]);
        let r = t.route("hello.localhost").unwrap();
        assert!(!r.has_selectable(ALL));
        assert_eq!(r.select(ALL, &[]), None);
        let empty = table(2, vec![]);
        assert_eq!(
            empty.route("hello.localhost").unwrap().select(ALL, &[]),
            None
        );
    }

    fn release_up(instance: &str, release: &str, port: u16, weight: u32) -> Upstream {
        Upstream {
            release: release.into(),
            ..up(instance, port, weight)
        }
    }

    /// A route "hello.localhost" splitting `upstreams` towards r2, with
    /// preview host "Preview.Hello.Localhost:8080".
    fn split_table(upstreams: Vec<Upstream>) -> Table {
        let resp = RoutesResponse {
            index: 1,
            routes: vec![Route {
                app: "hello".into(),
                env: "production".into(),
                host: "hello.localhost".into(),
                upstreams,
                split: Some(Split {
                    release: "r2".into(),
                    weight_permille: 100,
                    key: SplitKey::Header("x-user".into()),
                    values: vec![],
                    preview_host: Some("Preview.Hello.Localhost:8080".into()),
                    preview_header: Some("x-drover-preview".into()),
                    proxy_labels: Default::default(),
                }),
            }],
        };
        Table::build(&resp, &Stats::default())
    }

    fn decision(side: Side, preview: bool) -> Decision {
        Decision {
            side,
            preview,
            set_cookie: None,
        }
    }

    const NEW: Group = Group::Only(Side::New);
    const STABLE: Group = Group::Only(Side::Stable);

    #[test]
    fn split_groups_upstreams_by_release() {
        let t = split_table(vec![
            release_up("s1", "r1", 1, 1),
            release_up("n1", "r2", 2, 1),
            release_up("s2", "r0", 3, 1),
            release_up("n2", "r2", 4, 1),
        ]);
        let r = t.route("hello.localhost").unwrap();
        assert_eq!(r.split.as_ref().unwrap().release, "r2");
        let sides: Vec<Side> = r.upstreams.iter().map(|u| u.side).collect();
        // Stable is every release but the split's, not just one.
        assert_eq!(sides, [Side::Stable, Side::New, Side::Stable, Side::New]);
        // Each group rotates on its own, never leaving the group.
        let new: Vec<usize> = (0..4).map(|_| r.select(NEW, &[]).unwrap()).collect();
        assert_eq!(new, [1, 3, 1, 3]);
        let stable: Vec<usize> = (0..4).map(|_| r.select(STABLE, &[]).unwrap()).collect();
        assert_eq!(stable, [0, 2, 0, 2]);
    }

    #[test]
    fn split_preview_host_is_the_same_route() {
        let t = split_table(vec![release_up("n1", "r2", 2, 1)]);
        assert_eq!(
            t.lookup("hello.localhost"),
            Some(HostMatch {
                route: 0,
                preview: false
            })
        );
        assert_eq!(
            t.lookup("preview.hello.localhost"),
            Some(HostMatch {
                route: 0,
                preview: true
            })
        );
        assert!(std::ptr::eq(
            t.route("PREVIEW.hello.localhost:443").unwrap(),
            t.route("hello.localhost").unwrap()
        ));
        assert_eq!(t.routes.len(), 1);
    }

    #[test]
    fn split_preview_host_never_takes_another_routes_host() {
        let mut resp = RoutesResponse {
            index: 1,
            routes: vec![
                Route {
                    app: "other".into(),
                    env: String::new(),
                    host: "taken.localhost".into(),
                    upstreams: vec![up("o", 1, 1)],
                    split: None,
                },
                Route {
                    app: "hello".into(),
                    env: String::new(),
                    host: "hello.localhost".into(),
                    upstreams: vec![release_up("n1", "r2", 2, 1)],
                    split: Some(Split {
                        release: "r2".into(),
                        weight_permille: 0,
                        key: SplitKey::Cookie("k".into()),
                        values: vec![],
                        preview_host: Some("taken.localhost".into()),
                        preview_header: None,
                        proxy_labels: Default::default(),
                    }),
                },
            ],
        };
        let t = Table::build(&resp, &Stats::default());
        assert_eq!(t.route("taken.localhost").unwrap().app, "other");
        assert!(!t.lookup("taken.localhost").unwrap().preview);
        assert_eq!(t.route("hello.localhost").unwrap().app, "hello");
        // A later route whose host is an earlier preview host is left out.
        resp.routes.reverse();
        let t = Table::build(&resp, &Stats::default());
        assert_eq!(t.route("taken.localhost").unwrap().app, "hello");
        assert!(t.lookup("taken.localhost").unwrap().preview);
        assert_eq!(t.routes.len(), 1);
    }

    #[test]
    fn split_decided_side_is_used_when_it_has_instances() {
        let t = split_table(vec![
            release_up("s1", "r1", 1, 1),
            release_up("n1", "r2", 2, 1),
        ]);
        let r = t.route("hello.localhost").unwrap();
        assert_eq!(r.group_for(&decision(Side::New, false)), Some(NEW));
        assert_eq!(r.group_for(&decision(Side::Stable, false)), Some(STABLE));
        assert_eq!(r.group_for(&decision(Side::New, true)), Some(NEW));
    }

    #[test]
    fn split_falls_back_to_the_other_group_but_preview_never_does() {
        // New release not started yet (or only at weight 0): new → stable.
        let t = split_table(vec![
            release_up("s1", "r1", 1, 1),
            release_up("n0", "r2", 2, 0),
        ]);
        let r = t.route("hello.localhost").unwrap();
        assert_eq!(r.group_for(&decision(Side::New, false)), Some(STABLE));
        assert_eq!(r.group_for(&decision(Side::Stable, false)), Some(STABLE));
        assert_eq!(r.group_for(&decision(Side::New, true)), None);
        // Stable gone (everything moved to the new release): stable → new.
        let t = split_table(vec![release_up("n1", "r2", 2, 1)]);
        let r = t.route("hello.localhost").unwrap();
        assert_eq!(r.group_for(&decision(Side::Stable, false)), Some(NEW));
        assert_eq!(r.group_for(&decision(Side::New, true)), Some(NEW));
        // Nothing at all: the decided group, which has nothing to select.
        let t = split_table(vec![]);
        let r = t.route("hello.localhost").unwrap();
        assert_eq!(r.group_for(&decision(Side::New, false)), Some(NEW));
        assert_eq!(r.select(NEW, &[]), None);
    }

    #[test]
    fn split_retries_stay_in_the_group() {
        let t = split_table(vec![
            release_up("s1", "r1", 1, 1),
            release_up("n1", "r2", 2, 1),
            release_up("n2", "r2", 3, 1),
        ]);
        let r = t.route("hello.localhost").unwrap();
        // n1 tried: n2 is the only untried new upstream, s1 is never offered.
        assert!(r.has_untried(NEW, &[1]));
        for _ in 0..5 {
            assert_eq!(r.select(NEW, &[1]), Some(2));
        }
        // Both new upstreams tried: no untried one left in the group, though
        // stable has one; a further attempt reuses a new upstream.
        assert!(!r.has_untried(NEW, &[1, 2]));
        assert!(r.has_untried(ALL, &[1, 2]));
        for _ in 0..5 {
            assert!(matches!(r.select(NEW, &[1, 2]), Some(1 | 2)));
        }
        assert_eq!(r.select(STABLE, &[0]), Some(0));
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
