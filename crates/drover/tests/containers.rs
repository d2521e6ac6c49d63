//! The docker driver end to end, on the machine's Docker Engine: server,
//! agents and proxy as processes on 127.0.0.1, the app a container image
//! built by the pipeline from the repository's Dockerfile.
//!
//! Nothing is pulled from outside: the app is `tests/apps/greeter.c`
//! compiled static here, and its Dockerfile is `FROM scratch`. Images go
//! to the agents as artifacts, or through Debian's `docker-registry` run
//! by the test (with a login) when the app has a `[registry]`.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const APP: &str = "cweb";
const HOST: &str = "cweb.localhost";

fn docker(args: &[&str]) -> Result<String, String> {
    common::docker::docker(args)
}

fn docker_ok(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

fn spec() -> String {
    spec_for(APP, HOST, "")
}

fn spec_for(app: &str, host: &str, extra: &str) -> String {
    format!(
        r#"[app]
name = "{app}"

[run]
instances = 2
stop_timeout = "3s"
memory = "64m"
cpus = 0.5

[health]
path = "/healthz"
interval = "200ms"
healthy_after = 1
unhealthy_after = 2
deadline = "60s"

[route]
host = "{host}"

[deploy]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
drain_timeout = "10s"
{extra}"#
    )
}

/// Commits a Dockerfile that makes `greeting` the app's answer.
fn commit(repo: &Path, greeting: &str) -> String {
    commit_spec(repo, greeting, &spec())
}

fn commit_spec(repo: &Path, greeting: &str, spec: &str) -> String {
    std::fs::write(
        repo.join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY greeter /greeter\nENV GREETING={greeting}\nCMD [\"/greeter\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(repo.join("drover.toml"), spec).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "--quiet", "-m", greeting]);
    git(repo, &["rev-parse", "HEAD"]).trim().to_string()
}

/// The app's repository: the greeter binary, a Dockerfile, drover.toml.
fn create_repo(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/greeter.c");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(repo.join("greeter"))
        .arg(&src)
        .output()
        .expect("cc (build-essential) is needed to build the test app");
    assert!(
        out.status.success(),
        "cc -static greeter.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    git(&repo, &["init", "--quiet", "--initial-branch=main"]);
    repo
}

/// (instance, container id, image id) of the app's running containers,
/// sorted.
fn containers() -> Vec<(String, String, String)> {
    containers_of(APP)
}

fn containers_of(app: &str) -> Vec<(String, String, String)> {
    let ids = docker_ok(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=drover.app={app}"),
    ]);
    let mut v: Vec<_> = ids
        .lines()
        .map(|id| {
            let f = docker_ok(&[
                "inspect",
                "--format",
                "{{index .Config.Labels \"drover.instance\"}} {{.Image}}",
                id,
            ]);
            let (inst, image) = f.split_once(' ').unwrap();
            (inst.to_string(), id.to_string(), image.to_string())
        })
        .collect();
    v.sort();
    v
}

/// The image id of release `rN` as the API reports it.
fn release_image(c: &Cluster, release: &str) -> String {
    release_field(c, APP, release, "image")
}

fn release_field(c: &Cluster, app: &str, release: &str, field: &str) -> String {
    let list = c.api_get(&format!("/v1/apps/{app}/releases")).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == release)
        .and_then(|r| r[field].as_str())
        .unwrap_or_else(|| panic!("{release} has no {field}: {list:#}"))
        .to_string()
}

fn all_answer(c: &Cluster, greeting: &str) -> bool {
    all_answer_at(c, HOST, greeting)
}

fn all_answer_at(c: &Cluster, host: &str, greeting: &str) -> bool {
    (0..6).all(|_| get_version(&c.proxy_url(), host).is_ok_and(|v| v == greeting))
}

/// `drover deploy APP --wait`, which must fail; its output.
fn deploy_fails(c: &Cluster, app: &str) -> String {
    let out = c.cli(&["deploy", app, "--wait"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the deploy should fail: {text}");
    text
}

/// Removes what the test made in the engine, whatever happened: the
/// containers of these agent dirs, the images of this app.
struct Cleanup(Vec<String>, &'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(ids) = docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=drover.agent={dir}"),
            ]) {
                for id in ids.lines() {
                    let _ = docker(&["rm", "-f", id]);
                }
            }
        }
        if let Ok(imgs) = docker(&[
            "images",
            "-q",
            "--filter",
            &format!("label=drover.app={}", self.1),
        ]) {
            for id in imgs.lines() {
                let _ = docker(&["rmi", "-f", id]);
            }
        }
    }
}

