//! TLS to the servers of `https` pools, for the pooled forwarding client,
//! WebSocket handshakes and probes alike.
//!
//! A server's certificate is verified against the pool's `ca` file or the
//! system's roots, for `tls_server_name` (default: the server's host).
//! `insecure_skip_verify` turns verification off and says so loudly.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{PoolConfig, PoolProtocol};

/// The TLS settings of an `https` pool.
#[derive(Debug, Clone)]
pub struct PoolTls {
    /// For the forwarding client (which offers ALPN `h2`, `http/1.1`).
    pub config: Arc<ClientConfig>,
    /// For WebSocket handshakes and probes (ALPN `http/1.1`).
    pub http1_config: Arc<ClientConfig>,
    /// SNI and verification name, if fixed by `tls_server_name`.
    pub server_name: Option<ServerName<'static>>,
}

impl PoolTls {
    /// The TLS settings of `pool`, or `None` for an `http` pool.
    pub fn for_pool(pool: &PoolConfig) -> Result<Option<PoolTls>, String> {
        if pool.protocol != PoolProtocol::Https {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if pool.insecure_skip_verify {
            tracing::warn!(pool = %pool.name, "insecure_skip_verify: server certificates of this pool are NOT verified; use this only in a lab");
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(roots(pool)?).with_no_client_auth()
        };
        let mut http1_config = config.clone();
        http1_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // The forwarding connector offers h2 and http/1.1 itself.
        config.alpn_protocols.clear();
        let server_name = match &pool.tls_server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|e| format!("tls_server_name: {e}"))?),
            None => None,
        };
        Ok(Some(PoolTls { config: Arc::new(config), http1_config: Arc::new(http1_config), server_name }))
    }

    /// The name to present and verify for the server at `address`
    /// (`host:port`).
    pub fn name_for(&self, address: &str) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|e| format!("`{host}` is not a TLS server name: {e}"))
    }
}

fn roots(pool: &PoolConfig) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match &pool.ca {
        Some(file) => {
            for cert in CertificateDer::pem_file_iter(file).map_err(|e| format!("ca {}: {e}", file.display()))? {
                let cert = cert.map_err(|e| format!("ca {}: {e}", file.display()))?;
                roots.add(cert).map_err(|e| format!("ca {}: {e}", file.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca {}: no certificate in the file", file.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(pool = %pool.name, %error, "reading the system's CA certificates");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(pool = %pool.name, "no system CA certificates found; set `ca` for this pool");
            }
        }
    }
    Ok(roots)
}

/// Whether an error (or one of its causes) is a TLS failure. `io::Error`
/// hides the error it wraps from `source()`, so those are opened by hand.
pub fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    if err.is::<rustls::Error>() {
        return true;
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
        && is_tls_error(inner)
    {
        return true;
    }
    err.source().is_some_and(is_tls_error)
}

/// `insecure_skip_verify`: accepts any certificate, still checks signatures
/// so the handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
