//! API tokens and roles.
//!
//! A token is `drv_<id>_<secret>`: `id` (12 hex) finds its record, `secret`
//! (64 hex, 256 random bits) proves it. Only the sha256 of the secret is
//! stored, compared in constant time. Roles: `viewer` (read), `deployer`
//! (read + deploy, rollback and rollout controls), `admin` (everything,
//! incl. apps and tokens) and `node`: the join token (proxies' endpoints,
//! and an agent's first registration), and an agent on the agent port,
//! identified by its certificate instead of a token (see [`crate::pki`]).
//!
//! *Architecture Invariant*: every route is registered through
//! [`Guarded::route`] with the role it needs, checked before the handler
//! runs; there is no other way to add a route to the API router, so an
//! endpoint without an access rule cannot exist (deny by default).
//!
//! At first start the server creates a bootstrap admin token and a join
//! token for agents and proxies, writes them to `<data-dir>/admin-token` and
//! `<data-dir>/join-token` (mode 0600) and logs where they are, never what.

use crate::api::ApiErr;
use crate::{now_ms, Server};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::MethodRouter;
use axum::Router;
use drover_store::{NodeCertRecord, Store, TokenRecord};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Deployer,
    Admin,
    /// Agents and proxies.
    Node,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "deployer" => Role::Deployer,
            "admin" => Role::Admin,
            "node" => Role::Node,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }

    /// Whether this role meets `need`.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Public => true,
            Need::Viewer => matches!(self, Role::Viewer | Role::Deployer | Role::Admin),
            Need::Deployer => matches!(self, Role::Deployer | Role::Admin),
            Need::Admin => self == Role::Admin,
            Need::Node => self == Role::Node,
        }
    }
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No token (health; webhooks, which carry their own HMAC signature).
    Public,
    Viewer,
    Deployer,
    Admin,
    Node,
}

impl Need {
    fn role_name(self) -> &'static str {
        match self {
            Need::Public => "none",
            Need::Viewer => "viewer",
            Need::Deployer => "deployer",
            Need::Admin => "admin",
            Need::Node => "node (an agent's or proxy's join token)",
        }
    }
}

/// Who made a request (in the request's extensions once authenticated).
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// An agent on the agent port: its node and certificate serial.
    pub cert: Option<crate::pki::PeerNode>,
}

const PREFIX: &str = "drv_";

/// The node a caller's certificate is for, if it is an agent.
pub fn bound_node(caller: &Caller) -> Option<&str> {
    caller.cert.as_ref().map(|c| c.node.as_str())
}

/// An agent endpoint may act for `node` only with that node's certificate:
/// not the shared join token (which only registers), not another node's.
pub fn check_node(caller: &Caller, node: &str) -> Result<(), crate::api::ApiErr> {
    match bound_node(caller) {
        Some(n) if n == node => Ok(()),
        Some(n) => Err(crate::api::ApiErr::Forbidden(format!(
            "this certificate is node {n}'s; it cannot act for node {node}"
        ))),
        None => Err(crate::api::ApiErr::Forbidden(format!(
            "token {} ({}) may only register agents; node {node}'s calls go to the agent port \
             over mutual TLS, with the certificate its registration returned",
            caller.token_id, caller.name
        ))),
    }
}

