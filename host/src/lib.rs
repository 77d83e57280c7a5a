//! wasmgate: an edge gateway whose routing and WAF decisions run in
//! WebAssembly components. See `ARCHITECTURE.md` for the codemap; read
//! [`proxy`] for the life of a request.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod counter;
pub mod error;
pub mod file_watch;
pub mod forward;
pub mod gateway;
pub mod head;
pub mod listener;
pub mod metrics;
pub mod plugin;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod shutdown;
pub mod tls;
pub mod upstream;
pub mod websocket;

pub use config::Config;
pub use gateway::Gateway;
