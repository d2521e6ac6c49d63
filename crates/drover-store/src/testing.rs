//! Test support: a throwaway PostgreSQL cluster.
//!
//! [`TestPostgres::shared`] starts one cluster per test process, on first
//! use, from the installed PostgreSQL binaries (`initdb`, `postgres`) in a
//! temporary directory, listening on 127.0.0.1 only with `trust`
//! authentication and TLS offered (a certificate for 127.0.0.1 and
//! `localhost` from a CA of its own, [`TestPostgres::ca_file`]), so
//! connections that `prefer` TLS, sqlx's default, use it. It lives as long as the test process: its shell waits on
//! a pipe that only the process's exit closes, then stops the server and
//! removes the directory. Each test takes its own database with
//! [`TestPostgres::fresh_database`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A PostgreSQL server for tests (superuser `postgres`, no password).
pub struct TestPostgres {
    port: u16,
    dir: PathBuf,
    /// The server's shell, whose stdin is never written nor closed: the
    /// process's exit closes it, and the shell then stops the server.
    _server: Mutex<Child>,
    databases: AtomicU64,
}

static SHARED: OnceLock<TestPostgres> = OnceLock::new();

/// The test process's cluster (see [`TestPostgres::shared`]).
pub fn shared() -> &'static TestPostgres {
    TestPostgres::shared()
}

impl TestPostgres {
    /// The test process's cluster, started on first use. Panics when
    /// PostgreSQL is not installed or does not start.
    pub fn shared() -> &'static TestPostgres {
        SHARED.get_or_init(TestPostgres::start)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PEM file of the CA that signed the server's certificate (for
    /// `sslmode=verify-full&sslrootcert=…`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }

    /// The cluster's directory (data, socket, `log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn fresh_database(&self) -> String {
        use sqlx::{Connection, Executor};
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("t_{}_{n}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("test PostgreSQL at port {}: {e}", self.port));
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        self.url(&name)
    }

    fn start() -> TestPostgres {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
        });
        let dir = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let log = dir.join("log");
        let log_file = File::create(&log).expect("the server log");
        write_tls_files(&dir.join("tls"));
        // PostgreSQL refuses to run as root: as root, run it as `postgres`.
        let as_root = is_root();
        if as_root {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&dir));
        }
        let cmd = |program: &Path| {
            let mut c = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            };
            // The postgres user may not be able to enter the test's directory.
            c.current_dir(&dir);
            c
        };
        run(cmd(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C"));

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let script = format!(
            "{postgres} -D {data} -p {port} -h 127.0.0.1 -k {dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c ssl=on -c ssl_cert_file={tls}/server.pem -c ssl_key_file={tls}/server.key & pid=$!; read _; kill -INT $pid; wait $pid; rm -rf {dir}",
            postgres = sh_quote(&bin.join("postgres")),
            data = sh_quote(&dir.join("data")),
            dir = sh_quote(&dir),
            tls = sh_quote(&dir.join("tls")),
        );
        let mut server = cmd(Path::new("sh"))
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("the server log"))
            .stderr(log_file)
            .spawn()
            .expect("sh starts");

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            let exited = server.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "the test PostgreSQL did not start ({}); its log, {}:\n{}",
                    match exited {
                        Some(s) => format!("it exited: {s}"),
                        None => "not ready after 30 s".into(),
                    },
                    log.display(),
                    read_log(&log),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        TestPostgres {
            port,
            dir,
            _server: Mutex::new(server),
            databases: AtomicU64::new(0),
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` and
/// `postgres`, else the directory of `initdb` on the PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| match std::fs::canonicalize(d.join("initdb")) {
            // A symlink into the version's directory: use that one.
            Ok(initdb) => initdb.parent().map(Path::to_path_buf).unwrap_or(d),
            Err(_) => d,
        })
        .find(|d| has_both(d))
}

fn is_root() -> bool {
    match Command::new("id").arg("-u").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim() == "0",
        _ => std::env::var("USER").is_ok_and(|u| u == "root"),
    }
}

/// Runs a setup command; panics with its output when it fails.
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?} does not start: {e}", cmd.get_program()));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// `p` quoted for `sh`.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// A CA (`ca.pem`) and a server certificate it signed for 127.0.0.1 and
/// `localhost` (`server.pem`, `server.key`, mode 0600 as PostgreSQL
/// requires) in `dir`.
fn write_tls_files(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).expect("the TLS directory");
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "drover test PostgreSQL CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("a server key");
    let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server certificate names");
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = server
        .signed_by(&key, &issuer)
        .expect("the server certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&key_file, key.serialize_pem()).expect("server.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("server.key's mode");
}
