//! Plain HTTP through the gateway: routing by the `path-router` plugin,
//! rewrites and headers, forwarding headers, bodies, and the request head
//! plugins see.

use crate::common::*;
use http::StatusCode;

const ROUTES: &str = r#"
[config]
routes = """
*   /api/       pool=api  rewrite=/v1/  set-header=x-routed-by:path-router
*   /old        redirect=308:/new
*   /private    respond=404
*   /           pool=app
"""
"#;

fn config(app: &Backend, api: &Backend) -> String {
    format!(
        r#"
        [[listener]]
        name = "web"
        bind = "127.0.0.1:0"
        router = "path-router"

        [[pool]]
        name = "app"
        servers = ["{}"]

        [[pool]]
        name = "api"
        servers = ["{}"]
        request_timeout_s = 1
        "#,
        app.addr, api.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_reach_the_pool_chosen_by_path_router() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let addr = web(&gateway);

    let home = get(addr, "/index.html").await;
    assert_eq!(home.status, StatusCode::OK);
    assert!(home.body.starts_with("backend=app "), "{}", home.body);

    let users = request(addr, "GET", "/api/users?limit=2", &[("x-forwarded-for", "203.0.113.9")], vec![]).await;
    assert_eq!(users.status, StatusCode::OK);
    assert!(users.body.contains("backend=api"), "{}", users.body);
    let seen = api.requests().pop().expect("api saw the request");
    assert_eq!(seen.target, "/v1/users?limit=2", "path rewritten, query kept");
    assert_eq!(seen.header("x-routed-by"), Some("path-router"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "a client's own is replaced");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some(format!("gw.test:{}", addr.port()).as_str()));
    assert_eq!(seen.header("host"), Some(format!("gw.test:{}", addr.port()).as_str()), "Host is preserved");
    assert!(app.requests().iter().all(|r| !r.target.contains("users")), "app never saw the api request");

    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let checksum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let posted = request(addr, "POST", "/api/upload", &[], body).await;
    assert_eq!(posted.status, StatusCode::OK);
    assert!(posted.body.contains("method=POST target=/v1/upload body_len=1048576"), "{}", posted.body);
    assert!(posted.body.contains(&format!("checksum={checksum}")), "{}", posted.body);
    let upload = api.requests().into_iter().find(|r| r.target == "/v1/upload").expect("api saw the upload");
    assert_eq!(upload.body_len, 1 << 20, "the backend received the whole body, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_can_answer_itself() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let addr = web(&gateway);

    let old = get(addr, "/old/page").await;
    assert_eq!(old.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(old.header("location"), Some("/new"));
    assert_eq!(old.header("x-wasmgate-error"), None, "a plugin's own answer is not a gateway error");

    let private = get(addr, "/private").await;
    assert_eq!(private.status, StatusCode::NOT_FOUND);
    assert!(app.requests().is_empty() && api.requests().is_empty(), "no backend saw them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_without_default_pool_is_404() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("path-router", "path-router", "[config]\nroutes = \"* /app/ pool=app\"\n");
    let config = routed_by("path-router", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let missing = get(web(&gateway), "/elsewhere").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.header("x-wasmgate-error"), Some("no-route"));
    assert!(get(web(&gateway), "/app/x").await.body.contains("backend=app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let app = Backend::start("app").await;
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let headers = [
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("x-kept", "yes"),
    ];
    let got = request(web(&gateway), "GET", "/", &headers, vec![]).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.header("x-hop-secret"), None);
    assert_eq!(seen.header("keep-alive"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_504_after_request_timeout() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let started = std::time::Instant::now();
    let slow = get(web(&gateway), "/api/slow").await;
    let took = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(slow.header("x-wasmgate-error"), Some("backend-timeout"));
    // The backend needs 3 s; the pool waits its request_timeout_s = 1, no less.
    let timeout = std::time::Duration::from_secs(1);
    assert!(took >= timeout && took < timeout + CI_MARGIN, "cut at request_timeout_s = 1, after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_with_its_own_query_replaces_the_clients() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = routed_by("hostile", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let got = get(web(&gateway), "/rewrite-query?from=client").await;
    assert!(got.body.contains("target=/new?from=plugin "), "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_whole_request_head() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("head-echo", "head-echo", "");
    let config = routed_by("head-echo", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);

    let got = request(addr, "DELETE", "/items/7?force=yes&x=%20", &[("x-custom", "Value 1")], vec![]).await;
    let expect = [
        "method: DELETE".to_string(),
        "scheme: http".into(),
        "version: HTTP/1.1".into(),
        "tls: none".into(),
        format!("authority: gw.test:{}", addr.port()),
        "path: /items/7".into(),
        "query: Some(\"force=yes&x=%20\")".into(),
        "client-ip: 127.0.0.1".into(),
        "listener: web".into(),
        "websocket: none".into(),
        "header x-custom: Value 1".into(),
    ];
    for line in expect {
        assert!(got.body.lines().any(|l| l == line), "missing `{line}` in:\n{}", got.body);
    }

    // One header by name: every line of it, joined as a backend reads them.
    let got =
        request(addr, "GET", "/h?header=X-Tag", &[("x-tag", "a"), ("x-tag", "b"), ("x-other", "c")], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(X-Tag): Some(\"a, b\")"), "{}", got.body);
    let got = request(addr, "GET", "/h?header=cookie", &[("cookie", "s=1"), ("cookie", "t=2")], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(cookie): Some(\"s=1; t=2\")"), "{}", got.body);
    let got = request(addr, "GET", "/h?header=x-absent", &[], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(x-absent): None"), "{}", got.body);

    // HTTP/1.0 is shown as such.
    let old = raw_exchange(addr, "GET /old HTTP/1.0\r\nHost: gw.test\r\n\r\n").await;
    assert!(old.contains("\nversion: HTTP/1.0\n"), "{old}");

    // A handshake: the router answers it itself, so the client gets 200 and
    // the body shows the websocket fields.
    let raw = "GET /chat HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\
         Origin: https://app.example.test\r\n\r\n";
    let answer = raw_exchange(addr, raw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(
            "websocket: version=13 subprotocols=[\"chat\", \"superchat\"] origin=Some(\"https://app.example.test\") extensions=[\"permessage-deflate\"]"
        ),
        "{answer}"
    );
    assert!(app.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_router_routes_as_the_readme_says() {
    let (app, api, canary) = (Backend::start("app").await, Backend::start("api").await, Backend::start("canary").await);
    let plugins = PluginDir::new().add("hello-router", "hello-router", "");
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"hello-router\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[[pool]]\nname = \"api\"\nservers = [\"{}\"]\n\
         [[pool]]\nname = \"canary\"\nservers = [\"{}\"]\n",
        app.addr, api.addr, canary.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);
    assert!(request(addr, "GET", "/x", &[("x-canary", "1")], vec![]).await.body.contains("backend=canary"));
    let via_api = get(addr, "/api/items").await;
    assert!(via_api.body.contains("backend=api method=GET target=/items "), "{}", via_api.body);
    assert_eq!(api.requests()[0].header("x-via"), Some("hello"));
    assert!(get(addr, "/other").await.body.contains("backend=app"), "no route falls back to default_pool");
    let refused = ws_refused(addr, "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.body, "no chat here");
}
