//! A blocking HTTP client for the API, mapping failures to exit codes:
//! bad input / not found → 2, everything else → 1.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// An error with the exit code it should produce.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fail {}

pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Fail {
        code,
        message: message.into(),
    }
    .into()
}

pub struct Client {
    base: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    /// A bad DROVER_CA_CERT: every call fails with it.
    setup_error: Option<String>,
}

impl Client {
    /// A client of the server at `base`, sending `token` as a bearer token.
    pub fn new(base: &str, token: Option<&str>) -> Self {
        let (cas, setup_error) = match drover_api::trusted_cas() {
            Ok(c) => (c, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .default_headers(drover_api::bearer_headers(token))
            .tls_certs_merge(cas)
            .build()
            .expect("http client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Client {
            base: base.trim_end_matches('/').to_string(),
            http,
            rt,
            setup_error,
        }
    }

    fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        if let Some(e) = &self.setup_error {
            return Err(fail(2, e.clone()));
        }
        let base = self.base.clone();
        self.rt.block_on(async move {
            let resp = req.send().await.map_err(|e| {
                use drover_agent::client::{error_chain, is_tls_error};
                if is_tls_error(&e) {
                    return fail(1, format!("cannot talk TLS with the drover server at {base}: {}. If its certificate is from a private CA, set {} to that CA's PEM file", error_chain(&e), drover_api::CA_CERT_ENV));
                }
                fail(1, format!("cannot reach the drover server at {base}: {e}. Is `drover server` or `drover up` running? (set DROVER_SERVER)"))
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<drover_api::ApiError>(&text).map(|e| e.error).unwrap_or(text);
            let code = if status.as_u16() == 400 || status.as_u16() == 404 { 2 } else { 1 };
            Err(fail(code, msg))
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.http.get(format!("{}{path}", self.base)))?;
        self.rt
            .block_on(resp.json::<T>())
            .map_err(|e| fail(1, format!("unexpected answer from the server: {e}")))
    }

    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self.send(self.http.get(format!("{}{path}", self.base)))?;
        self.rt
            .block_on(resp.text())
            .map_err(|e| fail(1, e.to_string()))
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self.send(self.http.post(format!("{}{path}", self.base)).json(body))?;
        self.rt
            .block_on(resp.json::<T>())
            .map_err(|e| fail(1, format!("unexpected answer from the server: {e}")))
    }
}
