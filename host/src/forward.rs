//! Forwarding a plain HTTP request to a server and streaming its response
//! back.
//!
//! Upstream connections are pooled per server (hyper-util's client). Bodies
//! stream both ways without being buffered whole. Hop-by-hop headers are
//! removed in both directions and `X-Forwarded-For/-Proto/-Host` are added.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::GatewayError;
use crate::listener::ConnInfo;
use crate::pool::Server;
use crate::proxy::{ResponseBody, Route};
use crate::upstream::PoolTls;

/// How long a connection to a server may take to open (at most): a server
/// that does not answer the connection is skipped like one that refuses it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connect timeout of a pool: 5 s, or less if its request timeout is.
pub fn connect_timeout(request_timeout: Duration) -> Duration {
    CONNECT_TIMEOUT.min(request_timeout / 2)
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The body of a forwarded request: the client's, or none (for requests
/// without one, so they can be sent again to another server).
pub type ForwardBody = Either<Incoming, Empty<Bytes>>;

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
}

/// The pooled client a pool's plain requests are forwarded with.
#[derive(Debug)]
pub enum Forwarder {
    Plain(Client<HttpConnector, ForwardBody>),
    /// HTTP/1.1 or HTTP/2 (by ALPN) over TLS.
    Tls(Client<HttpsConnector<HttpConnector>, ForwardBody>),
}

impl Forwarder {
    /// A client for a pool with these TLS settings (`None`: plain HTTP/1.1).
    pub fn new(tls: Option<&PoolTls>, connect_timeout: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let builder = Client::builder(TokioExecutor::new());
        let Some(tls) = tls else {
            return Forwarder::Plain(builder.build(connector));
        };
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls.config).clone()).https_only();
        let https = match &tls.server_name {
            Some(name) => https.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
            None => https,
        };
        Forwarder::Tls(builder.build(https.enable_all_versions().wrap_connector(connector)))
    }

    fn scheme(&self) -> &'static str {
        match self {
            Forwarder::Plain(_) => "http",
            Forwarder::Tls(_) => "https",
        }
    }

    /// Sends a prepared request (see [`prepare_upstream`]) to `server` and
    /// returns its response head, the body still streaming.
    pub async fn send(
        &self,
        mut parts: Parts,
        body: ForwardBody,
        server: &Server,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        parts.uri = absolute(&parts.uri, self.scheme(), server).map_err(|e| SendError::Failed(e.to_string()))?;
        let request = Request::from_parts(parts, body);
        let sent = async {
            match self {
                Forwarder::Plain(client) => client.request(request).await,
                Forwarder::Tls(client) => client.request(request).await,
            }
        };
        let response = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) if crate::upstream::is_tls_error(&err) => return Err(SendError::Tls(error_chain(&err))),
            Ok(Err(err)) if err.is_connect() => return Err(SendError::Connect(error_chain(&err))),
            Ok(Err(err)) => return Err(SendError::Failed(error_chain(&err))),
            Err(_) => return Err(SendError::Timeout),
        };
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

/// Turns the client's request head into the head sent upstream (to whichever
/// server): origin-form target (rewritten if the route says so), hop-by-hop
/// headers removed, forwarding headers added, the route's headers set.
pub fn prepare_upstream(parts: &mut Parts, route: &Route, client: &ConnInfo) -> Result<(), GatewayError> {
    let original = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path_and_query = match &route.rewrite {
        Some(rewrite) if rewrite.query().is_none() => match original.query() {
            Some(query) => format!("{}?{query}", rewrite.path())
                .parse()
                .map_err(|_| GatewayError::BadRequest("rewritten target is invalid"))?,
            None => rewrite.clone(),
        },
        Some(rewrite) => rewrite.clone(),
        None => original,
    };
    // HTTP/2 carries the host in `:authority`; HTTP/1.1 backends need `Host`.
    let host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let Some(host) = &host {
        parts.headers.insert(header::HOST, host.clone());
    }
    parts.uri = Uri::from(path_and_query);
    parts.version = http::Version::HTTP_11;

    remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::UPGRADE);

    let client_ip = client.addr.ip().to_canonical().to_string();
    let forwarded_for = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", value);
    }
    parts.headers.insert("x-forwarded-proto", HeaderValue::from_static(client.scheme()));
    if let Some(host) = host {
        parts.headers.insert("x-forwarded-host", host);
    }
    for (name, value) in &route.set_headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Ok(())
}

/// A copy of a request head, for sending it again to another server.
pub fn copy_head(parts: &Parts) -> Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// `uri` (origin-form) made absolute for `server`.
fn absolute(uri: &Uri, scheme: &str, server: &Server) -> Result<Uri, http::Error> {
    let path = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder().scheme(scheme).authority(server.address.as_str()).path_and_query(path).build()
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
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