/// A new token for `name` with `role`: the token string (shown once) and
/// the record to store.
pub fn new_token(
    name: &str,
    role: Role,
    expires_at: Option<u64>,
    now: u64,
) -> (String, TokenRecord) {
    let id = hex::encode(rand::random::<[u8; 6]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let record = TokenRecord {
        id: id.clone(),
        name: name.to_string(),
        role: role.as_str().to_string(),
        secret_hash: hash_secret(&secret),
        created_at: now,
        expires_at,
        revoked_at: None,
    };
    (format!("{PREFIX}{id}_{secret}"), record)
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equal bytes, in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `(id, secret)` of a well-formed token.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

/// The caller a token belongs to, or why it is refused. The reasons name
/// the token's id and name only, never its secret.
pub async fn authenticate(store: &dyn Store, token: &str, now: u64) -> Result<Caller, ApiErr> {
    let bad = || {
        ApiErr::Unauthorized(
            "the token is not valid (wrong, or not a drover token); check DROVER_TOKEN".into(),
        )
    };
    let (id, secret) = split_token(token).ok_or_else(bad)?;
    let rec = match store.get_token(id).await {
        Ok(r) => r,
        Err(drover_store::StoreError::NotFound(_)) => return Err(bad()),
        Err(e) => return Err(e.into()),
    };
    if !ct_eq(hash_secret(secret).as_bytes(), rec.secret_hash.as_bytes()) {
        return Err(bad());
    }
    if rec.revoked_at.is_some() {
        return Err(ApiErr::Unauthorized(format!(
            "token {} ({}) was revoked; ask an admin for a new one",
            rec.id, rec.name
        )));
    }
    if rec.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiErr::Unauthorized(format!(
            "token {} ({}) has expired; ask an admin for a new one",
            rec.id, rec.name
        )));
    }
    let role = Role::parse(&rec.role).ok_or_else(|| {
        ApiErr::Internal(format!(
            "token {} has an unknown role {:?}",
            rec.id, rec.role
        ))
    })?;
    Ok(Caller {
        token_id: rec.id,
        name: rec.name,
        role,
        cert: None,
    })
}

/// The `Authorization: Bearer …` token of a request.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(|t| t.trim().to_string())
}

/// How long a certificate's record read from the store is trusted. A
/// revocation by this server takes effect at once ([`CertCache::forget`]);
/// one by another server sharing the database, within this long.
const CERT_FRESH_MS: u64 = 5_000;

/// Certificates' records as last read from the store: every report and
/// poll of every agent is authenticated by its certificate, and reading
/// the record each time was a store query per request (thousands a second
/// with thousands of agents).
#[derive(Default)]
pub struct CertCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (NodeCertRecord, u64)>>,
}

impl CertCache {
    async fn get(
        &self,
        store: &dyn Store,
        serial: &str,
        now: u64,
    ) -> drover_store::Result<NodeCertRecord> {
        if let Some((rec, at)) = self.entries.lock().unwrap().get(serial) {
            if now.saturating_sub(*at) < CERT_FRESH_MS {
                return Ok(rec.clone());
            }
        }
        let rec = store.get_node_cert(serial).await?;
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= 100_000 {
            entries.retain(|_, (_, at)| now.saturating_sub(*at) < CERT_FRESH_MS);
        }
        entries.insert(serial.to_string(), (rec.clone(), now));
        Ok(rec)
    }

    /// Drops `node`'s certificates (after revoking some of them).
    pub fn forget(&self, node: &str) {
        self.entries
            .lock()
            .unwrap()
            .retain(|_, (rec, _)| rec.node != node);
    }
}

/// The caller of the agent port: the node of a certificate the built-in CA
/// issued (the handshake checked the chain and dates), while the store
/// holds it unrevoked for that node.
pub async fn authenticate_peer(
    store: &dyn Store,
    certs: &CertCache,
    peer: &crate::pki::PeerNode,
    now: u64,
) -> Result<Caller, ApiErr> {
    let again = "register again with the join token";
    let rec = match certs.get(store, &peer.serial, now).await {
        Ok(r) => r,
        Err(drover_store::StoreError::NotFound(_)) => {
            return Err(ApiErr::Unauthorized(format!(
            "certificate {} (node {}) is not one this server issued, or expired long ago; {again}",
            peer.serial, peer.node
        )))
        }
        Err(e) => return Err(e.into()),
    };
    if rec.node != peer.node {
        return Err(ApiErr::Unauthorized(format!(
            "certificate {} was issued to node {}, not {}",
            peer.serial, rec.node, peer.node
        )));
    }
    if rec.revoked_at.is_some() {
        return Err(ApiErr::Unauthorized(format!(
            "certificate {} of node {} was revoked (the node registered again, or renewed twice since); {again}",
            peer.serial, peer.node
        )));
    }
    if rec.not_after <= now {
        return Err(ApiErr::Unauthorized(format!(
            "certificate {} of node {} has expired; {again}",
            peer.serial, peer.node
        )));
    }
    Ok(Caller {
        token_id: format!("cert {}", peer.serial),
        name: format!("node:{}", peer.node),
        role: Role::Node,
        cert: Some(peer.clone()),
    })
}

