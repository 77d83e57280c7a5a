//! The request head sent upstream, made from the client's: origin-form
//! target (rewritten if the route says so), hop-by-hop headers removed
//! first (so a client's `Connection` cannot name what the gateway sets),
//! `Host` from the settled authority, forwarding headers set (appended to
//! only from a trusted proxy), the route's headers set. The same head serves
//! a plain request and a WebSocket handshake; [`copy_head`] makes a copy for
//! another server.

use http::Request;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use super::route::Route;
use crate::http::ConnInfo;
use crate::http::GatewayError;
use crate::http::headers::remove_hop_by_hop;

/// Forwarding headers a client could forge, believed only from a trusted proxy.
const FORWARDING: [HeaderName; 4] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
];

// Header names made once (a `&str` name is parsed on every use).
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Turns the client's request head into the head sent upstream (to whichever
/// server): origin-form target (rewritten if the route says so), hop-by-hop
/// headers removed, forwarding headers set, the route's headers set.
/// `trusted`: the peer is a trusted proxy, whose forwarding headers are kept.
pub fn prepare_upstream(
    parts: &mut Parts,
    route: &Route,
    client: &ConnInfo,
    trusted: bool,
) -> Result<(), GatewayError> {
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
    // Read before hop-by-hop removal: `Connection: host` must not drop it.
    // HTTP/2 carries the host in `:authority`; HTTP/1.1 backends need `Host`.
    let host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::UPGRADE);
    if let Some(host) = &host {
        parts.headers.insert(header::HOST, host.clone());
    }
    parts.uri = Uri::from(path_and_query);
    parts.version = http::Version::HTTP_11;

    let earlier = if trusted { joined(&parts.headers, &X_FORWARDED_FOR) } else { None };
    let value = match earlier {
        Some(earlier) => {
            let client_ip = client.ip_header.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{earlier}, {client_ip}")).unwrap_or_else(|_| client.ip_header.clone())
        }
        None => client.ip_header.clone(),
    };
    parts.headers.insert(X_FORWARDED_FOR, value);
    if !trusted {
        for name in &FORWARDING {
            parts.headers.remove(name);
        }
    }
    if !trusted || !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        parts.headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme()));
    }
    if let Some(host) = host
        && (!trusted || !parts.headers.contains_key(&X_FORWARDED_HOST))
    {
        parts.headers.insert(X_FORWARDED_HOST, host);
    }
    for (name, value) in &route.set_headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Ok(())
}

/// Every line of header `name`, joined with `, `.
fn joined(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
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
