//! Connections to backend servers, by address: one-off HTTP/1.1 connections
//! (plain or TLS) for WebSocket handshakes and probes, and the pooled client
//! plain requests are forwarded with.
//!
//! Everything here takes a server's `host:port`, never a pool's `Server`:
//! what a failure means for the server's health is decided by the caller.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::budget::{Budgets, Counted, CountingConnector, is_over_budget};
use super::tls::{PoolTls, is_tls_error};
use crate::http::ResponseBody;
use crate::http::headers::remove_hop_by_hop;

/// How long a connection to a server may take to open (at most): a server
/// that does not answer the connection is skipped like one that refuses it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle upstream connections kept open per server for reuse.
pub const MAX_IDLE_PER_SERVER: usize = 32;

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
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Opens a connection to `address` (TLS if `tls` is set) for an HTTP/1.1
/// exchange: a WebSocket handshake or a probe. It holds a place in
/// `budgets` while it is open.
pub async fn connect(
    address: &str,
    tls: Option<&PoolTls>,
    connect_timeout: Duration,
    budgets: &Budgets,
) -> Result<Box<dyn Io>, SendError> {
    let slot = budgets.take().map_err(|over| SendError::Local(over.to_string()))?;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => Counted::new(stream, slot),
        Ok(Err(e)) if is_local_exhaustion(&e) => return Err(SendError::Local(e.to_string())),
        Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
        Err(_) => return Err(SendError::Connect(format!("no connection within {connect_timeout:?}"))),
    };
    let _ = stream.get_ref().set_nodelay(true);
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

/// The body of a forwarded request: the client's, or none (for requests
/// without one, so they can be sent again to another server).
pub type ForwardBody = Either<Incoming, Empty<Bytes>>;

/// The pooled client a pool's plain requests are forwarded with.
#[derive(Debug)]
pub enum Forwarder {
    Plain(Client<CountingConnector<HttpConnector>, ForwardBody>),
    /// HTTP/1.1 or HTTP/2 (by ALPN) over TLS.
    Tls(Client<HttpsConnector<CountingConnector<HttpConnector>>, ForwardBody>),
}

impl Forwarder {
    /// A client for a pool with these TLS settings (`None`: plain HTTP/1.1)
    /// whose connections count in `budgets`, keeping at most `max_idle`
    /// idle connections per server.
    pub fn new(tls: Option<&PoolTls>, connect_timeout: Duration, budgets: Budgets, max_idle: usize) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut builder = Client::builder(TokioExecutor::new());
        // Idle connections kept per server: a burst's connections do not all
        // stay open (each is a descriptor) once it has passed. The timer
        // closes those idle past the pool's idle timeout (90 s) even when
        // nothing checks one out again.
        builder.pool_max_idle_per_host(max_idle).pool_timer(TokioTimer::new());
        let Some(tls) = tls else {
            return Forwarder::Plain(builder.build(CountingConnector::new(connector, budgets)));
        };
        connector.enforce_http(false);
        let connector = CountingConnector::new(connector, budgets);
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls.config).clone()).https_only();
        let https = match &tls.server_name {
            Some(name) => https.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
            None => https,
        };
        Forwarder::Tls(builder.build(https.enable_all_versions().wrap_connector(connector)))
    }

    fn scheme(&self) -> Scheme {
        match self {
            Forwarder::Plain(_) => Scheme::HTTP,
            Forwarder::Tls(_) => Scheme::HTTPS,
        }
    }

    /// Sends a request head made for upstream (origin-form target) to the
    /// server at `address` and returns its response head, hop-by-hop headers
    /// removed, the body still streaming.
    pub async fn send(
        &self,
        mut parts: Parts,
        body: ForwardBody,
        authority: &Authority,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        parts.uri = absolute(&parts.uri, self.scheme(), authority).map_err(|e| SendError::Failed(e.to_string()))?;
        let request = Request::from_parts(parts, body);
        let sent = async {
            match self {
                Forwarder::Plain(client) => client.request(request).await,
                Forwarder::Tls(client) => client.request(request).await,
            }
        };
        let response = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) if is_tls_error(&err) => return Err(SendError::Tls(error_chain(&err))),
            Ok(Err(err)) if err.is_connect() && (local_exhaustion(&err) || is_over_budget(&err)) => {
                return Err(SendError::Local(error_chain(&err)));
            }
            Ok(Err(err)) if err.is_connect() => return Err(SendError::Connect(error_chain(&err))),
            Ok(Err(err)) => return Err(SendError::Failed(error_chain(&err))),
            Err(_) => return Err(SendError::Timeout),
        };
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
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
