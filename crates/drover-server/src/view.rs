//! Translation between stored records, the planner's plain types and the
//! wire views (status, assignments, routes).

use drover_api as api;
use drover_core::spec::AppSpec;
use drover_core::{Desired, Health, Instance, Rollout, Strategy};
use drover_store::{InstanceRecord, NodeRecord, ReleaseRecord};
use std::collections::BTreeMap;

pub fn observed(rec: &InstanceRecord) -> Option<api::InstanceReport> {
    rec.observed
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
}

/// `lease_ms`: [`crate::node_lease_ms`] of the cluster's size.
pub fn node_ready(n: &NodeRecord, now: u64, lease_ms: u64) -> bool {
    now.saturating_sub(n.last_seen) < lease_ms
}

/// The planner's view of an instance's health, from its last report.
fn health_of(o: Option<&api::InstanceReport>, node_ready: bool) -> Health {
    let Some(o) = o else {
        return Health::Pending;
    };
    match o.state {
        api::InstanceState::Stopped => Health::Stopped,
        _ if !node_ready => Health::Unhealthy,
        api::InstanceState::Preparing | api::InstanceState::Starting => Health::Starting,
        api::InstanceState::Healthy => Health::Healthy,
        api::InstanceState::Unhealthy
        | api::InstanceState::Crashed
        | api::InstanceState::Stopping => Health::Unhealthy,
        api::InstanceState::Failed => Health::Failed,
    }
}

pub fn to_core(rec: &InstanceRecord, node_ready: bool, drained: bool) -> Instance {
    let o = observed(rec);
    Instance {
        id: rec.id.clone(),
        release: rec.release.clone(),
        node: rec.node.clone(),
        desired: rec.desired,
        routed: rec.routed,
        health: health_of(o.as_ref(), node_ready),
        created_at: rec.created_at,
        drained,
        last_check: o.and_then(|o| o.health.last_response.or(o.message)),
    }
}

pub use drover_core::spec::in_env;

/// "[staging] ", or "" for an app without environments (event prefixes).
pub fn env_tag(env: &str) -> String {
    if env.is_empty() {
        String::new()
    } else {
        format!("[{env}] ")
    }
}

/// The environments a spec defines, for messages.
pub fn env_list(spec: &AppSpec) -> String {
    if spec.environments.is_empty() {
        "none (deploy without an environment)".into()
    } else {
        spec.env_names().join(", ")
    }
}

/// A node selector matches when the node has every one of its labels.
pub use drover_core::labels_match;

/// The nodes an environment of `spec` may run on (every label of its
/// selector), as the planner sees them.
pub fn env_nodes(
    spec: &AppSpec,
    env: &str,
    records: &[NodeRecord],
    ready: &BTreeMap<String, bool>,
) -> Vec<drover_core::Node> {
    let selector = spec.environment(env).map(|e| &e.nodes);
    records
        .iter()
        .filter(|n| selector.is_none_or(|sel| labels_match(sel, &n.labels)))
        .map(|n| drover_core::Node {
            name: n.name.clone(),
            ready: ready.get(&n.name).copied().unwrap_or(false),
            labels: n.labels.clone(),
        })
        .collect()
}

pub fn parse_release_name(name: &str) -> Option<i64> {
    name.strip_prefix('r')?.parse().ok().filter(|n| *n > 0)
}

/// The app's spec as of its newest release (the registration spec before
/// the first): which environments it has, in order.
pub async fn current_spec(
    server: &crate::Server,
    app: &str,
) -> Result<AppSpec, crate::api::ApiErr> {
    let releases = server.store.list_releases(app).await?;
    if let Some(spec) = releases.iter().find_map(|r| release_spec(r).ok()) {
        return Ok(spec);
    }
    let a = server.store.get_app(app).await?;
    serde_json::from_str(&a.spec).map_err(|e| {
        crate::api::ApiErr::Internal(format!("stored spec of {app} does not parse: {e}"))
    })
}

/// The spec of a rollout's target release (None if it cannot be read).
pub async fn target_spec(server: &crate::Server, app: &str, r: &Rollout) -> Option<AppSpec> {
    let n = parse_release_name(&r.to)?;
    let rel = server.store.get_release(app, n).await.ok()?;
    release_spec(&rel).ok()
}

pub fn release_spec(r: &ReleaseRecord) -> Result<AppSpec, String> {
    serde_json::from_str(&r.spec)
        .map_err(|e| format!("stored spec of {} {} does not parse: {e}", r.app, r.name()))
}

pub fn assignment(
    rec: &InstanceRecord,
    release: &ReleaseRecord,
    spec: &AppSpec,
) -> api::Assignment {
    api::Assignment {
        instance: rec.id.clone(),
        app: rec.app.clone(),
        release: rec.release.clone(),
        artifact: api::ArtifactRef {
            sha256: release.artifact_sha256.clone(),
            size: release.artifact_size,
            path: format!("/v1/artifacts/{}", release.artifact_sha256),
        },
        image: release.image.clone(),
        image_ref: release.image_ref.clone(),
        registry_auth: None,
        run: api::RunSpec {
            command: spec.run.command.clone(),
            env: {
                let mut env = spec.run.env.clone();
                if !rec.env.is_empty() {
                    env.insert("DROVER_ENV".into(), rec.env.clone());
                }
                env
            },
            stop_timeout_ms: spec.run.stop_timeout_ms,
            memory_bytes: spec.run.memory_bytes,
            cpus: spec.run.cpus,
        },
        health: api::HealthSpec {
            path: spec.health.path.clone(),
            interval_ms: spec.health.interval_ms,
            timeout_ms: spec.health.timeout_ms,
            healthy_after: spec.health.healthy_after,
            unhealthy_after: spec.health.unhealthy_after,
        },
        desired: if rec.desired == Desired::Stop {
            api::DesiredState::Stop
        } else {
            api::DesiredState::Run
        },
    }
}

