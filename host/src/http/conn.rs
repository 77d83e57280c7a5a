//! What the gateway knows about a client connection: made once by the
//! listener when it accepts, shared by every request on the connection.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The client's socket address and, on TLS connections, what the TLS
/// handshake told.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub addr: SocketAddr,
    /// Set on TLS connections.
    pub tls: Option<TlsDetails>,
    /// The WebSockets this connection carries now.
    pub tunnels: Tunnels,
    /// The client's IP address (IPv4-mapped addresses as IPv4) as a header
    /// value, formatted once per connection for `X-Forwarded-For`.
    pub ip_header: http::HeaderValue,
    /// On plain TCP connections, the socket's descriptor: a WebSocket
    /// upgraded on it may splice its payload (the connection's stream owns
    /// the socket; this only names it). Set only by the unsafe
    /// [`ConnInfo::with_plain_fd`].
    plain_fd: Option<RawFd>,
}

/// What the TLS handshake told: the name asked for and the protocol agreed.
#[derive(Debug, Clone)]
pub struct TlsDetails {
    pub sni: Option<String>,
    pub alpn: Option<String>,
}

impl ConnInfo {
    /// What is known of a new connection from `addr`.
    pub fn new(addr: SocketAddr, tls: Option<TlsDetails>) -> ConnInfo {
        let ip = addr.ip().to_canonical().to_string();
        let ip_header = http::HeaderValue::from_str(&ip).expect("an IP address is a header value");
        ConnInfo { addr, tls, tunnels: Tunnels::default(), ip_header, plain_fd: None }
    }

    /// Names the plain TCP socket under the connection.
    ///
    /// # Safety
    /// `fd` must be the descriptor of the plain TCP socket that the
    /// connection's stream owns and reads and writes directly (no TLS, no
    /// buffer in between), so that an HTTP/1.1 upgrade of the connection
    /// owns that socket whole.
    pub unsafe fn with_plain_fd(self, fd: RawFd) -> ConnInfo {
        ConnInfo { plain_fd: Some(fd), ..self }
    }

    /// The socket's descriptor on plain TCP connections (see
    /// [`ConnInfo::with_plain_fd`]).
    pub fn plain_fd(&self) -> Option<RawFd> {
        self.plain_fd
    }

    /// `https` on TLS connections, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// The upgraded streams (WebSockets) a client connection carries now: a
/// relay counts itself in with [`Tunnels::enter`], so an HTTP/2 connection
/// whose only traffic is a quiet WebSocket is not closed as idle.
#[derive(Debug, Clone, Default)]
pub struct Tunnels(Arc<AtomicUsize>);

/// One tunnel counted while it lives.
#[derive(Debug)]
pub struct TunnelGuard(Arc<AtomicUsize>);

impl Tunnels {
    pub fn enter(&self) -> TunnelGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        TunnelGuard(self.0.clone())
    }

    pub fn live(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
