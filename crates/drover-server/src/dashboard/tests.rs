//! Rendering: what the templates show of a status, escaped, with the data
//! attributes scripts and browser tests read.

use super::chart;
use super::views::*;
use crate::timeseries::{Point, Sample};
use askama::Template;
use drover_api as api;
use std::collections::BTreeMap;

fn rollout(state: &str, message: &str) -> api::RolloutStatus {
    api::RolloutStatus {
        id: 7,
        from: Some("r1".into()),
        to: "r2".into(),
        strategy: "canary".into(),
        state: state.into(),
        step: 1,
        steps: 3,
        reverting: false,
        canary_step: Some("1/2".into()),
        weight: Some(20),
        analysis: Some("inconclusive: 3 requests < 10".into()),
        preview: None,
        message: message.into(),
        failure: None,
        started_at_ms: 1_700_000_000_000,
    }
}

fn instance(id: &str, release: &str, node: &str, state: &str, routed: bool) -> api::InstanceStatus {
    api::InstanceStatus {
        id: id.into(),
        release: release.into(),
        node: node.into(),
        address: Some("127.0.0.1:30001".into()),
        state: state.into(),
        routed,
        pid: Some(42),
        restarts: 0,
        last_check: Some("200 OK".into()),
        message: None,
    }
}

fn status(r: Option<api::RolloutStatus>) -> api::AppStatus {
    api::AppStatus {
        app: "web".into(),
        environment: String::new(),
        environments: vec![api::EnvSummary {
            name: String::new(),
            host: "web.localhost".into(),
            live_release: Some("r1".into()),
            promote: "auto".into(),
            rollout: None,
        }],
        waiting: None,
        live_release: Some("r1".into()),
        rollout: r,
        traffic: BTreeMap::from([("r1".into(), 80), ("r2".into(), 20)]),
        instances: vec![
            instance("web-r1-a", "r1", "node-1", "healthy", true),
            instance("web-r2-b", "r2", "node-2", "starting", false),
        ],
        last_run: None,
        figures: Vec::new(),
    }
}

