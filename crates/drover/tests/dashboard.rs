//! The web dashboard in a real browser: Debian's Chromium driven through
//! WebDriver (chromedriver, fantoccini) against a cluster of real
//! processes with load through the proxy. Signed in with a viewer token
//! the app page has no action buttons; with a deployer token, while a
//! canary progresses the app page updates itself (no reload), its chart
//! shows the split `drover status` reports, the run page's log grows live,
//! and a click on rollback (confirmed) rolls the rollout back.
//!
//! Screenshots of the main pages are written as PNG files to
//! `target/screenshots/` (or `$DROVER_SCREENSHOTS`); the test prints where.
//! Needs `chromium` and `chromium-driver` (`apt-get install -y chromium
//! chromium-driver`; `.ci/run` installs them).

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL: &str =
    "install Debian's Chromium and its WebDriver: apt-get install -y chromium chromium-driver (.ci/run does)";

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver as a child process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(logs: &Path) -> Driver {
        let bin =
            std::env::var("DROVER_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let log = std::fs::File::create(logs.join("chromedriver.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); {INSTALL}"));
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let until = Instant::now() + Duration::from_secs(30);
        // (It keeps connections open, so a connect is the readiness check.)
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "{bin} did not answer on port {port} within 30s; see {}",
                logs.join("chromedriver.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let chromium = match std::env::var("DROVER_TEST_CHROMIUM") {
        Ok(p) => PathBuf::from(p),
        Err(_) => find_in_path("chromium")
            .or_else(|| find_in_path("chromium-browser"))
            .unwrap_or_else(|| panic!("no chromium in PATH; {INSTALL}")),
    };
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,1800",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    // Two rustls providers are linked (pingora's ring, everyone else's
    // aws-lc-rs): fantoccini takes the process default, so name it.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    ClientBuilder::rustls()
        .expect("rustls connector")
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot open a Chromium session through chromedriver: {e}; {INSTALL}")
        })
}

