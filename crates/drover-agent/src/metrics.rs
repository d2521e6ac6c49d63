//! `GET /metrics` of an agent (`drover agent --metrics-addr`): its
//! instances by app, release and state, and their restarts, in the
//! Prometheus/OpenMetrics text format.

use crate::supervisor::Supervisor;
use drover_api::InstanceState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

fn state_name(s: InstanceState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The text of one scrape of `rows` ((app, release, instance, state, restarts)).
pub fn encode(rows: &[(String, String, String, InstanceState, u32)]) -> String {
    let instances = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    for (app, release, instance, state, n) in rows {
        instances
            .get_or_create(&vec![
                ("app", app.clone()),
                ("release", release.clone()),
                ("state", state_name(*state)),
            ])
            .inc();
        restarts
            .get_or_create(&vec![
                ("app", app.clone()),
                ("release", release.clone()),
                ("instance", instance.clone()),
            ])
            .inc_by(u64::from(*n));
    }
    let mut registry = Registry::default();
    registry.register(
        "drover_agent_instances",
        "Instances on this node by app, release and state.",
        instances,
    );
    registry.register(
        "drover_agent_instance_restarts",
        "Restarts of an instance after it exited unexpectedly.",
        restarts,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, sup: Arc<Supervisor>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sup = sup.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        drover_api::metrics::CONTENT_TYPE,
                    )],
                    encode(&sup.metric_rows()),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_counted_by_state_and_restarts_per_instance() {
        let rows = vec![
            (
                "web".to_string(),
                "r1".to_string(),
                "web-r1-a".to_string(),
                InstanceState::Healthy,
                0,
            ),
            (
                "web".to_string(),
                "r1".to_string(),
                "web-r1-b".to_string(),
                InstanceState::Healthy,
                2,
            ),
            (
                "web".to_string(),
                "r2".to_string(),
                "web-r2-c".to_string(),
                InstanceState::Starting,
                0,
            ),
        ];
        let text = encode(&rows);
        for want in [
            r#"drover_agent_instances{app="web",release="r1",state="healthy"} 2"#,
            r#"drover_agent_instances{app="web",release="r2",state="starting"} 1"#,
            r#"drover_agent_instance_restarts_total{app="web",release="r1",instance="web-r1-b"} 2"#,
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
    }
}
