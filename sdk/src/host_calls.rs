//! What a plugin can ask of the gateway: its configuration, shared
//! counters, the healthy servers of a pool, and the log. In native unit
//! tests the same calls go to [`testing`](crate::testing)'s mock host.

use crate::Level;
#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::host;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::mock as host;

/// A string from the `[config]` table of the plugin's `NAME.toml`.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// Counts one event for `key` and returns the count over the trailing
/// `window_ms` milliseconds, this one included. Keys are private to the
/// plugin; counts are the gateway's, so they survive instance recycling.
pub fn count(key: &str, window_ms: u32) -> u64 {
    host::count(key, window_ms)
}

/// The servers (`host:port`) of `pool` that may currently take traffic.
pub fn healthy_servers(pool: &str) -> Vec<String> {
    host::healthy_servers(pool)
}

/// Writes `message` to the gateway's log at `level`, tagged with the
/// plugin's name. (The [`log`](crate::log) crate's macros end here too.)
pub fn log(level: Level, message: &str) {
    host::log(level, message)
}

/// Logs at `trace`.
pub fn log_trace(message: &str) {
    log(Level::Trace, message)
}

/// Logs at `debug`.
pub fn log_debug(message: &str) {
    log(Level::Debug, message)
}

/// Logs at `info`.
pub fn log_info(message: &str) {
    log(Level::Info, message)
}

/// Logs at `warn`.
pub fn log_warn(message: &str) {
    log(Level::Warn, message)
}

/// Logs at `error`.
pub fn log_error(message: &str) {
    log(Level::Error, message)
}