#[test]
fn a_rollout_renders_escaped_with_its_state_step_and_reason_as_text_and_data() {
    let evil = r#"waits <script>alert("x")</script> & 'more'"#;
    let st = status(Some(rollout("progressing", evil)));
    let commits = BTreeMap::from([("r1".to_string(), "0123456789abcdef".to_string())]);
    let html = env_part(&st, &commits).render().unwrap();
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains(
            "waits &#60;script&#62;alert(&#34;x&#34;)&#60;/script&#62; &#38; &#39;more&#39;"
        ),
        "{html}"
    );
    assert!(html.contains(r#"data-state="progressing""#), "{html}");
    assert!(html.contains(r#"data-step="1/2""#), "{html}");
    assert!(html.contains(r#"data-weight="20""#), "{html}");
    // Readable without colour: a symbol and a word.
    assert!(html.contains("▶ progressing"), "{html}");
    assert!(html.contains("step 1/2 · 20% of users on r2"), "{html}");
    assert!(html.contains("1 of 3 instances of r2 serving"), "{html}");
    assert!(
        html.contains("0123456789ab"),
        "the live commit, short: {html}"
    );
    assert!(
        html.contains(r#"data-release="r2" data-percent="20""#),
        "{html}"
    );
    // Instances per node with their health in words.
    let html = instances_part(&st).render().unwrap();
    assert!(
        html.contains("● yes") && html.contains("○ no"),
        "routed: {html}"
    );
    assert!(html.contains("node-1") && html.contains("node-2"), "{html}");
    assert!(
        html.contains("✓ healthy") && html.contains("… starting"),
        "{html}"
    );
}

#[test]
fn a_viewer_who_may_not_act_gets_no_buttons_and_buttons_follow_the_rollout_state() {
    let st = status(Some(rollout("progressing", "step 1")));
    let part = |can_act| {
        ActionsPart {
            app: "web".into(),
            env: String::new(),
            can_act,
            actions: actions("web", &st, None),
        }
        .render()
        .unwrap()
    };
    assert!(!part(false).contains("<button"));
    let html = part(true);
    for a in ["promote", "pause", "resume", "abort", "rollback"] {
        assert!(
            html.contains(&format!(r#"data-action="{a}""#)),
            "{a}: {html}"
        );
    }
    let enabled = |st: &api::AppStatus| -> Vec<&'static str> {
        actions("web", st, None)
            .into_iter()
            .filter(|a| a.enabled)
            .map(|a| a.name)
            .collect()
    };
    assert_eq!(enabled(&st), ["promote", "pause", "abort", "rollback"]);
    let paused = status(Some(rollout("paused", "paused by the operator")));
    assert_eq!(enabled(&paused), ["promote", "resume", "abort", "rollback"]);
    let done = status(Some(rollout("succeeded", "done")));
    assert_eq!(enabled(&done), ["rollback"]);
    // A release waiting to enter an environment: that environment's promote.
    let mut waiting = status(Some(rollout("succeeded", "done")));
    waiting.environment = "production".into();
    waiting.waiting = Some("r2 (run 3) waits to enter production".into());
    assert!(actions("web", &waiting, Some("production"))[0].enabled);
    assert!(!actions("web", &waiting, Some("staging"))[0].enabled);
    let q = &actions("web", &st, None)[4].question;
    assert_eq!(q, "Roll web back to r1? The rollout of r2 reverts.");
}

#[test]
fn the_chart_carries_the_split_per_release_and_each_series() {
    let st = status(Some(rollout("progressing", "")));
    let samples = vec![Sample {
        at_ms: 999_000,
        points: BTreeMap::from([(
            "r2".to_string(),
            Point {
                percent: Some(20),
                rate: 12.5,
                error_rate: Some(0.01),
                p99_ms: Some(25.0),
            },
        )]),
    }];
    let html = ChartPart {
        env: String::new(),
        chart: chart::build(&st.traffic, &samples, 1_000_000),
    }
    .render()
    .unwrap();
    assert!(
        html.contains(r#"data-release="r1" data-percent="80""#),
        "{html}"
    );
    assert!(
        html.contains(r#"data-release="r2" data-percent="20""#),
        "{html}"
    );
    for s in ["percent", "rate", "errors", "p99"] {
        assert!(
            html.contains(&format!(r#"data-series="{s}""#)),
            "{s}: {html}"
        );
    }
    assert!(
        html.contains(r#"data-release="r2" data-last="12.5""#),
        "{html}"
    );
    assert!(html.contains("r1 80% · r2 20%"), "{html}");
}

#[test]
fn runs_link_to_their_page_and_nodes_show_heartbeat_age_and_labels() {
    let run = api::RunInfo {
        id: 12,
        app: "web".into(),
        commit: "abcdef0123456789".into(),
        git_ref: "refs/heads/main".into(),
        trigger: "poll".into(),
        state: "failed".into(),
        steps: vec![api::RunStep {
            name: "test".into(),
            state: "failed".into(),
            started_at_ms: 0,
            duration_ms: Some(1500),
            log_tail: Some("assert <1 == 2>".into()),
        }],
        release: None,
        rollout_id: None,
        error: Some("test failed".into()),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let html = RunsPart {
        runs: vec![run_row(&run)],
    }
    .render()
    .unwrap();
    assert!(html.contains(r#"<a href="/runs/12">#12</a>"#), "{html}");
    assert!(
        html.contains("✗ failed") && html.contains("✗ test 1.5s"),
        "{html}"
    );
    let page = run_part(&run).render().unwrap();
    assert!(page.contains("assert &#60;1 == 2&#62;"), "{page}");

    let nodes = NodesPart {
        nodes: node_rows(&[api::NodeInfo {
            name: "node-1".into(),
            labels: BTreeMap::from([("region".into(), "eu".into())]),
            ready: false,
            last_seen_ms_ago: 12_345,
            instances: 3,
        }]),
    }
    .render()
    .unwrap();
    assert!(
        nodes.contains("region=eu") && nodes.contains("12 s ago"),
        "{nodes}"
    );
    assert!(nodes.contains("✗ not ready"), "{nodes}");
}

#[test]
fn times_are_shown_in_utc_and_ages_in_readable_units() {
    assert_eq!(utc(0), "1970-01-01 00:00:00Z");
    assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20Z");
    assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
    assert_eq!(age(400), "0.4 s");
    assert_eq!(age(65_000), "65 s");
    assert_eq!(age(600_000), "10 min");
}

#[test]
fn a_page_names_its_event_stream_and_holds_its_parts() {
    let html = NodesPage {
        title: "Nodes <&>".into(),
        stream: super::Page::Nodes.stream(),
        who: "ci <x> (viewer)".into(),
        nodes: Slot {
            id: "nodes".into(),
            html: "<table></table>".into(),
        },
    }
    .render()
    .unwrap();
    assert!(html.contains(r#"data-stream="/ui/events/nodes""#), "{html}");
    assert!(
        html.contains(r#"<div id="nodes" data-part><table></table></div>"#),
        "{html}"
    );
    assert!(
        html.contains("<title>Nodes &#60;&#38;&#62; · drover</title>"),
        "{html}"
    );
    assert!(html.contains(r#"<script src="/ui/dash.js" defer></script>"#));
    assert!(html.contains("ci &#60;x&#62; (viewer)"), "{html}");
    assert!(
        html.contains(r#"<form class="who" method="post" action="/logout">"#),
        "{html}"
    );
}
