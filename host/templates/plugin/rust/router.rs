//! {{name}}: a wasmgate router. Requests whose path starts with `prefix` go
//! to the pool `pool`; the others get no route from it (the listener's
//! `default_pool`, or 404).
//!
//! Settings (`[config]` in {{name}}.toml), checked by `init`:
//! - `pool` (required): the pool to forward to.
//! - `prefix`: the path prefix that matches (default `/`).

use std::sync::OnceLock;

wit_bindgen::generate!({ path: "wit", world: "router-plugin" });

use exports::wasmgate::plugin::{lifecycle, router};
use wasmgate::plugin::host::config;
use wasmgate::plugin::types::{Request, RouteDecision, Upstream};

struct Settings {
    pool: String,
    prefix: String,
}

/// Set once by `init`: each instance of the plugin runs `init` before its
/// first request.
static SETTINGS: OnceLock<Settings> = OnceLock::new();

struct Plugin;

impl lifecycle::Guest for Plugin {
    fn init() -> Result<(), String> {
        let pool = config("pool").unwrap_or_default();
        if pool.is_empty() {
            return Err("bad config: pool: the pool to forward to is required".into());
        }
        let prefix = config("prefix").unwrap_or_else(|| "/".into());
        if !prefix.starts_with('/') {
            return Err(format!("bad config: prefix: `{prefix}` does not start with /"));
        }
        let _ = SETTINGS.set(Settings { pool, prefix });
        Ok(())
    }
}

impl router::Guest for Plugin {
    fn route(req: &Request) -> RouteDecision {
        let settings = SETTINGS.get().expect("init ran");
        if !req.path().starts_with(&settings.prefix) {
            return RouteDecision::NoRoute;
        }
        RouteDecision::Forward(Upstream {
            pool: settings.pool.clone(),
            rewrite_path: None,
            set_headers: Vec::new(),
            affinity_key: None,
        })
    }
}

export!(Plugin);
