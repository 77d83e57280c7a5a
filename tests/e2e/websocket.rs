//! WebSockets through the gateway: echo of every message kind, close in both
//! directions, subprotocols, the server's own refusal, a 101 a client must
//! refuse, half-closes, the idle timeout, the lifetime and the close grace.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
    let offered = [
        ("sec-websocket-protocol", "chat.v2, chat.v1"),
        ("origin", "https://app.example.test"),
        ("cookie", "session=abc; theme=dark"),
        ("sec-websocket-extensions", "x-test-ext; p=1"),
    ];
    let (mut ws, response) = ws_connect(web(&gateway), "/ws/room?id=1", &offered).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()),
        Some("chat.v2"),
        "the backend's subprotocol choice reaches the client"
    );
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.target, "/ws/room?id=1");
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat.v2, chat.v1"));
    assert_eq!(seen.header("origin"), Some("https://app.example.test"));
    assert_eq!(seen.header("cookie"), Some("session=abc; theme=dark"));
    assert_eq!(seen.header("sec-websocket-extensions"), Some("x-test-ext; p=1"));
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
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("stream ends");
    assert!(end.is_none(), "stream ends after the close handshake: {end:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_a_client_must_refuse_is_502() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    let offer = [("sec-websocket-protocol", "chat.v1"), ("sec-websocket-extensions", "permessage-deflate")];
    for path in ["/ws-no-upgrade", "/ws-no-connection", "/ws-unoffered-protocol", "/ws-unoffered-extension"] {
        let refused = ws_refused(web(&gateway), path, &offer).await;
        assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(refused.header("x-wasmgate-error"), Some("bad-backend-handshake"), "{path}");
    }
    // The same offer to a backend that answers properly is upgraded.
    let (_ws, response) = ws_connect(web(&gateway), "/ws", &offer[..1]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
}

/// Everything `stream` sends until it closes (within `limit`).
async fn read_to_end(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut got)).await.expect("closed in time").unwrap();
    got
}

/// A raw WebSocket backend for one connection: it answers the upgrade with
/// a correct 101, then hands the socket to `then`. Returns its address.
async fn raw_backend<F, Fut>(then: F) -> std::net::SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = backend.accept().await.unwrap();
        let text = read_head(&mut socket).await.expect("a handshake head");
        let key = websocket_key(&text).expect("a Sec-WebSocket-Key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        socket.write_all(answer.as_bytes()).await.unwrap();
        then(socket).await;
    });
    addr
}

