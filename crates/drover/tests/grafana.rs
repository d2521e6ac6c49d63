//! The Grafana dashboard shipped in `grafana/drover.json` stays true to the
//! metrics: it parses as a dashboard, and every `drover_…` series and label
//! its queries use is one that the server's, a proxy's or an agent's
//! `/metrics` exposes (rendered here by the very encoders they use).

use std::collections::BTreeSet;

const DASHBOARD: &str = include_str!("../../../grafana/drover.json");

fn exposition() -> String {
    let row = |release: &str| drover_api::ReleaseStats {
        app: "web".into(),
        env: "production".into(),
        release: release.into(),
        requests: 10,
        errors: 1,
        latency_buckets: vec![1; drover_api::LATENCY_BUCKETS_MS.len() + 1],
        latency_sum_us: 1000,
    };
    [
        server_exposition(row("r1")),
        drover_api::metrics::encode_release_traffic("drover_proxy_release", vec![row("r2")]),
        drover_agent::metrics::encode(&[(
            "web".into(),
            "r1".into(),
            "web-r1-a".into(),
            drover_api::InstanceState::Healthy,
            1,
        )]),
    ]
    .join("\n")
}

/// The server's `/metrics` with one of everything it observes.
fn server_exposition(row: drover_api::ReleaseStats) -> String {
    let mut r = drover_core::Rollout::new("web", "production", Some("r1".into()), "r2", 0);
    r.canary = Some(drover_core::CanaryProgress {
        step: 0,
        weight: 20,
        step_started_at: None,
        analysis: None,
        window_started_at: None,
    });
    let observed = drover_server::metrics::Observed::default();
    observed.step(&r, "canary", 1000);
    observed.rollout(&r, "canary", 5000);
    observed.run("web", "succeeded", 3000);
    observed.delivery("web", "delivered");
    let snap = drover_server::metrics::Snapshot {
        rollouts: vec![r],
        instances: vec![(
            (
                "web".into(),
                "production".into(),
                "r2".into(),
                "healthy".into(),
            ),
            1,
        )],
        nodes: vec![("node-1".into(), true, 100)],
    };
    let window = drover_core::analysis::Window {
        requests: row.requests,
        errors: row.errors,
        latency_buckets: row.latency_buckets,
        latency_sum_us: row.latency_sum_us,
    };
    drover_server::metrics::encode(
        vec![((row.app, row.env, row.release), window)],
        &snap,
        &observed,
    )
}

/// `drover_…` words of a PromQL expression.
fn series(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("drover_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_series_and_labels_drover_exposes() {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    assert_eq!(d["uid"], "drover-releases");
    let text = exposition();
    let mut queries: Vec<String> = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        for t in p["targets"].as_array().expect("targets") {
            queries.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            queries.push(q.to_string());
        }
    }
    assert!(queries.len() >= 6, "{queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        for s in series(q) {
            let exposed = text
                .lines()
                .any(|l| l.starts_with(&format!("{s}{{")) || l.starts_with(&format!("{s} ")));
            assert!(
                exposed,
                "the dashboard queries {s}, which no role exposes:\n{text}"
            );
            used.insert(s);
        }
        for label in ["app=", "env=~", "release", "state", "le"] {
            if q.contains(label) {
                let name = label.trim_end_matches(['=', '~']);
                assert!(
                    text.contains(&format!("{name}=\"")),
                    "label {name} of {q} is not exposed"
                );
            }
        }
    }
    // Every role's metrics appear on the dashboard.
    for prefix in [
        "drover_release_",
        "drover_proxy_release_",
        "drover_agent_",
        "drover_rollout_",
        "drover_pipeline_",
    ] {
        assert!(
            used.iter().any(|s| s.starts_with(prefix)),
            "{prefix}: {used:?}"
        );
    }
}
