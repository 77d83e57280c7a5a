//! Run a plugin's logic natively, in `cargo test`: a mock host behind
//! [`config`](crate::config), [`count`](crate::count),
//! [`healthy_servers`](crate::healthy_servers) and [`log`](crate::log()), and
//! requests built in the test.
//!
//! ```ignore
//! use wasmgate_sdk::testing::{self, MockRequest};
//!
//! #[test]
//! fn api_goes_to_the_api_pool() {
//!     testing::set_config("routes", "* /api/ pool=api");
//!     MyRouter::init().unwrap();
//!     let decision = MyRouter::route(&MockRequest::get("/api/users").header("x-user", "7").request());
//!     assert!(matches!(decision, RouteDecision::Forward(up) if up.pool == "api"));
//! }
//! ```
//!
//! The mock host is per test thread: tests running in parallel do not see
//! each other's configuration, counts or logs.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use crate::{Header, Level, Request, TlsInfo, WebsocketHandshake};

#[derive(Default)]
struct MockHost {
    config: BTreeMap<String, String>,
    counts: HashMap<String, u64>,
    healthy: HashMap<String, Vec<String>>,
    logs: Vec<(Level, String)>,
}

thread_local! {
    static HOST: RefCell<MockHost> = RefCell::new(MockHost::default());
}

/// Sets a `[config]` string, as `NAME.toml` would.
pub fn set_config(key: &str, value: &str) {
    HOST.with_borrow_mut(|host| host.config.insert(key.to_owned(), value.to_owned()));
}

/// Sets the healthy servers `healthy_servers(pool)` answers.
pub fn set_healthy_servers(pool: &str, servers: &[&str]) {
    HOST.with_borrow_mut(|host| host.healthy.insert(pool.to_owned(), servers.iter().map(|s| s.to_string()).collect()));
}

/// Everything logged so far on this thread, oldest first.
pub fn logs() -> Vec<(Level, String)> {
    HOST.with_borrow(|host| host.logs.clone())
}

/// How many times `count(key, _)` was called on this thread since [`reset`].
pub fn counted(key: &str) -> u64 {
    HOST.with_borrow(|host| host.counts.get(key).copied().unwrap_or(0))
}

/// Forgets this thread's configuration, counts, servers and logs.
pub fn reset() {
    HOST.with_borrow_mut(|host| *host = MockHost::default());
}

/// The mock host calls (the window of `count` is ignored: every event of a
/// key counts until [`reset`]).
pub(crate) mod mock {
    use super::HOST;
    use crate::Level;

    pub fn config(key: &str) -> Option<String> {
        HOST.with_borrow(|host| host.config.get(key).cloned())
    }

    pub fn count(key: &str, _window_ms: u32) -> u64 {
        HOST.with_borrow_mut(|host| {
            let n = host.counts.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        })
    }

    pub fn healthy_servers(pool: &str) -> Vec<String> {
        HOST.with_borrow(|host| host.healthy.get(pool).cloned().unwrap_or_default())
    }

    pub fn log(level: Level, message: &str) {
        HOST.with_borrow_mut(|host| host.logs.push((level, message.to_owned())));
    }
}

/// A request built in a test. Defaults: `GET / HTTP/1.1` over `http` to
/// `example.test`, from `192.0.2.1` on listener `web`, no headers.
#[derive(Debug, Clone)]
pub struct MockRequest {
    pub method: String,
    pub scheme: String,
    pub version: String,
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<Header>,
    pub client_ip: String,
    pub listener: String,
    pub tls: Option<TlsInfo>,
    pub websocket: Option<WebsocketHandshake>,
}

impl MockRequest {
    /// `GET target`, where `target` is a path with an optional `?query`.
    pub fn get(target: &str) -> MockRequest {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (target.to_owned(), None),
        };
        MockRequest {
            method: "GET".into(),
            scheme: "http".into(),
            version: "HTTP/1.1".into(),
            authority: "example.test".into(),
            path,
            query,
            headers: Vec::new(),
            client_ip: "192.0.2.1".into(),
            listener: "web".into(),
            tls: None,
            websocket: None,
        }
    }

    /// Adds a header line (a `host` header also sets the authority).
    pub fn header(mut self, name: &str, value: &str) -> MockRequest {
        if name.eq_ignore_ascii_case("host") {
            self.authority = value.to_owned();
        }
        self.headers.push(Header::new(name.to_ascii_lowercase(), value));
        self
    }

    pub fn method(mut self, method: &str) -> MockRequest {
        self.method = method.to_owned();
        self
    }

    pub fn client_ip(mut self, ip: &str) -> MockRequest {
        self.client_ip = ip.to_owned();
        self
    }

    /// Makes it a WebSocket handshake from `origin` (if any).
    pub fn websocket(mut self, origin: Option<&str>) -> MockRequest {
        self.websocket = Some(WebsocketHandshake {
            version: "13".into(),
            subprotocols: Vec::new(),
            origin: origin.map(str::to_owned),
            extensions: Vec::new(),
        });
        self
    }

    /// The request as the plugin's code receives it.
    pub fn request(&self) -> Request<'_> {
        Request::from_mock(self)
    }

    /// Header lines joined as the gateway joins them.
    pub(crate) fn joined_header(&self, name: &str) -> Option<String> {
        let separator = if name.eq_ignore_ascii_case("cookie") { "; " } else { ", " };
        let lines: Vec<&str> =
            self.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str()).collect();
        (!lines.is_empty()).then(|| lines.join(separator))
    }
}