/// Runs `script` in the page; its `return` value.
async fn js(b: &Client, script: &str) -> Value {
    b.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Polls `script` in the page until `ok` accepts its value (deadline `secs`).
async fn wait_js(
    b: &Client,
    what: &str,
    secs: u64,
    script: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut last = Value::Null;
    while Instant::now() < until {
        last = js(b, script).await;
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs}s waiting for {what}; the page last showed {last}");
}

fn screenshots_dir() -> PathBuf {
    let dir = match std::env::var_os("DROVER_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        // <target>/tmp → <target>/screenshots
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("screenshots"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(b: &Client, name: &str) -> PathBuf {
    // The whole page, not only the window: make the window as tall as it.
    let (w, _) = b.get_window_size().await.unwrap();
    b.set_window_size(w as u32, 700).await.unwrap();
    let h = js(b, "return Math.ceil(document.documentElement.scrollHeight)")
        .await
        .as_u64()
        .unwrap_or(1800)
        .clamp(600, 6000);
    b.set_window_size(w as u32, h as u32).await.unwrap();
    let png = b.screenshot().await.unwrap();
    let path = screenshots_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.display());
    path
}

/// The rollout the app page shows (environment-less app: parts `*-_`).
const ROLLOUT: &str = r#"
const r = document.querySelector('#env-_ .rollout');
if (!r) return null;
return {
  id: r.dataset.rollout, state: r.dataset.state, step: r.dataset.step,
  weight: r.dataset.weight, to: r.dataset.to,
  label: r.querySelector('.rollout-state').textContent.trim(),
  message: r.querySelector('.rollout-message').textContent.trim(),
  instances: Array.from(document.querySelectorAll('#instances-_ tr[data-instance]'))
    .map(t => t.dataset.release + ':' + t.dataset.state),
  marker: window.__same_page || null,
  updates: Number(document.body.dataset.updates || 0),
};
"#;

/// The chart's split now and the last rate drawn per release.
const CHART: &str = r#"
const split = {};
document.querySelectorAll('#chart-_ svg.split [data-release]')
  .forEach(g => split[g.dataset.release] = Number(g.dataset.percent));
const rate = {}, points = {};
document.querySelectorAll('#chart-_ svg.panel[data-series="rate"] [data-release]')
  .forEach(g => {
    rate[g.dataset.release] = Number(g.dataset.last);
    points[g.dataset.release] = (g.querySelector('path').getAttribute('d').match(/[ML]/g) || []).length;
  });
const percent = {};
document.querySelectorAll('#chart-_ svg.panel[data-series="percent"] [data-release]')
  .forEach(g => percent[g.dataset.release] = Number(g.dataset.last));
return { split, rate, percent, points };
"#;

fn canary_spec() -> String {
    let s = spec("web", 3, "30s")
        .replace("strategy = \"rolling\"", "strategy = \"canary\"")
        .replace(
            "host = \"web.localhost\"",
            "host = \"web.localhost\"\nuser_key = \"header:x-user\"",
        );
    // Step 1 passes after 3 s of good traffic; step 2 holds (10 min) until
    // the operator acts.
    format!(
        "{s}steps = [{{ weight = 20, pause = \"3s\" }}, {{ weight = 50, pause = \"10m\" }}]\n\n\
         [deploy.analysis]\nmax_error_rate = 0.05\nmin_requests = 5\ninterval = \"500ms\"\ndeadline = \"60s\"\n"
    )
}

fn status_json(c: &Cluster) -> Value {
    serde_json::from_str(&c.cli_ok(&["status", "web", "--json"])).unwrap()
}

#[test]
fn the_app_page_follows_a_canary_live_its_chart_shows_the_split_and_rollback_rolls_it_back() {
    let _g = serial();
    let c = Cluster::start(3);
    let sp = canary_spec();
    let repo = Repo::create(c.dir.path(), &sp, &Behavior::ok("v1"));
    c.cli_ok(&["apps", "add", &repo.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    let token = |name: &str, role: &str| {
        c.cli_ok(&["tokens", "create", "--name", name, "--role", role])
            .trim()
            .to_string()
    };
    let (viewer, deployer) = (
        token("dash-viewer", "viewer"),
        token("dash-deployer", "deployer"),
    );
    let driver = Driver::start(&c.dir.path().join("logs"));
    let profile = c.dir.path().join("chromium-profile");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let began = Instant::now();
        let b = browser(&driver, &profile).await;
        let app_url = format!("{}/apps/web", c.api);
        // Not signed in: sent to sign in.
        b.goto(&app_url).await.unwrap();
        assert_eq!(b.current_url().await.unwrap().path(), "/login");

        println!("{:>6.1?} viewer", began.elapsed());
        // A viewer sees everything but no action buttons.
        sign_in(&b, &c.api, &viewer).await;
        b.goto(&app_url).await.unwrap();
        let seen = wait_js(&b, "the app page, for a viewer", 30, ROLLOUT, |v| v["state"] == "succeeded").await;
        assert_eq!(seen["to"], "r1");
        let who = js(&b, "return document.querySelector('form.who').textContent").await;
        assert!(who.as_str().unwrap().contains("dash-viewer (viewer)"), "{who}");
        let buttons = js(&b, "return document.querySelectorAll('button[data-action]').length").await;
        assert_eq!(buttons, 0, "a viewer gets no action buttons");
        b.find(fantoccini::Locator::Css("form.who button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_js(&b, "signed out", 30, "return location.pathname", |v| v == "/login").await;

        println!("{:>6.1?} deployer", began.elapsed());
        // A deployer gets them.
        sign_in(&b, &c.api, &deployer).await;
        b.goto(&app_url).await.unwrap();
        let buttons = js(&b, "return document.querySelectorAll('button[data-action]').length").await;
        assert_eq!(buttons, 5, "promote, pause, resume, abort, rollback");
        let first = wait_js(&b, "the first rollout, succeeded", 30, ROLLOUT, |v| {
            v["state"] == "succeeded" && v["to"] == "r1"
        })
        .await;
        assert_eq!(first["label"], "✓ succeeded", "state as symbol and word: {first}");
        wait_js(&b, "the live indicator", 30, "return document.getElementById('live').dataset.live", |v| v == "on").await;
        // A reload would lose this.
        js(&b, "window.__same_page = 'yes'; return true").await;

        println!("{:>6.1?} canary starts", began.elapsed());
        // The canary starts while the page is open.
        let load = Load::start(&c.proxy_url(), "web.localhost", Duration::from_secs(240));
        repo.commit(&sp, &Behavior::ok("v2"));
        c.cli_ok(&["deploy", "web"]);
        let step1 = wait_js(&b, "canary step 1/2 at 20%", 60, ROLLOUT, |v| {
            v["to"] == "r2" && v["step"] == "1/2" && v["weight"] == "20"
        })
        .await;
        println!("step 1 on the page: {step1}");
        assert_eq!(step1["state"], "progressing");
        assert_eq!(step1["label"], "▶ progressing");
        let step2 = wait_js(&b, "canary step 2/2 at 50%", 60, ROLLOUT, |v| {
            v["to"] == "r2" && v["step"] == "2/2" && v["weight"] == "50"
        })
        .await;
        println!("step 2 on the page: {step2}");
        assert_eq!(step2["marker"], "yes", "the page was not reloaded");
        assert!(step2["updates"].as_u64().unwrap() > 0, "{step2}");
        assert_ne!(step1["message"], step2["message"], "the reason it waits changed with the step");
        // Instances per node, live: the canary's own are on the page.
        let with_r2 = wait_js(&b, "the canary's instances, healthy", 30, ROLLOUT, |v| {
            v["instances"]
                .as_array()
                .is_some_and(|l| l.iter().filter(|i| *i == "r2:healthy").count() == 2)
        })
        .await;
        println!("instances on the page: {}", with_r2["instances"]);

        println!("{:>6.1?} step 2", began.elapsed());
        // The chart shows the split `drover status` reports (step 2 holds:
        // both stay put), and traffic reaching both releases.
        let st = status_json(&c);
        let traffic = st["traffic"].clone();
        assert_eq!(traffic, json!({"r1": 50, "r2": 50}), "{st:#}");
        let chart = wait_js(&b, "the chart's split and rates", 30, CHART, |v| {
            v["split"] == traffic
                && v["percent"] == traffic
                && v["rate"]["r1"].as_f64().unwrap_or(0.0) > 0.0
                && v["rate"]["r2"].as_f64().unwrap_or(0.0) > 0.0
        })
        .await;
        println!("chart: {chart}");
        // The chart grows while the page is open (a point a second).
        let drawn = chart["points"]["r2"].as_u64().unwrap();
        let grown = wait_js(&b, "the chart's history growing", 60, CHART, |v| {
            v["points"]["r2"].as_u64().unwrap_or(0) >= (drawn + 10).max(15)
        })
        .await;
        println!("chart later: {grown}");
        screenshot(&b, "app-mid-canary").await;

        println!("{:>6.1?} phone", began.elapsed());
        // At phone width the layout does not scroll sideways.
        b.set_window_size(390, 844).await.unwrap();
        let overflow = wait_js(
            &b,
            "no horizontal scrolling at 390 px",
            10,
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            |v| v.as_i64() == Some(0),
        )
        .await;
        assert_eq!(overflow, 0);
        screenshot(&b, "app-mid-canary-phone").await;
        b.set_window_size(1280, 1800).await.unwrap();

        println!("{:>6.1?} run tab", began.elapsed());
        // The run of r2, in a tab of its own: its log grows when the rollout ends.
        let run_id = c.runs("web")[0]["id"].as_i64().unwrap();
        let app_tab = b.window().await.unwrap();
        let run_tab = b.new_window(true).await.unwrap();
        b.switch_to_window(run_tab.handle.clone()).await.unwrap();
        b.goto(&format!("{}/runs/{run_id}", c.api)).await.unwrap();
        let run_js = "return { state: document.querySelector('#run [data-state]').dataset.state, \
                      log: document.getElementById('log').textContent, marker: window.__same_page || null }";
        let before = wait_js(&b, "the run page, running", 30, run_js, |v| v["state"] == "running").await;
        assert!(before["log"].as_str().unwrap().contains("==> checkout"), "{before}");
        js(&b, "window.__same_page = 'run'; return true").await;
        screenshot(&b, "run").await;

        println!("{:>6.1?} rollback", began.elapsed());
        // Roll back from the app page: the dialog asks first; dismissed,
        // nothing happens; accepted, the rollout reverts.
        b.switch_to_window(app_tab).await.unwrap();
        click(&b, "#actions-_ button[data-action='rollback']").await;
        let question = b.get_alert_text().await.unwrap();
        assert_eq!(question, "Roll web back to r1? The rollout of r2 reverts.");
        b.dismiss_alert().await.unwrap();
        assert_eq!(status_json(&c)["rollout"]["state"], "progressing");
        click(&b, "#actions-_ button[data-action='rollback']").await;
        b.accept_alert().await.unwrap();
        let st = loop_until(&c, "drover status shows rolled_back", |c| {
            let st = status_json(c);
            (st["rollout"]["state"] == "rolled_back").then_some(st)
        });
        assert_eq!(st["live_release"], "r1");
        let back = wait_js(&b, "the page shows the rollback", 30, ROLLOUT, |v| {
            v["state"] == "rolled_back"
        })
        .await;
        assert_eq!(back["label"], "↺ rolled back");
        assert_eq!(back["marker"], "yes", "the page was not reloaded");
        wait_js(
            &b,
            "the answer to the click",
            30,
            "return document.getElementById('notice').textContent",
            |v| v.as_str().is_some_and(|t| t.contains("reverts")),
        )
        .await;

        println!("{:>6.1?} rolled back", began.elapsed());
        // The run page followed along: the rollout's end is in its log.
        b.switch_to_window(run_tab.handle).await.unwrap();
        let after = wait_js(&b, "the run page, failed with the rollout's end", 30, run_js, |v| {
            v["state"] == "failed"
                && v["log"]
                    .as_str()
                    .is_some_and(|l| l.contains(&format!("==> rollout {}:", back["id"].as_str().unwrap())))
        })
        .await;
        assert_eq!(after["marker"], "run", "the run page was not reloaded");

        println!("{:>6.1?} other pages", began.elapsed());
        // The other pages.
        b.goto(&format!("{}/", c.api)).await.unwrap();
        let overview = wait_js(
            &b,
            "the overview",
            30,
            "const r = document.querySelector('tr[data-app=\"web\"]'); \
             return r && { live: r.querySelector('.live-release').textContent, state: r.querySelector('[data-state]').dataset.state }",
            |v| v["live"] == "r1",
        )
        .await;
        assert_eq!(overview["state"], "rolled_back");
        screenshot(&b, "overview").await;
        b.goto(&format!("{}/nodes", c.api)).await.unwrap();
        let nodes = wait_js(
            &b,
            "the nodes",
            30,
            "return Array.from(document.querySelectorAll('tr[data-node]')).map(r => r.dataset.node + ':' + r.dataset.ready)",
            |v| v.as_array().is_some_and(|l| l.len() == 3),
        )
        .await;
        assert_eq!(nodes, json!(["node-1:true", "node-2:true", "node-3:true"]));
        screenshot(&b, "nodes").await;
        b.close().await.unwrap();
        println!("browser part took {:?}", began.elapsed());
        let stats = load.finish();
        println!(
            "load: {} requests, {} failed, by version {:?}",
            stats.sent, stats.failed, stats.by_version
        );
        assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    });
}

/// Signs in on the dashboard's sign-in page with `token`.
async fn sign_in(b: &Client, api: &str, token: &str) {
    b.goto(&format!("{api}/login")).await.unwrap();
    b.find(fantoccini::Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    b.find(fantoccini::Locator::Css("form[action='/login'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(b, "signed in", 30, "return location.pathname", |v| v == "/").await;
}

/// Clicks the element (found again if a live update replaced it meanwhile).
async fn click(b: &Client, css: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let res = match b.find(fantoccini::Locator::Css(css)).await {
            Ok(e) => e.click().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => return,
            Err(e) if Instant::now() < until => {
                println!("click on {css} retried: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot click {css}: {e}"),
        }
    }
}

/// Polls `f` (deadline 60 s) until it gives a value.
fn loop_until<T>(c: &Cluster, what: &str, mut f: impl FnMut(&Cluster) -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if let Some(v) = f(c) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after 60s waiting for {what}\n{}", c.logs());
}
