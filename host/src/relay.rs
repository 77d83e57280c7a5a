//! The relay: after a WebSocket upgrade, bytes flow both ways untouched until
//! either side closes, the connection idles past `idle_timeout_s`, or it
//! reaches `max_lifetime_s`.
//!
//! The relay never reads payload: it copies bytes. A side that closes its
//! write half (EOF) has that half-close passed on, and the other direction
//! keeps flowing until it closes too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Limits on one relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed.
    Closed { client_to_server: u64, server_to_client: u64 },
    /// No byte moved for `idle_timeout`.
    IdleTimeout,
    /// The connection reached `max_lifetime`.
    MaxLifetime,
    /// The gateway stopped it (its server turned unhealthy).
    Stopped,
    /// A socket failed.
    Error(io::Error),
}

/// Relays between `client` and `server` until one of the [`RelayEnd`]s;
/// `stop` resolving ends it too.
pub async fn relay<C, S>(client: C, server: S, limits: RelayLimits, stop: impl Future<Output = ()>) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_read = Arc::new(AtomicU64::new(0));
    let mut client = Watched { io: client, start, last_read: last_read.clone() };
    let mut server = Watched { io: server, start, last_read: last_read.clone() };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    let lifetime = tokio::time::sleep(limits.max_lifetime);
    tokio::pin!(lifetime);
    tokio::pin!(stop);
    loop {
        let seen = last_read.load(Ordering::Relaxed);
        let idle_deadline = start + Duration::from_millis(seen) + limits.idle_timeout;
        tokio::select! {
            result = &mut copy => {
                return match result {
                    Ok((client_to_server, server_to_client)) => RelayEnd::Closed { client_to_server, server_to_client },
                    Err(e) => RelayEnd::Error(e),
                };
            }
            _ = &mut lifetime => return RelayEnd::MaxLifetime,
            _ = &mut stop => return RelayEnd::Stopped,
            _ = tokio::time::sleep_until(idle_deadline) => {
                if last_read.load(Ordering::Relaxed) == seen {
                    return RelayEnd::IdleTimeout;
                }
            }
        }
    }
}

/// Records when bytes were last read, for the idle timer.
struct Watched<T> {
    io: T,
    start: Instant,
    last_read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last_read.store(this.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