#[test]
fn a_dockerfile_app_rolls_out_as_containers_rolls_back_to_its_image_and_survives_its_agent() {
    let _g = serial();
    docker(&["info"]).unwrap_or_else(|e| panic!("these tests need the Docker Engine: {e}"));
    // Declared before the cluster so that it is dropped after it: removed
    // while their agent still ran, containers came back (one was left
    // running after a test, and failed the next run's checks).
    let _cleanup: Cleanup;
    // Keeping one release: r2's image goes once r3 is live (the end).
    let mut c = Cluster::start_with(2, "0", &["--keep-releases", "1"]);
    let agent_dirs: Vec<String> = (1..=2)
        .map(|i| {
            std::fs::canonicalize(c.agent_dir(i))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    _cleanup = Cleanup(agent_dirs.clone(), APP);
    let repo = create_repo(c.dir.path());
    let commit1 = commit(&repo, "v1");

    // Commit → image → containers.
    c.cli_ok(&["apps", "add", &repo.to_string_lossy()]);
    c.cli_ok(&["deploy", APP, "--wait"]);
    c.wait_until(
        "v1 answers through the proxy",
        Duration::from_secs(20),
        |c| all_answer(c, "v1"),
    );
    let image1 = release_image(&c, "r1");
    assert!(image1.starts_with("sha256:"), "{image1}");
    let labels = docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"drover.commit\"}}",
        &format!("drover/{APP}:r1"),
    ]);
    assert_eq!(
        labels, commit1,
        "the image is tagged by release, labelled with its commit"
    );
    let running = containers();
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(
        running.iter().all(|(_, _, img)| *img == image1),
        "{running:?}"
    );
    let limits = docker_ok(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}",
        &running[0].1,
    ]);
    assert_eq!(limits, format!("{} 500000000", 64 << 20), "resource limits");
    c.wait_until(
        "the container's output in its log file",
        Duration::from_secs(10),
        |c| {
            running.iter().all(|(inst, _, _)| {
                (1..=2).any(|i| {
                    std::fs::read_to_string(c.agent_dir(i).join("logs").join(format!("{inst}.log")))
                        .is_ok_and(|l| l.contains("greeter v1 listening on port"))
                })
            })
        },
    );

    // A new image rolls out under load without a failed request.
    commit(&repo, "v2");
    let load = Load::start(&c.proxy_url(), HOST, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    c.cli_ok(&["deploy", APP, "--wait"]);
    std::thread::sleep(Duration::from_millis(300));
    let stats = load.finish();
    println!(
        "container rolling deploy under load: {} requests sent, {} failed, by version {:?}",
        stats.sent, stats.failed, stats.by_version
    );
    stats.assert_clean(&["v1", "v2"], &c.logs());
    assert!(all_answer(&c, "v2"));
    let image2 = release_image(&c, "r2");
    assert_ne!(image1, image2);
    c.wait_until(
        "only r2's containers are left",
        Duration::from_secs(20),
        |_| {
            let all = docker_ok(&["ps", "-aq", "--filter", &format!("label=drover.app={APP}")]);
            let now = containers();
            all.lines().count() == 2 && now.len() == 2 && now.iter().all(|r| r.2 == image2)
        },
    );

    // Rollback to r1, whose image the engine no longer has: the agents
    // fetch r1's archive from the server and load it.
    docker_ok(&[
        "rmi",
        "-f",
        &format!("drover/{APP}:r1"),
        &format!("drover/{APP}:{}", &commit1[..12]),
    ]);
    assert!(
        docker(&["image", "inspect", &image1]).is_err(),
        "r1's image is gone"
    );
    c.cli_ok(&["rollback", APP, "--wait"]);
    c.wait_until("v1 answers again", Duration::from_secs(20), |c| {
        all_answer(c, "v1")
    });
    c.wait_until(
        "r1's image runs on both instances",
        Duration::from_secs(20),
        |_| {
            let now = containers();
            now.len() == 2 && now.iter().all(|r| r.2 == image1)
        },
    );
    let sha1 = c.api_get(&format!("/v1/apps/{APP}/releases")).unwrap();
    let sha1 = sha1
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r1")
        .unwrap()["artifact_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        (1..=2).any(|i| c
            .agent_dir(i)
            .join("artifacts")
            .join(format!("{sha1}.tar.zst"))
            .is_file()),
        "an agent downloaded r1's image archive"
    );

    // An agent restart keeps the containers; a stray with the agent's
    // labels is removed.
    let before = containers();
    let stray = format!("drover-stray-{}", std::process::id());
    docker_ok(&[
        "create",
        "--name",
        &stray,
        "--label",
        &format!("drover.agent={}", agent_dirs[0]),
        "--label",
        "drover.instance=stray-1",
        &image1,
    ]);
    c.agents[0].kill9();
    std::thread::sleep(Duration::from_secs(1));
    let agent = c.spawn_agent(1);
    c.agents[0] = agent;
    c.wait_until(
        "the stray container is removed",
        Duration::from_secs(20),
        |_| docker(&["inspect", &stray]).is_err(),
    );
    c.wait_until(
        "all healthy after the agent restart",
        Duration::from_secs(15),
        |c| {
            c.status(APP)["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["state"] == "healthy")
        },
    );
    assert_eq!(containers(), before, "the same containers run on");
    assert!(
        c.pids(APP).iter().all(|p| p.2 == 0),
        "no restarts: {:?}",
        c.pids(APP)
    );

    // A container killed by hand is restarted.
    let (victim, old_id, _) = before[0].clone();
    docker_ok(&["kill", &old_id]);
    c.wait_until(
        "the killed container is replaced",
        Duration::from_secs(30),
        |c| {
            let now = containers();
            now.iter().any(|r| r.0 == victim && r.1 != old_id)
                && c.pids(APP).iter().any(|p| p.0 == victim && p.2 == 1)
                && c.status(APP)["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|i| i["state"] == "healthy")
        },
    );
    assert!(all_answer(&c, "v1"));

    // A commit without its Dockerfile, whose drover.toml has no run
    // command: the run fails saying so, and nothing moves.
    std::fs::remove_file(repo.join("Dockerfile")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "no Dockerfile"]);
    let text = deploy_fails(&c, APP);
    assert!(
        text.contains("[run] command is missing") && text.contains("has no Dockerfile"),
        "{text}"
    );
    assert_eq!(c.status(APP)["live_release"], "r1");
    assert!(all_answer(&c, "v1"));

    // Retention: with r3 live and r1 its rollback target, r2 is pruned —
    // its archive and its image tags on the server's engine.
    commit(&repo, "v3");
    c.cli_ok(&["deploy", APP, "--wait"]);
    c.wait_until("v3 answers", Duration::from_secs(20), |c| {
        all_answer(c, "v3")
    });
    c.wait_until("r2 is pruned", Duration::from_secs(20), |c| {
        c.api_get(&format!("/v1/apps/{APP}/releases"))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "r2" && r["status"] == "pruned")
    });
    assert!(docker(&["image", "inspect", &format!("drover/{APP}:r2")]).is_err());
    assert!(
        docker(&["image", "inspect", &image2]).is_err(),
        "r2's image is gone"
    );
    docker_ok(&["image", "inspect", &format!("drover/{APP}:r3")]);
}

