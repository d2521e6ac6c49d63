//! Traffic splitting: which side of a route's [`Split`] a request belongs to.
//!
//! A route with a split has two groups of upstreams: *new* (the instances of
//! `split.release`) and *stable* (all the others). This module only decides
//! the side, from the request's headers; the table ([`crate::table`]) then
//! balances within the group and falls back to the other group when the
//! decided one has no instance. The decision, in order:
//!
//! 1. *Preview* — the request came in on `preview_host`, or carries
//!    `preview_header` with a non-empty value: new, and only new.
//! 2. *Segment* — `values` is non-empty: new iff the request's user key is
//!    listed (no key: stable).
//! 3. *Share* — the key is present: new iff
//!    [`split_bucket`]`(key) < weight_permille`. Deterministic, so a user
//!    always lands on the same side, on every proxy and after restarts.
//! 4. *No key* — cookie source, weight strictly between 0 and 1000: draw a
//!    random key, decide by its bucket, and hand it back in a `Set-Cookie` so
//!    the client sticks from its next request on. Otherwise (header source,
//!    or a weight of 0 or 1000) decide this request alone, at random with
//!    probability `weight_permille / 1000`.
//!
//! A split by *proxy labels* (partial deployment by node label) is resolved
//! before all this, when a table arrives ([`localize`]): this proxy either
//! has the labels (everyone to new) or not (everyone to stable).
//!
//! Everything here is built once per routing table ([`SplitRule::new`]) and
//! then only read; deciding allocates nothing except the `Set-Cookie` value
//! of a newly drawn key. Headers are read through [`RequestHeaders`], so
//! either engine's request representation (an `http::HeaderMap`, or the
//! h1 engine's parsed header slice) can be decided on without a copy.

use std::collections::{BTreeMap, HashSet};

use drover_api::{split_bucket, RoutesResponse, Split, SplitKey};
use http::{HeaderMap, HeaderName};

/// Read access to a request's header fields, whatever holds them.
pub trait RequestHeaders {
    /// Calls `f` on each value of header `name` (a lowercase name, matched
    /// ASCII case-insensitively), in order, until it returns `Some`.
    fn find_map<'h, T>(&'h self, name: &str, f: impl FnMut(&'h [u8]) -> Option<T>) -> Option<T>;
}

impl RequestHeaders for HeaderMap {
    fn find_map<'h, T>(
        &'h self,
        name: &str,
        mut f: impl FnMut(&'h [u8]) -> Option<T>,
    ) -> Option<T> {
        self.get_all(name).iter().find_map(|v| f(v.as_bytes()))
    }
}

/// Resolves the splits that go by proxy labels for this proxy: with all
/// the labels, every user goes to the new release; without, none does
/// (preview requests still do). Other splits are left as they are.
pub fn localize(resp: &mut RoutesResponse, own: &BTreeMap<String, String>) {
    for split in resp.routes.iter_mut().filter_map(|r| r.split.as_mut()) {
        if split.proxy_labels.is_empty() {
            continue;
        }
        let ours = split
            .proxy_labels
            .iter()
            .all(|(k, v)| own.get(k) == Some(v));
        split.weight_permille = if ours { 1000 } else { 0 };
        split.values.clear();
        split.proxy_labels.clear();
    }
}

/// The two groups of a split route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Every upstream whose release is not the split's release.
    Stable,
    /// The upstreams of the split's release.
    New,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Stable => Side::New,
            Side::New => Side::Stable,
        }
    }
}

/// Where a request's user key comes from, validated once.
#[derive(Debug)]
enum KeySource {
    Header(HeaderName),
    Cookie(String),
    /// The configured header or cookie name is not a valid one: no request
    /// can carry it, so every request is decided as keyless (at random,
    /// without issuing a cookie).
    Unusable,
}

/// A route's [`Split`], prepared for the request path.
#[derive(Debug)]
pub struct SplitRule {
    /// The new release.
    pub release: String,
    /// Clamped to 0..=1000.
    weight_permille: u32,
    key: KeySource,
    values: HashSet<String>,
    preview_header: Option<HeaderName>,
}

/// The side a request was decided for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub side: Side,
    /// A preview request: new only, never stable, not even as a fallback.
    pub preview: bool,
    /// For a keyless request with a cookie key source: the `Set-Cookie` value
    /// carrying the key drawn for it.
    pub set_cookie: Option<String>,
}

