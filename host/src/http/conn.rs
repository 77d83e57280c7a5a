//! What the gateway knows about a client connection: made once by the
//! listener when it accepts, shared by every request on the connection; and
//! the client stream it serves HTTP on ([`ClientStream`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
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

/// How much [`ClientStream::read_first`] reads: what hyper's first read of
/// a request head takes.
const FIRST_READ: usize = 8 * 1024;

/// A client's TCP stream, as the listener serves HTTP on it (under TLS on
/// `https` listeners): it notes in its [`Activity`] every read or write
/// that moves bytes. A WebSocket upgraded on a plain connection gets the
/// socket back from hyper as this type ([`ClientStream::into_tcp`]).
pub struct ClientStream {
    io: TcpStream,
    activity: Arc<Activity>,
    /// Read by [`ClientStream::read_first`] and not yet read from this
    /// stream; empty (and unallocated) once it has been.
    first: Bytes,
}

impl ClientStream {
    pub fn new(io: TcpStream, activity: Arc<Activity>) -> ClientStream {
        ClientStream { io, activity, first: Bytes::new() }
    }

    /// Waits for the client's first bytes and reads what has come (at most
    /// 8 KiB), to be read from this stream again: hyper-util's protocol
    /// sniff (24 bytes) and hyper's first read of the head then take them
    /// with no read of their own, so a plain connection costs one read
    /// less. The buffer is taken only once bytes are there: a connection
    /// that sends nothing holds none. False when the client closed without
    /// a byte.
    pub async fn read_first(&mut self) -> std::io::Result<bool> {
        self.io.readable().await?;
        let mut first = BytesMut::with_capacity(FIRST_READ);
        // A read through `AsyncRead`, not `try_read_buf`: tokio takes a
        // short read as the socket drained, so hyper's next read waits for
        // readiness instead of finding EAGAIN.
        if self.io.read_buf(&mut first).await? == 0 {
            return Ok(false);
        }
        self.activity.touch();
        self.first = first.freeze();
        Ok(true)
    }

    /// The socket, its activity no longer noted, and what
    /// [`read_first`](ClientStream::read_first) read that was not yet read
    /// from this stream (it comes before what the socket still holds).
    pub fn into_tcp(self) -> (TcpStream, Bytes) {
        (self.io, self.first)
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            if self.first.is_empty() {
                // Frees the buffer.
                self.first = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_first_read_is_read_again_and_what_is_left_of_it_comes_back_with_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let activity = Arc::new(Activity::new());
        let mut stream = ClientStream::new(socket, activity.clone());

        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(stream.read_first().await.unwrap());
        assert!(activity.quiet_for() < Duration::from_millis(20), "the first read is activity");
        // What came later stays in the socket until the first bytes are read.
        client.write_all(b"Host: a\r\n").await.unwrap();
        let mut head = [0u8; 4];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET ");
        let (mut socket, unread) = stream.into_tcp();
        assert_eq!(&unread[..], b"/ HTTP/1.1\r\n");
        let mut rest = [0u8; 9];
        socket.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"Host: a\r\n");
    }

    #[tokio::test]
    async fn a_client_that_closes_without_a_byte_is_told_apart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        drop(client);
        let mut stream = ClientStream::new(socket, Arc::new(Activity::new()));
        assert!(!stream.read_first().await.unwrap());
    }

    #[tokio::test]
    async fn the_first_read_is_served_in_pieces_no_larger_than_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::new(socket, Arc::new(Activity::new()));
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(stream.read_first().await.unwrap());
        assert!(stream.first.len() <= FIRST_READ);
        // Small reads, as hyper-util's 24-byte sniff makes, then large ones.
        let mut got = vec![0u8; 24];
        stream.read_exact(&mut got).await.unwrap();
        let mut rest = vec![0u8; sent.len() - 24];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut rest)).await;
        assert!(read.is_ok_and(|read| read.is_ok()), "bytes lost");
        got.extend_from_slice(&rest);
        assert_eq!(got, sent);
        assert!(stream.first.is_empty());
    }
}