/// Debian's `docker-registry` on 127.0.0.1, asking for a login (htpasswd,
/// bcrypt from Python's `crypt`), its storage in a temporary directory.
struct Registry {
    addr: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

const REGISTRY_USER: &str = "ci";
const REGISTRY_PASSWORD: &str = "s3cret-registry-pw";

impl Registry {
    fn start() -> Registry {
        let bin =
            std::env::var("DROVER_TEST_REGISTRY").unwrap_or_else(|_| "docker-registry".into());
        let dir = tempfile::tempdir().unwrap();
        let hash = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                REGISTRY_PASSWORD,
            ])
            .output()
            .unwrap();
        assert!(
            hash.status.success(),
            "bcrypt: {}",
            String::from_utf8_lossy(&hash.stderr)
        );
        std::fs::write(
            dir.path().join("htpasswd"),
            format!(
                "{REGISTRY_USER}:{}",
                String::from_utf8_lossy(&hash.stdout).trim()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: drover-test\n    path: {}\n",
                dir.path().join("data").display(),
                dir.path().join("htpasswd").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); install Debian's docker-registry package (.ci/run does)"));
        let r = Registry {
            addr,
            _proc: Proc {
                name: "registry".into(),
                child,
            },
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !raw_get(&r.addr, "localhost", "/v2/").is_ok_and(|(h, _)| h.contains(" 401")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    /// The tags of `repo`, as the registry lists them to a logged-in client.
    fn tags(&self, repo: &str) -> String {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"));
        let (_, body) = raw_get_with(
            &self.addr,
            "localhost",
            &format!("/v2/{repo}/tags/list"),
            &format!("Authorization: Basic {auth}\r\n"),
        )
        .unwrap();
        body
    }
}

fn set_secret(c: &Cluster, app: &str, name: &str, value: &str) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["secrets", "set", app, name])
        .env("DROVER_SERVER", &c.api)
        .env("DROVER_TOKEN", &c.admin_token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    write!(child.stdin.take().unwrap(), "{value}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn with_a_registry_images_are_pushed_with_its_login_and_pulled_by_digest() {
    const APP2: &str = "cweb2";
    const HOST2: &str = "cweb2.localhost";
    let _g = serial();
    docker(&["info"]).unwrap_or_else(|e| panic!("these tests need the Docker Engine: {e}"));
    let registry = Registry::start();
    // Dropped after the cluster (see the first test).
    let _cleanup: Cleanup;
    let c = Cluster::start(1);
    let agent_dir = std::fs::canonicalize(c.agent_dir(1))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    _cleanup = Cleanup(vec![agent_dir], APP2);
    let repo = create_repo(c.dir.path());
    let extra = format!(
        "\n[registry]\nserver = \"{}\"\nrepository = \"team/{APP2}\"\nusername = \"{REGISTRY_USER}\"\npassword_secret = \"REGISTRY_PASSWORD\"\n",
        registry.addr
    );
    let spec = spec_for(APP2, HOST2, &extra);
    let commit1 = commit_spec(&repo, "v1", &spec);
    c.cli_ok(&["apps", "add", &repo.to_string_lossy()]);

    // Without the password's secret the push cannot log in: the run says so.
    let text = deploy_fails(&c, APP2);
    assert!(
        text.contains("REGISTRY_PASSWORD is not set") && text.contains("drover secrets set"),
        "{text}"
    );

    set_secret(&c, APP2, "REGISTRY_PASSWORD", REGISTRY_PASSWORD);
    set_secret(&c, APP2, "API_TOKEN", "tok-123");
    c.cli_ok(&["deploy", APP2, "--wait"]);
    c.wait_until("v1 answers", Duration::from_secs(20), |c| {
        all_answer_at(c, HOST2, "v1")
    });
    let image1 = release_field(&c, APP2, "r1", "image");
    let reference = release_field(&c, APP2, "r1", "image_ref");
    assert!(
        reference.starts_with(&format!("{}/team/{APP2}@sha256:", registry.addr)),
        "{reference}"
    );
    let tags = registry.tags(&format!("team/{APP2}"));
    assert!(
        tags.contains(&commit1[..12]) && tags.contains("\"r1\""),
        "{tags}"
    );
    // No archive on the server: the registry holds the image.
    let digest = release_field(&c, APP2, "r1", "artifact_sha256");
    assert!(!c
        .dir
        .path()
        .join("server/artifacts")
        .join(format!("{digest}.tar.zst"))
        .exists());
    // The registry's password is the driver's, not the app's.
    let (_, cid, _) = containers_of(APP2)[0].clone();
    let env = docker_ok(&["inspect", "--format", "{{.Config.Env}}", &cid]);
    assert!(
        !env.contains(REGISTRY_PASSWORD) && env.contains("GREETING=v1"),
        "{env}"
    );
    assert!(
        env.contains("API_TOKEN=tok-123"),
        "the app's secrets are its env: {env}"
    );

    // r2, then r1's image removed from the engine: the rollback pulls it.
    commit_spec(&repo, "v2", &spec);
    c.cli_ok(&["deploy", APP2, "--wait"]);
    c.wait_until("v2 answers", Duration::from_secs(20), |c| {
        all_answer_at(c, HOST2, "v2")
    });
    c.wait_until("r1's container is gone", Duration::from_secs(20), |_| {
        containers_of(APP2).iter().all(|r| r.2 != image1)
    });
    docker_ok(&["rmi", "-f", &image1]);
    assert!(
        docker(&["image", "inspect", &image1]).is_err(),
        "r1's image is gone"
    );
    c.cli_ok(&["rollback", APP2, "--wait"]);
    c.wait_until("v1 answers again", Duration::from_secs(20), |c| {
        all_answer_at(c, HOST2, "v1")
    });
    // r2's containers go once their agent has drained and stopped them
    // (seen in CI: answers were all r1's while an r2 container still ran).
    c.wait_until("only r1's image runs", Duration::from_secs(20), |_| {
        let running = containers_of(APP2);
        !running.is_empty() && running.iter().all(|r| r.2 == image1)
    });
    let agent_log = std::fs::read_to_string(c.dir.path().join("logs/agent-1.log")).unwrap();
    assert!(
        agent_log.contains("image pulled from the registry"),
        "{agent_log}"
    );

    // The same node runs a process app beside the containers.
    let web = Repo::create(
        &c.dir.path().join("web"),
        &common::spec("web", 2, "30s"),
        &Behavior::ok("p1"),
    );
    c.cli_ok(&["apps", "add", &web.path.to_string_lossy()]);
    c.cli_ok(&["deploy", "web", "--wait"]);
    c.wait_until("both apps answer", Duration::from_secs(20), |c| {
        all_answer_at(c, "web.localhost", "p1") && all_answer_at(c, HOST2, "v1")
    });
    assert!(
        c.pids("web").iter().all(|p| p.1 > 0),
        "web runs as processes: {:?}",
        c.pids("web")
    );
}
