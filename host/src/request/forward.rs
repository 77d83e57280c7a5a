//! The request head sent upstream, made from the client's: origin-form
//! target (rewritten if the route says so), hop-by-hop headers removed,
//! `Host` from `:authority`, `X-Forwarded-For/-Proto/-Host` added, the
//! route's headers set. The same head serves a plain request and a WebSocket
//! handshake; [`copy_head`] makes a copy for another server.

use http::Request;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use super::route::Route;
use crate::http::ConnInfo;
use crate::http::GatewayError;
use crate::http::headers::remove_hop_by_hop;

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
