//! `drover_agent::run` against a fake control plane: registers (waiting
//! for a server that is not up yet), polls assignments, starts the
//! instance, reports, re-registers after a 404, and on shutdown leaves the
//! app running for the next agent to adopt.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use drover_agent::AgentConfig;
use drover_api::{
    AgentReport, AssignmentsResponse, InstanceState, RegisterRequest, RegisterResponse,
};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Plane {
    registers: Vec<RegisterRequest>,
    reports: Vec<AgentReport>,
    /// Answer 404 to report/assignments until the next register.
    forgotten: bool,
    assignments: Vec<drover_api::Assignment>,
    /// The stand-in agent port (TLS).
    agent_port: u16,
}

fn handler(plane: Arc<Mutex<Plane>>) -> Handler {
    Arc::new(move |req: &Req| {
        let mut p = plane.lock().unwrap();
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v1/agent/register") => {
                let r: RegisterRequest = serde_json::from_slice(&req.body).unwrap();
                p.forgotten = false;
                let node = r.node.clone();
                let cert = r.csr.as_deref().map(|csr| CA.sign_csr(&node, csr));
                p.registers.push(r);
                Resp::json(&RegisterResponse {
                    node,
                    lease_ms: 10_000,
                    report_interval_ms: 200,
                    agent_port: p.agent_port,
                    cert_not_after_ms: cert.as_ref().map(|_| u64::MAX / 2),
                    cert,
                    ca: CA.ca_pem.clone(),
                    ca_mac: None,
                })
            }
            _ if p.forgotten => Resp::new(404, r#"{"error":"unknown node"}"#),
            ("GET", "/v1/agent/assignments") => {
                assert!(req.query.contains("node=n%201"), "{}", req.query);
                Resp::json(&AssignmentsResponse {
                    index: 7,
                    assignments: p.assignments.clone(),
                    unchanged: Vec::new(),
                })
            }
            ("POST", "/v1/agent/report") => {
                p.reports.push(serde_json::from_slice(&req.body).unwrap());
                Resp::new(200, "{}")
            }
            _ => Resp::new(404, ""),
        }
    })
}

fn last_report(plane: &Arc<Mutex<Plane>>, id: &str) -> Option<drover_api::InstanceReport> {
    plane
        .lock()
        .unwrap()
        .reports
        .last()?
        .instances
        .iter()
        .find(|i| i.instance == id)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_registers_converges_reports_and_leaves_apps_running() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = assignment("hello-r1-run", "exec sleep 30");
    prepare_release(dir.path(), &a);
    let plane = Arc::new(Mutex::new(Plane {
        assignments: vec![a.clone()],
        ..Default::default()
    }));
    // The server comes up only after the agent started.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = AgentConfig::new(
        format!("http://127.0.0.1:{port}"),
        "n 1",
        dir.path().to_path_buf(),
    );
    config.labels.insert("role".into(), "web".into());
    config.port_range = (31400, 31499);
    let token = CancellationToken::new();
    let agent = tokio::spawn(drover_agent::run(config.clone(), token.clone()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let tls = serve_tls(0, handler(plane.clone())).await;
    plane.lock().unwrap().agent_port = tls.addr.port();
    let _srv = serve(port, handler(plane.clone())).await;

    let r = wait_for(15, "instance reported with a pid", || {
        last_report(&plane, "hello-r1-run").filter(|r| r.pid.is_some())
    })
    .await;
    let pid = r.pid.unwrap();
    assert_eq!(r.state, InstanceState::Starting);
    assert!(r.address.unwrap().starts_with("127.0.0.1:314"));
    {
        let p = plane.lock().unwrap();
        assert_eq!(p.registers.len(), 1);
        assert_eq!(p.registers[0].node, "n 1");
        assert_eq!(p.registers[0].labels["role"], "web");
    }

    // The server forgets the node: the agent registers again, the app
    // keeps running.
    plane.lock().unwrap().forgotten = true;
    wait_for(10, "re-registration", || {
        (plane.lock().unwrap().registers.len() >= 2).then_some(())
    })
    .await;
    let n = plane.lock().unwrap().reports.len();
    wait_for(10, "reports after re-registration", || {
        (plane.lock().unwrap().reports.len() > n + 1).then_some(())
    })
    .await;
    assert_eq!(last_report(&plane, "hello-r1-run").unwrap().pid, Some(pid));

    // Shutdown returns promptly and leaves the app running.
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("run did not return after shutdown")
        .unwrap()
        .unwrap();
    assert!(pid_exists(pid));

    // A new agent adopts it: same pid, no restart.
    let token = CancellationToken::new();
    let n = plane.lock().unwrap().reports.len();
    let agent = tokio::spawn(drover_agent::run(config, token.clone()));
    wait_for(10, "report from the new agent", || {
        (plane.lock().unwrap().reports.len() > n + 1).then_some(())
    })
    .await;
    let r = last_report(&plane, "hello-r1-run").unwrap();
    assert_eq!(r.pid, Some(pid));
    assert_eq!(r.restarts, 0);

    // The server drops the assignment: the agent stops the app.
    plane.lock().unwrap().assignments.clear();
    // (The fake answers at once; the agent re-polls.)
    wait_for(10, "app stopped", || (!pid_exists(pid)).then_some(())).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("run did not return after shutdown")
        .unwrap()
        .unwrap();
}
