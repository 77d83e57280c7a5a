//! Reused HTTP/1.1 connections to one server: idle connections kept on a
//! stack (the most recently used is taken first, so a quiet period lets the
//! others age out), leased for one exchange, and given back only once the
//! response body has been read to its end on a connection ready for the
//! next request. A lease dropped before that closes its connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use super::body::ForwardBody;

/// The sending half of one HTTP/1.1 connection (hyper's; its connection
/// task reads and writes the socket).
pub type Sender = SendRequest<ForwardBody>;

/// One server's idle connections.
#[derive(Debug)]
pub struct IdleConnections {
    idle: Mutex<Vec<Idle>>,
    /// At most this many are kept; a connection given back past it closes.
    max_idle: usize,
    /// A connection idle this long is closed rather than reused.
    timeout: Duration,
    /// Its pool was replaced or removed: connections coming back close.
    retired: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl IdleConnections {
    pub fn new(max_idle: usize, timeout: Duration) -> Arc<IdleConnections> {
        Arc::new(IdleConnections { idle: Mutex::new(Vec::new()), max_idle, timeout, retired: AtomicBool::new(false) })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing here can panic while holding the lock; a poisoned list is
        // still a list of connections.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection ready for a request, the most recently used
    /// first; closed and expired ones met on the way are dropped.
    pub fn checkout(self: &Arc<Self>) -> Option<Lease> {
        let now = Instant::now();
        let mut idle = self.idle();
        while let Some(entry) = idle.pop() {
            if entry.sender.is_ready() && now.duration_since(entry.since) < self.timeout {
                return Some(Lease { sender: entry.sender, home: self.clone(), reused: true });
            }
        }
        None
    }

    /// A connection back from an exchange: kept if it is ready and there is
    /// room, else closed.
    fn checkin(&self, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = self.idle();
        // Read under the lock `retire` empties the list with, so none is
        // pushed after it.
        if idle.len() < self.max_idle && !self.retired.load(Ordering::Acquire) {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// When the oldest idle connection came back, if one is kept.
    pub fn oldest(&self) -> Option<Instant> {
        self.idle().first().map(|oldest| oldest.since)
    }

    /// Closes the oldest idle connection; false if none is kept.
    pub fn close_oldest(&self) -> bool {
        let mut idle = self.idle();
        let oldest = (!idle.is_empty()).then(|| idle.remove(0));
        drop(idle);
        oldest.is_some()
    }

    /// Closes every idle connection (their server stopped answering on
    /// one, so the others are suspect too).
    pub fn close_all(&self) {
        let closed = std::mem::take(&mut *self.idle());
        drop(closed);
    }

    /// The pool these connections served is gone: the idle ones close now,
    /// and those still leased close when they come back.
    pub fn retire(&self) {
        // `checkin` reads the flag under the list's lock: one that read it
        // unset pushed before `close_all` takes the list, so it closes too.
        self.retired.store(true, Ordering::Release);
        self.close_all();
    }

    /// Closes the connections idle for the timeout or more, and those their
    /// server closed; returns when the oldest one left expires (the stack is
    /// in the order connections came back, so none expires sooner).
    pub fn sweep(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut idle = self.idle();
        idle.retain(|entry| !entry.sender.is_closed() && now.duration_since(entry.since) < self.timeout);
        idle.first().map(|oldest| oldest.since + self.timeout)
    }

    /// Idle connections kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.idle().len()
    }
}

/// One connection, taken for one exchange.
#[derive(Debug)]
pub struct Lease {
    sender: Sender,
    home: Arc<IdleConnections>,
    reused: bool,
}

impl Lease {
    /// A new connection's lease; given back, it joins `home`'s idle ones.
    pub fn new(sender: Sender, home: Arc<IdleConnections>) -> Lease {
        Lease { sender, home, reused: false }
    }

    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// Whether the connection served an exchange before this one (a server
    /// may have closed it meanwhile, so a request it refuses unsent may be
    /// sent again on a new one).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The exchange is complete: the connection is kept for the next one
    /// once hyper is ready to send it. Mostly it already is; else (the
    /// request body is still being written, or the connection task has not
    /// yet run since the response ended) a small task waits for that, at
    /// most as long as an idle connection is kept; past that the connection
    /// is not reused (it closes once hyper has finished writing the body,
    /// which the pool's request timeout bounds).
    pub fn release(mut self) {
        if self.sender.is_ready() {
            return self.home.checkin(self.sender);
        }
        if self.sender.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(self.home.timeout, self.sender.ready()).await {
                self.home.checkin(self.sender);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::ForwardBody;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers `/big` with 1 MiB and every other request with
    /// `hi`; it counts the
    /// connections it accepted and those still open.
    async fn server() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepting, opened) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepting.fetch_add(1, SeqCst);
                opened.fetch_add(1, SeqCst);
                let opened = opened.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                        let body = if req.uri().path() == "/big" { vec![b'x'; 1 << 20] } else { b"hi".to_vec() };
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(bytes::Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    opened.fetch_sub(1, SeqCst);
                });
            }
        });
        (addr, accepted, open)
    }

    async fn connect(addr: std::net::SocketAddr, home: &Arc<IdleConnections>) -> Lease {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        sender.ready().await.unwrap();
        Lease::new(sender, home.clone())
    }

    fn get() -> http::Request<ForwardBody> {
        get_path("/")
    }

    fn get_path(path: &str) -> http::Request<ForwardBody> {
        http::Request::builder()
            .uri(path)
            .header("host", "server")
            .body(http_body_util::Either::Right(Empty::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_response_is_read_to_the_end() {
        let (addr, accepted, open) = server().await;
        let home = IdleConnections::new(4, Duration::from_secs(90));
        let mut lease = connect(addr, &home).await;
        let response = lease.sender().send_request(get_path("/big")).await.unwrap();
        // Given back before its body is read: hyper is not ready for the
        // next request while the response is still on the socket (a small
        // one may be all read into the body already), so it is not kept yet.
        lease.release();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(home.len(), 0, "kept with its response unread");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes().len(), 1 << 20);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(home.len(), 1);

        let mut again = home.checkout().expect("the connection is idle");
        assert!(again.reused());
        let body = again.sender().send_request(get()).await.unwrap().into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "hi");
        assert_eq!(accepted.load(SeqCst), 1, "one connection served both");

        // Dropped without being released (say, the client left mid-body):
        // the connection closes instead of going back.
        drop(again);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(home.len(), 0);
        assert_eq!(open.load(SeqCst), 0, "the server saw it close");
    }

    #[tokio::test]
    async fn a_retired_home_keeps_nothing_and_gives_up_its_oldest_first() {
        let (addr, _, open) = server().await;
        let home = IdleConnections::new(4, Duration::from_secs(90));
        let (first, second, third) =
            (connect(addr, &home).await, connect(addr, &home).await, connect(addr, &home).await);
        first.release();
        let oldest = home.oldest().expect("one idle");
        second.release();
        assert_eq!((home.len(), home.oldest()), (2, Some(oldest)), "the oldest stays the first given back");
        assert!(home.close_oldest());
        assert!(home.oldest().is_some_and(|next| next > oldest), "the oldest went first");
        home.retire();
        assert_eq!(home.len(), 0);
        // A lease out when its pool was retired: its connection closes when
        // it comes back instead of joining the idle ones.
        third.release();
        assert_eq!(home.len(), 0);
        assert!(!home.close_oldest());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.load(SeqCst), 0, "the server saw all three close");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_or_the_cap_or_closed_by_the_server_are_not_kept() {
        let (addr, _, _) = server().await;
        let home = IdleConnections::new(1, Duration::from_millis(200));
        let (first, second) = (connect(addr, &home).await, connect(addr, &home).await);
        first.release();
        let released = Instant::now();
        second.release();
        assert_eq!(home.len(), 1, "the cap is one");
        let expires = home.sweep().expect("one idle connection");
        assert!(expires > released && expires <= Instant::now() + Duration::from_millis(200), "{expires:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(home.checkout().is_none(), "expired");

        // A server that closes the connection after one answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let home = IdleConnections::new(4, Duration::from_secs(90));
        let mut lease = connect(addr, &home).await;
        let body = lease.sender().send_request(get()).await.unwrap().into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "hi");
        lease.release();
        assert_eq!(home.len(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        home.sweep();
        assert_eq!(home.len(), 0, "the server closed it");
    }
}
