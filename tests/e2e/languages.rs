//! Plugins written in languages other than Rust, built from source by
//! `scripts/build-plugins` with their pinned toolchains, loaded by a running
//! gateway and serving real traffic.

use hmac::{Hmac, Mac};
use http::StatusCode;
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;

use futures_util::SinkExt;

use crate::common::*;

const API_KEYS: &str = "[config]\napi_keys = \"demo=demo-key-0123456789, ops=ops-key-0123456789ab\"\n\
                        rate_limit = \"4/60s\"\n";

/// A signed token for key `name`: `NAME.EXPIRY.hex(HMAC-SHA256(key, "NAME.EXPIRY"))`.
fn token(name: &str, key: &str, expiry: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{name}.{expiry}").as_bytes());
    let signature: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}.{expiry}.{signature}")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_api_key_guard_checks_keys_and_tokens_and_limits_each_key() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("api-key-guard", "api-key-guard", API_KEYS);
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"api-key-guard\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);

    let missing = ws_refused(addr, "/ws", &[]).await;
    assert_eq!((missing.status, missing.header("www-authenticate")), (StatusCode::UNAUTHORIZED, Some("ApiKey")));
    let wrong = ws_refused(addr, "/ws", &[("x-api-key", "not-a-key-0123456789")]).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert!(wrong.body.contains("unknown API key"), "{}", wrong.body);
    let forged = format!("/ws?token={}", token("demo", "guessed-key-0123456", now() + 600));
    assert_eq!(ws_refused(addr, &forged, &[]).await.status, StatusCode::FORBIDDEN);
    let expired = format!("/ws?token={}", token("demo", "demo-key-0123456789", now() - 5));
    let expired = ws_refused(addr, &expired, &[]).await;
    assert!(expired.status == StatusCode::FORBIDDEN && expired.body.contains("expired"), "{}", expired.body);
    assert!(app.requests().is_empty(), "nothing refused reached the backend");

    // A good key, by header and by a browser's signed token: echoed through.
    let (mut ws, response) = ws_connect(addr, "/ws", &[("x-api-key", "demo-key-0123456789")]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("through the python waf")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("through the python waf"));
    let signed = format!("/ws?token={}", token("demo", "demo-key-0123456789", now() + 600));
    let (_ws, response) = ws_connect(addr, &signed, &[]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    // Four handshakes a minute per key: the fifth with `demo` is refused,
    // another key is not, and plain requests are not guarded (scope).
    for _ in 0..2 {
        ws_connect(addr, "/ws", &[("x-api-key", "demo-key-0123456789")]).await;
    }
    let over = ws_refused(addr, "/ws", &[("x-api-key", "demo-key-0123456789")]).await;
    assert_eq!((over.status, over.header("retry-after")), (StatusCode::TOO_MANY_REQUESTS, Some("60")));
    ws_connect(addr, "/ws", &[("x-api-key", "ops-key-0123456789ab")]).await;
    assert_eq!(get(addr, "/plain").await.status, StatusCode::OK);
}

#[test]
fn check_refuses_the_python_guard_with_its_own_message() {
    let plugins = PluginDir::new().add("api-key-guard", "api-key-guard", "[config]\napi_keys = \"demo=short\"\n");
    let config = plugins.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins]\ndir = \".\"\ncache_dir = \"{}\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
             default_pool = \"app\"\nwaf = [\"api-key-guard\"]\n[[pool]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n",
            shared_cache().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("plugin `api-key-guard` refused its configuration: bad config: api_keys: the key of `demo` is shorter than 16 characters"),
        "{text}"
    );
}
