//! Listeners: accept TCP connections (and the TLS handshake on `https`
//! listeners), serve HTTP/1.1 and HTTP/2 on them, and hand each request to
//! the listener's [`ListenerProxy`]. Upgrades (HTTP/1.1) and extended CONNECT
//! (HTTP/2, RFC 8441) are enabled on every connection, so WebSocket works on
//! every listener with no switch.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::proxy_protocol;
use crate::http::conn::{Activity, ClientStream};
use crate::http::{ConnInfo, TlsDetails};
use crate::request::ListenerProxy;
use crate::shutdown::Drain;

/// Open files kept free of client connections (plugins, cache, logs, probes).
const FD_HEADROOM: u64 = 256;

/// The process-wide cap on client connections plus WebSockets, so the
/// gateway never runs out of file descriptors: past it, new connections are
/// closed at once, logged once per burst.
#[derive(Debug)]
pub struct ConnectionCap {
    cap: usize,
    /// Upstream connections the process may have open at once: what the
    /// open-file limit leaves after the headroom and the client cap.
    upstream: usize,
    live: AtomicUsize,
    refusing: AtomicBool,
    drain: Arc<Drain>,
}

/// Holds a place under the cap while a connection lives.
pub struct Admitted(Arc<ConnectionCap>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCap {
    /// The cap from config, or from the open-file limit: the soft limit is
    /// raised to the hard one, and each connection may need two descriptors
    /// (client and server), so half of what is left after the headroom goes
    /// to clients and half to upstream connections.
    pub fn new(configured: Option<usize>, drain: Arc<Drain>) -> ConnectionCap {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            limit.current = limit.maximum;
            if let Err(error) = setrlimit(Resource::Nofile, limit) {
                tracing::warn!(%error, "could not raise the open-file limit to its hard limit");
                limit = getrlimit(Resource::Nofile);
            }
        }
        let files = limit.current.unwrap_or(1 << 20);
        let derived = (files.saturating_sub(FD_HEADROOM) / 2).max(1) as usize;
        let cap = configured.unwrap_or(derived);
        let upstream = (files.saturating_sub(FD_HEADROOM).saturating_sub(cap as u64)).max(files / 4) as usize;
        tracing::info!(
            open_file_limit = files,
            max_connections = cap,
            max_upstream_connections = upstream,
            "connection cap"
        );
        ConnectionCap { cap, upstream, live: AtomicUsize::new(0), refusing: AtomicBool::new(false), drain }
    }

    /// How many upstream connections the process may have open at once:
    /// the open-file limit less 256 and the client cap, and at least a
    /// quarter of the open-file limit.
    pub fn upstream_allowance(&self) -> usize {
        self.upstream
    }

    /// A place for a new client connection, or `None` past the cap.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let live = self.live.fetch_add(1, Ordering::AcqRel) + 1;
        if live + self.drain.websockets() <= self.cap {
            if self.refusing.load(Ordering::Relaxed) && (live + self.drain.websockets()) * 10 < self.cap * 9 {
                self.refusing.store(false, Ordering::Relaxed);
                tracing::info!(max_connections = self.cap, "below the connection cap again; accepting");
            }
            return Some(Admitted(self.clone()));
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        if !self.refusing.swap(true, Ordering::Relaxed) {
            tracing::warn!(max_connections = self.cap, "connection cap reached; refusing new connections");
        }
        None
    }
}

/// How each connection is served: timeouts and size caps from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub client_idle_timeout: Duration,
    pub max_concurrent_streams: u32,
}

/// Binds `addr` with `SO_REUSEPORT`, so a new gateway process (a new binary
/// or config) can bind the same port while this one drains: the kernel
/// spreads new connections over both until this one stops accepting.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts connections on `listener` until the task is dropped; with `tls`,
/// each connection starts with a TLS handshake.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<ListenerProxy>,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    cap: Arc<ConnectionCap>,
    stop: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => {
                // Serve the connections already queued, then close: with
                // SO_REUSEPORT a successor takes every new one.
                while let Ok(Ok((stream, addr))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                    let Some(admitted) = cap.admit() else { continue };
                    tokio::spawn(connection(stream, addr, proxy.clone(), tls.clone(), builder.clone(), limits, admitted));
                }
                tracing::info!(listener = %proxy.name, "stopped accepting");
                return;
            }
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(listener = %proxy.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Past the cap the connection is closed at once (dropped).
        let Some(admitted) = cap.admit() else { continue };
        // Linux gives an accepted socket the listener's TCP_NODELAY (set in
        // `bind`), so this call would be one more syscall per connection.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, addr, proxy.clone(), tls.clone(), builder.clone(), limits, admitted));
    }
}

