//! What an attacker's raw socket tries against the edge, with the demo's
//! rules (a WAF denying `/admin*`, a router sending `/api/` to the api
//! pool): paths spelled to slip past a prefix rule, `Connection` naming the
//! headers the gateway sets, forged forwarding headers, an absolute-form
//! target with another `Host`, a plain `CONNECT`, an upgrade with a body,
//! and a backend answering in the gateway's name.

use http::StatusCode;

use crate::common::*;

const ROUTES: &str = "[config]\nroutes = \"\"\"\n\
                      api.example /  pool=api\n\
                      *   /api/  pool=api  rewrite=/\n\
                      *   /      pool=app\n\"\"\"\n";
const GUARD: &str = "[config]\ndeny_paths = \"/admin*, *.php, /.git*\"\n";

fn config(app: &Backend, api: &Backend, listener_extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nwaf = [\"handshake-guard\"]\nrouter = \"path-router\"\n\
         default_pool = \"app\"\n{listener_extra}\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[[pool]]\nname = \"api\"\nservers = [\"{}\"]\n",
        app.addr, api.addr
    )
}

async fn gateway(app: &Backend, api: &Backend, listener_extra: &str) -> (wasmgate::Gateway, PluginDir) {
    let plugins =
        PluginDir::new().add("path-router", "path-router", ROUTES).add("handshake-guard", "handshake-guard", GUARD);
    (start_gateway(&config(app, api, listener_extra), &plugins).await, plugins)
}

/// The status line's code of a raw exchange.
fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {response:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_spelled_to_slip_past_a_denied_prefix_are_denied() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    for path in ["/admin", "/x/../admin", "/%61dmin", "//admin", "/./admin", "/api/../admin/users", "/%61dmin/./x"] {
        let response = raw_exchange(web(&gateway), &format!("GET {path} HTTP/1.1\r\nHost: app.example\r\n\r\n")).await;
        assert_eq!(status_of(&response), 403, "{path}: {response}");
    }
    // Spellings backends disagree on are refused outright.
    for path in ["/x%2fadmin", "/%2e%2e/admin", "/x%5cadmin", "/x\\..\\admin"] {
        let response = raw_exchange(web(&gateway), &format!("GET {path} HTTP/1.1\r\nHost: app.example\r\n\r\n")).await;
        assert_eq!(status_of(&response), 400, "{path}: {response}");
    }
    assert!(app.requests().is_empty() && api.requests().is_empty(), "nothing reached a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_dot_out_of_the_api_prefix_reaches_neither_the_api_pool_nor_a_dot_dot() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    let response = raw_exchange(web(&gateway), "GET /api/../internal?x=1 HTTP/1.1\r\nHost: app.example\r\n\r\n").await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(api.requests().is_empty(), "the api pool got {:?}", api.requests());
    assert_eq!(app.requests()[0].target, "/internal?x=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_the_headers_the_gateway_sets() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    let raw = "GET /page HTTP/1.1\r\nHost: app.example\r\nConnection: host, x-forwarded-for, x-forwarded-host\r\n\r\n";
    assert_eq!(status_of(&raw_exchange(web(&gateway), raw).await), 200);
    let seen = &app.requests()[0];
    assert_eq!(seen.header("host"), Some("app.example"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.example"));
}

const FORGED: &str = "GET /page HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\n\
                      Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 443\r\n\
                      X-Forwarded-Prefix: /evil\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    assert_eq!(status_of(&raw_exchange(web(&gateway), FORGED).await), 200);
    let seen = &app.requests()[0];
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.example"));
    for forged in ["forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix"] {
        assert_eq!(seen.header(forged), None, "{forged} reached the backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_forwarding_headers_are_kept_and_appended_to() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "trusted_proxies = [\"127.0.0.0/8\"]").await;
    assert_eq!(status_of(&raw_exchange(web(&gateway), FORGED).await), 200);
    let seen = &app.requests()[0];
    assert_eq!(seen.header("x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(seen.header("forwarded"), Some("for=6.6.6.6;proto=https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_routed_by_its_authority_not_by_host() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    let raw = "GET http://api.example/status HTTP/1.1\r\nHost: app.example\r\n\r\n";
    assert_eq!(status_of(&raw_exchange(web(&gateway), raw).await), 200);
    assert!(app.requests().is_empty(), "routed by Host: {:?}", app.requests());
    let seen = &api.requests()[0];
    assert_eq!(seen.header("host"), Some("api.example"));
    assert_eq!(seen.target, "/status");
    // Two Host lines, or none in HTTP/1.1, are refused (RFC 9112 §3.2).
    let two = "GET / HTTP/1.1\r\nHost: app.example\r\nHost: api.example\r\n\r\n";
    assert_eq!(status_of(&raw_exchange(web(&gateway), two).await), 400);
    assert_eq!(status_of(&raw_exchange(web(&gateway), "GET / HTTP/1.1\r\n\r\n").await), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connect_is_405_and_an_upgrade_with_a_body_is_400() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    let connect =
        raw_exchange(web(&gateway), "CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n").await;
    assert_eq!(status_of(&connect), 405, "{connect}");
    assert!(connect.to_ascii_lowercase().contains("\r\nallow: get, head, post"), "{connect}");
    assert!(connect.contains("x-wasmgate-error: method-not-allowed"), "{connect}");

    let upgrade = "GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Content-Length: 8\r\n\r\nsmuggled";
    let response = raw_exchange(web(&gateway), upgrade).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(app.requests().is_empty() && api.requests().is_empty(), "nothing reached a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_cannot_answer_in_the_gateways_name() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "").await;
    let got = get(web(&gateway), "/spoof-gateway-error").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "the backend's own status is kept");
    assert_eq!(got.header("x-wasmgate-error"), None, "{:?}", got.headers);
    assert!(got.body.contains("backend says"), "{}", got.body);
}
