//! Canary analysis by a real Prometheus (Debian's package) scraping the
//! server's `/metrics`: a PromQL query and a condition judge each step,
//! instead of the built-in figures.

mod common;

use common::*;
use std::time::Duration;

/// The error ratio of the canary over the step so far, from drover's own
/// series as Prometheus scraped them.
const ERROR_RATIO: &str = "sum(increase(drover_release_errors_total{app=\"{{app}}\",env=\"{{env}}\",release=\"{{release}}\"}[{{window}}])) / sum(increase(drover_release_requests_total{app=\"{{app}}\",env=\"{{env}}\",release=\"{{release}}\"}[{{window}}]))";

fn prom_spec(prometheus: &str) -> String {
    let s = spec("web", 3, "30s")
        .replace("strategy = \"rolling\"", "strategy = \"canary\"")
        .replace(
            "host = \"web.localhost\"",
            "host = \"web.localhost\"\nuser_key = \"header:x-user\"",
        );
    format!(
        "{s}steps = [{{ weight = 34, pause = \"1s\" }}, {{ weight = 67, pause = \"1s\" }}]\n\n\
         [deploy.analysis]\nbuiltin = false\nprometheus = \"{prometheus}\"\ninterval = \"3s\"\ndeadline = \"60s\"\n\n\
         [[deploy.analysis.query]]\nname = \"error-ratio\"\nquery = '{ERROR_RATIO}'\ncondition = \"< 0.02\"\n"
    )
}

#[test]
fn prometheus_queries_judge_the_canary_a_bad_one_is_rolled_back_a_good_one_passes() {
    let _g = serial();
    let c = Cluster::start(3);
    // A proxy that serves its own /metrics.
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let (_p2, p2_addr) = c.spawn_proxy("proxy-2", &[], &["--metrics-addr", &metrics_addr]);
    // Prometheus scrapes the server and that proxy, with a token of its own
    // that can only read.
    let token = c.cli_ok(&[
        "tokens",
        "create",
        "--name",
        "prometheus",
        "--role",
        "viewer",
    ]);
    let agents: Vec<String> = (1..=3).map(|i| c.agent_metrics_addr(i)).collect();
    let mut targets = vec![c.api_addr.as_str(), metrics_addr.as_str()];
    targets.extend(agents.iter().map(String::as_str));
    let prom = Prometheus::start(&targets, token.trim());
    let sp = prom_spec(&prom.url);
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(150));

    // Prometheus scrapes drover: r1's series are there, as counters.
    c.wait_until(
        "Prometheus has r1's requests",
        Duration::from_secs(30),
        |_| {
            let r = prom.query("drover_release_requests_total{app=\"web\",release=\"r1\"}");
            r.as_array().is_some_and(|a| {
                a.len() == 1
                    && a[0]["value"][1]
                        .as_str()
                        .unwrap_or("0")
                        .parse::<f64>()
                        .unwrap_or(0.0)
                        > 0.0
            })
        },
    );
    let buckets =
        prom.query("drover_release_request_duration_seconds_bucket{release=\"r1\",le=\"+Inf\"}");
    assert_eq!(buckets.as_array().map(Vec::len), Some(1), "{buckets}");
    // The proxy's own series, parsed by Prometheus: exactly the requests
    // sent through it.
    for _ in 0..25 {
        let (head, _) = raw_get(&p2_addr, "web.localhost", "/").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    c.wait_until(
        "Prometheus has the proxy's 25 requests",
        Duration::from_secs(30),
        |_| {
            let r = prom.query("drover_proxy_release_requests_total{app=\"web\",release=\"r1\"}");
            r[0]["value"][1].as_str() == Some("25")
        },
    );
    let count = prom.query("drover_proxy_release_request_duration_seconds_count{release=\"r1\"}");
    assert_eq!(count[0]["value"][1].as_str(), Some("25"), "{count}");
    // The agents' series: the three healthy instances of r1.
    c.wait_until(
        "Prometheus has the agents' instances",
        Duration::from_secs(30),
        |_| {
            let r = prom
                .query("sum(drover_agent_instances{app=\"web\",release=\"r1\",state=\"healthy\"})");
            r[0]["value"][1].as_str() == Some("3")
        },
    );

    // r2 answers 5% of requests with 500: the query's ratio fails the step.
    repo.commit(
        &sp,
        &Behavior {
            fail_every: 20,
            ..Behavior::ok("v2")
        },
    );
    let out = c.cli(&["deploy", "web", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.status("web");
    let failure = st["rollout"]["failure"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("bad canary judged by Prometheus: {failure}");
    assert_eq!(st["rollout"]["state"], "rolled_back", "{st:#}");
    assert!(
        failure.contains("canary analysis failed at step 1/2")
            && failure.contains("query \"error-ratio\" = ")
            && failure.contains("does not meet the condition < 0.02"),
        "{failure}"
    );
    assert_eq!(st["live_release"], "r1");

    // r3 is healthy: the query passes each step and it goes to 100%.
    repo.commit(&sp, &Behavior::ok("v3"));
    let out = c.cli(&["deploy", "web", "--wait"]);
    let st = c.status("web");
    assert!(
        out.status.success(),
        "{}\n{st:#}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(st["live_release"], "r3");
    c.wait_until("only r3 runs", Duration::from_secs(30), |c| {
        c.status("web")["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == "r3")
    });
    let stats = load.finish();
    println!(
        "load: {} sent, {} failed ({} answered 500 by the bad canary), by version {:?}",
        stats.sent, stats.failed, stats.status_500, stats.by_version
    );
    assert_eq!(stats.failed, stats.status_500, "{:?}", stats.failures);
    assert!(stats.by_version.get("v3").copied().unwrap_or(0) > 0);
}
