//! What the export macros wire in: the panic hook and the `log` facade,
//! installed by `init`, and the request handed to the plugin's code.

use std::sync::Once;

use crate::bindings::wasmgate::plugin::types as wit;
use crate::{Level, Request};

/// Installs the panic hook (a panic's message goes to the gateway's log
/// before the instance traps) and the `log` facade. Idempotent.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        std::panic::set_hook(Box::new(|info| crate::log_error(&info.to_string())));
        if log::set_logger(&HostLogger).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}

/// The request for the plugin's code.
pub fn request(req: &wit::Request) -> Request<'_> {
    Request::from_host(req)
}

/// The `log` crate's records, written to the gateway's log.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let level = match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug => Level::Debug,
            log::Level::Trace => Level::Trace,
        };
        crate::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}
