//! wasmgate: an edge gateway whose routing and WAF decisions run in
//! WebAssembly components. See `ARCHITECTURE.md` for the codemap and the
//! rules on which folder may import which; read [`request::proxy`] for the
//! life of a request.
//!
//! The folders, top floor first (a module imports only from floors below
//! its own):
//!
//! - [`control`]: starting and changing the running gateway.
//! - [`edge`]: where clients come in (listeners, TLS).
//! - [`request`]: the life of a request, phases in order.
//! - [`websocket`]: handshakes, sessions and the relay.
//! - [`plugin`]: the sandbox.
//! - [`upstream`]: backends (pools, probes, connections).
//! - [`telemetry`]: metrics and the access log.
//! - [`http`], [`config`], [`shutdown`], [`file_watch`]: the ground floor.

pub mod config;
pub mod control;
pub mod counting;
pub mod edge;
pub mod file_watch;
pub mod http;
pub mod plugin;
pub mod request;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
pub mod websocket;

pub use config::Config;
pub use control::Gateway;
