//! What the gateway knows about a client connection: made once by the
//! listener when it accepts, shared by every request on the connection; and
//! the client stream it serves HTTP on ([`ClientStream`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
        ConnInfo { addr, tls, tunnels: Tunnels::default(), ip_header }
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

/// When a connection last moved a byte, in milliseconds since it opened.
pub struct Activity {
    pub opened: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity { opened: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last byte moved.
    pub fn quiet_for(&self) -> Duration {
        self.opened.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A client's TCP stream, as the listener serves HTTP on it (under TLS on
/// `https` listeners): it notes in its [`Activity`] every read or write
/// that moves bytes. A WebSocket upgraded on a plain connection gets the
/// socket back from hyper as this type ([`ClientStream::into_tcp`]).
pub struct ClientStream {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl ClientStream {
    pub fn new(io: TcpStream, activity: Arc<Activity>) -> ClientStream {
        ClientStream { io, activity }
    }

    /// The socket, its activity no longer noted. Nothing is lost: this
    /// stream buffers nothing (keep it so; a WebSocket relay reads the
    /// socket directly once it has it back).
    pub fn into_tcp(self) -> TcpStream {
        self.io
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
