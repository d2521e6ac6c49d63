//! The sample app of `drover up --demo`: a small HTTP server (Python's
//! standard library, nothing to install) with `/healthz`, in a git repo on
//! branch `main` with its `drover.toml`.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;

pub const APP_PY: &str = r#"# hello: drover's demo app. Serves "hello from <release>" and /healthz.
import http.server, os, socketserver

PORT = int(os.environ["PORT"])
RELEASE = os.environ.get("DROVER_RELEASE", "dev")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok\n" if self.path == "/healthz" else f"hello from {RELEASE}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server((os.environ.get("HOST", "127.0.0.1"), PORT), Handler).serve_forever()
"#;

pub const DROVER_TOML: &str = r#"[app]
name = "hello"

[build]
command = "python3 -m py_compile app.py"
artifact = ["app.py"]

[run]
command = "exec python3 app.py"
instances = 3
stop_timeout = "5s"

[health]
path = "/healthz"
interval = "500ms"
healthy_after = 1
deadline = "30s"

[route]
host = "hello.localhost"

[deploy]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
"#;

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run git; install git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Creates the demo repo at `dir` unless it exists. Returns true if created.
pub fn create(dir: &Path) -> anyhow::Result<bool> {
    if dir.join(".git").exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("app.py"), APP_PY)?;
    std::fs::write(dir.join("drover.toml"), DROVER_TOML)?;
    git(dir, &["init", "--quiet", "--initial-branch=main"])?;
    // A repo-local identity, so commits work on a machine with no git
    // identity configured (the README's quick start commits here).
    git(dir, &["config", "user.name", "drover demo"])?;
    git(dir, &["config", "user.email", "demo@drover.invalid"])?;
    git(dir, &["add", "app.py", "drover.toml"])?;
    git(dir, &["commit", "--quiet", "-m", "hello: first version"])?;
    Ok(true)
}
