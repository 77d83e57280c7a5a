//! Helpers over the generated types: header lookup, response builders and
//! logging shorthands.

use crate::bindings::wasmgate::plugin::host;
use crate::{Header, Level, RequestHead, Response, Upstream};

impl RequestHead {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
    }

    /// The host part of the authority, without a port, lower-cased.
    pub fn host(&self) -> String {
        let authority = self.authority.as_str();
        let host = if let Some(rest) = authority.strip_prefix('[') {
            // [v6]:port
            rest.split(']').next().unwrap_or(rest)
        } else {
            authority.rsplit_once(':').map_or(authority, |(h, _)| h)
        };
        host.to_ascii_lowercase()
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    /// True when this request is a WebSocket opening handshake.
    pub fn is_websocket(&self) -> bool {
        self.websocket.is_some()
    }
}

impl Header {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Header { name: name.into(), value: value.into() }
    }
}

impl Response {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            headers: vec![Header::new("content-type", "text/plain; charset=utf-8")],
            body: body.into().into_bytes(),
        }
    }

    /// A redirect (`301`, `302`, `307` or `308`) to `location`.
    pub fn redirect(status: u16, location: impl Into<String>) -> Self {
        Response { status, headers: vec![Header::new("location", location)], body: Vec::new() }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }
}

impl Upstream {
    /// Forward to `pool` unchanged.
    pub fn pool(pool: impl Into<String>) -> Self {
        Upstream { pool: pool.into(), rewrite_path: None, set_headers: Vec::new(), affinity_key: None }
    }

    /// Replace the request target with `path` (origin-form).
    pub fn rewrite(mut self, path: impl Into<String>) -> Self {
        self.rewrite_path = Some(path.into());
        self
    }

    /// Set a header on the upstream request.
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_headers.push(Header::new(name, value));
        self
    }
}

/// A string from the `[config]` table of the plugin's `NAME.toml`.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// Counts one event for `key` and returns the count over the trailing window.
pub fn count(key: &str, window_ms: u32) -> u64 {
    host::count(key, window_ms)
}

/// Logs at `trace` through the gateway's log (with the plugin's name).
pub fn log_trace(message: &str) {
    host::log(Level::Trace, message)
}

/// Logs at `debug` through the gateway's log.
pub fn log_debug(message: &str) {
    host::log(Level::Debug, message)
}

/// Logs at `info` through the gateway's log.
pub fn log_info(message: &str) {
    host::log(Level::Info, message)
}

/// Logs at `warn` through the gateway's log.
pub fn log_warn(message: &str) {
    host::log(Level::Warn, message)
}

/// Logs at `error` through the gateway's log.
pub fn log_error(message: &str) {
    host::log(Level::Error, message)
}

/// The plugin's settings, parsed by `parse` on the first call of this
/// instance and kept in `cell` for the calls after it.
///
/// A configuration `parse` refuses is logged at `error` (with the plugin's
/// name, by the gateway) and the call traps, so the gateway applies the
/// plugin's `on_error` policy rather than run on a half-read config.
///
/// ```ignore
/// static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();
/// let routes = parsed_config(&ROUTES, || parse_routes(&config("routes").unwrap_or_default()));
/// ```
pub fn parsed_config<T, E: std::fmt::Display>(
    cell: &'static std::sync::OnceLock<T>,
    parse: impl FnOnce() -> Result<T, E>,
) -> &'static T {
    cell.get_or_init(|| match parse() {
        Ok(value) => value,
        Err(problem) => {
            let message = format!("bad config: {problem}");
            log_error(&message);
            panic!("{message}");
        }
    })
}
