//! The config loader (`Config::from_toml` and `PluginSettings`), which
//! reads what an operator (or a ConfigMap someone else writes) hands the
//! gateway. Any text is either a config that passed validation or an error
//! that names the file; nothing panics.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wasmgate::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_toml(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            // A valid config names what it listens on and routes to.
            for listener in &config.listener {
                assert!(!listener.name.is_empty());
            }
        }
        Err(error) => assert!(error.to_string().contains("fuzz.toml"), "{error}"),
    }
});
