//! The demo backend: `demo-backend NAME ADDR` serves
//! - `/` (on the `app` backend): a page that opens a WebSocket through the
//!   gateway and echoes what you type;
//! - `/ws`: a WebSocket echo;
//! - anything else: a plain-text description of the request it received.

use std::convert::Infallible;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

const PAGE: &str = include_str!("page.html");

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(addr)) = (args.next(), args.next()) else {
        eprintln!("usage: demo-backend NAME ADDR   (e.g. demo-backend app 127.0.0.1:9001)");
        std::process::exit(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("demo-backend: `{addr}` is not ip:port: {e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("demo-backend {name}: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    // One write, so two backends starting together do not interleave.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("demo-backend {name}: listening on http://{addr}\n").as_bytes(),
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(name.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(name: String, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let wants_websocket = req.headers().get(UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if wants_websocket {
        let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
            return Ok(text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n".into()));
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                let _ = ws.send(Message::text(format!("connected to backend `{name}`"))).await;
                while let Some(Ok(message)) = ws.next().await {
                    let reply = match message {
                        Message::Text(t) => Message::text(format!("{name} echoes: {t}")),
                        Message::Binary(b) => Message::Binary(b),
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, "websocket".parse().unwrap());
        headers.insert(CONNECTION, "Upgrade".parse().unwrap());
        headers.insert(SEC_WEBSOCKET_ACCEPT, key.parse().unwrap());
        return Ok(response);
    }
    if req.uri().path() == "/" && name == "app" {
        let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
        response.headers_mut().insert(CONTENT_TYPE, "text/html; charset=utf-8".parse().unwrap());
        return Ok(response);
    }
    let mut body = format!("backend `{name}` got {} {}\n", req.method(), req.uri());
    for (header, value) in req.headers() {
        body.push_str(&format!("  {header}: {}\n", String::from_utf8_lossy(value.as_bytes())));
    }
    Ok(text(StatusCode::OK, body))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, "text/plain; charset=utf-8".parse().unwrap());
    response
}
