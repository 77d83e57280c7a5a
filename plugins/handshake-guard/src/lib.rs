//! `handshake-guard`: a WAF for WebSocket handshakes (and plain request heads).
//!
//! Configured by strings in `handshake-guard.toml`; every key is optional:
//!
//! | key | meaning |
//! |---|---|
//! | `allowed_origins` | space/comma-separated origins a WebSocket handshake may come from (`https://app.example.test`, `https://*.example.test`, `*`). Defends against cross-site WebSocket hijacking. Unset: any origin. |
//! | `allow_missing_origin` | `true` (default) lets handshakes without `Origin` (non-browser clients) through; `false` refuses them. |
//! | `required_headers` | header names that must be present. |
//! | `token_param`, `tokens` | the query parameter that must carry one of the comma-separated `tokens`. |
//! | `auth_scope` | where `required_headers` and tokens apply: `websocket` (default) or `all`. |
//! | `deny_paths` | comma-separated path patterns (`*` matches any run of characters) refused with 403 on every request. |
//! | `rate_limit` | `N/Ws` (e.g. `20/10s`): at most N requests per client IP per W seconds, then 429 with `Retry-After`. |
//! | `rate_limit_scope` | `all` (default) or `websocket`. |

use wasmgate_sdk::*;

mod rules;

pub use rules::{Decision, Rules};

struct HandshakeGuard;

static RULES: Parsed<Rules> = Parsed::new();

impl Waf for HandshakeGuard {
    /// A bad setting refuses the plugin at load, with the setting named.
    fn init() -> Result<(), String> {
        RULES.init(|| Rules::from_config(config))
    }

    fn inspect(req: &Request) -> Verdict {
        match RULES.get().check(req) {
            Decision::Allow => Verdict::Allow,
            Decision::Forbidden(reason) => Verdict::Deny(Response::text(403, format!("forbidden: {reason}\n"))),
            Decision::TooManyRequests { retry_after_s } => Verdict::Deny(
                Response::text(429, "too many requests\n").with_header("retry-after", retry_after_s.to_string()),
            ),
        }
    }
}

export_waf!(HandshakeGuard);
