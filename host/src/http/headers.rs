//! Header helpers: hop-by-hop removal (RFC 9110 §7.6.1), comma-separated
//! token lists, and the `Sec-WebSocket-Key`s the gateway makes.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Mostly `Connection` says only `keep-alive` or `close`: nothing to
    // collect (a field named `close`, should one come, is removed by name).
    let tokens = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
    };
    let more = |token: &[u8]| {
        !token.eq_ignore_ascii_case(b"close")
            && !HOP_BY_HOP.iter().any(|n| token.eq_ignore_ascii_case(n.as_str().as_bytes()))
    };
    let close = tokens().any(|token| token.eq_ignore_ascii_case(b"close"));
    // Empty, this allocates nothing.
    let named: Vec<HeaderName> =
        tokens().filter(|token| more(token)).filter_map(|token| HeaderName::from_bytes(token).ok()).collect();
    if close {
        headers.remove("close");
    }
    for name in &named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// True if any comma-separated token of header `name` equals `token`
/// (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Every comma-separated item of every `name` header, trimmed.
pub fn list(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A fresh `Sec-WebSocket-Key` for a handshake the gateway makes itself (a
/// probe, or an HTTP/2 WebSocket bridged to HTTP/1.1): 16 random bytes in
/// base64, as RFC 6455 §4.1 asks, from the TLS stack's secure random source.
pub fn new_websocket_key() -> String {
    use base64::Engine as _;
    let mut nonce = [0u8; 16];
    // Building a provider allocates its suite lists; its random source is
    // a `'static`, taken once.
    static RANDOM: std::sync::OnceLock<&'static dyn rustls::crypto::SecureRandom> = std::sync::OnceLock::new();
    let random = RANDOM.get_or_init(|| rustls::crypto::ring::default_provider().secure_random);
    if random.fill(&mut nonce).is_err() {
        // The system's random source failed: still unpredictable enough for
        // a nonce that only guards against caching proxies.
        let state = std::hash::RandomState::new();
        for (i, chunk) in nonce.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&std::hash::BuildHasher::hash_one(&state, i).to_le_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    #[test]
    fn every_header_connection_names_is_removed_and_the_others_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "Close , X-A,,keep-alive"),
            ("connection", "x-b\t"),
            ("close", "1"),
            ("x-a", "1"),
            ("x-b", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ] {
            headers.append(HeaderName::from_static(name), name_value(value));
        }
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);

        // Only standard names listed: the common case, nothing else goes.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, name_value("keep-alive"));
        headers.insert(HeaderName::from_static("x-kept"), name_value("1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }

    fn name_value(value: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn websocket_keys_are_16_fresh_random_bytes() {
        let keys: Vec<Vec<u8>> =
            (0..64).map(|_| base64::engine::general_purpose::STANDARD.decode(new_websocket_key()).unwrap()).collect();
        for key in &keys {
            assert_eq!(key.len(), 16);
            assert_ne!(key[..8], key[8..], "not one half repeated");
            assert!(key[..8].iter().zip(&key[8..]).any(|(a, b)| *a != !*b), "not one half and its complement");
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "a new key every time");
    }
}
