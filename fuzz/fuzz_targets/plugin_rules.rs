//! The first-party plugins' rule parsers and matchers, which run inside the
//! sandbox on every request: `path-router`'s route table (parse, pick,
//! rewrite) and `handshake-guard`'s settings and checks. Any settings are
//! either refused with a message or give rules that decide any request
//! without panicking (a panic in a plugin is a trap: a failed request).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wasmgate_sdk::testing::MockRequest;

#[derive(Arbitrary, Debug)]
struct Input {
    routes: String,
    host: String,
    path: String,
    guard: Vec<(u8, String)>,
    headers: Vec<(String, String)>,
    origin: Option<String>,
    websocket: bool,
    query: Option<String>,
}

const GUARD_KEYS: [&str; 9] = [
    "allowed_origins",
    "allow_missing_origin",
    "required_headers",
    "token_param",
    "tokens",
    "auth_scope",
    "deny_paths",
    "rate_limit",
    "rate_limit_scope",
];

fuzz_target!(|input: Input| {
    if let Ok(routes) = path_router::parse_routes(&input.routes) {
        assert!(!routes.is_empty(), "an accepted table has a route");
        let path = if input.path.starts_with('/') { input.path.clone() } else { format!("/{}", input.path) };
        if let Some(route) = path_router::pick(&routes, &input.host, &path) {
            assert!(path.starts_with(&route.prefix));
            if let Some(new_prefix) = &route.rewrite {
                let rewritten = path_router::rewrite(&path, &route.prefix, new_prefix);
                assert!(!rewritten.is_empty());
            }
        }
    }

    let settings: Vec<(&str, &str)> =
        input.guard.iter().map(|(k, v)| (GUARD_KEYS[usize::from(*k) % GUARD_KEYS.len()], v.as_str())).collect();
    let lookup = |key: &str| settings.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned());
    if let Ok(rules) = handshake_guard::Rules::from_config(lookup) {
        let target = match &input.query {
            Some(query) => format!("/{}?{query}", input.path.trim_start_matches('/')),
            None => format!("/{}", input.path.trim_start_matches('/')),
        };
        let mut request = MockRequest::get(&target);
        for (name, value) in input.headers.iter().take(8) {
            request = request.header(name, value);
        }
        if input.websocket {
            request = request.websocket(input.origin.as_deref());
        }
        let _ = rules.check(&request.request());
    }
});
