//! Phase 1: the request made unambiguous before anything reads it, so the
//! plugins and the backend see the same request (the access log keeps the
//! path the client sent):
//!
//! - `CONNECT` is only an RFC 8441 WebSocket (with `:protocol`); any other
//!   is answered 405, never tunnelled.
//! - The authority is taken in RFC order: an absolute-form target's (HTTP/1.1)
//!   or `:authority` (HTTP/2) wins, and becomes `Host`; an HTTP/1.1 request
//!   must carry exactly one valid `Host` (RFC 9112 §3.2), and an HTTP/2
//!   request whose `host` names another authority is malformed (RFC 9113
//!   §8.3.1). Userinfo in the authority is refused.
//! - The path is normalized (`http::target::normalize_path`), or refused.
//! - An HTTP/1.1 upgrade request has no body: with one, the backend would
//!   wait for bytes the relay never frames as a body (400).

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Request, Version};
use hyper::body::Body;

use crate::http::GatewayError;
use crate::http::target::normalize_path;

/// With `require_sni_match`, a request on a TLS connection whose settled
/// `Host` names another host than the SNI is refused (421).
pub fn check_sni<B>(req: &Request<B>, sni: Option<&str>) -> Result<(), GatewayError> {
    let Some(sni) = sni else { return Ok(()) };
    let host = req.headers().get(header::HOST).and_then(|h| authority(h.as_bytes()));
    match host {
        Some(host) if host.host().eq_ignore_ascii_case(sni) => Ok(()),
        _ => Err(GatewayError::MisdirectedRequest),
    }
}

/// Settles `req`'s method, authority and path, or says why it is refused.
pub fn settle<B: Body>(req: &mut Request<B>) -> Result<(), GatewayError> {
    if req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none() {
        return Err(GatewayError::MethodNotAllowed(Method::CONNECT));
    }
    settle_authority(req)?;
    settle_path(req)?;
    if req.version() < Version::HTTP_2 && req.headers().contains_key(header::UPGRADE) && !req.body().is_end_stream() {
        return Err(GatewayError::BadRequest("an upgrade request has a body"));
    }
    Ok(())
}

fn settle_authority<B>(req: &mut Request<B>) -> Result<(), GatewayError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(GatewayError::BadRequest("more than one Host header")),
        (host, None) => host.cloned(),
    };
    let host_authority = match &host {
        Some(value) => Some(authority(value.as_bytes()).ok_or(GatewayError::BadRequest("the Host header is invalid"))?),
        None => None,
    };
    let target_authority = req.uri().authority().cloned();
    if let Some(target) = &target_authority
        && target.as_str().contains('@')
    {
        return Err(GatewayError::BadRequest("userinfo in the request target"));
    }
    match (target_authority, host_authority) {
        (Some(target), Some(host)) if req.version() == Version::HTTP_2 && !same(&target, &host) => {
            Err(GatewayError::BadRequest("the host header names another authority than :authority"))
        }
        // The target's authority wins (absolute-form, or `:authority`).
        (Some(target), _) => {
            let value =
                HeaderValue::from_str(target.as_str()).map_err(|_| GatewayError::BadRequest("bad authority"))?;
            req.headers_mut().insert(header::HOST, value);
            Ok(())
        }
        (None, Some(_)) => Ok(()),
        (None, None) if req.version() == Version::HTTP_11 => {
            Err(GatewayError::BadRequest("the Host header is missing"))
        }
        (None, None) => Ok(()),
    }
}

/// A `Host` value as an authority, without userinfo.
fn authority(value: &[u8]) -> Option<Authority> {
    let authority = Authority::try_from(value).ok()?;
    (!authority.as_str().contains('@') && !authority.host().is_empty()).then_some(authority)
}

/// Whether two authorities name the same host and port (hosts compare
/// case-insensitively).
fn same(a: &Authority, b: &Authority) -> bool {
    a.host().eq_ignore_ascii_case(b.host()) && a.port_u16() == b.port_u16()
}