/// Whether an instance serves traffic: routed by the planner, running,
/// reported healthy, on a node within its lease, with a known address.
pub fn serves(rec: &InstanceRecord, node_ready: bool) -> Option<String> {
    serving_address(rec, observed(rec).as_ref(), node_ready)
}

fn serving_address(
    rec: &InstanceRecord,
    o: Option<&api::InstanceReport>,
    node_ready: bool,
) -> Option<String> {
    if rec.desired != Desired::Run || !rec.routed || !node_ready {
        return None;
    }
    let o = o?;
    (o.state == api::InstanceState::Healthy)
        .then(|| o.address.clone())
        .flatten()
}

pub fn instance_status(rec: &InstanceRecord, node_ready: bool) -> api::InstanceStatus {
    let o = observed(rec);
    let observed_state = o.as_ref().map(|o| match o.state {
        api::InstanceState::Preparing => "preparing",
        api::InstanceState::Starting => "starting",
        api::InstanceState::Healthy => "healthy",
        api::InstanceState::Unhealthy => "unhealthy",
        api::InstanceState::Crashed => "crashed",
        api::InstanceState::Stopping => "stopping",
        api::InstanceState::Stopped => "stopped",
        api::InstanceState::Failed => "failed",
    });
    let state = match (rec.desired, observed_state) {
        (_, Some("stopped")) => "stopped",
        (Desired::Drain { .. }, _) => "draining",
        (Desired::Stop, _) => "stopping",
        (_, _) if !node_ready && o.is_some() => "lost",
        (_, Some(s)) => s,
        (_, None) => "pending",
    };
    api::InstanceStatus {
        id: rec.id.clone(),
        release: rec.release.clone(),
        node: rec.node.clone(),
        address: o.as_ref().and_then(|o| o.address.clone()),
        state: state.to_string(),
        routed: serving_address(rec, o.as_ref(), node_ready).is_some(),
        pid: o.as_ref().and_then(|o| o.pid),
        restarts: o.as_ref().map(|o| o.restarts).unwrap_or(0),
        last_check: o.as_ref().and_then(|o| o.health.last_response.clone()),
        message: o.and_then(|o| o.message),
    }
}

/// The split the rollout asks of the proxies (see
/// [`drover_core::share::rollout_split`]); `spec` is its target's.
pub fn rollout_split(r: &Rollout, spec: &AppSpec) -> Option<(String, u32)> {
    drover_core::share::rollout_split(r, &spec.deploy)
}

/// Blue/green: the host that reaches only the new set before the switch.
pub fn preview_host(spec: &AppSpec) -> Option<String> {
    (spec.deploy.strategy == Strategy::BlueGreen).then(|| format!("preview.{}", spec.route.host))
}

/// Blue/green: requests with this header reach only the new set.
pub const PREVIEW_HEADER: &str = "x-drover-preview";

/// `header:NAME` / `cookie:NAME` (validated by the spec) as the wire type.
pub fn split_key(user_key: &str) -> api::SplitKey {
    match user_key.split_once(':') {
        Some(("header", name)) => api::SplitKey::Header(name.to_string()),
        Some((_, name)) => api::SplitKey::Cookie(name.to_string()),
        None => api::SplitKey::Cookie("drover_user".into()),
    }
}

/// Percent of users per release, from the routed instances and the split.
pub fn traffic(
    instances: &[api::InstanceStatus],
    split: Option<&(String, u32)>,
) -> BTreeMap<String, u32> {
    let mut routed: BTreeMap<String, u32> = BTreeMap::new();
    for i in instances.iter().filter(|i| i.routed) {
        *routed.entry(i.release.clone()).or_default() += 1;
    }
    drover_core::share::shares(routed, split)
}

pub fn nodes_ready(nodes: &[NodeRecord], now: u64) -> BTreeMap<String, bool> {
    let lease = crate::node_lease_ms(nodes.len());
    nodes
        .iter()
        .map(|n| (n.name.clone(), node_ready(n, now, lease)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(release: &str, routed: bool) -> api::InstanceStatus {
        api::InstanceStatus {
            id: "x".into(),
            release: release.into(),
            node: "n".into(),
            address: None,
            state: "healthy".into(),
            routed,
            pid: None,
            restarts: 0,
            last_check: None,
            message: None,
        }
    }

    #[test]
    fn traffic_shares_sum_to_100() {
        let routed = [
            st("r1", true),
            st("r1", true),
            st("r2", true),
            st("r2", false),
        ];
        let t = traffic(&routed, None);
        assert_eq!(t, BTreeMap::from([("r1".into(), 67), ("r2".into(), 33)]));
        assert!(traffic(&[st("r1", false)], None).is_empty());
    }

    #[test]
    fn a_split_shows_its_weight_and_goes_to_stable_when_it_reverts() {
        let routed = [st("r1", true), st("r1", true), st("r2", true)];
        let split = ("r2".to_string(), 10);
        let t = traffic(&routed, Some(&split));
        assert_eq!(t, BTreeMap::from([("r1".into(), 90), ("r2".into(), 10)]));
        let back = ("r2".to_string(), 0);
        let t = traffic(&routed, Some(&back));
        assert_eq!(t, BTreeMap::from([("r1".into(), 100), ("r2".into(), 0)]));
        // Nothing of r2 routed yet: all of it on r1.
        let t = traffic(&[st("r1", true)], Some(&split));
        assert_eq!(t, BTreeMap::from([("r1".into(), 100)]));
    }
}