impl Decision {
    fn side(side: Side) -> Decision {
        Decision {
            side,
            preview: false,
            set_cookie: None,
        }
    }
}

impl SplitRule {
    /// Prepares `split` for route `host`. Invalid header or cookie names are
    /// logged and disabled rather than refused: dropping the split would send
    /// the new release a rolling share of all traffic, which a preview-only
    /// release must never get.
    pub fn new(host: &str, split: &Split) -> SplitRule {
        if split.weight_permille > 1000 {
            tracing::warn!(
                host,
                weight_permille = split.weight_permille,
                "split weight above 1000 per mille; using 1000"
            );
        }
        let key = match &split.key {
            SplitKey::Header(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => KeySource::Header(h),
                Err(_) => {
                    tracing::warn!(
                        host,
                        header = name,
                        "split key header name is invalid; every request counts as keyless"
                    );
                    KeySource::Unusable
                }
            },
            SplitKey::Cookie(name) if is_cookie_name(name) => KeySource::Cookie(name.clone()),
            SplitKey::Cookie(name) => {
                tracing::warn!(
                    host,
                    cookie = name,
                    "split key cookie name is invalid; every request counts as keyless"
                );
                KeySource::Unusable
            }
        };
        let preview_header = split.preview_header.as_deref().and_then(|name| {
            let parsed = HeaderName::from_bytes(name.as_bytes()).ok();
            if parsed.is_none() {
                tracing::warn!(
                    host,
                    header = name,
                    "split preview header name is invalid; ignoring it"
                );
            }
            parsed
        });
        SplitRule {
            release: split.release.clone(),
            weight_permille: split.weight_permille.min(1000),
            key,
            values: split.values.iter().cloned().collect(),
            preview_header,
        }
    }

    /// Decides a request's side. `via_preview_host`: the request's Host is
    /// the split's preview host. `random` is drawn from only for keyless
    /// requests.
    pub fn decide<H: RequestHeaders + ?Sized>(
        &self,
        via_preview_host: bool,
        headers: &H,
        random: &mut impl FnMut() -> u64,
    ) -> Decision {
        if via_preview_host || self.has_preview_header(headers) {
            return Decision {
                side: Side::New,
                preview: true,
                set_cookie: None,
            };
        }
        let key = match &self.key {
            KeySource::Header(name) => header_value(headers, name),
            KeySource::Cookie(name) => cookie_value(headers, name),
            KeySource::Unusable => None,
        };
        if !self.values.is_empty() {
            let listed = key.is_some_and(|k| self.values.contains(k));
            return Decision::side(if listed { Side::New } else { Side::Stable });
        }
        if let Some(key) = key {
            return Decision::side(self.side_of_bucket(split_bucket(key)));
        }
        match &self.key {
            KeySource::Cookie(name) if self.weight_permille > 0 && self.weight_permille < 1000 => {
                let key = format!("{:016x}", random());
                Decision {
                    side: self.side_of_bucket(split_bucket(&key)),
                    preview: false,
                    set_cookie: Some(format!("{name}={key}; Path=/; HttpOnly; SameSite=Lax")),
                }
            }
            _ => {
                // Uniform in 0..1000 up to a bias of about 1e-16.
                let draw = (random() % 1000) as u32;
                Decision::side(self.side_of_bucket(draw))
            }
        }
    }

    fn side_of_bucket(&self, bucket: u32) -> Side {
        if bucket < self.weight_permille {
            Side::New
        } else {
            Side::Stable
        }
    }

    fn has_preview_header<H: RequestHeaders + ?Sized>(&self, headers: &H) -> bool {
        self.preview_header.as_ref().is_some_and(|name| {
            headers
                .find_map(name.as_str(), |v| (!v.is_empty()).then_some(()))
                .is_some()
        })
    }
}

/// The first non-empty value of header `name`, if it is valid UTF-8.
fn header_value<'h, H: RequestHeaders + ?Sized>(
    headers: &'h H,
    name: &HeaderName,
) -> Option<&'h str> {
    headers.find_map(name.as_str(), |v| {
        let v = std::str::from_utf8(v).ok()?.trim();
        (!v.is_empty()).then_some(v)
    })
}

