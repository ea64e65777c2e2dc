//! TLS for the gateway's listeners (HTTP and gRPC, one certificate) and the agent link.
//!
//! Certificates come from PEM files named in the configuration (`[tls] cert`, `key`); rustls
//! with the ring provider does the protocol, so no system OpenSSL is involved. Without a
//! `[tls]` section both listeners speak plaintext, which is the zero-config default for a
//! gateway on loopback; binding plaintext to any other address logs a warning.
//!
//! Agents dial `https://` when given `--tls-ca FILE` (the CA, or the gateway's self-signed
//! certificate, to trust); the join token then travels encrypted.

use osprey_core::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A loaded server identity, in the forms both servers need.
#[derive(Clone)]
pub struct ServerTls {
    /// For the HTTP listener.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// For tonic (which builds its own rustls configuration from the PEM text).
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::invalid(format!("reading the TLS {what} {}: {e}", path.display())))
}

impl ServerTls {
    /// Loads a certificate chain and its private key (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls> {
        let cert_pem = read(cert, "certificate")?;
        let key_pem = read(key, "key")?;
        let bad = |p: &Path, e: String| Error::invalid(format!("{}: {e}", p.display()));
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(cert, format!("not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(bad(cert, "holds no certificate".into()));
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, private)
            .map_err(|e| bad(cert, format!("certificate and key do not make an identity: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert_pem, key_pem })
    }

    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The client side of the agent link: trust `ca` (PEM) for the gateway named `domain`.
pub fn client(ca: &Path, domain: &str) -> Result<tonic::transport::ClientTlsConfig> {
    let pem = read(ca, "CA certificate")?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name(domain))
}

/// Whether `addr` (host:port) is a loopback address, where plaintext is the default.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}
