//! Connections to backend servers, by address: one-off HTTP/1.1 connections
//! (plain or TLS) for WebSocket handshakes and probes, and the reused
//! connections plain requests are forwarded over.
//!
//! Everything here takes a server's `host:port`, never a pool's `Server`:
//! what a failure means for the server's health is decided by the caller.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Once, Weak};
use std::time::Duration;

use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, header};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use super::budget::{Budgets, Counted, CountingConnector, Reclaim, is_over_budget};
use super::tls::{PoolTls, is_tls_error};
use crate::http::ResponseBody;
use crate::http::body::{ForwardBody, Upstream};
use crate::http::client::{IdleConnections, Lease};
use crate::http::headers::remove_hop_by_hop;

/// How long a connection to a server may take to open (at most): a server
/// that does not answer the connection is skipped like one that refuses it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle upstream connections kept open per server for reuse: room for a
/// busy server's concurrency, so steady load reuses its connections instead
/// of closing and opening some on every burst (each still closes after
/// [`IDLE_TIMEOUT`] unused, and all count in the pool's budgets).
pub const MAX_IDLE_PER_SERVER: usize = 256;

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connect timeout of a pool: 5 s, or less if its request timeout is.
pub fn connect_timeout(request_timeout: Duration) -> Duration {
    CONNECT_TIMEOUT.min(request_timeout / 2)
}

/// Why one attempt to send to a server failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: nothing reached the server.
    Connect(String),
    /// The server did not answer within the pool's `request_timeout_s`.
    Timeout,
    /// The connection broke after the request may have reached the server.
    Failed(String),
    /// The TLS handshake with the server failed (certificate, name, protocol).
    Tls(String),
    /// This host ran out of something a connection needs (descriptors,
    /// ephemeral ports, buffers): not the server's doing, so its health is
    /// left alone.
    Local(String),
}

/// Whether `error` is this host running out of resources (`EMFILE`,
/// `ENFILE`, `EADDRNOTAVAIL`, `ENOBUFS`, `ENOMEM`) rather than the server
/// refusing or failing.
pub fn is_local_exhaustion(error: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let local = [Errno::MFILE, Errno::NFILE, Errno::ADDRNOTAVAIL, Errno::NOBUFS, Errno::NOMEM];
    error.raw_os_error().is_some_and(|code| local.iter().any(|errno| errno.raw_os_error() == code))
}

/// The first I/O error in `error`'s chain that is a local exhaustion.
fn local_exhaustion(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.downcast_ref::<std::io::Error>().is_some_and(is_local_exhaustion) {
            return true;
        }
        next = error.source();
    }
    false
}

/// A byte stream to a server, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The plain TCP socket under `io`, when [`connect`] opened it without TLS.
pub fn plain_tcp(io: &dyn Io) -> Option<&tokio::net::TcpStream> {
    let io: &dyn std::any::Any = io;
    io.downcast_ref::<Counted<tokio::net::TcpStream>>().map(Counted::get_ref)
}

/// Quiet time after which the kernel checks an upstream socket's peer is
/// still there, then every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] times:
/// a server whose host vanished without a FIN is found within a minute,
/// not when the next request on the socket times out.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// hyper-util's TCP connector as every upstream socket is opened: no Nagle
/// delay, TCP keepalive, and `connect_timeout` divided among a name's
/// addresses.
fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(KEEPALIVE_IDLE));
    connector.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    connector.set_keepalive_retries(Some(KEEPALIVE_PROBES));
    connector.set_connect_timeout(Some(connect_timeout));
    connector
}

