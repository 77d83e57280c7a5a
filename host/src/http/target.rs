//! The request target as the plugins and the backend see it (the access log
//! keeps the client's): one spelling of each path, so a rule on `/admin`
//! cannot be talked past with `/x/../admin`, `//admin` or `/%61dmin`.
//!
//! [`normalize_path`] applies RFC 3986 §6.2.2: percent-encodings of
//! unreserved characters are decoded, the others upper-cased; repeated
//! slashes are merged; `.` and `..` segments are removed (§5.2.4, never
//! above the root). Encodings that backends disagree on are refused rather
//! than guessed: an encoded `/`, `\` or `.`, an encoded NUL, a literal `\`,
//! and a malformed `%`.

use std::borrow::Cow;

/// Why a path is refused (the 400's reason).
pub type PathError = &'static str;

/// The normalized form of an origin-form `path` (no query), or why it is
/// refused. Borrows when the path is already normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err("the path does not start with /");
    }
    let decoded = decode_unreserved(path)?;
    if matches!(decoded, Cow::Borrowed(_)) && is_normal(path) {
        // Most paths: nothing to change, nothing allocated.
        return Ok(Cow::Borrowed(path));
    }
    let normal = remove_dot_segments(&decoded);
    Ok(if normal == path { Cow::Borrowed(path) } else { Cow::Owned(normal) })
}

/// Whether `path` (starting with `/`, decoded) has no dot segment and no
/// empty segment but a last one: what [`remove_dot_segments`] leaves as is.
fn is_normal(path: &str) -> bool {
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// RFC 3986 §5.2.4 on a decoded path, empty segments dropped.
fn remove_dot_segments(decoded: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    // Whether the normal form ends with a slash: a path ending in `/`, `/.`
    // or `/..` names a directory (§5.2.4).
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => {
                segments.push(name);
                trailing = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing || segments.is_empty() {
        normal.push('/');
    }
    normal
}

/// `path` with encodings of unreserved characters decoded and the other
/// encodings upper-cased; refuses what [`normalize_path`] refuses.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path.contains('\\') {
        return Err("a `\\` in the path");
    }
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Safe to copy up to the next `%`: it is ASCII, a char boundary.
            let next = path[i..].find('%').map_or(bytes.len(), |at| i + at);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        let (Some(high), Some(low)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err("a malformed percent-encoding in the path");
        };
        let byte = (high * 16 + low) as u8;
        match byte {
            b'/' | b'\\' => return Err("an encoded `/` or `\\` in the path"),
            b'.' => return Err("an encoded `.` in the path"),
            0 => return Err("an encoded NUL in the path"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'~' => out.push(byte as char),
            _ => {
                out.push('%');
                out.push_str(&format!("{byte:02X}"));
            }
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

/// Whether `name` is one of `hosts` (lowercase certificate names): exactly,
/// or under a leading `*.` wildcard that stands for one whole label.
pub fn names_host(hosts: &[String], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    hosts.contains(&name) || hosts.iter().any(|h| wildcard_matches(h, &name))
}

/// Whether `pattern` (`*.example.test`) covers `name` (lowercase): exactly
/// one label in place of the `*`.
pub fn wildcard_matches(pattern: &str, name: &str) -> bool {
    pattern.strip_prefix("*.").is_some_and(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|label| label.len() > 1 && label.ends_with('.') && !label[..label.len() - 1].contains('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_name_stands_for_exactly_one_label() {
        let hosts = ["gw.test".to_owned(), "*.apps.test".to_owned()];
        for name in ["gw.test", "GW.Test", "a.apps.test", "A-1.APPS.test"] {
            assert!(names_host(&hosts, name), "{name}");
        }
        for name in ["apps.test", ".apps.test", "a.b.apps.test", "evil.example", "gw.test.evil", "xapps.test", ""] {
            assert!(!names_host(&hosts, name), "{name}");
        }
    }

    fn normal(path: &str) -> String {
        normalize_path(path).unwrap_or_else(|e| panic!("{path}: {e}")).into_owned()
    }

    #[test]
    fn the_bypasses_of_a_prefix_rule_all_become_the_prefix() {
        for path in
            ["/admin", "/x/../admin", "//admin", "/%61dmin", "/./admin", "/../admin", "/a/b/../../admin", "///admin"]
        {
            assert_eq!(normal(path), "/admin", "{path}");
        }
        assert_eq!(normal("/api/../internal"), "/internal");
    }

    #[test]
    fn directories_keep_their_trailing_slash() {
        assert_eq!(normal("/"), "/");
        assert_eq!(normal("/a/"), "/a/");
        assert_eq!(normal("/a/b/.."), "/a/");
        assert_eq!(normal("/a/."), "/a/");
        assert_eq!(normal("/.."), "/");
        assert_eq!(normal("//"), "/");
        assert_eq!(normal("/a//b/"), "/a/b/");
    }

    #[test]
    fn other_encodings_are_kept_upper_cased() {
        assert_eq!(normal("/a%20b"), "/a%20b");
        assert_eq!(normal("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(normal("/q%3fx"), "/q%3Fx");
        assert_eq!(normal("/%7euser"), "/~user");
    }

    #[test]
    fn ambiguous_encodings_are_refused() {
        for path in
            ["/a%2fb", "/a%2Fb", "/a%5cb", "/%2e%2e/admin", "/a%2E", "/a%00", "/a%zz", "/a%4", "/a%", "/a\\b", "a", ""]
        {
            assert!(normalize_path(path).is_err(), "{path}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        assert!(matches!(normalize_path("/api/users/42"), Ok(Cow::Borrowed(_))));
    }

    proptest::proptest! {
        /// Paths built from the pieces attacks are made of: whatever comes
        /// out is normal (no dot segment, no empty segment, no encoded
        /// unreserved character) and normalizing it again changes nothing.
        #[test]
        fn normalizing_is_idempotent_and_leaves_no_dot_segment(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", "//", ".", "..", "a", "admin", "%61", "%2e", "%2F", "%7e", "%c3%a9", "%", "%4", "b~-_",
                    "%20", ";", "\\", "%00", "x.y",
                ]),
                0..12,
            )
        ) {
            let path = format!("/{}", pieces.concat());
            // The shortcut for paths already normal agrees with the long way.
            proptest::prop_assert_eq!(is_normal(&path), remove_dot_segments(&path) == path, "{}", path);
            if let Ok(normal) = normalize_path(&path) {
                proptest::prop_assert!(normal.starts_with('/'));
                for segment in normal.split('/').skip(1) {
                    proptest::prop_assert!(segment != "." && segment != "..", "{normal}");
                }
                proptest::prop_assert!(!normal.contains("//"), "{normal}");
                proptest::prop_assert!(!normal.to_ascii_lowercase().contains("%61"), "{normal}");
                let again = normalize_path(&normal).map(|n| n.into_owned());
                proptest::prop_assert_eq!(again.as_deref(), Ok(normal.as_ref()));
            }
        }
    }
}
