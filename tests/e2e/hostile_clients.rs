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

/// `bytes` sent on a new connection to `addr`; everything the gateway
/// answers until it closes (or 5 s pass).
async fn exchange_bytes(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_l4_balancer_the_proxy_header_names_the_client_and_nothing_else_gets_in() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let (gateway, _plugins) = gateway(&app, &api, "proxy_protocol = true").await;
    let request = b"GET /page HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n";

    // Version 2 (binary), as AWS NLB and HAProxy send it.
    let source: std::net::SocketAddr = "203.0.113.7:5555".parse().unwrap();
    let destination: std::net::SocketAddr = "192.0.2.1:80".parse().unwrap();
    let mut v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap();
    v2.extend_from_slice(request);
    let answer = String::from_utf8_lossy(&exchange_bytes(web(&gateway), &v2).await).into_owned();
    assert_eq!(status_of(&answer), 200, "{answer}");
    // The header's source is the client: a forged X-Forwarded-For is replaced by it.
    assert_eq!(app.requests()[0].header("x-forwarded-for"), Some("203.0.113.7"));

    // Version 1 (text).
    let v1 = [&b"PROXY TCP4 198.51.100.9 192.0.2.1 6000 80\r\n"[..], request].concat();
    assert_eq!(status_of(&String::from_utf8_lossy(&exchange_bytes(web(&gateway), &v1).await)), 200);
    assert_eq!(app.requests()[1].header("x-forwarded-for"), Some("198.51.100.9"));

    // A client that reaches the listener directly, or sends a broken
    // header, is closed without an answer and reaches no backend.
    for direct in [
        &request[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET / HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
    ] {
        let answer = exchange_bytes(web(&gateway), direct).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    assert_eq!(app.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_client_a_trusted_proxy_names_and_the_peer_otherwise() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("head-echo", "head-echo", "");
    let config = |trusted: &str| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"head-echo\"\ntrusted_proxies = [{trusted}]\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
            app.addr
        )
    };
    async fn client_ip_seen(addr: std::net::SocketAddr, forwarded_for: &str) -> String {
        let raw =
            format!("GET / HTTP/1.1\r\nHost: gw.test\r\nX-Forwarded-For: {forwarded_for}\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(addr, &raw).await;
        let line = answer.lines().find_map(|l| l.strip_prefix("client-ip: ")).map(str::to_owned);
        line.unwrap_or_else(|| panic!("no client-ip in {answer}"))
    }

    // The peer (127.0.0.1) is trusted, and so is 10.0.0.0/8: the client is
    // the right-most address no trusted proxy stands for.
    let trusting = start_gateway(&config("\"127.0.0.0/8\", \"10.0.0.0/8\""), &plugins).await;
    assert_eq!(client_ip_seen(web(&trusting), "203.0.113.7").await, "203.0.113.7");
    assert_eq!(client_ip_seen(web(&trusting), "6.6.6.6, 203.0.113.7, 10.1.2.3").await, "203.0.113.7");
    assert_eq!(client_ip_seen(web(&trusting), "203.0.113.7, not-an-ip").await, "127.0.0.1", "garbage: the peer");
    // Ports are dropped (Azure Application Gateway adds them).
    assert_eq!(client_ip_seen(web(&trusting), "203.0.113.7:4711").await, "203.0.113.7");
    assert_eq!(client_ip_seen(web(&trusting), "[2001:db8::7]:443").await, "2001:db8::7");
    // A byte the client put in its own part of the line does not hide the
    // address its proxy appended (one line, as nginx writes it).
    assert_eq!(client_ip_seen(web(&trusting), "\u{80}, 203.0.113.7").await, "203.0.113.7");
    // From a peer it does not trust, X-Forwarded-For says nothing.
    let untrusting = start_gateway(&config("\"10.0.0.0/8\""), &plugins).await;
    assert_eq!(client_ip_seen(web(&untrusting), "203.0.113.7").await, "127.0.0.1");
}
