//! The `handshake-guard` WAF and the gateway's own error answers.

use crate::common::*;
use http::StatusCode;

const GUARD: &str = r#"
[config]
allowed_origins = "http://good.test, https://*.example.test"
deny_paths = "/admin*, *.php"
rate_limit = "5/60s"
"#;

fn config(app: &Backend, waf: bool) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n{}\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        if waf { "waf = [\"handshake-guard\"]" } else { "" },
        app.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origin_is_refused_and_never_reaches_the_backend() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", GUARD);
    let gateway = start_gateway(&config(&app, true), &plugins).await;
    let addr = web(&gateway);

    let refused = ws_refused(addr, "/ws", &[("origin", "https://evil.test")]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.header("x-wasmgate-error"), Some("waf-deny"));
    assert!(refused.body.contains("origin not allowed"), "{}", refused.body);
    assert!(app.requests().is_empty(), "the backend never saw the hijacking attempt");

    let (_ws, response) = ws_connect(addr, "/ws", &[("origin", "https://chat.example.test")]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(app.requests().len(), 1);

    let denied = get(addr, "/admin/users").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "plain requests are inspected too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_over_its_rate_gets_429_with_retry_after() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", GUARD);
    let gateway = start_gateway(&config(&app, true), &plugins).await;
    let addr = web(&gateway);
    for i in 0..5 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK, "request {i} is within the rate");
    }
    let limited = ws_refused(addr, "/ws", &[("origin", "http://good.test")]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.header("retry-after"), Some("60"));
    assert_eq!(app.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_get_400_and_other_versions_426() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, false), &PluginDir::new()).await;
    let addr = web(&gateway);
    let handshake = |key: &str, version: &str, method: &str| {
        format!(
            "{method} /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             {key}{version}\r\n"
        )
    };
    let good_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";

    for (raw, why) in [
        (handshake("", v13, "GET"), "missing key"),
        (handshake("Sec-WebSocket-Key: c2hvcnQ=\r\n", v13, "GET"), "key not 16 bytes"),
        (handshake(good_key, "", "GET"), "missing version"),
        (handshake(good_key, v13, "POST"), "not GET"),
        (handshake(good_key, v13, "GET").replace("HTTP/1.1", "HTTP/1.0"), "HTTP/1.0"),
        (
            handshake(good_key, v13, "GET").replace("Connection: Upgrade", "Connection: keep-alive"),
            "no Connection: Upgrade",
        ),
        (handshake(&format!("{good_key}{good_key}"), v13, "GET"), "key repeated"),
    ] {
        let answer = raw_exchange(addr, &raw).await;
        assert_eq!(answer.split(' ').nth(1), Some("400"), "{why}: {answer}");
        assert!(answer.to_ascii_lowercase().contains("x-wasmgate-error: bad-handshake"), "{why}: {answer}");
    }

    let answer = raw_exchange(addr, &handshake(good_key, "Sec-WebSocket-Version: 8\r\n", "GET")).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("sec-websocket-version: 13"), "{answer}");
    assert!(lower.contains("x-wasmgate-error: unsupported-websocket-version"), "{answer}");
    assert!(app.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_connections_is_502_then_leaves_the_pool() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{closed}\"]\n"
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let got = get(web(&gateway), "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.header("x-wasmgate-error"), Some("backend-unreachable"));
    assert!(!got.body.contains(&closed.to_string()), "backend addresses are not shown to clients");
    // The refused server is out of the pool until probes bring it back.
    let refused = ws_refused(web(&gateway), "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("x-wasmgate-error"), Some("no-healthy-server"));

    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let refused = ws_refused(web(&gateway), "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "a handshake to a refusing server");
    assert_eq!(refused.header("x-wasmgate-error"), Some("backend-unreachable"));
}
