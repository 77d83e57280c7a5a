//! One request followed across the fleet: its request ID (`X-Request-Id`)
//! and its W3C trace context (`traceparent`, Trace Context Level 1).
//!
//! - The request ID a trusted proxy sent is kept (1-128 visible ASCII
//!   characters); any other is replaced by a new one (32 hex digits). The
//!   backend gets it, the client gets it back, the access log has it.
//! - A valid `traceparent` is continued: the trace ID and flags are kept and
//!   the gateway's own span becomes the parent the backend sees. A missing
//!   or invalid one starts a new trace (sampled flag off). `tracestate` is
//!   passed on as it came, as the specification asks of a hop that does not
//!   add to it.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Header names made once (a `&str` name is parsed on every use).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Longest request ID kept from a trusted proxy.
const MAX_REQUEST_ID: usize = 128;

/// A request's identity: what the backend, the client and the log see.
#[derive(Debug, Clone)]
pub struct Trace {
    pub request_id: HeaderValue,
    pub trace_id: [u8; 16],
    /// The gateway's span: the `parent-id` the backend sees.
    pub span_id: [u8; 8],
    /// The span the gateway's span continues, if the request came with one.
    pub parent_id: Option<[u8; 8]>,
    pub flags: u8,
    /// The `traceparent` the backend gets, made once.
    traceparent: HeaderValue,
}

impl Trace {
    /// The trace of a request with `headers`, from a peer the listener
    /// trusts (`trusted`) or not.
    pub fn of(headers: &HeaderMap, trusted: bool) -> Trace {
        let kept = if trusted { headers.get(&REQUEST_ID).filter(|v| valid_request_id(v.as_bytes())) } else { None };
        let parent = headers.get(&TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes()));
        let (trace_id, parent_id, flags) = match parent {
            Some((trace_id, parent_id, flags)) => (trace_id, Some(parent_id), flags),
            None => (nonzero_random(), None, 0),
        };
        let span_id = nonzero_random();
        let traceparent = traceparent_bytes(&trace_id, &span_id, flags);
        // One allocation holds both values the gateway makes (the request
        // and its response each get a shared reference, not a copy).
        let (request_id, traceparent) = match kept {
            Some(id) => (id.clone(), header_value(bytes::Bytes::from_owner(traceparent))),
            None => {
                let mut made = [0u8; 32 + 55];
                hex_into(&nonzero_random::<16>(), &mut made[..32]);
                made[32..].copy_from_slice(&traceparent);
                let made = bytes::Bytes::from_owner(made);
                (header_value(made.slice(..32)), header_value(made.slice(32..)))
            }
        };
        Trace { request_id, trace_id, span_id, parent_id, flags, traceparent }
    }

    /// A new span ID, for a span under this trace.
    pub fn new_span_id() -> [u8; 8] {
        nonzero_random()
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Puts the request ID and the gateway's `traceparent` on a request
    /// going to the backend, replacing whatever the client sent.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(REQUEST_ID, self.request_id.clone());
        headers.insert(TRACEPARENT, self.traceparent.clone());
    }
}

/// `00-TRACE-SPAN-FLAGS`.
fn traceparent_bytes(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(trace_id, &mut out[3..35]);
    hex_into(span_id, &mut out[36..52]);
    hex_into(&[flags], &mut out[53..55]);
    out
}

/// Hex digits and dashes as a header value, sharing `bytes`.
fn header_value(bytes: bytes::Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).expect("hex digits and dashes are a header value")
}

/// 1-128 visible ASCII characters (no spaces or controls): safe to log and
/// to send on as they are.
fn valid_request_id(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&value.len()) && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// `traceparent` per W3C Trace Context: `VV-TTTT(32)-PPPP(16)-FF`, lowercase
/// hex; version `ff` is invalid; version 00 is exactly 55 characters, a
/// later version may carry more after a `-`; an all-zero trace or parent
/// ID is invalid.
fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&value[0..2])?[0];
    if version == 0xff || (version == 0 && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let parent_id = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// Lowercase hex digits to bytes; `None` for anything else.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Lowercase hex of `bytes` into `out`, two digits a byte (on every
/// request: a table, not the formatter).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are UTF-8")
}

/// Random bytes, not all zero (an all-zero ID is invalid in a trace).
fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        fastrand::fill(&mut out);
        if out != [0; N] {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_valid_traceparent_is_continued_under_the_gateways_span() {
        let trace = Trace::of(&headers(&[(TRACEPARENT, VALID)]), false);
        let sent = trace.traceparent.to_str().unwrap();
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent}");
        assert_eq!(sent[36..52], hex(&trace.span_id), "the parent the backend sees is the span exported");
        assert!(sent.ends_with("-01"), "the sampled flag is kept: {sent}");
        assert_ne!(&sent[36..52], "00f067aa0ba902b7", "the backend's parent is the gateway's span");
        assert_eq!(trace.parent_id, Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"));
        assert_eq!(parse_traceparent(sent.as_bytes()).map(|(t, _, f)| (t, f)), Some((trace.trace_id, 1)));
        // A later version with more fields is read by its version-00 part.
        let future = format!("cc{}-what-comes-next", &VALID[2..]);
        assert!(parse_traceparent(future.as_bytes()).is_some());
    }

    #[test]
    fn an_invalid_traceparent_starts_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        let trace = Trace::of(&headers(&[(TRACEPARENT, "00-zz")]), true);
        assert_eq!(trace.parent_id, None);
        assert_eq!(trace.flags, 0);
        assert_ne!(trace.trace_id, [0; 16]);
    }

    #[test]
    fn a_request_id_is_kept_only_from_a_trusted_proxy_and_only_if_sane() {
        let sent = headers(&[(REQUEST_ID, "lb-7f3a-0001")]);
        assert_eq!(Trace::of(&sent, true).request_id, "lb-7f3a-0001");
        let replaced = Trace::of(&sent, false).request_id;
        assert_ne!(replaced, "lb-7f3a-0001", "a client names no request ID");
        assert_eq!(replaced.len(), 32);
        for bad in ["with space", &"x".repeat(129)] {
            assert_ne!(Trace::of(&headers(&[(REQUEST_ID, bad)]), true).request_id, bad);
        }
        assert_ne!(Trace::of(&HeaderMap::new(), true).request_id, Trace::of(&HeaderMap::new(), true).request_id);
    }

    #[test]
    fn stamping_replaces_what_the_client_sent() {
        let mut sent = headers(&[(REQUEST_ID, "forged"), (REQUEST_ID, "twice"), (TRACEPARENT, VALID)]);
        let trace = Trace::of(&sent, false);
        trace.stamp(&mut sent);
        assert_eq!(sent.get_all(&REQUEST_ID).iter().count(), 1);
        assert_eq!(sent[&REQUEST_ID], trace.request_id);
        assert_eq!(sent[&TRACEPARENT], trace.traceparent);
    }
}
