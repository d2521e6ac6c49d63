//! Service discovery: which instances of an app serve, by set — `stable`
//! (the app's ordinary traffic), `canary` (a new release taking a share of
//! the users) and `preview` (a new release reachable by preview only) —
//! read from the same routing table the proxies get, so apps and proxies
//! never disagree. Two interfaces: the HTTP watch API (`GET
//! /v1/discovery/{app}`, a blocking query on the global index, as Consul's)
//! and DNS ([`serve_dns`]: A and SRV records for
//! `[stable.|canary.|preview.]<app>[.<env>].service.drover`, A records for
//! `<instance>.instance.drover`, the SRV targets).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_api as api;

use crate::api::ApiErr;
use crate::Server;

/// A route's serving instances, by set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sets {
    pub stable: Vec<api::Endpoint>,
    pub canary: Vec<api::Endpoint>,
    pub preview: Vec<api::Endpoint>,
}

/// Which set `which` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Stable,
    Canary,
    Preview,
}

impl Sets {
    pub fn get(&self, which: Which) -> &[api::Endpoint] {
        match which {
            Which::Stable => &self.stable,
            Which::Canary => &self.canary,
            Which::Preview => &self.preview,
        }
    }
}

/// The sets of one route: without a split every upstream is stable; with
/// one, the split's release is the new group — stable once it takes every
/// user (a finished switch), else canary when it takes some and preview
/// when it is previewed — and the rest is stable (the new group too when
/// there is no rest: a request for stable goes to it then).
pub fn sets(route: &api::Route) -> Sets {
    let endpoint = |u: &api::Upstream| api::Endpoint {
        instance: u.instance.clone(),
        release: u.release.clone(),
        address: u.address.clone(),
    };
    let mut out = Sets::default();
    let Some(split) = &route.split else {
        out.stable = route.upstreams.iter().map(endpoint).collect();
        out.stable.sort();
        return out;
    };
    let (new, old): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| u.release == split.release);
    let by_share = split.values.is_empty() && split.proxy_labels.is_empty();
    let switched = by_share && split.weight_permille >= 1000;
    let some_users =
        !split.values.is_empty() || !split.proxy_labels.is_empty() || split.weight_permille > 0;
    let previewed = split.preview_host.is_some() || split.preview_header.is_some();
    let new: Vec<api::Endpoint> = new.into_iter().map(endpoint).collect();
    if switched || old.is_empty() {
        out.stable = new.clone();
    } else {
        out.stable = old.into_iter().map(endpoint).collect();
        if some_users {
            out.canary = new.clone();
        }
    }
    if previewed && !switched {
        out.preview = new;
    }
    out.stable.sort();
    out.canary.sort();
    out.preview.sort();
    out
}

/// The environment a query means: the one named (checked), or the app's
/// last (where `[route] host` points: production).
pub async fn environment(s: &Server, app: &str, env: Option<&str>) -> Result<String, ApiErr> {
    s.store.get_app(app).await?;
    let names = crate::view::current_spec(s, app).await?.env_names();
    match env {
        None => Ok(names.last().cloned().unwrap_or_default()),
        Some(e) if names.iter().any(|n| n == e) => Ok(e.to_string()),
        Some(e) if names == [""] => Err(ApiErr::BadInput(format!(
            "{app} has no environment {e:?}: it has no [environments]; leave env out"
        ))),
        Some(e) => Err(ApiErr::BadInput(format!(
            "{app} has no environment {e:?}; its environments: {}",
            names.join(", ")
        ))),
    }
}

/// The answer of `GET /v1/discovery/{app}` (after any wait).
pub async fn discover(s: &Server, app: &str, env: Option<&str>) -> Result<api::Discovery, ApiErr> {
    let env = environment(s, app, env).await?;
    let table = crate::api::routing_table(s).await?;
    let found = table
        .routes
        .iter()
        .find(|r| r.app == app && r.env == env)
        .map(sets)
        .unwrap_or_default();
    let live_release = s
        .store
        .get_deployment(app, &env)
        .await?
        .and_then(|d| d.live_release);
    Ok(api::Discovery {
        index: table.index,
        app: app.to_string(),
        environment: env,
        live_release,
        stable: found.stable,
        canary: found.canary,
        preview: found.preview,
    })
}

