//! Helpers over the generated types: response and upstream builders, and
//! configuration parsed at `init`.

use std::sync::OnceLock;

use crate::{Header, Response, Upstream};

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

/// Configuration parsed once, by `init`, and read by every call after it.
///
/// ```ignore
/// static ROUTES: Parsed<Vec<Route>> = Parsed::new();
///
/// impl Router for MyRouter {
///     fn init() -> Result<(), String> {
///         ROUTES.init(|| parse_routes(&config("routes").unwrap_or_default()))
///     }
///     fn route(req: &Request) -> RouteDecision {
///         let routes = ROUTES.get();
///         // ...
///     }
/// }
/// ```
pub struct Parsed<T>(OnceLock<T>);

impl<T> Parsed<T> {
    pub const fn new() -> Self {
        Parsed(OnceLock::new())
    }

    /// Parses and keeps the configuration; an `Err` becomes the message the
    /// gateway refuses the plugin with.
    pub fn init<E: std::fmt::Display>(&self, parse: impl FnOnce() -> Result<T, E>) -> Result<(), String> {
        let value = parse().map_err(|problem| format!("bad config: {problem}"))?;
        // A second `init` on one instance keeps the first value: the
        // configuration of an instance never changes.
        let _ = self.0.set(value);
        Ok(())
    }

    /// The parsed configuration. The gateway always runs `init` first; a
    /// call without it (a unit test that forgot) panics, saying so.
    pub fn get(&self) -> &T {
        self.0.get().expect("the plugin's init has not run: call it before the request")
    }
}

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Self::new()
    }
}
