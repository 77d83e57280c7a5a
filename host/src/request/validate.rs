//! Checks on what plugins return, as strict as on what clients send: a plugin
//! cannot inject a header line, answer with a 1xx/101, name a pool that does
//! not exist, rewrite to a path that is not normal, or return an oversized
//! body.

use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode};

use super::route::Route;
use crate::http::body::{self, ResponseBody};
use crate::http::target::normalize_path;
use crate::plugin::PluginError;
use crate::plugin::bindings::{self, Header};
use crate::upstream::Pools;

/// Largest body a plugin may answer with.
pub const MAX_RESPONSE_BODY: usize = 1 << 20;

/// Headers a plugin may not set: they belong to the connection, not to the
/// message, and the gateway manages them.
const RESERVED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "te",
    "trailer",
    "sec-websocket-accept",
    "x-wasmgate-error",
];

fn invalid(plugin: &str, reason: String) -> PluginError {
    PluginError::InvalidOutput { plugin: plugin.to_owned(), reason }
}

/// Turns a plugin's `response` into an HTTP response.
pub fn response(plugin: &str, response: bindings::Response) -> Result<Response<ResponseBody>, PluginError> {
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| invalid(plugin, format!("status {} is not 200-599", response.status)))?;
    if response.body.len() > MAX_RESPONSE_BODY {
        return Err(invalid(
            plugin,
            format!("response body of {} bytes exceeds {MAX_RESPONSE_BODY}", response.body.len()),
        ));
    }
    let mut out = Response::new(body::whole(response.body));
    *out.status_mut() = status;
    for (name, value) in headers(plugin, response.headers)? {
        out.headers_mut().append(name, value);
    }
    Ok(out)
}

/// Turns a plugin's `upstream` into a route to a configured pool.
pub fn upstream(plugin: &str, upstream: bindings::Upstream, pools: &Pools) -> Result<Route, PluginError> {
    let pool = pools
        .get(&upstream.pool)
        .cloned()
        .ok_or_else(|| invalid(plugin, format!("pool `{}` does not exist", upstream.pool)))?;
    let rewrite = match upstream.rewrite_path {
        None => None,
        Some(path) => {
            if !path.starts_with('/') {
                return Err(invalid(plugin, format!("rewrite `{path}` is not origin-form (must start with /)")));
            }
            let target = path
                .parse::<PathAndQuery>()
                .map_err(|_| invalid(plugin, format!("rewrite `{path}` is not a valid request target")))?;
            // Normalized as a client's path is: a rewrite cannot reach
            // upstream with `..` or `//` in it.
            let normal = normalize_path(target.path())
                .map_err(|reason| invalid(plugin, format!("rewrite `{path}`: {reason}")))?;
            let normal = match target.query() {
                Some(query) => format!("{normal}?{query}"),
                None => normal.into_owned(),
            };
            Some(
                normal
                    .parse::<PathAndQuery>()
                    .map_err(|_| invalid(plugin, format!("rewrite `{path}` is not a valid request target")))?,
            )
        }
    };
    let set_headers = headers(plugin, upstream.set_headers)?;
    Ok(Route { pool, rewrite, set_headers, affinity_key: upstream.affinity_key })
}

fn headers(plugin: &str, headers: Vec<Header>) -> Result<Vec<(HeaderName, HeaderValue)>, PluginError> {
    headers
        .into_iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| invalid(plugin, format!("header name {:?} is not valid", h.name)))?;
            if RESERVED.contains(&name.as_str()) {
                return Err(invalid(plugin, format!("header `{name}` is managed by the gateway")));
            }
            let value = HeaderValue::from_str(&h.value)
                .map_err(|_| invalid(plugin, format!("value of header `{name}` is not valid (control characters?)")))?;
            Ok((name, value))
        })
        .collect()
}