async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    proxy: Arc<ListenerProxy>,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnectionLimits,
    _admitted: Admitted,
) {
    let activity = Arc::new(Activity::new());
    let mut stream = ClientStream::new(stream, activity.clone());
    let addr = if proxy.proxy_protocol() {
        let header = proxy_protocol::read_header(&mut stream, addr);
        let read = tokio::time::timeout(limits.header_read_timeout, header).await;
        let refused = "PROXY header refused; connection closed";
        let Some(client) = settled(&proxy, addr, read, refused, "no PROXY header in time; connection closed") else {
            return;
        };
        client
    } else {
        addr
    };
    let Some(acceptor) = tls else {
        // The client's first bytes, read before hyper serves: its protocol
        // sniff and first read of the head take them without reads of their
        // own. Bounded like the rest of the head; once the listener is
        // removed, a connection still silent gets the grace an idle one gets
        // (one whose request is already here is served, its response the
        // connection's last).
        let deadline = tokio::time::Instant::from_std(activity.opened + limits.header_read_timeout);
        let read = {
            let first = stream.read_first();
            tokio::pin!(first);
            tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, &mut first) => read,
                _ = proxy.retired() => {
                    let grace = deadline.min(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    tokio::time::timeout_at(grace, &mut first).await
                }
            }
        };
        // `false`: closed without a byte.
        let late = "no request in time; connection closed";
        let Some(true) = settled(&proxy, addr, read, "client connection failed", late) else { return };
        let conn = Arc::new(ConnInfo::new(addr, None));
        return serve_http(TokioIo::new(stream), conn, proxy, &builder, limits, &activity).await;
    };
    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
    let Some(stream) = settled(&proxy, addr, handshake, "TLS handshake failed", "TLS handshake timed out") else {
        return;
    };
    let session = stream.get_ref().1;
    let details = TlsDetails {
        sni: session.server_name().map(str::to_owned),
        alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
    };
    let conn = Arc::new(ConnInfo::new(addr, Some(details)));
    serve_http(TokioIo::new(stream), conn, proxy, &builder, limits, &activity).await;
}

/// What a bounded step of a new connection (its PROXY header, first bytes
/// or TLS handshake) gave; `None`, logged, when it failed or ran out of
/// time, and the connection is to be dropped.
fn settled<T, E: std::fmt::Display>(
    proxy: &ListenerProxy,
    peer: SocketAddr,
    step: Result<Result<T, E>, tokio::time::error::Elapsed>,
    failed: &str,
    late: &str,
) -> Option<T> {
    match step {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            tracing::debug!(listener = %proxy.name, %peer, %error, "{failed}");
            None
        }
        Err(_) => {
            tracing::debug!(listener = %proxy.name, %peer, "{late}");
            None
        }
    }
}

/// How long a connection closed as idle has to finish (a GOAWAY answered,
/// a last response written) before it is cut.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

async fn serve_http<I>(
    io: TokioIo<I>,
    conn: Arc<ConnInfo>,
    proxy: Arc<ListenerProxy>,
    builder: &auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    activity: &Activity,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // Requests of this connection being handled (up to their response head),
    // whether one ever was, and the WebSockets it carries.
    let handling = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(AtomicBool::new(false));
    let tunnels = conn.tunnels.clone();
    let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| {
        let (proxy, conn, handling) = (proxy.clone(), conn.clone(), handling.clone());
        asked.store(true, Ordering::Relaxed);
        async move {
            handling.fetch_add(1, Ordering::AcqRel);
            let response = proxy.handle(req, &conn).await;
            handling.fetch_sub(1, Ordering::AcqRel);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // A listener a reload removed ends its connections politely: once no
    // request is being handled, HTTP/1.1 closes and HTTP/2 sends GOAWAY
    // (responses under way are finished either way). So does a connection
    // left idle: no request by `header_read_timeout` after it opened (a
    // client that connects, or sends an HTTP/2 preface, and nothing more),
    // or no byte for `client_idle_timeout` with nothing under way.
    let retired = proxy.retired();
    tokio::pin!(retired);
    let (mut retiring, mut shut) = (false, None::<Instant>);
    let floor = Duration::from_millis(20);
    let result = loop {
        let busy = handling.load(Ordering::Acquire) > 0 || tunnels.live() > 0;
        let asked_once = asked.load(Ordering::Relaxed);
        // When to look again: the earliest moment something can change.
        let wait = if shut.is_some() || retiring {
            floor.max(IDLE_CLOSE_GRACE / 4).min(Duration::from_millis(250))
        } else if busy {
            limits.client_idle_timeout / 2
        } else if asked_once {
            limits.client_idle_timeout.saturating_sub(activity.quiet_for()).max(floor)
        } else {
            // A first request may come before then, starting the idle clock.
            limits
                .header_read_timeout
                .saturating_sub(activity.opened.elapsed())
                .min(limits.client_idle_timeout)
                .max(floor)
        };
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = &mut retired, if !retiring => retiring = true,
            _ = tokio::time::sleep(wait) => {
                let busy = handling.load(Ordering::Acquire) > 0 || tunnels.live() > 0;
                if let Some(since) = shut {
                    // Cut only what has gone quiet: a response still being
                    // written finishes.
                    if since.elapsed() >= IDLE_CLOSE_GRACE && !busy && activity.quiet_for() >= IDLE_CLOSE_GRACE {
                        tracing::debug!(listener = %proxy.name, client = %conn.addr, "closed connection cut");
                        return;
                    }
                    continue;
                }
                let idle = !busy
                    && if asked.load(Ordering::Relaxed) {
                        activity.quiet_for() >= limits.client_idle_timeout
                    } else {
                        activity.opened.elapsed() >= limits.header_read_timeout
                    };
                if idle || (retiring && !busy) {
                    connection.as_mut().graceful_shutdown();
                    shut = Some(Instant::now());
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(listener = %proxy.name, client = %conn.addr, %error, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle_delay() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        // On Linux inherited from the listener, with no call of its own.
        assert!(accepted.nodelay().unwrap());
    }
}
