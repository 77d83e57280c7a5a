//! {{name}}: a wasmgate WAF. Requests whose path starts with `deny_prefix`
//! are refused with 403; the others go on to the router.
//!
//! Settings (`[config]` in {{name}}.toml), checked by `init`:
//! - `deny_prefix`: the path prefix refused (default `/admin`).

use std::sync::OnceLock;

wit_bindgen::generate!({ path: "wit", world: "waf-plugin" });

use exports::wasmgate::plugin::{lifecycle, waf};
use wasmgate::plugin::host::{Level, config, log};
use wasmgate::plugin::types::{Header, Request, Response, Verdict};

/// Set once by `init`: each instance of the plugin runs `init` before its
/// first request.
static DENY_PREFIX: OnceLock<String> = OnceLock::new();

struct Plugin;

impl lifecycle::Guest for Plugin {
    fn init() -> Result<(), String> {
        let prefix = config("deny_prefix").unwrap_or_else(|| "/admin".into());
        if !prefix.starts_with('/') {
            return Err(format!("bad config: deny_prefix: `{prefix}` does not start with /"));
        }
        let _ = DENY_PREFIX.set(prefix);
        Ok(())
    }
}

impl waf::Guest for Plugin {
    fn inspect(req: &Request) -> Verdict {
        let prefix = DENY_PREFIX.get().expect("init ran");
        if !req.path().starts_with(prefix.as_str()) {
            return Verdict::Allow;
        }
        log(Level::Info, &format!("refused {} from {}", req.path(), req.client_ip()));
        Verdict::Deny(Response {
            status: 403,
            headers: vec![Header { name: "content-type".into(), value: "text/plain; charset=utf-8".into() }],
            body: b"forbidden\n".to_vec(),
        })
    }
}

export!(Plugin);
