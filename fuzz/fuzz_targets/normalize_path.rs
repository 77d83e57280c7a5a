//! Path normalization (`http::target::normalize_path`), which every plugin
//! and backend relies on to see one spelling of each path. Whatever a client
//! sends, a path that is accepted comes out normal: starting with `/`, no
//! `.` or `..` segment, no empty segment, no percent-encoded unreserved
//! character, no encoded `/`, `\`, `.` or NUL, valid as a request target
//! when the input was a valid path, and normalizing it again changes
//! nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate::http::target::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let Ok(normal) = normalize_path(path) else { return };
    let normal = normal.into_owned();
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    let segments: Vec<&str> = normal.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        assert!(*segment != "." && *segment != "..", "{path:?} -> {normal:?}");
        assert!(!segment.is_empty() || i + 1 == segments.len(), "empty segment: {path:?} -> {normal:?}");
    }
    assert!(!normal.contains('\\'), "{path:?} -> {normal:?}");
    let bytes = normal.as_bytes();
    for (i, _) in normal.match_indices('%') {
        let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("two hex digits after %");
        let byte = u8::from_str_radix(hex, 16).expect("hex");
        assert!(hex.chars().all(|c| !c.is_ascii_lowercase()), "upper-case hex: {normal:?}");
        let unreserved = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
        assert!(!unreserved, "encoded unreserved {hex}: {path:?} -> {normal:?}");
        assert!(!b"/\\\0".contains(&byte), "encoded separator {hex}: {path:?} -> {normal:?}");
    }
    assert!(normalize_path(&normal).is_ok_and(|again| again == normal), "not idempotent: {normal:?}");
    // The gateway normalizes what hyper parsed as a path: for such a path
    // (no `?`, `#` or bytes a target may not hold), the normal form is one too.
    if http::uri::PathAndQuery::try_from(path).is_ok_and(|parsed| parsed.as_str() == path && parsed.query().is_none()) {
        assert!(http::uri::PathAndQuery::try_from(normal.as_str()).is_ok(), "{path:?} -> invalid {normal:?}");
    }
});
