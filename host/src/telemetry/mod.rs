//! Sinks the request path and relays write to: the Prometheus metrics
//! ([`metrics`]) and the access log ([`access_log`]). Nothing here reads the
//! running config; what is state rather than events is handed in at scrape
//! time by whoever owns it.

pub mod access_log;
pub mod metrics;
pub mod otlp;
