//! End-to-end tests of traffic splitting through the real proxy process: a
//! stable group (two instances of r1) and a new group (two instances of r2),
//! each backend answering with its release name, behind `drover-proxy-dev`
//! fed by a stand-in control plane (see `common`).
//!
//! The expected side of every user key is computed with the same
//! `drover_api::split_bucket` the proxy uses, so the checks are exact: a
//! canary share, stickiness of a user, a listed segment, blue/green preview
//! (host and header, 503 rather than stable when the new group is empty) and
//! the sticky cookie the proxy issues to clients without a key, and retries
//! that stay in the chosen group.

mod common;

for_each_engine!(
    canary_sends_each_user_where_its_bucket_says,
    a_user_always_reaches_the_same_release,
    only_the_listed_users_reach_the_new_release,
    preview_reaches_only_the_new_release_and_never_stable,
    clients_without_a_cookie_get_one_and_stick_to_their_release,
    retries_after_a_failed_connect_stay_in_the_chosen_group
);

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use common::{serve, Harness, Reply};
use drover_api::{split_bucket, Route, RoutesResponse, Split, SplitKey, Upstream};

const HOST: &str = "hello.localhost";
const STABLE: &str = "r1";
const NEW: &str = "r2";

/// A backend that answers every request with its release name.
async fn release_backend(release: &'static str) -> SocketAddr {
    serve(Router::new().route("/", get(move || async move { release }))).await
}

/// The four instances: `s-1`, `s-2` of r1 and `n-1`, `n-2` of r2.
struct Backends {
    stable: Vec<Upstream>,
    new: Vec<Upstream>,
}

impl Backends {
    async fn start() -> Backends {
        let mut stable = Vec::new();
        let mut new = Vec::new();
        for i in 1..=2 {
            stable.push(upstream(
                &format!("s-{i}"),
                STABLE,
                release_backend(STABLE).await,
            ));
            new.push(upstream(&format!("n-{i}"), NEW, release_backend(NEW).await));
        }
        Backends { stable, new }
    }

    /// Both groups, interleaved as a control plane might list them.
    fn all(&self) -> Vec<Upstream> {
        self.stable
            .iter()
            .zip(&self.new)
            .flat_map(|(s, n)| [s.clone(), n.clone()])
            .collect()
    }
}

fn upstream(instance: &str, release: &str, addr: SocketAddr) -> Upstream {
    Upstream {
        instance: instance.into(),
        release: release.into(),
        address: addr.to_string(),
        weight: 1,
    }
}

fn routes(index: u64, upstreams: Vec<Upstream>, split: Split) -> RoutesResponse {
    RoutesResponse {
        index,
        routes: vec![Route {
            app: "hello".into(),
            env: "production".into(),
            host: HOST.into(),
            upstreams,
            split: Some(split),
        }],
    }
}

/// A split towards r2 at `weight_permille`, keyed by the `x-user` header.
fn by_user_header(weight_permille: u32) -> Split {
    Split {
        release: NEW.into(),
        weight_permille,
        key: SplitKey::Header("x-user".into()),
        values: vec![],
        preview_host: None,
        preview_header: None,
        proxy_labels: Default::default(),
    }
}

/// The release `key` must reach at `weight_permille`.
fn expected(key: &str, weight_permille: u32) -> &'static str {
    if split_bucket(key) < weight_permille {
        NEW
    } else {
        STABLE
    }
}

/// The release that answered, checked against drover's response header.
fn answered(r: &Reply) -> &str {
    assert_eq!(r.status, 200, "body: {}", r.body);
    assert_eq!(
        r.header("x-drover-release"),
        r.body,
        "release header vs body"
    );
    r.body.as_str()
}