fn settle_path<B>(req: &mut Request<B>) -> Result<(), GatewayError> {
    let uri = req.uri();
    if req.method() == Method::OPTIONS && uri.path() == "*" {
        return Ok(());
    }
    let normal = match normalize_path(uri.path()).map_err(GatewayError::BadRequest)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normal) => normal,
    };
    let target = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(target).map_err(|_| GatewayError::BadRequest("the normalized target is invalid"))?);
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("the normalized target is invalid"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http_body_util::{Empty, Full};

    use super::*;

    fn request(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Request<Empty<bytes::Bytes>> {
        let mut builder = Request::builder().method(method).uri(target).version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Empty::new()).unwrap()
    }

    fn refused(mut req: Request<Empty<bytes::Bytes>>) -> GatewayError {
        settle(&mut req).expect_err("refused")
    }

    #[test]
    fn an_absolute_form_target_overrides_host() {
        let mut req = request("GET", "http://app.example/x", Version::HTTP_11, &[("host", "other.example")]);
        settle(&mut req).unwrap();
        assert_eq!(req.headers()["host"], "app.example");
    }

    #[test]
    fn http2_host_must_match_authority() {
        let mut req = request("GET", "https://app.example/x", Version::HTTP_2, &[("host", "APP.example")]);
        settle(&mut req).unwrap();
        let req = request("GET", "https://app.example/x", Version::HTTP_2, &[("host", "admin.internal")]);
        assert_eq!(refused(req).status(), 400);
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        assert_eq!(refused(request("GET", "/", Version::HTTP_11, &[])).status(), 400);
        let two = request("GET", "/", Version::HTTP_11, &[("host", "a.example"), ("host", "b.example")]);
        assert_eq!(refused(two).status(), 400);
        for bad in ["a.example/x", "user@a.example", "a example", ""] {
            assert_eq!(refused(request("GET", "/", Version::HTTP_11, &[("host", bad)])).status(), 400, "{bad}");
        }
        settle(&mut request("GET", "/", Version::HTTP_10, &[])).unwrap();
        assert_eq!(refused(request("GET", "http://u:p@a.example/", Version::HTTP_11, &[])).status(), 400);
    }

    #[test]
    fn a_host_other_than_the_sni_is_421() {
        let mut req = request("GET", "/", Version::HTTP_11, &[("host", "App.Example:443")]);
        settle(&mut req).unwrap();
        assert!(check_sni(&req, Some("app.example")).is_ok());
        assert!(check_sni(&req, None).is_ok(), "no SNI sent: nothing to match");
        assert_eq!(check_sni(&req, Some("admin.example")).unwrap_err().status(), 421);
    }

    #[test]
    fn plain_connect_is_405_with_allow() {
        let error = refused(request("CONNECT", "a.example:443", Version::HTTP_11, &[("host", "a.example:443")]));
        assert_eq!(error.status(), 405);
        assert!(error.response().headers().contains_key(header::ALLOW));
    }

    #[test]
    fn the_path_is_normalized_and_the_query_kept() {
        let mut req = request("GET", "/x/../%61dmin//panel?a=%2e%2e", Version::HTTP_11, &[("host", "a.example")]);
        settle(&mut req).unwrap();
        assert_eq!(req.uri().to_string(), "/admin/panel?a=%2e%2e");
        assert_eq!(refused(request("GET", "/a%2fb", Version::HTTP_11, &[("host", "a")])).status(), 400);
        let mut star = request("OPTIONS", "*", Version::HTTP_11, &[("host", "a")]);
        settle(&mut star).unwrap();
    }

    #[test]
    fn an_upgrade_with_a_body_is_refused() {
        let mut req = Request::builder()
            .uri("/chat")
            .header("host", "a.example")
            .header("upgrade", "websocket")
            .body(Full::new(bytes::Bytes::from_static(b"smuggled")))
            .unwrap();
        assert_eq!(settle(&mut req).unwrap_err().status(), 400);
    }
}