fn raw_config(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"raw\"\n\
         [[pool]]\nname = \"raw\"\nservers = [\"{backend}\"]\n[pool.probe]\ninterval_s = 3600\ntimeout_s = 1\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_is_passed_on_and_the_other_direction_keeps_flowing() {
    // After the 101 the backend reads until the client's side ends, then
    // still sends one text frame and closes.
    let backend = raw_backend(|mut socket| async move {
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.unwrap();
        socket.write_all(b"\x81\x07saw eof").await.unwrap();
        socket.shutdown().await.unwrap();
    })
    .await;
    let gateway = start_gateway(&raw_config(backend, ""), &PluginDir::new()).await;
    let mut client = raw_upgrade(web(&gateway), "/ws").await;
    client.shutdown().await.unwrap();
    let got = read_to_end(&mut client, Duration::from_secs(5)).await;
    assert_eq!(got, b"\x81\x07saw eof", "the server saw the client's EOF and could still answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_the_handshake_is_504_at_the_request_timeout() {
    // Accepts, reads the handshake, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = raw_config(backend, "").replace("servers = [", "request_timeout_s = 1\nservers = [");
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let started = Instant::now();
    let refused = ws_refused(web(&gateway), "/ws", &[]).await;
    let took = started.elapsed();
    assert_eq!(refused.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(refused.header("x-wasmgate-error"), Some("backend-timeout"));
    let timeout = Duration::from_secs(1);
    assert!(took >= timeout && took < timeout + CI_MARGIN, "answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sides_that_ignore_the_gateways_close_are_cut_after_the_grace() {
    // Neither side answers the Close the idle timeout sends: the backend
    // only records what it receives, the client only reads.
    let (received_tx, received_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let backend = raw_backend(|mut socket| async move {
        let mut received = Vec::new();
        let _ = socket.read_to_end(&mut received).await;
        let _ = received_tx.send(received);
    })
    .await;
    let gateway = start_gateway(&raw_config(backend, "[websocket]\nidle_timeout_s = 1\n"), &PluginDir::new()).await;
    let mut client = raw_upgrade(web(&gateway), "/ws").await;
    let close_frame = [&[0x88u8, 0x0e][..], &1001u16.to_be_bytes(), b"idle timeout"].concat();
    let mut got = Vec::new();
    let mut closed_at = None;
    let cut_at = loop {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.expect("in time").unwrap();
        if n == 0 {
            break Instant::now();
        }
        got.extend_from_slice(&buf[..n]);
        if closed_at.is_none() && got.windows(close_frame.len()).any(|w| w == close_frame) {
            closed_at = Some(Instant::now());
        }
    };
    let closed_at = closed_at.unwrap_or_else(|| panic!("no Close 1001 \"idle timeout\" in {got:?}"));
    let grace = cut_at - closed_at;
    assert!(grace >= Duration::from_millis(4900), "cut {grace:?} after the Close, before the 5 s grace");
    assert!(grace < Duration::from_secs(5) + CI_MARGIN, "cut {grace:?} after the Close");

    // The backend got the same Close, masked as a client's must be.
    let received = tokio::time::timeout(Duration::from_secs(2), received_rx).await.expect("backend cut").unwrap();
    assert_eq!(received.len(), 2 + 4 + 14, "one masked Close frame: {received:?}");
    assert_eq!((received[0], received[1]), (0x88, 0x80 | 14), "FIN + Close, masked, 14 bytes");
    let mask = &received[2..6];
    let payload: Vec<u8> = received[6..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    assert_eq!(&payload[2..], b"idle timeout");
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
    assert!(idle < Duration::from_secs(1) + CI_MARGIN, "closed {idle:?} after the last message, not at 1 s");
    // The client's answer completes the close; then the stream ends.
    let end = tokio::time::timeout(Duration::from_secs(6), ws.next()).await.expect("stream ends");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
    // The backend got the same Close, masked as from a client (its
    // server-side stream refuses an unmasked frame).
    wait_until("the backend's Close", Duration::from_secs(2), || {
        app.closes.lock().unwrap().contains(&(1001, "idle timeout".to_owned()))
    })
    .await;
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
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(950) && lived < Duration::from_secs(1) + CI_MARGIN,
        "closed after {lived:?}"
    );
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

/// Sends unmasked binary frames (65,280 bytes of payload each) as fast as
/// `to` takes them, until a write makes no progress for `stall` or 64 MiB
/// went (far more than socket buffers hold); returns the bytes sent.
async fn flood<W: tokio::io::AsyncWrite + Unpin>(to: &mut W, stall: Duration) -> u64 {
    let mut frame = vec![0x82u8, 126, 0xff, 0x00];
    frame.resize(4 + 0xff00, 0xab);
    let mut sent = 0u64;
    while sent < 64 << 20 {
        match tokio::time::timeout(stall, to.write_all(&frame)).await {
            Ok(Ok(())) => sent += frame.len() as u64,
            _ => break,
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_idle_timeout() {
    // The backend sends binary frames as fast as it can; the client never
    // reads, so the gateway's writes to it stop making progress.
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<(u64, Instant)>();
    let backend = raw_backend(|mut socket| async move {
        let sent = flood(&mut socket, Duration::from_secs(30)).await;
        let _ = cut_tx.send((sent, Instant::now()));
    })
    .await;
    let gateway = start_gateway(&raw_config(backend, "[websocket]\nidle_timeout_s = 1\n"), &PluginDir::new()).await;
    let _client = raw_upgrade(web(&gateway), "/ws").await;
    let started = Instant::now();
    let (sent, cut_at) =
        tokio::time::timeout(Duration::from_secs(15), cut_rx).await.expect("the backend was cut").unwrap();
    assert!(sent < 64 << 20, "the backend could send everything: the client's side never filled");
    // Cut once the writes to the client stood still for the idle timeout
    // (plus the time to fill the buffers), not after the backend's 30 s.
    let took = cut_at - started;
    assert!(took < Duration::from_secs(1) + Duration::from_secs(3) + CI_MARGIN, "cut after {took:?}");
    wait_until("the WebSocket is released", Duration::from_secs(5), || gateway.websockets() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_direction_never_holds_up_the_other() {
    // The backend floods the client, which never reads, so the gateway's
    // writes toward the client stall; meanwhile the client keeps sending,
    // and every one of its frames must still reach the backend.
    const FRAMES: usize = 200;
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<usize>();
    let backend = raw_backend(|socket| async move {
        let (mut read, mut write) = socket.into_split();
        tokio::spawn(async move { flood(&mut write, Duration::from_secs(20)).await });
        // Each client frame: 2 header bytes, a 4-byte mask, 8 of payload.
        let mut buf = vec![0u8; FRAMES * 14];
        let got = match tokio::time::timeout(Duration::from_secs(20), read.read_exact(&mut buf)).await {
            Ok(Ok(_)) => FRAMES,
            _ => 0,
        };
        let _ = got_tx.send(got);
    })
    .await;
    let gateway = start_gateway(&raw_config(backend, "[websocket]\nidle_timeout_s = 30\n"), &PluginDir::new()).await;
    let mut client = raw_upgrade(web(&gateway), "/ws").await;
    // Let the flood fill every buffer toward the client first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..FRAMES {
        client.write_all(&[0x82, 0x88, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(25), got_rx).await.expect("the backend answered").unwrap();
    assert_eq!(got, FRAMES, "the client's frames were held up behind the stalled direction");
}

/// A binary frame from a server (unmasked) with a patterned payload.
fn server_frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0x82, 127];
    frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
    frame.extend((0..payload_len).map(|i| (i % 251) as u8 ^ seed));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_frames_arrive_whole_when_they_start_with_the_101_or_are_cut_off() {
    // The backend's 101 and the start of a large frame leave in one write,
    // so the gateway reads part of the frame with the 101; the rest comes
    // later (spliced), then a second large frame the backend cuts off.
    let (first, second) = (server_frame(300_000, 1), server_frame(200_000, 2));
    let expected = [&first[..], &second[..60_000]].concat();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let sent = (first.clone(), second.clone());
    tokio::spawn(async move {
        let (first, second) = sent;
        let (mut socket, _) = backend.accept().await.unwrap();
        let text = read_head(&mut socket).await.expect("a handshake head");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
            websocket_key(&text).expect("a Sec-WebSocket-Key").as_bytes(),
        );
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        answer.extend_from_slice(&first[..40_000]);
        socket.write_all(&answer).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket.write_all(&first[40_000..]).await.unwrap();
        socket.write_all(&second[..60_000]).await.unwrap();
        socket.shutdown().await.unwrap();
        let _ = socket.read_to_end(&mut Vec::new()).await;
    });
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n[websocket]\nsplice = true\n";
    let gateway = start_gateway(&format!("{admin}{}", raw_config(addr, "")), &PluginDir::new()).await;
    let mut client = raw_upgrade(web(&gateway), "/ws").await;
    let got = read_to_end(&mut client, Duration::from_secs(5)).await;
    assert!(got == expected, "{} bytes arrived of {} sent, not the same bytes", got.len(), expected.len());
    drop(client);
    let admin = gateway.admin_addr().unwrap();
    crate::admin::websockets_closed(admin, 1.0).await;
    let spliced = crate::admin::counter(admin, "wasmgate_websocket_spliced_bytes_total").await;
    assert!(spliced > 100_000.0, "the frames' later bytes were spliced: {spliced}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_with_the_handshake_reaches_the_server() {
    // A client that does not wait for the 101: its first frame leaves in the
    // same write as its handshake, so the gateway reads it with the head.
    let frame = b"\x81\x85\x01\x02\x03\x04\x69\x67\x6f\x68\x6e".to_vec(); // masked "hello"
    let expected = frame.clone();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let backend = raw_backend(move |mut socket| async move {
        let mut got = vec![0; expected.len()];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut got)).await;
        let _ = seen_tx.send(read.is_ok() && got == expected);
    })
    .await;
    let gateway = start_gateway(&raw_config(backend, ""), &PluginDir::new()).await;
    let mut client = TcpStream::connect(web(&gateway)).await.unwrap();
    let mut head = b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    head.extend_from_slice(&frame);
    client.write_all(&head).await.unwrap();
    let answer = read_head(&mut client).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert_eq!(seen_rx.await, Ok(true), "the server got the frame, byte for byte");
}