async fn canary_sends_each_user_where_its_bucket_says(engine: &str) {
    let backends = Backends::start().await;
    let h = Harness::start(
        engine,
        "split-canary",
        routes(1, backends.all(), by_user_header(250)),
    )
    .await;

    let mut per_release: BTreeMap<String, u64> = BTreeMap::new();
    let mut instances = HashSet::new();
    for i in 0..1000 {
        let user = format!("user-{i}");
        let r = h.get(HOST, &[("x-user", &user)]).await;
        assert_eq!(answered(&r), expected(&user, 250), "{user}");
        *per_release.entry(r.body.clone()).or_default() += 1;
        instances.insert(r.header("x-drover-instance").to_string());
    }
    let to_new = (0..1000)
        .filter(|i| expected(&format!("user-{i}"), 250) == NEW)
        .count() as u64;
    assert_eq!(per_release.get(NEW).copied().unwrap_or(0), to_new);
    // About a quarter, and both instances of each group served.
    assert!(
        (200..=300).contains(&to_new),
        "{to_new} of 1000 users on r2"
    );
    assert_eq!(instances.len(), 4, "{instances:?}");

    // Stats are kept per release actually used.
    h.cp.wait_report("stats for 1000 requests", |r| {
        let count = |release: &str| {
            r.stats
                .iter()
                .find(|s| s.app == "hello" && s.env == "production" && s.release == release)
                .map_or(0, |s| s.requests)
        };
        count(NEW) == to_new && count(STABLE) == 1000 - to_new
    })
    .await;
}

async fn a_user_always_reaches_the_same_release(engine: &str) {
    let backends = Backends::start().await;
    let h = Harness::start(
        engine,
        "split-sticky",
        routes(1, backends.all(), by_user_header(500)),
    )
    .await;

    let users: Vec<String> = (0..50).map(|i| format!("sticky-{i}")).collect();
    let mut first: BTreeMap<&str, String> = BTreeMap::new();
    // Round after round, so each user's requests are interleaved with the
    // others' and round robin has moved on in between.
    for round in 0..10 {
        for user in &users {
            let r = h.get(HOST, &[("x-user", user)]).await;
            let release = answered(&r).to_string();
            let was = first.entry(user).or_insert_with(|| release.clone());
            assert_eq!(*was, release, "{user} flipped in round {round}");
        }
    }
    for (user, release) in &first {
        assert_eq!(release, expected(user, 500), "{user}");
    }
    let sides: HashSet<&String> = first.values().collect();
    assert_eq!(
        sides.len(),
        2,
        "50 users at 500 per mille land on both sides"
    );
}

async fn only_the_listed_users_reach_the_new_release(engine: &str) {
    let backends = Backends::start().await;
    let listed = ["alice", "bob", "user-7"];
    let split = Split {
        // The weight is ignored once users are listed.
        values: listed.iter().map(|s| s.to_string()).collect(),
        ..by_user_header(1000)
    };
    let h = Harness::start(engine, "split-segment", routes(1, backends.all(), split)).await;

    let mut users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    users.extend(["alice", "bob", "carol", "Alice", "alice2"].map(String::from));
    let mut reached_new = Vec::new();
    for user in &users {
        let r = h.get(HOST, &[("x-user", user)]).await;
        if answered(&r) == NEW {
            reached_new.push(user.as_str());
        }
    }
    reached_new.sort_unstable();
    assert_eq!(reached_new, ["alice", "bob", "user-7"]);
    // No key at all: stable.
    for _ in 0..10 {
        assert_eq!(answered(&h.get(HOST, &[]).await), STABLE);
    }
}

async fn preview_reaches_only_the_new_release_and_never_stable(engine: &str) {
    let backends = Backends::start().await;
    let split = |weight_permille| Split {
        preview_host: Some("preview.hello.localhost".into()),
        preview_header: Some("x-drover-preview".into()),
        ..by_user_header(weight_permille)
    };
    let h = Harness::start(engine, "split-preview", routes(1, backends.all(), split(0))).await;

    for i in 0..10 {
        let user = format!("user-{i}");
        // Weight 0: normal traffic stays on stable...
        assert_eq!(answered(&h.get(HOST, &[("x-user", &user)]).await), STABLE);
        // ...the preview host (any case, any port) reaches only new...
        let r = h
            .get("Preview.Hello.Localhost:8080", &[("x-user", &user)])
            .await;
        assert_eq!(answered(&r), NEW);
        // ...and so does the preview header on the normal host.
        let r = h
            .get(HOST, &[("x-user", &user), ("x-drover-preview", "1")])
            .await;
        assert_eq!(answered(&r), NEW);
        // An empty preview header is no preview.
        let r = h
            .get(HOST, &[("x-user", &user), ("x-drover-preview", "")])
            .await;
        assert_eq!(answered(&r), STABLE);
    }

    // The new release loses its instances; even at weight 1000, normal
    // requests fall back to stable, while previews get a 503, never stable.
    h.cp.apply(routes(2, backends.stable.clone(), split(1000)))
        .await;
    for i in 0..10 {
        let user = format!("user-{i}");
        assert_eq!(answered(&h.get(HOST, &[("x-user", &user)]).await), STABLE);
        for r in [
            h.get("preview.hello.localhost", &[("x-user", &user)]).await,
            h.get(HOST, &[("x-drover-preview", "yes")]).await,
        ] {
            assert_eq!(r.status, 503, "body: {}", r.body);
            assert_eq!(
                r.body,
                "drover: no healthy instance of hello release r2 to preview\n"
            );
        }
    }
}

