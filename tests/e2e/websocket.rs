//! WebSockets through the gateway: echo of every message kind, close in both
//! directions, subprotocols, the server's own refusal, a wrong accept key, and
//! the idle timeout.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

fn config(app: &Backend, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\nrequest_timeout_s = 2\n{extra}",
        app.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    let (mut ws, response) =
        ws_connect(web(&gateway), "/ws/room?id=1", &[("sec-websocket-protocol", "chat.v2, chat.v1")]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()),
        Some("chat.v2"),
        "the backend's subprotocol choice reaches the client"
    );
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.target, "/ws/room?id=1");
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat.v2, chat.v1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));

    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));

    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(big));

    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Pong(b"are you there".to_vec().into()));

    // The client starts the close; the server's Close comes back through.
    ws.close(Some(CloseFrame { code: 1000.into(), reason: "done".into() })).await.unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected the server's Close, got {other:?}"),
    }
    assert!(ws.next().await.is_none(), "stream ends after the close handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_initiated_close_reaches_the_client() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    let (mut ws, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    ws.send(Message::text("close-me")).await.unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1000);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the server's Close, got {other:?}"),
    }
    // tungstenite answers the Close; then the stream ends.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("stream ends");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_the_upgrade_has_its_answer_passed_through() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    let refused = ws_refused(web(&gateway), "/reject-upgrade", &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.header("x-wasmgate-error"), None, "the backend's answer, not the gateway's");
    assert_eq!(refused.body, "no websockets here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_accept_key_from_backend_is_502() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    let refused = ws_refused(web(&gateway), "/ws-bad-accept", &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.header("x-wasmgate-error"), Some("bad-backend-handshake"));
}

/// The Close frame the gateway sends, and when it arrived.
async fn gateway_close(ws: &mut Ws, within: Duration) -> (u16, String) {
    loop {
        match tokio::time::timeout(within, ws.next()).await.expect("a Close in time") {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_gets_a_close_frame_after_idle_timeout() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "[websocket]\nidle_timeout_s = 1\n"), &PluginDir::new()).await;
    let (mut ws, _) = ws_connect(web(&gateway), "/ws", &[]).await;

    // Traffic keeps it open past the timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    }
    // ...silence ends it, with a WebSocket Close naming the cause.
    let quiet_since = Instant::now();
    let (code, reason) = gateway_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    let idle = quiet_since.elapsed();
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}, before the idle timeout");
    // The client's answer completes the close; then the stream ends.
    let end = tokio::time::timeout(Duration::from_secs(6), ws.next()).await.expect("stream ends");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_websocket_gets_a_close_frame_at_its_maximum_lifetime() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "[websocket]\nmax_lifetime_s = 1\n"), &PluginDir::new()).await;
    let (mut ws, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    let opened = Instant::now();
    let mut sent = 0;
    let (code, reason) = loop {
        ws.send(Message::binary(vec![1u8; 50_000])).await.unwrap();
        sent += 1;
        match next_message(&mut ws).await {
            Message::Binary(b) => assert_eq!(b.len(), 50_000, "whole frames only"),
            Message::Close(Some(frame)) => break (u16::from(frame.code), frame.reason.to_string()),
            other => panic!("{other:?}"),
        }
        assert!(opened.elapsed() < Duration::from_secs(5), "never closed");
    };
    assert_eq!((code, reason.as_str()), (1001, "maximum lifetime reached"));
    assert!(opened.elapsed() >= Duration::from_millis(950));
    assert!(sent > 3, "traffic was flowing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_capacity_listener_answers_503_with_retry_after() {
    let app = Backend::start("app").await;
    let config = config(&app, "").replace("default_pool = \"app\"", "default_pool = \"app\"\nmax_websockets = 10");
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(ws_connect(web(&gateway), "/ws", &[]).await.0);
    }
    // The 11th is refused.
    let refused = ws_refused(web(&gateway), "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("x-wasmgate-error"), Some("at-capacity"));
    assert!(refused.header("retry-after").is_some());

    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(ws_request(web(&gateway), "/ws", &[])).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("a place never freed up: {e}"),
        }
    }
}