// ---------------------------------------------------------------- DNS ----

/// The DNS zone drover answers for.
pub const ZONE: &str = "drover";

/// What a DNS name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// `[set.]<app>[.<env>].service.drover`.
    Set {
        which: Which,
        app: String,
        env: Option<String>,
    },
    /// `<instance>.instance.drover`: an SRV target.
    Instance(String),
}

/// Parses a query name (any case, with or without the final dot).
pub fn parse_name(name: &str) -> Option<Lookup> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    match labels.as_slice() {
        [instance, "instance", ZONE] => Some(Lookup::Instance(instance.to_string())),
        [rest @ .., "service", ZONE] => {
            let set = |l: &str| match l {
                "stable" => Some(Which::Stable),
                "canary" => Some(Which::Canary),
                "preview" => Some(Which::Preview),
                _ => None,
            };
            let (which, app, env) = match rest {
                [app] => (Which::Stable, *app, None),
                [first, app] if set(first).is_some() => (set(first)?, *app, None),
                [app, env] => (Which::Stable, *app, Some(*env)),
                [first, app, env] => (set(first)?, *app, Some(*env)),
                _ => return None,
            };
            Some(Lookup::Set {
                which,
                app: app.to_string(),
                env: env.map(str::to_string),
            })
        }
        _ => None,
    }
}

/// One answer of a set: an instance's IPv4 address and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub instance: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// The IPv4 address and port of `host:port` (`localhost` is 127.0.0.1;
/// other names and IPv6 have no A record here).
fn target(e: &api::Endpoint) -> Option<Target> {
    let (host, port) = e.address.rsplit_once(':')?;
    let ip = if host == "localhost" {
        Ipv4Addr::LOCALHOST
    } else {
        host.parse().ok()?
    };
    Some(Target {
        instance: e.instance.clone(),
        ip,
        port: port.parse().ok()?,
    })
}

/// What the routing table says about `lookup`: `None` when the name does
/// not exist (NXDOMAIN), else its targets (possibly none).
pub fn resolve(
    table: &api::RoutesResponse,
    last_env: &dyn Fn(&str) -> Option<String>,
    lookup: &Lookup,
) -> Option<Vec<Target>> {
    match lookup {
        Lookup::Instance(id) => table
            .routes
            .iter()
            .flat_map(|r| &r.upstreams)
            .find(|u| &u.instance == id)
            .and_then(|u| {
                target(&api::Endpoint {
                    instance: u.instance.clone(),
                    release: u.release.clone(),
                    address: u.address.clone(),
                })
            })
            .map(|t| vec![t]),
        Lookup::Set { which, app, env } => {
            let env = match env {
                Some(e) => e.clone(),
                None => last_env(app)?,
            };
            let route = table
                .routes
                .iter()
                .find(|r| &r.app == app && r.env == env)?;
            Some(sets(route).get(*which).iter().filter_map(target).collect())
        }
    }
}

const TYPE_A: u16 = 1;
const TYPE_SRV: u16 = 33;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
/// Answers fit a plain UDP message; more set TC.
const MAX_UDP: usize = 512;