async fn clients_without_a_cookie_get_one_and_stick_to_their_release(engine: &str) {
    let backends = Backends::start().await;
    let split = Split {
        key: SplitKey::Cookie("drover_key".into()),
        ..by_user_header(500)
    };
    let h = Harness::start(engine, "split-cookie", routes(1, backends.all(), split)).await;

    let mut sides = HashSet::new();
    let mut keys = HashSet::new();
    for client in 0..40 {
        // First visit: no drover_key (maybe other cookies) → one is issued.
        let first = if client % 2 == 0 {
            h.get(HOST, &[]).await
        } else {
            h.get(HOST, &[("cookie", "theme=dark")]).await
        };
        let release = answered(&first).to_string();
        let set_cookie = first.header("set-cookie").to_string();
        let key = set_cookie
            .strip_prefix("drover_key=")
            .and_then(|rest| rest.strip_suffix("; Path=/; HttpOnly; SameSite=Lax"))
            .unwrap_or_else(|| panic!("client {client}: unexpected Set-Cookie {set_cookie:?}"))
            .to_string();
        assert!(!key.is_empty() && !key.contains(';'), "{key:?}");
        assert!(keys.insert(key.clone()), "key {key} issued twice");
        assert_eq!(release, expected(&key, 500), "client {client}, key {key}");
        sides.insert(release.clone());

        // Coming back with it: always the same release, no new cookie.
        let cookie = format!("theme=dark; drover_key={key}; lang=en");
        for visit in 0..10 {
            let r = h.get(HOST, &[("cookie", &cookie)]).await;
            assert_eq!(answered(&r), release, "client {client}, visit {visit}");
            assert!(r.headers.get("set-cookie").is_none(), "cookie re-issued");
        }
    }
    assert_eq!(
        sides.len(),
        2,
        "40 clients at 500 per mille land on both sides"
    );
}

async fn retries_after_a_failed_connect_stay_in_the_chosen_group(engine: &str) {
    let backends = Backends::start().await;
    let dead: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let split = Split {
        preview_header: Some("x-drover-preview".into()),
        ..by_user_header(0)
    };
    // The new group: a dead instance and a live one.
    let mut upstreams = vec![upstream("n-dead", NEW, dead), backends.new[0].clone()];
    upstreams.extend(backends.stable.iter().cloned());
    let h = Harness::start(engine, "split-retry", routes(1, upstreams, split.clone())).await;
    for _ in 0..10 {
        let r = h.get(HOST, &[("x-drover-preview", "1")]).await;
        assert_eq!(answered(&r), NEW);
        assert_eq!(r.header("x-drover-instance"), "n-1");
    }

    // Only the dead one left in the new group: the preview fails rather than
    // being retried on stable; normal traffic is unaffected.
    let mut upstreams = vec![upstream("n-dead", NEW, dead)];
    upstreams.extend(backends.stable.iter().cloned());
    h.cp.apply(routes(2, upstreams, split)).await;
    for _ in 0..5 {
        let r = h.get(HOST, &[("x-drover-preview", "1")]).await;
        assert_eq!(r.status, 502, "body: {}", r.body);
        assert_ne!(r.body, STABLE);
        assert_eq!(answered(&h.get(HOST, &[("x-user", "u")]).await), STABLE);
    }
}