/// The value of cookie `name` in the request's `Cookie` header(s) (HTTP/2
/// clients may send several), without allocating. Pairs are separated by `;`
/// with optional whitespace; names match exactly (case-sensitive); a value
/// in double quotes is unquoted; the first non-empty match wins. Malformed
/// pairs and non-UTF-8 values are skipped.
pub fn cookie_value<'h, H: RequestHeaders + ?Sized>(headers: &'h H, name: &str) -> Option<&'h str> {
    headers.find_map("cookie", |value| {
        value.split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
            if n != name.as_bytes() {
                return None;
            }
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            std::str::from_utf8(v).ok().filter(|v| !v.is_empty())
        })
    })
}

/// An RFC 6265 cookie name: a non-empty HTTP token.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn split(weight_permille: u32, key: SplitKey) -> Split {
        Split {
            release: "r2".into(),
            weight_permille,
            key,
            values: vec![],
            preview_host: None,
            preview_header: Some("x-drover-preview".into()),
            proxy_labels: Default::default(),
        }
    }

    fn by_header(weight_permille: u32) -> SplitRule {
        SplitRule::new(
            "h",
            &split(weight_permille, SplitKey::Header("X-User".into())),
        )
    }

    fn by_cookie(weight_permille: u32) -> SplitRule {
        SplitRule::new(
            "h",
            &split(weight_permille, SplitKey::Cookie("drover_key".into())),
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    /// A random source that must not be used.
    fn no_random() -> impl FnMut() -> u64 {
        || panic!("a keyed request must not draw randomness")
    }

    /// A deterministic stand-in for the proxy's random source (splitmix64).
    fn seeded(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    fn side_for_user(rule: &SplitRule, user: &str) -> Side {
        rule.decide(false, &headers(&[("x-user", user)]), &mut no_random())
            .side
    }

    /// How many of 10,000 distinct users `rule` sends to new.
    fn new_share(rule: &SplitRule) -> usize {
        (0..10_000)
            .filter(|i| side_for_user(rule, &format!("user-{i}")) == Side::New)
            .count()
    }

    #[test]
    fn weight_zero_sends_every_key_to_stable() {
        assert_eq!(new_share(&by_header(0)), 0);
    }

    #[test]
    fn weight_thousand_sends_every_key_to_new() {
        assert_eq!(new_share(&by_header(1000)), 10_000);
        // Above 1000 counts as 1000.
        assert_eq!(new_share(&by_header(5000)), 10_000);
    }

    #[test]
    fn weight_two_hundred_sends_a_fifth_of_the_keys_to_new() {
        let n = new_share(&by_header(200));
        assert!((1_800..=2_200).contains(&n), "{n} of 10000 went to new");
    }

    #[test]
    fn a_key_goes_where_its_bucket_says_every_time() {
        let rule = by_header(300);
        for i in 0..2_000 {
            let user = format!("user-{i}");
            let expected = if split_bucket(&user) < 300 {
                Side::New
            } else {
                Side::Stable
            };
            for _ in 0..3 {
                assert_eq!(side_for_user(&rule, &user), expected, "{user}");
            }
        }
    }

    #[test]
    fn raising_the_weight_only_moves_users_from_stable_to_new() {
        let (low, high) = (by_header(100), by_header(400));
        for i in 0..2_000 {
            let user = format!("user-{i}");
            if side_for_user(&low, &user) == Side::New {
                assert_eq!(side_for_user(&high, &user), Side::New, "{user}");
            }
        }
    }

    #[test]
    fn header_key_names_are_case_insensitive_and_empty_values_count_as_missing() {
        let rule = by_header(1000);
        let d = rule.decide(false, &headers(&[("X-USER", "u")]), &mut no_random());
        assert_eq!(d.side, Side::New);
        // An empty header is no key: decided at random (here: 1000 ‰ → new).
        let d = rule.decide(false, &headers(&[("x-user", "")]), &mut seeded(1));
        assert_eq!(d, Decision::side(Side::New));
    }

    #[test]
    fn values_segment_sends_exactly_the_listed_keys_to_new() {
        let mut s = split(1000, SplitKey::Header("x-user".into()));
        s.values = vec!["alice".into(), "bob".into()];
        let rule = SplitRule::new("h", &s);
        assert_eq!(side_for_user(&rule, "alice"), Side::New);
        assert_eq!(side_for_user(&rule, "bob"), Side::New);
        // Weight 1000 is ignored for everyone else, prefixes do not match.
        for user in ["carol", "alic", "alice2", "Alice", "user-1"] {
            assert_eq!(side_for_user(&rule, user), Side::Stable, "{user}");
        }
        // No key: stable, without randomness and without a cookie.
        let d = rule.decide(false, &HeaderMap::new(), &mut no_random());
        assert_eq!(d, Decision::side(Side::Stable));
    }

    #[test]
    fn values_segment_by_cookie() {
        let mut s = split(0, SplitKey::Cookie("beta".into()));
        s.values = vec!["yes".into()];
        let rule = SplitRule::new("h", &s);
        let decide = |cookie: &str| {
            rule.decide(false, &headers(&[("cookie", cookie)]), &mut no_random())
                .side
        };
        assert_eq!(decide("a=1; beta=yes"), Side::New);
        assert_eq!(decide("beta=no"), Side::Stable);
        assert_eq!(decide("a=yes"), Side::Stable);
    }

    #[test]
    fn preview_header_with_a_value_goes_to_new_whatever_the_key() {
        let rule = by_header(0);
        let d = rule.decide(
            false,
            &headers(&[("x-user", "user-1"), ("X-Drover-Preview", "1")]),
            &mut no_random(),
        );
        assert_eq!(
            d,
            Decision {
                side: Side::New,
                preview: true,
                set_cookie: None
            }
        );
        // An empty preview header is no preview.
        let d = rule.decide(
            false,
            &headers(&[("x-user", "user-1"), ("x-drover-preview", "")]),
            &mut no_random(),
        );
        assert_eq!(d, Decision::side(Side::Stable));
    }

    #[test]
    fn preview_host_goes_to_new_even_with_a_listed_segment_and_no_key() {
        let mut s = split(0, SplitKey::Cookie("drover_key".into()));
        s.values = vec!["alice".into()];
        let d = SplitRule::new("h", &s).decide(true, &HeaderMap::new(), &mut no_random());
        assert!(d.preview);
        assert_eq!(d.side, Side::New);
    }

    #[test]
    fn keyless_cookie_request_gets_a_key_decided_by_its_bucket() {
        let rule = by_cookie(500);
        let mut random = seeded(7);
        let mut sides = HashSet::new();
        for _ in 0..200 {
            let d = rule.decide(false, &HeaderMap::new(), &mut random);
            let cookie = d.set_cookie.expect("a keyless request gets a cookie");
            let rest = cookie.strip_prefix("drover_key=").unwrap();
            let (key, attrs) = rest.split_once(';').unwrap();
            assert_eq!(attrs, " Path=/; HttpOnly; SameSite=Lax");
            assert_eq!(key.len(), 16);
            let expected = if split_bucket(key) < 500 {
                Side::New
            } else {
                Side::Stable
            };
            assert_eq!(d.side, expected);
            // Coming back with that cookie: same side, no new cookie.
            let again = rule.decide(
                false,
                &headers(&[("cookie", &format!("other=1; drover_key={key}"))]),
                &mut no_random(),
            );
            assert_eq!(again, Decision::side(expected));
            sides.insert(d.side);
        }
        assert_eq!(sides.len(), 2, "both sides drawn over 200 keyless requests");
    }

    #[test]
    fn no_cookie_is_issued_at_weight_zero_or_thousand() {
        for (weight, side) in [(0, Side::Stable), (1000, Side::New)] {
            let d = by_cookie(weight).decide(false, &HeaderMap::new(), &mut seeded(3));
            assert_eq!(d, Decision::side(side), "weight {weight}");
        }
    }

    #[test]
    fn keyless_header_requests_are_decided_at_random_by_weight() {
        let rule = by_header(250);
        let mut random = seeded(11);
        let n = (0..10_000)
            .filter(|_| {
                let d = rule.decide(false, &HeaderMap::new(), &mut random);
                assert_eq!(d.set_cookie, None);
                d.side == Side::New
            })
            .count();
        assert!((2_250..=2_750).contains(&n), "{n} of 10000 went to new");
    }

    #[test]
    fn proxy_label_splits_send_everyone_one_way_by_this_proxys_labels() {
        let labelled = |labels: &[(&str, &str)]| {
            let mut s = split(300, SplitKey::Header("x-user".into()));
            s.values = vec!["alice".into()];
            s.proxy_labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            RoutesResponse {
                index: 1,
                routes: vec![drover_api::Route {
                    app: "web".into(),
                    env: String::new(),
                    host: "h".into(),
                    upstreams: vec![],
                    split: Some(s),
                }],
            }
        };
        let eu: BTreeMap<String, String> = [("region".to_string(), "eu".to_string())].into();
        let mut resp = labelled(&[("region", "eu")]);
        localize(&mut resp, &eu);
        let rule = SplitRule::new("h", resp.routes[0].split.as_ref().unwrap());
        let mut resp_us = labelled(&[("region", "us")]);
        localize(&mut resp_us, &eu);
        let rule_us = SplitRule::new("h", resp_us.routes[0].split.as_ref().unwrap());
        for user in ["alice", "bob", "carol"] {
            assert_eq!(side_for_user(&rule, user), Side::New);
            assert_eq!(side_for_user(&rule_us, user), Side::Stable);
        }
        let none = rule_us.decide(false, &HeaderMap::new(), &mut seeded(7));
        assert_eq!(none.side, Side::Stable);
        // Preview requests still reach the new release everywhere.
        let d = rule_us.decide(
            false,
            &headers(&[("x-drover-preview", "1")]),
            &mut no_random(),
        );
        assert_eq!((d.side, d.preview), (Side::New, true));
        // A split without proxy labels is left alone.
        let mut plain = labelled(&[]);
        localize(&mut plain, &eu);
        assert_eq!(plain.routes[0].split.as_ref().unwrap().weight_permille, 300);
    }

    #[test]
    fn cookie_parsing() {
        let find = |pairs: &[(&'static str, &str)]| {
            cookie_value(&headers(pairs), "drover_key").map(str::to_string)
        };
        let some = |v: &str| Some(v.to_string());
        assert_eq!(find(&[("cookie", "drover_key=abc")]), some("abc"));
        // Several cookies, with and without spaces.
        assert_eq!(find(&[("cookie", "a=1; drover_key=abc; b=2")]), some("abc"));
        assert_eq!(find(&[("cookie", "a=1;drover_key=abc;b=2")]), some("abc"));
        assert_eq!(
            find(&[("cookie", "a=1;  drover_key = abc  ;b=2")]),
            some("abc")
        );
        // Quoted value; value containing '='.
        assert_eq!(find(&[("cookie", "drover_key=\"abc\"")]), some("abc"));
        assert_eq!(find(&[("cookie", "drover_key=a=b")]), some("a=b"));
        // Several Cookie headers (HTTP/2): found in any of them.
        assert_eq!(
            find(&[("cookie", "a=1"), ("cookie", "b=2; drover_key=xyz")]),
            some("xyz")
        );
        // Missing, different case, prefix/suffix names, empty value, no '='.
        assert_eq!(find(&[]), None);
        assert_eq!(find(&[("cookie", "a=1; b=2")]), None);
        assert_eq!(find(&[("cookie", "Drover_Key=abc")]), None);
        assert_eq!(
            find(&[("cookie", "xdrover_key=abc; drover_key_2=def")]),
            None
        );
        assert_eq!(find(&[("cookie", "drover_key=")]), None);
        assert_eq!(find(&[("cookie", "drover_key")]), None);
        assert_eq!(find(&[("cookie", ";;drover_key;")]), None);
        // The first non-empty occurrence wins.
        assert_eq!(find(&[("cookie", "drover_key=; drover_key=2")]), some("2"));
        assert_eq!(
            find(&[("cookie", "drover_key=1"), ("cookie", "drover_key=2")]),
            some("1")
        );
        // Only the Cookie header counts.
        assert_eq!(find(&[("set-cookie", "drover_key=abc")]), None);
    }

    #[test]
    fn invalid_key_names_make_every_request_keyless() {
        let rule = SplitRule::new("h", &split(1000, SplitKey::Cookie("bad name;".into())));
        let d = rule.decide(
            false,
            &headers(&[("cookie", "bad name;=x")]),
            &mut seeded(5),
        );
        // Decided at random (1000 ‰ → new), and no malformed cookie is issued.
        assert_eq!(d, Decision::side(Side::New));
        let rule = SplitRule::new("h", &split(0, SplitKey::Header("bad header".into())));
        assert_eq!(
            rule.decide(false, &HeaderMap::new(), &mut seeded(5)),
            Decision::side(Side::Stable)
        );
    }
}