/// A socket to a server given by IP address, set up as [`tcp_connector`]
/// sets up its own: opened non-blocking in one call (hyper-util's connector
/// takes two more to make it so), no name to resolve.
async fn connect_ip(ip: SocketAddr, connect_timeout: Duration) -> Result<tokio::net::TcpStream, SendError> {
    let failed = |error: std::io::Error| {
        if is_local_exhaustion(&error) {
            SendError::Local(format!("{ip}: {error}"))
        } else {
            SendError::Connect(format!("{ip}: {error}"))
        }
    };
    let socket = if ip.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(failed)?;
    // As hyper-util's connector does, an option refused is logged, not
    // fatal: it is this host's doing, never the server's.
    if let Err(error) = socket.set_nodelay(true) {
        tracing::warn!(server = %ip, %error, "could not set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(error) = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive) {
        tracing::warn!(server = %ip, %error, "could not set TCP keepalive");
    }
    match tokio::time::timeout(connect_timeout, socket.connect(ip)).await {
        Ok(connected) => connected.map_err(failed),
        Err(_) => Err(SendError::Connect(format!("{ip}: no connection within {connect_timeout:?}"))),
    }
}

/// Opens a connection to `address` (TLS if `tls` is set) for an HTTP/1.1
/// exchange: a forwarded request, a WebSocket handshake or a probe. It
/// holds a place in `budgets` while it is open.
///
/// A name that resolves to several addresses gets hyper-util's connector:
/// the timeout divided between the addresses, and the other address family
/// tried 300 ms into a silent first one (RFC 8305), so a black-holed IPv6
/// route neither costs the whole timeout nor marks the server unhealthy.
pub async fn connect(
    address: &str,
    tls: Option<&PoolTls>,
    connect_timeout: Duration,
    budgets: &Budgets,
) -> Result<Box<dyn Io>, SendError> {
    use tower_service::Service;
    // Waiting for an idle connection's place counts in the connect time.
    let slot = match tokio::time::timeout(connect_timeout, budgets.take_reclaiming()).await {
        Ok(taken) => taken.map_err(|over| SendError::Local(over.to_string()))?,
        Err(_) => return Err(SendError::Local(format!("no upstream connection place within {connect_timeout:?}"))),
    };
    let stream = match address.parse::<SocketAddr>() {
        Ok(ip) => Counted::new(connect_ip(ip, connect_timeout).await?, slot),
        Err(_) => {
            let uri: Uri = format!("http://{address}")
                .parse()
                .map_err(|_| SendError::Connect(format!("`{address}` is not a host and port")))?;
            let mut connector = tcp_connector(connect_timeout);
            // The whole bound, name resolution included.
            match tokio::time::timeout(connect_timeout, connector.call(uri)).await {
                Ok(Ok(stream)) => Counted::new(stream.into_inner(), slot),
                Ok(Err(e)) if local_exhaustion(&e) => return Err(SendError::Local(error_chain(&e))),
                Ok(Err(e)) => return Err(SendError::Connect(error_chain(&e))),
                Err(_) => return Err(SendError::Connect(format!("no connection within {connect_timeout:?}"))),
            }
        }
    };
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let name = tls.name_for(address).map_err(SendError::Tls)?;
    let connector = TlsConnector::from(tls.http1_config.clone());
    match connector.connect(name, stream).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(SendError::Tls(error_chain(&e))),
    }
}

/// How a pool's plain requests reach its servers.
#[derive(Debug)]
pub enum Forwarder {
    /// HTTP/1.1, each server's idle connections reused.
    Plain(Plain),
    /// HTTP/1.1 or HTTP/2 (by ALPN) over TLS, through hyper-util's pooled
    /// client.
    Tls(Box<Client<HttpsConnector<CountingConnector<HttpConnector>>, ForwardBody>>),
}

/// A plain pool's connections: per server, those idle for reuse.
#[derive(Debug)]
pub struct Plain {
    idle: HashMap<String, Arc<IdleConnections>>,
    connect_timeout: Duration,
    budgets: Budgets,
    /// Started with the first request (a runtime is running by then).
    sweeper: Once,
}

impl Plain {
    /// A new connection to `address`, leased for a request.
    async fn open(&self, address: &str, idle: &Arc<IdleConnections>) -> Result<Lease, SendError> {
        self.sweeper.call_once(|| {
            let idle: Vec<Weak<IdleConnections>> = self.idle.values().map(Arc::downgrade).collect();
            tokio::spawn(sweep(idle));
        });
        let io = connect(address, None, self.connect_timeout, &self.budgets).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Failed(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error_chain(&error), "upstream connection failed");
            }
        });
        Ok(Lease::new(sender, idle.clone()))
    }

    /// Sends `request` to the server at `address` over a connection of its
    /// own, and returns the response head (by `deadline`) with the
    /// connection's lease.
    ///
    /// A reused connection whose server does not answer in time was
    /// probably left for dead (its host gone without a FIN): that server's
    /// other idle connections are closed too, so the next requests do not
    /// each wait out the timeout on one.
    async fn send(
        &self,
        mut request: Request<ForwardBody>,
        address: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let idle = self
            .idle
            .get(address)
            .ok_or_else(|| SendError::Failed(format!("`{address}` is not a server of this pool")))?;
        loop {
            let mut lease = match idle.checkout() {
                Some(lease) => lease,
                // Boxed: opening a connection is a large future (connect,
                // name resolution, hyper's handshake), and every future
                // this one is nested in would carry its size, copied at
                // each level on every request, even those that reuse one.
                None => match tokio::time::timeout_at(deadline, Box::pin(self.open(address, idle))).await {
                    Ok(opened) => opened?,
                    Err(_) => return Err(SendError::Timeout),
                },
            };
            let answered = match tokio::time::timeout_at(deadline, lease.sender().try_send_request(request)).await {
                Ok(answered) => answered,
                Err(_) => {
                    if lease.reused() {
                        idle.close_all();
                    }
                    return Err(SendError::Timeout);
                }
            };
            match answered {
                Ok(response) => return Ok((response, lease)),
                Err(mut error) => match error.take_message() {
                    // Refused before a byte was written: the server closed
                    // the idle connection meanwhile. Sent again on another
                    // (at worst a new one, which ends the loop).
                    Some(unsent) if lease.reused() => request = unsent,
                    _ => return Err(SendError::Failed(error_chain(error.error()))),
                },
            }
        }
    }
}

