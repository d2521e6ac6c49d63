//! The built-in certificate authority, and mutual TLS for agents.
//!
//! At first start the server creates a CA (ECDSA P-256, valid ten years) in
//! `<data-dir>/ca/`: `ca.pem`, and `ca.key` (mode 0600). An agent registers
//! on the API port with the join token and a certificate signing request;
//! the server signs the request's public key — nothing else of the request
//! is used — into a certificate for that node (CN = the node's name, SAN
//! `<node>.node.drover`, client authentication only, valid `agent_ttl`) and
//! records its serial in the store. From then on the agent talks to the
//! agent listener only, over mutual TLS: the server presents a certificate
//! for [`SERVER_NAME`] from the same CA, re-issued daily; the agent presents
//! its own, and the node it may act for is the certificate's. A certificate
//! is accepted only while the store holds it unrevoked for its node (a node
//! registered again with the join token revokes its older ones; a renewal
//! revokes all but the one it was made with and the new one).

use anyhow::Context;
use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The name agents verify the server's certificate for (whatever address
/// they reach it at), as Consul's agents verify `server.<dc>.consul`.
pub const SERVER_NAME: &str = "server.drover";
/// How long the server's own certificate is valid; it is re-issued daily.
const SERVER_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const SERVER_CERT_RENEW: Duration = Duration::from_secs(24 * 3600);
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are issued (clock skew).
const BACKDATE: Duration = Duration::from_secs(60);

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    /// Lowercase hex, as [`peer_node`] reads it back.
    pub serial: String,
    pub not_after_ms: u64,
}

/// Who is on the other end of an agent connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub node: String,
    pub serial: String,
}

pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_cert: ArcSwap<CertifiedKey>,
    /// How long an agent's certificate is valid.
    pub agent_ttl: Duration,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("agent_ttl", &self.agent_ttl)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the CA from `dir`, creating it at first start.
    pub fn load_or_create(dir: &Path, agent_ttl: Duration) -> anyhow::Result<Pki> {
        let (cert_file, key_file) = (dir.join("ca.pem"), dir.join("ca.key"));
        let (ca_pem, key) = if cert_file.exists() || key_file.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| {
                    format!(
                        "cannot read the CA's {}: both ca.pem and ca.key must be there \
                         (restore them from a backup; deleting both makes a new CA that \
                         every agent must join again)",
                        p.display()
                    )
                })
            };
            let (pem, key) = (read(&cert_file)?, read(&key_file)?);
            let key = KeyPair::from_pem(&key)
                .with_context(|| format!("{} is not a private key", key_file.display()))?;
            (pem, key)
        } else {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "drover cluster CA");
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(serial().0);
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - BACKDATE;
            params.not_after = now + CA_TTL;
            let cert = params.self_signed(&key)?;
            crate::auth::write_secret(&key_file, key.serialize_pem().trim_end())
                .with_context(|| format!("cannot write {}", key_file.display()))?;
            std::fs::write(&cert_file, cert.pem())
                .with_context(|| format!("cannot write {}", cert_file.display()))?;
            tracing::info!(dir = %dir.display(), "created the cluster's certificate authority");
            (cert.pem(), key)
        };
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{} is not a certificate: {e}", cert_file.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .with_context(|| format!("{} is not a CA certificate", cert_file.display()))?;
        let server_cert = ArcSwap::from_pointee(server_certified_key(&issuer)?);
        Ok(Pki {
            ca_pem,
            ca_der,
            issuer,
            server_cert,
            agent_ttl,
        })
    }

    /// The CA's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs the public key of `csr_pem` into a certificate for `node`.
    /// The error says what is wrong with the request.
    pub fn issue_node(&self, node: &str, csr_pem: &str) -> Result<Issued, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("csr is not a valid PEM certificate signing request ({e})"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{node}.node.drover")
                .try_into()
                .map_err(|e| format!("node name {node:?} cannot be in a certificate: {e}"))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let (sn, serial) = serial();
        params.serial_number = Some(sn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + self.agent_ttl;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| format!("cannot sign the certificate signing request: {e}"))?;
        Ok(Issued {
            pem: cert.pem(),
            serial,
            not_after_ms: (params.not_after.unix_timestamp_nanos() / 1_000_000) as u64,
        })
    }

    /// Issues the server's certificate again (called daily).
    pub fn renew_server_cert(&self) -> anyhow::Result<()> {
        self.server_cert
            .store(Arc::new(server_certified_key(&self.issuer)?));
        Ok(())
    }

    /// TLS for the agent listener: the server's certificate, and a client
    /// certificate from this CA required of every connection.
    pub fn agent_tls_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .context("cannot build the agent certificate verifier")?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// TLS for the API listener from an operator's certificate chain and key
/// (PEM files), no client certificates.
pub fn api_tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert {}: not a PEM certificate chain ({e})",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--tls-cert {}: no certificate in it",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: not a PEM private key ({e})", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("--tls-cert and --tls-key do not go together")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct Resolver(Arc<Pki>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.server_cert.load_full())
    }
}

fn server_certified_key(issuer: &Issuer<'static, KeyPair>) -> anyhow::Result<CertifiedKey> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial().0);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + SERVER_CERT_TTL;
    let cert = params.signed_by(&key, issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| anyhow::anyhow!("cannot use the server's key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// A random positive serial (16 bytes, first byte 1..=0x7f so that its DER
/// form is these very bytes), and its hex.
fn serial() -> (SerialNumber, String) {
    let mut b: [u8; 16] = rand::random();
    b[0] = (b[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&b), hex::encode(b))
}

/// The node and serial of a peer's certificate (already verified by TLS).
pub fn peer_node(der: &[u8]) -> Option<PeerNode> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let node = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    drover_core::spec::valid_name(&node).then(|| PeerNode {
        node,
        serial: hex::encode(cert.raw_serial()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_carries_the_node_and_serial_and_chains_to_the_ca() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(&d.path().join("ca"), Duration::from_secs(3600)).unwrap();
        let key = KeyPair::generate().unwrap();
        // What the request asks for is ignored: the node is the server's word.
        let csr = CertificateParams::new(vec!["evil.node.drover".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = pki.issue_node("node-1", &csr).unwrap();
        let der: CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(issued.pem.as_bytes()).unwrap();
        assert_eq!(
            peer_node(&der),
            Some(PeerNode {
                node: "node-1".into(),
                serial: issued.serial.clone()
            })
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.subject().to_string().contains("evil"));
        let (_, ca) = x509_parser::parse_x509_certificate(&pki.ca_der).unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert!(pki
            .issue_node("node-1", "not a csr")
            .unwrap_err()
            .contains("csr"));
        // Loaded again: the same CA.
        let again = Pki::load_or_create(&d.path().join("ca"), Duration::from_secs(3600)).unwrap();
        assert_eq!(again.ca_pem(), pki.ca_pem());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("ca/ca.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
