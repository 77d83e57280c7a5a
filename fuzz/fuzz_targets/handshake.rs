//! The WebSocket handshake validator (`ClientHandshake::from_request`). A
//! handshake it accepts over HTTP/1.1 meets RFC 6455 §4.2.1: a GET of
//! HTTP/1.1 or later with a Host, `Upgrade: websocket`, `Connection:
//! Upgrade`, exactly one `Sec-WebSocket-Key` of 16 bytes in base64 and
//! `Sec-WebSocket-Version: 13`; a request that does not ask for a WebSocket
//! is never taken for one; nothing panics.

#![no_main]

use arbitrary::Arbitrary;
use http::{Method, Request, Version};
use libfuzzer_sys::fuzz_target;
use wasmgate::websocket::ClientHandshake;

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    version: u8,
    headers: Vec<(u8, String)>,
    extended_connect: Option<String>,
}

const NAMES: [&str; 10] = [
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "origin",
    "content-length",
    "x-other",
];

fn tokens(req: &Request<()>, name: &str, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fuzz_target!(|input: Input| {
    let method = [Method::GET, Method::POST, Method::CONNECT, Method::HEAD][usize::from(input.method % 4)].clone();
    let version = [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2][usize::from(input.version % 3)];
    let mut builder = Request::builder().method(method).version(version).uri("/chat");
    for (name, value) in input.headers.iter().take(12) {
        builder = builder.header(NAMES[usize::from(*name) % NAMES.len()], value.as_str());
    }
    if let Some(protocol) = &input.extended_connect {
        builder = builder.extension(hyper::ext::Protocol::from(protocol.as_str()));
    }
    let Ok(req) = builder.body(()) else { return };
    let asks = tokens(&req, "upgrade", "websocket")
        || (req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some());
    match ClientHandshake::from_request(&req) {
        Ok(None) => {}
        Err(_) => assert!(asks, "refused as a bad handshake without asking for one"),
        Ok(Some(handshake)) => {
            assert!(asks, "taken for a WebSocket without asking");
            if !handshake.over_h2 {
                assert_eq!(req.method(), Method::GET);
                assert!(req.version() >= Version::HTTP_11);
                assert!(req.headers().contains_key("host"));
                assert!(tokens(&req, "connection", "upgrade"));
                let keys: Vec<_> = req.headers().get_all("sec-websocket-key").iter().collect();
                assert_eq!(keys.len(), 1);
                let key = keys[0].to_str().expect("ascii key");
                use base64_check::decoded_len;
                assert_eq!(decoded_len(key), Some(16), "{key:?}");
                let version = req.headers().get("sec-websocket-version").map(|v| v.as_bytes().trim_ascii().to_vec());
                assert_eq!(version.as_deref(), Some(&b"13"[..]));
            }
        }
    }
});

/// A standalone check of the key's length (not the validator's own code).
mod base64_check {
    pub fn decoded_len(key: &str) -> Option<usize> {
        let key = key.trim();
        if key.len() % 4 != 0 || key.is_empty() {
            return None;
        }
        let padding = key.bytes().rev().take_while(|&b| b == b'=').count();
        let valid = key.bytes().take(key.len() - padding).all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        (valid && padding <= 2).then(|| key.len() / 4 * 3 - padding)
    }
}
