//! The admin listener: liveness, readiness that turns false while draining,
//! and a status document that matches the live state.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_live_state_and_readyz_turns_false_while_draining() {
    let app = Backend::start("app").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"handshake-guard\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\", \"{closed}\"]\n\
         [pool.probe]\ninterval_s = 0.2\ntimeout_s = 0.1\nunhealthy_threshold = 1\n",
        app.addr
    );
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", "");
    let gateway = start_gateway(&config, &plugins).await;
    let admin = gateway.admin_addr().expect("admin listener");
    let closed_text = closed.to_string();
    wait_until("the closed server marked down", Duration::from_secs(3), || {
        gateway.pool("app").unwrap().servers.iter().any(|s| s.address == closed_text && !s.is_healthy())
    })
    .await;
    let (_a, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    let (_b, _) = ws_connect(web(&gateway), "/ws", &[]).await;

    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(admin, "/readyz").await.status, StatusCode::OK);
    let status: serde_json::Value = serde_json::from_str(&get(admin, "/status").await.body).expect("JSON");
    assert_eq!(status["listeners"][0]["name"], "web");
    assert_eq!(status["listeners"][0]["addr"], web(&gateway).to_string());
    assert_eq!(status["websockets"], 2);
    let servers = status["pools"][0]["servers"].as_array().unwrap();
    let server = |addr: &str| servers.iter().find(|s| s["address"] == addr).unwrap().clone();
    assert_eq!(server(&app.addr.to_string())["healthy"], true);
    assert_eq!(server(&app.addr.to_string())["active"], 2, "the two WebSockets");
    assert_eq!(server(&closed_text)["healthy"], false);
    assert!(server(&closed_text)["last_reason"].as_str().unwrap().contains("connect"), "{status}");
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["name"], "handshake-guard");
    assert_eq!(plugin["kind"], "waf");
    assert_eq!(plugin["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(plugin["version"], 1);
    assert_eq!(plugin["calls"], 2, "one call per handshake");

    gateway.drain().await;
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "not ready while draining");
    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK, "still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_guards_every_admin_endpoint() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new();
    let token = plugins.path().join("admin-token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        token.display(),
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let admin = gateway.admin_addr().unwrap();
    assert_eq!(get(admin, "/status").await.status, StatusCode::UNAUTHORIZED);
    let wrong = request(admin, "GET", "/status", &[("authorization", "Bearer nope")], vec![]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let right = request(admin, "GET", "/status", &[("authorization", "Bearer s3cret-token")], vec![]).await;
    assert_eq!(right.status, StatusCode::OK);
}
