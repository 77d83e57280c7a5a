//! What the gateway knows about a client connection: made once by the
//! listener when it accepts, shared by every request on the connection.

use std::net::SocketAddr;

/// The client's socket address and, on TLS connections, what the TLS
/// handshake told.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub addr: SocketAddr,
    /// Set on TLS connections.
    pub tls: Option<TlsDetails>,
}

/// What the TLS handshake told: the name asked for and the protocol agreed.
#[derive(Debug, Clone)]
pub struct TlsDetails {
    pub sni: Option<String>,
    pub alpn: Option<String>,
}

impl ConnInfo {
    /// `https` on TLS connections, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}
