//! The state file: damaged or missing files give an empty state and one
//! clear problem, never a panic or a hang; saves round-trip.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use drover_agent::state::{self, AgentState, InstanceRecord};
use drover_api::InstanceState;

#[test]
fn missing_file_is_empty_state_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let l = state::load(&state::state_path(dir.path()));
    assert_eq!(l.state, AgentState::default());
    assert!(!l.corrupt);
    assert!(l.problem.unwrap().contains("no agent state file"));
}

#[test]
fn damaged_files_are_empty_state_with_an_error() {
    let mut good = AgentState {
        version: state::VERSION,
        port_cursor: Some(20005),
        ..Default::default()
    };
    good.instances.insert(
        "hello-r1-aaa".into(),
        InstanceRecord::new(assignment("hello-r1-aaa", "true")),
    );
    let good_bytes = serde_json::to_vec_pretty(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zeroed", vec![0u8; 4096]),
        ("empty", Vec::new()),
        ("truncated", good_bytes[..good_bytes.len() / 2].to_vec()),
        ("garbage", b"\xff\xfe not json {{{".to_vec()),
        ("wrong shape", b"[1,2,3]".to_vec()),
        (
            "future version",
            br#"{"version": 99, "instances": {}}"#.to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = state::state_path(dir.path());
        fs::write(&path, &bytes).unwrap();
        let l = state::load(&path);
        assert_eq!(l.state, AgentState::default(), "{name}");
        assert!(l.corrupt, "{name}");
        let p = l.problem.unwrap_or_default();
        assert!(p.contains("starting with empty state"), "{name}: {p}");
    }
}

#[test]
fn save_load_round_trip_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = state::state_path(dir.path());
    let mut st = AgentState {
        version: state::VERSION,
        port_cursor: Some(21000),
        ..Default::default()
    };
    let mut rec = InstanceRecord::new(assignment("hello-r1-x", "true"));
    rec.pid = Some(42);
    rec.start_time = Some(4242);
    rec.port = Some(20001);
    rec.restarts = 7;
    rec.health = Some(InstanceState::Healthy);
    st.instances.insert("hello-r1-x".into(), rec);
    state::save(&path, &st).unwrap();
    let l = state::load(&path);
    assert!(l.problem.is_none());
    assert_eq!(l.state, st);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!path.with_extension("json.tmp").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_starts_on_a_zeroed_state_file_and_reconciles() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = state::state_path(dir.path());
    fs::write(&path, vec![0u8; 1000]).unwrap();
    let sup = tokio::time::timeout(Duration::from_secs(5), async {
        supervisor(dir.path(), (31000, 31099), None)
    })
    .await
    .expect("supervisor start hung");
    assert!(sup.load_problem().unwrap().contains("corrupt"));
    assert!(sup.reports().is_empty());
    // The damaged file was kept aside and a good one written.
    assert!(path.with_extension("json.corrupt").exists());
    assert!(state::load(&path).problem.is_none());
    // Assignments still start what is missing.
    let a = assignment("hello-r1-z", "exec sleep 30");
    prepare_release(dir.path(), &a);
    sup.reconcile(std::slice::from_ref(&a));
    let pid = wait_for(10, "started", || report(&sup, "hello-r1-z")?.pid).await;
    kill_group(pid);
}
