//! Faults injected with real sockets, against a `wasmgate run` process: a
//! backend that dies mid-body, one that resets a WebSocket right after its
//! 101 or in the middle of it, one that takes a request or a handshake and
//! never answers, and a client that stops reading a 50 MB download. Each must leave nothing behind: no request or WebSocket
//! counted in `/status`, and no descriptor more in `/proc/PID/fd` than
//! before.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// A backend whose every connection misbehaves as its request path says:
/// `/truncated` promises 1 MB and resets after 1 KB; `/big` sends 50 MB;
/// `/ws-reset` answers 101 and resets; `/ws-die` answers 101, sends one
/// text frame and resets 200 ms later; `/hang` and `/ws-hang` never answer
/// and hold the connection until the gateway closes it.
async fn fault_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(misbehave(socket));
        }
    });
    addr
}

async fn misbehave(mut socket: TcpStream) {
    let Some(text) = read_head(&mut socket).await else { return };
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let key = websocket_key(&text);
    let reset = |socket: TcpStream| {
        // SO_LINGER 0: the close is a TCP reset, as a killed process's is.
        // (Deprecated because a non-zero linger blocks on drop; zero never does.)
        #[allow(deprecated)]
        let _ = socket.set_linger(Some(Duration::ZERO));
        drop(socket);
    };
    match path.as_str() {
        "/truncated" => {
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n").await;
            let _ = socket.write_all(&[b'x'; 1024]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            reset(socket);
        }
        "/big" => {
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n").await;
            let chunk = vec![b'y'; 64 * 1024];
            for _ in 0..800 {
                match tokio::time::timeout(Duration::from_secs(20), socket.write_all(&chunk)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        }
        "/hang" | "/ws-hang" => {
            // Silent, but reading: returns once the gateway hangs up.
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        }
        "/ws-reset" | "/ws-die" => {
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.unwrap_or_default().as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            let _ = socket.write_all(answer.as_bytes()).await;
            if path == "/ws-die" {
                let _ = socket.write_all(&[0x81, 5, b'h', b'e', b'l', b'l', b'o']).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reset(socket);
        }
        _ => {
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        }
    }
}

/// The Close frame a client gets when the backend's connection fails.
fn close_1011() -> Vec<u8> {
    [&[0x88u8, 25, 0x03, 0xf3][..], b"backend connection lost"].concat()
}

/// The gateway process's open descriptors.
fn open_files(gateway: &GatewayProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gateway.child.id())).map(|d| d.count()).unwrap_or(usize::MAX)
}

/// Everything `stream` sends until it closes (or 10 s pass).
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_and_client_faults_leave_no_count_and_no_descriptor_behind() {
    let backend = fault_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n[limits]\nclient_idle_timeout_s = 1\n\
             [websocket]\nidle_timeout_s = 2\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"faulty\"\n\
             [[pool]]\nname = \"faulty\"\nservers = [\"{backend}\"]\nrequest_timeout_s = 2\n\
             [pool.probe]\ninterval_s = 3600\ntimeout_s = 1\n"
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&config, &dir.path().join("gateway.log"), 2).await;
    let (web, admin) = (gateway.addr("web"), gateway.addr("admin"));
    let warm = raw_exchange(web, "GET /warm HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n").await;
    assert!(warm.starts_with("HTTP/1.1 200"), "{warm}");
    // Idle upstream connections from the warm-up may stay pooled: the
    // baseline is taken once the process has settled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = open_files(&gateway);

    // 1. The backend dies mid-body: the client's response ends short.
    let mut client = TcpStream::connect(web).await.unwrap();
    client.write_all(b"GET /truncated HTTP/1.1\r\nHost: gw.test\r\n\r\n").await.unwrap();
    let got = read_all(&mut client).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
    assert!(got.len() < 1_000_000, "the body cannot be whole: {} bytes", got.len());
    drop(client);

    // 2. The backend resets the WebSocket right after its 101.
    let mut reset = raw_upgrade(web, "/ws-reset").await;
    let after = read_all(&mut reset).await;
    assert_eq!(after, close_1011(), "a Close 1011, then the end");

    // 3. The backend dies in the middle of a WebSocket: the client has its
    // message, then the connection ends.
    let mut dying = raw_upgrade(web, "/ws-die").await;
    let after = read_all(&mut dying).await;
    let message = [0x81, 5, b'h', b'e', b'l', b'l', b'o'];
    assert_eq!(after, [&message[..], &close_1011()].concat(), "the message, then Close 1011");

    // 4. The backend takes a request, or a handshake, and never answers:
    // 504 at the pool's request timeout (2 s), and its connection closed.
    let hung = raw_exchange(web, "GET /hang HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n").await;
    assert!(hung.starts_with("HTTP/1.1 504"), "{hung:.200}");
    assert!(hung.contains("x-wasmgate-error: backend-timeout"), "{hung:.300}");
    let handshake = raw_exchange(
        web,
        "GET /ws-hang HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(handshake.starts_with("HTTP/1.1 504"), "{handshake:.200}");

    // 5. A client that stops reading a 50 MB download.
    let mut stalled = TcpStream::connect(web).await.unwrap();
    stalled.write_all(b"GET /big HTTP/1.1\r\nHost: gw.test\r\n\r\n").await.unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // ...and never reads again. The gateway closes it once nothing moves.
    let started = std::time::Instant::now();
    wait_until("the stalled download is closed", Duration::from_secs(15), || {
        open_files(&gateway) <= baseline + 1 // the stalled client's own socket may linger
    })
    .await;
    let closed_after = started.elapsed();

    // Nothing is left: no request, no WebSocket, no descriptor.
    drop((reset, dying, stalled));
    wait_until("every descriptor is released", Duration::from_secs(10), || open_files(&gateway) <= baseline).await;
    let status = status(admin).await;
    assert_eq!(status["requests_in_flight"], 0, "{status}");
    assert_eq!(status["websockets"], 0, "{status}");
    assert!(closed_after < Duration::from_secs(10), "the stalled client held its connection {closed_after:?}");
}
