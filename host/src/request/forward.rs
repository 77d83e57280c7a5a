//! The request head sent upstream, made from the client's: origin-form
//! target (rewritten if the route says so), hop-by-hop headers removed
//! first (so a client's `Connection` cannot name what the gateway sets),
//! `Host` from the settled authority, forwarding headers set (appended to
//! only from a trusted proxy), the route's headers set. The same head serves
//! a plain request and a WebSocket handshake; [`copy_head`] makes a copy for
//! another server.

use http::Request;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use super::route::Route;
use crate::http::ConnInfo;
use crate::http::GatewayError;
use crate::http::headers::remove_hop_by_hop;

/// Forwarding headers a client could forge, believed only from a trusted proxy.
const FORWARDING: [&str; 4] = ["forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix"];

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

    let earlier = if trusted { joined(&parts.headers, "x-forwarded-for") } else { None };
    let value = match earlier {
        Some(earlier) => {
            let client_ip = client.ip_header.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{earlier}, {client_ip}")).unwrap_or_else(|_| client.ip_header.clone())
        }
        None => client.ip_header.clone(),
    };
    parts.headers.insert("x-forwarded-for", value);
    if !trusted {
        for name in FORWARDING {
            parts.headers.remove(name);
        }
    }
    if !trusted || !parts.headers.contains_key("x-forwarded-proto") {
        parts.headers.insert("x-forwarded-proto", HeaderValue::from_static(client.scheme()));
    }
    if let Some(host) = host
        && (!trusted || !parts.headers.contains_key("x-forwarded-host"))
    {
        parts.headers.insert("x-forwarded-host", host);
    }
    for (name, value) in &route.set_headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Ok(())
}

/// Every line of header `name`, joined with `, `.
fn joined(headers: &http::HeaderMap, name: &str) -> Option<String> {
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