/// The bearer token of a request: `Authorization: Bearer …`, or the
/// dashboard's `drover_token` cookie.
fn request_token(req: &Request) -> Option<String> {
    let headers = req.headers();
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        return bearer(headers);
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("drover_token=").map(str::to_string))
}

async fn check(
    State((server, need)): State<(Arc<Server>, Need)>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiErr> {
    if need == Need::Public {
        return Ok(next.run(req).await);
    }
    // The agent port: the certificate is the credential, tokens do nothing.
    if let Some(peer) = req.extensions().get::<crate::pki::PeerNode>().cloned() {
        let caller = authenticate_peer(&*server.store, &server.node_certs, &peer, now_ms()).await?;
        if !caller.role.allows(need) {
            return Err(ApiErr::Forbidden(format!(
                "node {} may not call this",
                peer.node
            )));
        }
        req.extensions_mut().insert(caller);
        return Ok(next.run(req).await);
    }
    let Some(token) = request_token(&req) else {
        return Err(ApiErr::Unauthorized(format!(
            "no token: this needs a {} token; set DROVER_TOKEN (the bootstrap admin token is in the server's data dir, file admin-token)",
            need.role_name()
        )));
    };
    let caller = authenticate(&*server.store, &token, now_ms()).await?;
    // The audit trail: every call that may change something, by whom, and
    // how it ended (agents' and proxies' own calls aside).
    let audited = !matches!(*req.method(), Method::GET | Method::HEAD) && need != Need::Node;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if !caller.role.allows(need) {
        if audited {
            audit(&server, &caller, &method, &path, "refused: role too low").await;
        }
        return Err(ApiErr::Forbidden(format!(
            "token {} ({}) has role {}; this needs {}",
            caller.token_id,
            caller.name,
            caller.role.as_str(),
            need.role_name()
        )));
    }
    req.extensions_mut().insert(caller.clone());
    let resp = next.run(req).await;
    if audited {
        let outcome = resp.status().to_string();
        audit(&server, &caller, &method, &path, &outcome).await;
    }
    Ok(resp)
}

/// Records an `audit` event: who called what, and the outcome. A failure
/// to record is logged; the call itself has happened.
async fn audit(server: &Server, caller: &Caller, method: &Method, path: &str, outcome: &str) {
    let app = path
        .strip_prefix("/v1/apps/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(app, _)| app);
    let path: String = path.chars().take(200).collect();
    let msg = format!(
        "{} ({}, token {}) {method} {path} → {outcome}",
        caller.name,
        caller.role.as_str(),
        caller.token_id
    );
    if let Err(e) = server.store.add_event(app, "audit", &msg, now_ms()).await {
        tracing::warn!(error = %e, "cannot record the audit event: {msg}");
    }
}

/// The API router, where every route states the role it needs.
pub struct Guarded {
    router: Router<Arc<Server>>,
    server: Arc<Server>,
}

impl Guarded {
    pub fn new(server: Arc<Server>) -> Self {
        Guarded {
            router: Router::new(),
            server,
        }
    }

    /// Adds `path` for the methods of `m`, each request checked against `need`
    /// before the handler runs.
    pub fn route(self, path: &str, need: Need, m: MethodRouter<Arc<Server>>) -> Self {
        let guard = middleware::from_fn_with_state((self.server.clone(), need), check);
        Guarded {
            router: self.router.route(path, m.route_layer(guard)),
            server: self.server,
        }
    }

    pub fn into_router(self) -> Router<Arc<Server>> {
        self.router
    }
}

// ------------------------------------------------- dashboard sign-in ----

/// `GET /login`: a form for a token; the browser then carries it in an
/// HttpOnly, SameSite=Strict cookie (so another site cannot use it).
pub async fn login_page() -> axum::response::Html<String> {
    axum::response::Html(login_html(""))
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /login`: checks the token, sets the cookie, goes to the dashboard.
pub async fn login(
    State(server): State<Arc<Server>>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let refused = |status: StatusCode, why: &str| {
        (status, axum::response::Html(login_html(why))).into_response()
    };
    match authenticate(&*server.store, form.token.trim(), now_ms()).await {
        Ok(c) if c.role == Role::Node => refused(
            StatusCode::FORBIDDEN,
            "a join token is for agents and proxies; sign in with a viewer, deployer or admin token",
        ),
        Ok(_) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_string()),
                (
                    header::SET_COOKIE,
                    format!(
                        "drover_token={}; Path=/; HttpOnly; SameSite=Strict",
                        form.token.trim()
                    ),
                ),
            ],
        )
            .into_response(),
        Err(ApiErr::Internal(e)) => {
            tracing::error!(error = %e, "sign-in failed");
            refused(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the server log")
        }
        Err(e) => refused(StatusCode::UNAUTHORIZED, &e.to_string()),
    }
}

/// `POST /logout`: forgets the cookie.
pub async fn logout() -> Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login"),
            (
                header::SET_COOKIE,
                "drover_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            ),
        ],
    )
        .into_response()
}

fn login_html(error: &str) -> String {
    let error = match error {
        "" => String::new(),
        e => format!(
            "<p role=\"alert\"><strong>Not signed in:</strong> {}</p>",
            escape_html(e)
        ),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>drover · sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}}input{{width:100%;font:inherit;padding:.4rem;box-sizing:border-box}}button{{font:inherit;margin-top:.6rem;padding:.4rem 1rem}}</style>
</head><body><h1>drover</h1>{error}
<form method="post" action="/login"><label for="token">API token (see <code>drover tokens create</code>; the bootstrap admin token is in the server's data dir, file <code>admin-token</code>)</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Sign in</button></form></body></html>"#
    )
}

/// Text made safe inside HTML elements and attributes.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// At first start (no token at all): creates the bootstrap admin token and
/// the join token, and writes them (mode 0600) into `data_dir`.
pub async fn bootstrap(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    if !store.list_tokens().await?.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    for (file, name, role) in [
        ("admin-token", "bootstrap-admin", Role::Admin),
        ("join-token", "join", Role::Node),
    ] {
        let (token, record) = new_token(name, role, None, now);
        let path = data_dir.join(file);
        write_secret(&path, &token)?;
        store.insert_token(&record).await?;
        tracing::warn!(path = %path.display(), token.id = %record.id, role = role.as_str(), "wrote the {name} token; keep it secret");
    }
    Ok(())
}

/// Writes `text` to a new file only its owner can read.
pub(crate) fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_meet_needs_by_rank_and_node_is_apart() {
        use Need::*;
        let table = [
            (Role::Viewer, [true, true, false, false, false]),
            (Role::Deployer, [true, true, true, false, false]),
            (Role::Admin, [true, true, true, true, false]),
            (Role::Node, [true, false, false, false, true]),
        ];
        for (role, want) in table {
            let got = [Public, Viewer, Deployer, Admin, Node].map(|n| role.allows(n));
            assert_eq!(got, want, "{role:?}");
        }
    }

    #[test]
    fn tokens_parse_only_in_their_exact_shape_and_hash_their_secret() {
        let (t, rec) = new_token("ci", Role::Deployer, None, 1);
        let (id, secret) = split_token(&t).unwrap();
        assert_eq!(id, rec.id);
        assert_eq!(hash_secret(secret), rec.secret_hash);
        assert!(!rec.secret_hash.contains(secret));
        for bad in [
            "",
            "drv_",
            "drv_abc_def",
            &t[1..],
            &format!("{t}0"),
            &t.replace("drv_", "xyz_"),
        ] {
            assert!(split_token(bad).is_none(), "{bad}");
        }
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn bootstrap_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin-token");
        write_secret(&p, "drv_x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "drv_x\n");
    }
}