/// The reply to one DNS query message, or `None` for a message not worth
/// a reply (too short to hold a header, or itself a reply).
pub fn answer(query: &[u8], resolve: &dyn Fn(&Lookup) -> Option<Vec<Target>>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let id = [query[0], query[1]];
    let rd = query[2] & 0x01;
    let opcode = (query[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    let reply = |rcode: u8, question: &[u8], answers: &[Vec<u8>], extra: &[Vec<u8>], tc: bool| {
        let mut out = Vec::with_capacity(MAX_UDP);
        out.extend_from_slice(&id);
        out.push(0x80 | 0x04 | rd | if tc { 0x02 } else { 0 });
        out.push(rcode);
        out.extend_from_slice(&(u16::from(!question.is_empty())).to_be_bytes());
        out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        out.extend_from_slice(question);
        for r in answers.iter().chain(extra) {
            out.extend_from_slice(r);
        }
        out
    };
    if opcode != 0 {
        return Some(reply(4, &[], &[], &[], false)); // NOTIMP
    }
    if qdcount != 1 {
        return Some(reply(1, &[], &[], &[], false)); // FORMERR
    }
    // The question: labels (no compression in a query), type, class.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 || pos + 1 + len > query.len() || pos > 12 + 255 {
            return Some(reply(1, &[], &[], &[], false));
        }
        labels.push(String::from_utf8_lossy(&query[pos + 1..pos + 1 + len]).into_owned());
        pos += 1 + len;
    }
    if pos + 4 > query.len() {
        return Some(reply(1, &[], &[], &[], false));
    }
    let qtype = u16::from_be_bytes([query[pos], query[pos + 1]]);
    let qclass = u16::from_be_bytes([query[pos + 2], query[pos + 3]]);
    let question = &query[12..pos + 4];
    let name = labels.join(".");
    let Some(lookup) = parse_name(&name) else {
        return Some(reply(3, question, &[], &[], false)); // NXDOMAIN
    };
    let Some(targets) = resolve(&lookup) else {
        return Some(reply(3, question, &[], &[], false));
    };
    if qclass != CLASS_IN && qclass != TYPE_ANY {
        return Some(reply(0, question, &[], &[], false));
    }
    let record = |name: &[u8], rtype: u16, rdata: &[u8]| {
        let mut r = name.to_vec();
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: always ask again
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        r
    };
    const QNAME: [u8; 2] = [0xc0, 12]; // a pointer to the question's name
    let mut answers = Vec::new();
    let mut extra = Vec::new();
    if qtype == TYPE_A || qtype == TYPE_ANY {
        let ips: BTreeSet<Ipv4Addr> = targets.iter().map(|t| t.ip).collect();
        answers.extend(ips.iter().map(|ip| record(&QNAME, TYPE_A, &ip.octets())));
    }
    if (qtype == TYPE_SRV || qtype == TYPE_ANY) && matches!(lookup, Lookup::Set { .. }) {
        for t in &targets {
            let target = encode_name(&format!("{}.instance.{ZONE}", t.instance));
            let mut rdata = Vec::new();
            rdata.extend_from_slice(&1u16.to_be_bytes()); // priority
            rdata.extend_from_slice(&1u16.to_be_bytes()); // weight
            rdata.extend_from_slice(&t.port.to_be_bytes());
            rdata.extend_from_slice(&target);
            answers.push(record(&QNAME, TYPE_SRV, &rdata));
            extra.push(record(&target, TYPE_A, &t.ip.octets()));
        }
    }
    // Too big for UDP: the additional records go first, then answers, and
    // the reply says it was truncated.
    let size = |a: &[Vec<u8>], e: &[Vec<u8>]| {
        12 + question.len() + a.iter().chain(e).map(Vec::len).sum::<usize>()
    };
    let mut tc = false;
    while size(&answers, &extra) > MAX_UDP {
        tc = true;
        if extra.pop().is_none() {
            answers.pop();
        }
    }
    Some(reply(0, question, &answers, &extra, tc))
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.split('.').filter(|l| !l.is_empty()) {
        let l = &l.as_bytes()[..l.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

/// How long a routing table read for DNS is reused while the index stays.
const TABLE_TTL: Duration = Duration::from_secs(1);

/// Answers DNS queries on `socket` until the server shuts down. The table
/// is read again when the index moves or after a second (node leases
/// expire with time).
pub async fn serve_dns(s: Arc<Server>, socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 1500];
    let mut cached: Option<(
        Instant,
        api::RoutesResponse,
        std::collections::HashMap<String, String>,
    )> = None;
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS receive failed");
                    continue;
                }
            },
            _ = s.shutdown.cancelled() => return,
        };
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, t, _)| at.elapsed() < TABLE_TTL && t.index == *s.index.borrow());
        if !fresh {
            match crate::api::routing_table(&s).await {
                Ok(t) => {
                    // Each app's default environment: its last.
                    let mut last = std::collections::HashMap::new();
                    for app in t
                        .routes
                        .iter()
                        .map(|r| r.app.clone())
                        .collect::<BTreeSet<_>>()
                    {
                        if let Ok(spec) = crate::view::current_spec(&s, &app).await {
                            last.insert(app, spec.env_names().pop().unwrap_or_default());
                        }
                    }
                    cached = Some((Instant::now(), t, last));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DNS: cannot read the routing table");
                }
            }
        }
        let Some((_, table, last)) = &cached else {
            continue;
        };
        let last_env = |app: &str| last.get(app).cloned();
        let reply = answer(&buf[..n], &|l| resolve(table, &last_env, l));
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn up(instance: &str, release: &str, address: &str) -> api::Upstream {
        api::Upstream {
            instance: instance.into(),
            release: release.into(),
            address: address.into(),
            weight: 1,
        }
    }

    fn route(split: Option<api::Split>) -> api::Route {
        api::Route {
            app: "web".into(),
            env: "".into(),
            host: "web.localhost".into(),
            upstreams: vec![
                up("web-r1-a", "r1", "10.0.0.1:4000"),
                up("web-r1-b", "r1", "10.0.0.2:4000"),
                up("web-r2-c", "r2", "10.0.0.3:4001"),
            ],
            split,
        }
    }

    fn split(weight: u32, preview: bool) -> api::Split {
        api::Split {
            release: "r2".into(),
            weight_permille: weight,
            key: api::SplitKey::Cookie("u".into()),
            values: vec![],
            preview_host: preview.then(|| "preview.web.localhost".into()),
            preview_header: None,
            proxy_labels: BTreeMap::new(),
        }
    }

    fn names(v: &[api::Endpoint]) -> Vec<&str> {
        v.iter().map(|e| e.instance.as_str()).collect()
    }

    #[test]
    fn sets_follow_the_split() {
        // Rolling: everything is stable.
        let s = sets(&route(None));
        assert_eq!(names(&s.stable), ["web-r1-a", "web-r1-b", "web-r2-c"]);
        assert!(s.canary.is_empty() && s.preview.is_empty());
        // A canary at 10 %.
        let s = sets(&route(Some(split(100, false))));
        assert_eq!(names(&s.stable), ["web-r1-a", "web-r1-b"]);
        assert_eq!(names(&s.canary), ["web-r2-c"]);
        assert!(s.preview.is_empty());
        // Blue/green before the switch: preview only.
        let s = sets(&route(Some(split(0, true))));
        assert_eq!(names(&s.stable), ["web-r1-a", "web-r1-b"]);
        assert!(s.canary.is_empty());
        assert_eq!(names(&s.preview), ["web-r2-c"]);
        // After the switch the new set is stable.
        let s = sets(&route(Some(split(1000, true))));
        assert_eq!(names(&s.stable), ["web-r2-c"]);
        assert!(s.canary.is_empty() && s.preview.is_empty());
    }

    #[test]
    fn names_parse_into_set_app_and_environment() {
        let set = |which, app: &str, env: Option<&str>| Lookup::Set {
            which,
            app: app.into(),
            env: env.map(Into::into),
        };
        assert_eq!(
            parse_name("web.service.drover."),
            Some(set(Which::Stable, "web", None))
        );
        assert_eq!(
            parse_name("Canary.Web.Service.Drover"),
            Some(set(Which::Canary, "web", None))
        );
        assert_eq!(
            parse_name("web.staging.service.drover"),
            Some(set(Which::Stable, "web", Some("staging")))
        );
        assert_eq!(
            parse_name("preview.web.staging.service.drover"),
            Some(set(Which::Preview, "web", Some("staging")))
        );
        assert_eq!(
            parse_name("web-r2-c.instance.drover"),
            Some(Lookup::Instance("web-r2-c".into()))
        );
        for bad in [
            "web.drover",
            "service.drover",
            "a.b.c.d.service.drover",
            "x.example.com",
            "nope.web.x.service.drover",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    /// A query for `name` of `qtype`, id 0x1234, RD set.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(encode_name(name));
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn table() -> api::RoutesResponse {
        api::RoutesResponse {
            index: 7,
            routes: vec![route(Some(split(100, false)))],
        }
    }

    fn ask(name: &str, qtype: u16) -> Vec<u8> {
        let t = table();
        let last = |_: &str| Some(String::new());
        answer(&query(name, qtype), &|l| resolve(&t, &last, l)).unwrap()
    }

    fn counts(r: &[u8]) -> (u8, u16, u16) {
        (
            r[3] & 0x0f,
            u16::from_be_bytes([r[6], r[7]]),
            u16::from_be_bytes([r[10], r[11]]),
        )
    }

    #[test]
    fn a_and_srv_answers_carry_the_sets_addresses_and_ports() {
        let r = ask("web.service.drover", TYPE_A);
        assert_eq!(&r[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(r[2] & 0x80, 0x80, "a reply");
        assert_eq!(counts(&r), (0, 2, 0), "two stable IPs");
        // The last answer's address: 10.0.0.2.
        assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 2]);
        let r = ask("canary.web.service.drover", TYPE_SRV);
        assert_eq!(counts(&r), (0, 1, 1), "one SRV, its target's A");
        let srv_port = 4001u16.to_be_bytes();
        assert!(r.windows(2).any(|w| w == srv_port), "the canary's port");
        assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 3]);
        let r = ask("web-r2-c.instance.drover", TYPE_A);
        assert_eq!(counts(&r), (0, 1, 0));
        // Preview exists but is empty; an unknown app does not exist.
        assert_eq!(
            counts(&ask("preview.web.service.drover", TYPE_A)),
            (0, 0, 0)
        );
        assert_eq!(counts(&ask("shop.service.drover", TYPE_A)).0, 3, "NXDOMAIN");
        assert_eq!(counts(&ask("example.com", TYPE_A)).0, 3);
    }

    #[test]
    fn malformed_queries_get_an_error_or_nothing() {
        assert_eq!(answer(&[0; 5], &|_| None), None, "too short");
        let mut reply = query("web.service.drover", TYPE_A);
        reply[2] |= 0x80;
        assert_eq!(answer(&reply, &|_| None), None, "a reply is not answered");
        let mut two = query("web.service.drover", TYPE_A);
        two[5] = 2;
        assert_eq!(answer(&two, &|_| None).unwrap()[3] & 0x0f, 1, "FORMERR");
        let cut = &query("web.service.drover", TYPE_A)[..20];
        assert_eq!(answer(cut, &|_| None).unwrap()[3] & 0x0f, 1, "FORMERR");
    }

    #[test]
    fn a_reply_too_big_for_udp_is_truncated() {
        let many = api::RoutesResponse {
            index: 1,
            routes: vec![api::Route {
                upstreams: (0..60)
                    .map(|i| {
                        up(
                            &format!("web-r1-{i:06}"),
                            "r1",
                            &format!("10.0.{}.{}:4000", i / 250, i % 250),
                        )
                    })
                    .collect(),
                ..route(None)
            }],
        };
        let last = |_: &str| Some(String::new());
        let r = answer(&query("web.service.drover", TYPE_SRV), &|l| {
            resolve(&many, &last, l)
        })
        .unwrap();
        assert!(r.len() <= MAX_UDP);
        assert_eq!(r[2] & 0x02, 0x02, "TC set");
    }
}