impl Drop for Plain {
    /// The pool was replaced or removed: its idle connections close, and
    /// those of requests still under way close when they end, instead of
    /// idling in a list nothing takes from.
    fn drop(&mut self) {
        self.idle.values().for_each(|idle| idle.retire());
    }
}

impl Reclaim for IdleConnections {
    fn oldest_idle(&self) -> Option<std::time::Instant> {
        self.oldest()
    }

    fn close_oldest(&self) -> bool {
        IdleConnections::close_oldest(self)
    }
}

/// Closes each idle connection as it reaches [`IDLE_TIMEOUT`], even if
/// its server gets no request, until the pool is gone.
async fn sweep(idle: Vec<Weak<IdleConnections>>) {
    loop {
        let mut next = tokio::time::Instant::now() + IDLE_TIMEOUT;
        let mut any = false;
        for server in idle.iter().filter_map(Weak::upgrade) {
            if let Some(expires) = server.sweep() {
                next = next.min(expires.into());
            }
            any = true;
        }
        if !any {
            return;
        }
        tokio::time::sleep_until(next).await;
    }
}

impl Forwarder {
    /// The connections for a pool of `servers` with these TLS settings
    /// (`None`: plain HTTP/1.1) whose connections count in `budgets`,
    /// keeping at most `max_idle` idle connections per server.
    pub fn new(
        servers: &[String],
        tls: Option<&PoolTls>,
        connect_timeout: Duration,
        budgets: Budgets,
        max_idle: usize,
    ) -> Forwarder {
        let Some(tls) = tls else {
            let idle: HashMap<String, Arc<IdleConnections>> =
                servers.iter().map(|server| (server.clone(), IdleConnections::new(max_idle, IDLE_TIMEOUT))).collect();
            for server in idle.values() {
                budgets.kept_by(Arc::downgrade(server) as Weak<dyn Reclaim>);
            }
            return Forwarder::Plain(Plain { idle, connect_timeout, budgets, sweeper: Once::new() });
        };
        let mut connector = tcp_connector(connect_timeout);
        connector.enforce_http(false);
        let mut builder = Client::builder(TokioExecutor::new());
        // Idle connections kept per server: a burst's connections do not all
        // stay open (each is a descriptor) once it has passed. The timer
        // closes those idle past the pool's idle timeout (90 s) even when
        // nothing checks one out again.
        builder.pool_max_idle_per_host(max_idle).pool_idle_timeout(IDLE_TIMEOUT).pool_timer(TokioTimer::new());
        let connector = CountingConnector::new(connector, budgets);
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls.config).clone()).https_only();
        let https = match &tls.server_name {
            Some(name) => https.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
            None => https,
        };
        Forwarder::Tls(Box::new(builder.build(https.enable_all_versions().wrap_connector(connector))))
    }

    /// Sends a request head made for upstream (origin-form target) to the
    /// server at `address` (`authority`, parsed) and returns its response
    /// head, hop-by-hop headers removed, the body still streaming.
    pub async fn send(
        &self,
        mut parts: Parts,
        body: ForwardBody,
        address: &str,
        authority: &Authority,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        // HTTP/1.1 needs a `Host`; an HTTP/2 client's `:authority` became one
        // already, so this is for a client that sent neither.
        if !parts.headers.contains_key(header::HOST)
            && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut parts, body) = match self {
            Forwarder::Plain(plain) => {
                let (response, lease) = plain.send(Request::from_parts(parts, body), address, deadline).await?;
                let (parts, body) = response.into_parts();
                (parts, Upstream::leased(body, lease))
            }
            Forwarder::Tls(client) => {
                let sent = async {
                    parts.uri =
                        absolute(&parts.uri, Scheme::HTTPS, authority).map_err(|e| SendError::Failed(e.to_string()))?;
                    let response = match client.request(Request::from_parts(parts, body)).await {
                        Ok(response) => response,
                        Err(err) if is_tls_error(&err) => return Err(SendError::Tls(error_chain(&err))),
                        Err(err) if err.is_connect() && (local_exhaustion(&err) || is_over_budget(&err)) => {
                            return Err(SendError::Local(error_chain(&err)));
                        }
                        Err(err) if err.is_connect() => return Err(SendError::Connect(error_chain(&err))),
                        Err(err) => return Err(SendError::Failed(error_chain(&err))),
                    };
                    let (parts, body) = response.into_parts();
                    Ok((parts, Upstream::new(body)))
                };
                match tokio::time::timeout_at(deadline, sent).await {
                    Ok(sent) => sent?,
                    Err(_) => return Err(SendError::Timeout),
                }
            }
        };
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// `uri` (origin-form) made absolute for the server at `authority` (parsed
/// once per server, not per request).
fn absolute(uri: &Uri, scheme: Scheme, authority: &Authority) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    Uri::from_parts(parts)
}

