//! Environments: a release goes to staging, its smoke test runs against it
//! (DROVER_URL set), then to production — by itself with promote = "auto",
//! after `drover promote` with "manual" — and a failing smoke test stops it
//! before production. Staging and production run on the nodes their
//! selectors pick and are served on their own hosts.

mod common;

use common::*;
use std::time::Duration;

/// The smoke test the repo ships: the release in DROVER_URL must answer with
/// its version, and a version containing "nosmoke" fails it.
const SMOKE_PY: &str = r#"
import json, os, sys, urllib.request
want = json.load(open("behavior.json"))["version"]
assert os.environ["DROVER_ENV"] == "staging", os.environ["DROVER_ENV"]
assert os.environ["DROVER_HOST"] == "staging.web.localhost", os.environ["DROVER_HOST"]
body = urllib.request.urlopen(os.environ["DROVER_URL"] + "/", timeout=5).read().decode()
print("smoke: %s answered %r" % (os.environ["DROVER_URL"], body.strip()))
if not body.startswith(want + " ") or "nosmoke" in want:
    print("smoke test FAILED for " + want)
    sys.exit(1)
print("smoke test passed")
"#;

fn env_spec(production_promote: &str) -> String {
    format!(
        r#"{}
[environments.staging]
nodes = {{ stage = "staging" }}
instances = 1
smoke_test = "python3 smoke.py"

[environments.production]
nodes = {{ stage = "production" }}
promote = "{production_promote}"
"#,
        spec("web", 2, "30s")
    )
}

fn commit(repo: &Repo, promote: &str, version: &str) -> String {
    std::fs::write(repo.path.join("smoke.py"), SMOKE_PY).unwrap();
    repo.commit(&env_spec(promote), &Behavior::ok(version))
}

fn env_status(c: &Cluster, env: &str) -> serde_json::Value {
    c.api_get(&format!("/v1/apps/web/status?env={env}"))
        .unwrap_or_else(|e| panic!("status: {e}"))
}

fn answers(c: &Cluster, host: &str, version: &str) -> bool {
    (0..4).all(|_| get_version(&c.proxy_url(), host).as_deref() == Ok(version))
}

fn step_names(run: &serde_json::Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["name"].as_str().unwrap(),
                s["state"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn staging_smoke_test_then_production_manual_waits_for_promote_auto_goes_through() {
    let _g = serial();
    let c = Cluster::start_labeled(
        "300ms",
        &[
            &["stage=staging"],
            &["stage=production"],
            &["stage=production"],
        ],
    );
    let repo = Repo::create(c.dir.path(), &env_spec("manual"), &Behavior::ok("v0"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);

    // 1. manual: the commit reaches staging, passes its smoke test and waits.
    commit(&repo, "manual", "v1");
    c.wait_until(
        "r1 waits for promotion after staging",
        Duration::from_secs(60),
        |c| {
            c.runs("web")
                .first()
                .is_some_and(|r| r["state"] == "waiting")
        },
    );
    let run = &c.runs("web")[0];
    assert_eq!(
        step_names(run),
        [
            "checkout succeeded",
            "build succeeded",
            "pack succeeded",
            "deploy staging succeeded",
            "smoke staging succeeded",
            "promote production waiting"
        ]
    );
    let log = c.cli_ok(&["logs", "web", "--run", &run["id"].to_string()]);
    assert!(log.contains("smoke test passed"), "{log}");
    assert!(answers(&c, "staging.web.localhost", "v1"));
    let staging = env_status(&c, "staging");
    assert_eq!(staging["live_release"], "r1");
    let nodes: Vec<_> = staging["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes, ["node-1"], "staging runs only on the staging node");
    let prod = c.status("web");
    assert_eq!(
        prod["environment"], "production",
        "the default is the last one"
    );
    assert!(prod["live_release"].is_null(), "{prod:#}");
    assert!(
        prod["waiting"]
            .as_str()
            .unwrap()
            .contains("drover promote web"),
        "{prod:#}"
    );
    let shown = c.cli_ok(&["status", "web"]);
    assert!(
        shown.contains("waiting:") && shown.contains("staging"),
        "{shown}"
    );
    // Nothing reaches production by itself meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.status("web")["live_release"].is_null());

    c.cli_ok(&["promote", "web"]);
    c.wait_until("r1 live in production", Duration::from_secs(60), |c| {
        let st = c.status("web");
        st["live_release"] == "r1" && answers(c, "web.localhost", "v1")
    });
    c.wait_until("the run succeeded", Duration::from_secs(10), |c| {
        c.runs("web")[0]["state"] == "succeeded"
    });
    let run = &c.runs("web")[0];
    assert!(step_names(run).ends_with(&[
        "promote production succeeded".to_string(),
        "deploy production succeeded".to_string()
    ]));
    let mut prod_nodes: Vec<_> = c.status("web")["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect();
    prod_nodes.sort();
    assert_eq!(prod_nodes, ["node-2", "node-3"]);
    let again = c.cli(&["promote", "web"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing of web waits for promotion"));

    // 2. A failing smoke test stops the release in staging.
    commit(&repo, "manual", "v2-nosmoke");
    c.wait_until("r2's run fails", Duration::from_secs(60), |c| {
        c.runs("web")
            .first()
            .is_some_and(|r| r["release"] == "r2" && r["state"] == "failed")
    });
    let run = &c.runs("web")[0];
    assert!(
        step_names(run).ends_with(&["smoke staging failed".to_string()]),
        "{run:#}"
    );
    let err = run["error"].as_str().unwrap();
    assert!(
        err.contains("r2 failed the smoke test in staging")
            && err.contains("production is unchanged"),
        "{err}"
    );
    assert_eq!(env_status(&c, "staging")["live_release"], "r2");
    assert_eq!(c.status("web")["live_release"], "r1");
    assert!(answers(&c, "web.localhost", "v1"));
    assert_eq!(c.cli(&["promote", "web"]).status.code(), Some(1));

    // 3. auto: straight through to production, nothing typed.
    commit(&repo, "auto", "v3");
    c.wait_until("r3 live in production", Duration::from_secs(90), |c| {
        c.status("web")["live_release"] == "r3" && answers(c, "web.localhost", "v3")
    });
    c.wait_until("r3's run succeeded", Duration::from_secs(10), |c| {
        c.runs("web")[0]["state"] == "succeeded"
    });
    let run = &c.runs("web")[0];
    assert_eq!(
        step_names(run)[3..],
        [
            "deploy staging succeeded",
            "smoke staging succeeded",
            "deploy production succeeded"
        ]
    );
    assert!(answers(&c, "staging.web.localhost", "v3"));
    let releases = c.api_get("/v1/apps/web/releases").unwrap();
    let r3 = &releases.as_array().unwrap()[0];
    assert_eq!(r3["live_in"], serde_json::json!(["staging", "production"]));
}