/// An error and its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::budget::SocketBudget;

    #[tokio::test]
    async fn a_socket_opened_by_ip_address_has_no_nagle_delay_and_keepalive() {
        let budgets = Budgets { process: SocketBudget::new("the process", 2), pool: None };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for address in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let io = connect(&address, None, Duration::from_secs(2), &budgets).await.unwrap();
            let socket = plain_tcp(&*io).expect("a plain socket");
            assert!(socket.nodelay().unwrap(), "{address}");
            let socket = socket2::SockRef::from(socket);
            assert!(socket.keepalive().unwrap(), "{address}");
            assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE, "{address}");
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL, "{address}");
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES, "{address}");
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_each_address_tried_and_failures_are_told_apart() {
        let budgets = Budgets { process: SocketBudget::new("the process", 1), pool: None };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // `localhost` may resolve to ::1 first, where nothing listens.
        let open = connect(&format!("localhost:{port}"), None, Duration::from_secs(2), &budgets).await;
        assert!(open.is_ok(), "{:?}", open.err());
        // Its place is held while it is open: the budget of one is spent.
        let over = connect(&format!("127.0.0.1:{port}"), None, Duration::from_secs(2), &budgets).await;
        assert!(matches!(over, Err(SendError::Local(_))), "{:?}", over.err());
        drop((open, listener));
        let refused = connect(&format!("127.0.0.1:{port}"), None, Duration::from_secs(2), &budgets).await;
        assert!(matches!(refused, Err(SendError::Connect(_))), "{:?}", refused.err());
        let nonsense = connect("not an address", None, Duration::from_secs(2), &budgets).await;
        assert!(matches!(nonsense, Err(SendError::Connect(_))), "{:?}", nonsense.err());
    }

    /// A server that answers `/slow` after 100 ms, never answers `/hang`,
    /// and answers anything else at once; it counts its open connections.
    async fn server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = open.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let open = counting.clone();
                open.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                        match request.uri().path() {
                            "/slow" => tokio::time::sleep(Duration::from_millis(100)).await,
                            "/hang" => std::future::pending().await,
                            _ => {}
                        }
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(bytes::Bytes::from("hi"))))
                    });
                    let io = TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    open.fetch_sub(1, SeqCst);
                });
            }
        });
        (address, open)
    }

    /// Sends `path` to `address` through `forwarder`; the body read to its end.
    async fn fetch(forwarder: &Forwarder, address: &str, path: &str, timeout: Duration) -> Result<String, SendError> {
        use http_body_util::BodyExt;
        let (parts, _) = Request::get(path).body(()).unwrap().into_parts();
        let authority: Authority = address.parse().unwrap();
        let body = http_body_util::Either::Right(http_body_util::Empty::new());
        let response = forwarder.send(parts, body, address, &authority, timeout).await?;
        let body = response.into_body().collect().await.map_err(|e| SendError::Failed(e.to_string()))?;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    }

    fn idle(forwarder: &Forwarder, address: &str) -> usize {
        match forwarder {
            Forwarder::Plain(plain) => plain.idle[address].len(),
            Forwarder::Tls(_) => unreachable!("plain pools only here"),
        }
    }

    #[tokio::test]
    async fn a_full_budget_closes_another_pools_oldest_idle_connection_to_make_room() {
        let (address, open) = server().await;
        let process = SocketBudget::new("the process", 2);
        let budgets = || Budgets { process: process.clone(), pool: None };
        let second = Duration::from_secs(1);
        let busy = Forwarder::new(std::slice::from_ref(&address), None, second, budgets(), 8);
        let other = Forwarder::new(std::slice::from_ref(&address), None, second, budgets(), 8);
        // Two at once: two connections, both idle afterwards, holding the
        // process's every place.
        let (a, b) = tokio::join!(fetch(&busy, &address, "/slow", second), fetch(&busy, &address, "/slow", second));
        assert_eq!((a.unwrap(), b.unwrap()), ("hi".to_owned(), "hi".to_owned()));
        assert_eq!((idle(&busy, &address), process.open()), (2, 2));

        let answer = fetch(&other, &address, "/", second).await;
        assert_eq!(answer.ok().as_deref(), Some("hi"), "a place was made from an idle connection");
        assert_eq!((idle(&busy, &address), idle(&other, &address), process.open()), (1, 1, 2));

        // Places held by sockets in use are never taken: with both busy,
        // a third is refused as a local shortage.
        let (a, b, c) =
            tokio::join!(fetch(&busy, &address, "/slow", second), fetch(&other, &address, "/slow", second), async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                fetch(&busy, &address, "/", second).await
            });
        assert!(a.is_ok() && b.is_ok(), "{:?} {:?}", a.err(), b.err());
        assert!(matches!(c, Err(SendError::Local(_))), "{:?}", c);
        assert_eq!(open.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_replaced_pools_connections_close_as_their_exchanges_end() {
        use http_body_util::BodyExt;
        use std::sync::atomic::Ordering::SeqCst;
        let (address, open) = server().await;
        let budgets = Budgets { process: SocketBudget::new("the process", 8), pool: None };
        let forwarder = Forwarder::new(std::slice::from_ref(&address), None, Duration::from_secs(1), budgets, 8);
        let authority: Authority = address.parse().unwrap();
        let head = || {
            let (parts, _) = Request::get("/slow").body(()).unwrap().into_parts();
            let body = http_body_util::Either::Right(http_body_util::Empty::new());
            forwarder.send(parts, body, &address, &authority, Duration::from_secs(1))
        };
        let (first, second) = tokio::join!(head(), head());
        let (first, second) = (first.unwrap(), second.unwrap());
        drop(forwarder);
        // The first exchange ends while the second is still under way: its
        // connection closes rather than idling where nothing takes it.
        first.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.load(SeqCst), 1);
        second.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn a_server_that_stops_answering_loses_its_idle_connections() {
        let (address, open) = server().await;
        let budgets = Budgets { process: SocketBudget::new("the process", 8), pool: None };
        let forwarder = Forwarder::new(std::slice::from_ref(&address), None, Duration::from_secs(1), budgets, 8);
        let second = Duration::from_secs(1);
        let (a, b) =
            tokio::join!(fetch(&forwarder, &address, "/slow", second), fetch(&forwarder, &address, "/slow", second));
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(idle(&forwarder, &address), 2);
        let hung = fetch(&forwarder, &address, "/hang", Duration::from_millis(200)).await;
        assert!(matches!(hung, Err(SendError::Timeout)), "{:?}", hung);
        assert_eq!(idle(&forwarder, &address), 0, "every idle connection to it is suspect");

        // A timeout on a new connection says nothing about the idle ones
        // (a slow endpoint, not a vanished host): they stay.
        let (slow, hung) = tokio::join!(
            fetch(&forwarder, &address, "/slow", second),
            fetch(&forwarder, &address, "/hang", Duration::from_millis(200))
        );
        assert!(slow.is_ok() && matches!(hung, Err(SendError::Timeout)), "{:?} {:?}", slow.err(), hung.err());
        assert_eq!(idle(&forwarder, &address), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.load(std::sync::atomic::Ordering::SeqCst), 1, "the idle one");
    }

    #[test]
    fn running_out_of_descriptors_or_ports_is_local_and_a_refusal_is_not() {
        use rustix::io::Errno;
        for errno in [Errno::MFILE, Errno::NFILE, Errno::ADDRNOTAVAIL, Errno::NOBUFS, Errno::NOMEM] {
            assert!(is_local_exhaustion(&std::io::Error::from_raw_os_error(errno.raw_os_error())), "{errno:?}");
        }
        for errno in [Errno::CONNREFUSED, Errno::CONNRESET, Errno::HOSTUNREACH, Errno::TIMEDOUT] {
            assert!(!is_local_exhaustion(&std::io::Error::from_raw_os_error(errno.raw_os_error())), "{errno:?}");
        }
    }
}
