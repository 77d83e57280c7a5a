//! HTTPS and wss at the edge: TLS listeners with SNI, certificate reload,
//! HTTP/2 and WebSockets over HTTP/2, HTTPS backends, redirects to HTTPS.
//! Certificates come from a private CA made by each test (rcgen).

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use futures_util::SinkExt;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

fn https_config(app_pool: &str, certs: &[(&[&str], &Path, &Path)], extra_listener: &str) -> String {
    let mut out = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"https\"\ndefault_pool = \"app\"\n{extra_listener}\n"
    );
    for (hosts, cert, key) in certs {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        out += &format!(
            "[[listener.certificate]]\nhosts = [{}]\ncert = \"{}\"\nkey = \"{}\"\n",
            hosts.join(", "),
            cert.display(),
            key.display()
        );
    }
    out + app_pool
}

fn plain_pool(app: &Backend) -> String {
    format!("[[pool]]\nname = \"app\"\nservers = [\"{}\"]\n", app.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_get_and_wss_echo_verified_against_the_test_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let gateway =
        start_gateway(&https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], ""), &PluginDir::new()).await;
    let addr = web(&gateway);

    let got = https_request(addr, "gw.test", pki.client(&[b"http/1.1"]), "GET", "/hello").await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body.contains("backend=app"), "{}", got.body);
    assert_eq!(app.requests().pop().unwrap().header("x-forwarded-proto"), Some("https"));

    // wss: the WebSocket handshake and frames over the TLS connection.
    let tls = tls_connect(addr, "gw.test", pki.client(&[b"http/1.1"])).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("wss://gw.test/ws", tls).await.expect("wss handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)), "greeting");
    ws.send(Message::text("over wss")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("over wss"));

    // The system curl, verifying with the test CA, over HTTP/1.1 and HTTP/2.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = std::process::Command::new("curl")
            .args(["-sS", flag, "--cacert"])
            .arg(&pki.ca_pem)
            .args(["--resolve", &format!("gw.test:{}:127.0.0.1", addr.port())])
            .args(["-w", "\n%{http_code} %{http_version}"])
            .arg(format!("https://gw.test:{}/from-curl", addr.port()))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "curl {flag}: {}{text}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("backend=app method=GET target=/from-curl"), "{text}");
        assert!(text.trim_end().ends_with(&format!("200 {version}")), "curl {flag}: {text}");
    }
}

/// The leaf certificate a TLS client got for `sni`, or `None` if refused.
async fn served_certificate(addr: std::net::SocketAddr, pki: &Pki, sni: &str) -> Option<Vec<u8>> {
    // Trust the CA but not the name: the test compares the certificate itself.
    struct AnyName(std::sync::Arc<rustls::client::WebPkiServerVerifier>);
    impl std::fmt::Debug for AnyName {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("AnyName")
        }
    }
    impl rustls::client::danger::ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _name: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            // Chain checked against the CA for a name the certificate has.
            let name = rustls::pki_types::ServerName::try_from("gw.test").unwrap();
            match self.0.verify_server_cert(end_entity, intermediates, &name, ocsp, now) {
                Ok(ok) => Ok(ok),
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                    Ok(rustls::client::danger::ServerCertVerified::assertion())
                }
                Err(e) => Err(e),
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&pki.ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider.clone()).build().unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyName(verifier)))
        .with_no_client_auth();
    let stream = tls_connect(addr, sni, std::sync::Arc::new(config)).await.ok()?;
    Some(stream.get_ref().1.peer_certificates()?.first()?.to_vec())
}

fn der_of(pem_file: &Path) -> Vec<u8> {
    let cert: rustls::pki_types::CertificateDer = rustls::pki_types::pem::PemObject::from_pem_file(pem_file).unwrap();
    cert.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_hosts_certificate_and_unknown_names_get_the_default_or_nothing() {
    let pki = Pki::new();
    let (a_cert, a_key) = pki.issue("a", &["a.test"]);
    let (b_cert, b_key) = pki.issue("b", &["*.b.test"]);
    let app = Backend::start("app").await;
    let certs: [(&[&str], &Path, &Path); 2] = [(&["a.test"], &a_cert, &a_key), (&["*.b.test"], &b_cert, &b_key)];
    let gateway = start_gateway(&https_config(&plain_pool(&app), &certs, ""), &PluginDir::new()).await;
    let addr = web(&gateway);
    assert_eq!(served_certificate(addr, &pki, "a.test").await, Some(der_of(&a_cert)));
    assert_eq!(served_certificate(addr, &pki, "chat.b.test").await, Some(der_of(&b_cert)));
    assert_eq!(served_certificate(addr, &pki, "unknown.test").await, Some(der_of(&a_cert)), "default: the first");

    let refusing =
        start_gateway(&https_config(&plain_pool(&app), &certs, "unknown_sni = \"refuse\""), &PluginDir::new()).await;
    assert_eq!(served_certificate(web(&refusing), &pki, "unknown.test").await, None, "refused");
    assert_eq!(served_certificate(web(&refusing), &pki, "x.b.test").await, Some(der_of(&b_cert)));
}

/// An HTTP/2 connection to the gateway over TLS (ALPN h2).
async fn h2_sender(addr: std::net::SocketAddr, pki: &Pki) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = tls_connect(addr, "gw.test", pki.client(&[b"h2"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN chose h2");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_stream_through_to_an_http1_backend() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let gateway =
        start_gateway(&https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], ""), &PluginDir::new()).await;
    let mut h2 = h2_sender(web(&gateway), &pki).await;

    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 249) as u8).collect();
    let checksum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let request = Request::builder()
        .method(Method::POST)
        .uri("https://gw.test/upload")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = h2.send_request(request).await.expect("h2 response");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains(&format!("method=POST target=/upload body_len=1048576 checksum={checksum}")), "{text}");
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.header("host"), Some("gw.test"), "the :authority became Host for the HTTP/1.1 backend");
}

/// Opens a WebSocket at `uri` over HTTP/2 (RFC 8441), with `origin`, and
/// returns the response.
async fn h2_websocket(
    h2: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &str,
    origin: &str,
) -> http::Response<hyper::body::Incoming> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .header("sec-websocket-version", "13")
        .header("origin", origin)
        .body(Full::new(Bytes::new()))
        .unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    h2.send_request(request).await.expect("extended CONNECT answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_is_bridged_to_an_http1_backend() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let plugins =
        PluginDir::new().add("handshake-guard", "handshake-guard", "[config]\nallowed_origins = \"https://gw.test\"\n");
    let gateway = start_gateway(
        &https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], "waf = [\"handshake-guard\"]"),
        &plugins,
    )
    .await;
    let mut h2 = h2_sender(web(&gateway), &pki).await;

    let mut response = h2_websocket(&mut h2, "https://gw.test/ws", "https://gw.test").await;
    assert_eq!(response.status(), StatusCode::OK, "RFC 8441: 200 opens the stream");
    let upgraded = hyper::upgrade::on(&mut response).await.expect("h2 stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    assert!(matches!(next_message(&mut ws).await, Message::Text(t) if t.as_str().starts_with("hello from")));
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("over h2"));
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(vec![7u8; 100_000]));
    let seen = app.requests().into_iter().find(|r| r.header("upgrade").is_some()).expect("backend saw a handshake");
    assert_eq!(seen.method, "GET", "bridged to an HTTP/1.1 upgrade");
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
    // The key the gateway made for the backend: 16 random bytes, no pattern.
    let key =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, seen.header("sec-websocket-key").unwrap());
    let key = key.expect("base64 key");
    assert_eq!(key.len(), 16);
    assert!(key[..8] != key[8..] && key[..8].iter().zip(&key[8..]).any(|(a, b)| *a != !*b), "{key:?}");

    // Extended CONNECT without a version, or with another one.
    for (version, status, code) in [
        (None, StatusCode::BAD_REQUEST, "bad-handshake"),
        (Some("8"), StatusCode::UPGRADE_REQUIRED, "unsupported-websocket-version"),
    ] {
        let mut builder = Request::builder().method(Method::CONNECT).uri("https://gw.test/ws");
        if let Some(version) = version {
            builder = builder.header("sec-websocket-version", version);
        }
        let mut request = builder.body(Full::new(Bytes::new())).unwrap();
        request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        let refused = h2.send_request(request).await.expect("answered");
        assert_eq!(refused.status(), status, "{version:?}");
        assert_eq!(refused.headers().get("x-wasmgate-error").unwrap(), code, "{version:?}");
    }

    // CONNECT for anything but a WebSocket is a bad request.
    let mut other = Request::builder()
        .method(Method::CONNECT)
        .uri("https://gw.test/tunnel")
        .header("sec-websocket-version", "13")
        .body(Full::new(Bytes::new()))
        .unwrap();
    other.extensions_mut().insert(hyper::ext::Protocol::from_static("x-tunnel"));
    let refused = h2.send_request(other).await.expect("answered");
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.headers().get("x-wasmgate-error").unwrap(), "bad-request");

    // The WAF sees it as a handshake and its deny reaches the h2 client.
    let denied = h2_websocket(&mut h2, "https://gw.test/ws", "https://evil.test").await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert_eq!(denied.headers().get("x-wasmgate-error").unwrap(), "waf-deny");
}

fn https_pool(backend: &Backend, ca: &Path) -> String {
    format!(
        "[[pool]]\nname = \"app\"\nservers = [\"{}\"]\nprotocol = \"https\"\nca = \"{}\"\ntls_server_name = \"backend.test\"\n\
         [pool.probe]\ninterval_s = 60\n",
        backend.addr,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_pools_speak_http2_to_backends_that_offer_it() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", &["backend.test"]);
    let backend = Backend::start_tls("h2", pki.server_alpn(&cert, &key, &[b"h2", b"http/1.1"])).await;
    let listener = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n";
    let gateway = start_gateway(&format!("{listener}{}", https_pool(&backend, &pki.ca_pem)), &PluginDir::new()).await;
    let body: Vec<u8> = (0..300_000).map(|i| (i % 241) as u8).collect();
    let checksum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let got = request(web(&gateway), "POST", "/over-h2", &[], body).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert!(got.body.contains(&format!("target=/over-h2 body_len=300000 checksum={checksum}")), "{}", got.body);
    let seen = backend.requests().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_2, "ALPN chose h2 toward the backend");
    // An HTTP/1.1-only backend still gets HTTP/1.1 from the same kind of pool.
    let (cert1, key1) = pki.issue("backend1", &["backend.test"]);
    let http1 = Backend::start_tls("h1", pki.server(&cert1, &key1)).await;
    let gateway = start_gateway(&format!("{listener}{}", https_pool(&http1, &pki.ca_pem)), &PluginDir::new()).await;
    assert_eq!(get(web(&gateway), "/over-h1").await.status, StatusCode::OK);
    assert_eq!(http1.requests().pop().unwrap().version, Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_served_on_an_http_listener() {
    let app = Backend::start("app").await;
    let config =
        format!("[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n{}", plain_pool(&app));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let tcp = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2c handshake");
    tokio::spawn(connection);
    let request = Request::builder().uri("http://gw.test/h2c").body(Full::new(Bytes::new())).unwrap();
    let response = h2.send_request(request).await.expect("h2c response");
    assert_eq!((response.version(), response.status()), (Version::HTTP_2, StatusCode::OK));
    let seen = app.requests().pop().unwrap();
    assert_eq!(
        (seen.version, seen.header("host")),
        (Version::HTTP_11, Some("gw.test")),
        "HTTP/1.1 upstream, Host from :authority"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_https_http2_and_the_tls_session() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("head-echo", "head-echo", "");
    let config = https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], "")
        .replace("default_pool = \"app\"", "router = \"head-echo\"");
    let gateway = start_gateway(&config, &plugins).await;
    let mut h2 = h2_sender(web(&gateway), &pki).await;
    let request = Request::builder().uri("https://gw.test/seen").body(Full::new(Bytes::new())).unwrap();
    let response = h2.send_request(request).await.expect("h2 response");
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for line in
        ["scheme: https", "version: HTTP/2", "tls: sni=Some(\"gw.test\") alpn=Some(\"h2\")", "authority: gw.test"]
    {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    // Over HTTP/1.1 on the same listener: ALPN http/1.1.
    let tls = tls_connect(web(&gateway), "gw.test", pki.client(&[b"http/1.1"])).await.unwrap();
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder().uri("/seen").header("host", "gw.test").body(Full::new(Bytes::new())).unwrap();
    let text = String::from_utf8(
        h1.send_request(request).await.unwrap().into_body().collect().await.unwrap().to_bytes().to_vec(),
    )
    .unwrap();
    for line in ["scheme: https", "version: HTTP/1.1", "tls: sni=Some(\"gw.test\") alpn=Some(\"http/1.1\")"] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_is_verified_with_the_pools_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", &["backend.test"]);
    let backend = Backend::start_tls("secure", pki.server(&cert, &key)).await;
    let listener = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n";

    let gateway = start_gateway(&format!("{listener}{}", https_pool(&backend, &pki.ca_pem)), &PluginDir::new()).await;
    let got = get(web(&gateway), "/over-tls").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert!(got.body.contains("backend=secure method=GET target=/over-tls"), "{}", got.body);
    let (mut ws, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    ws.send(Message::text("to a TLS backend")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("to a TLS backend"));

    let other_ca = Pki::new();
    let wrong =
        start_gateway(&format!("{listener}{}", https_pool(&backend, &other_ca.ca_pem)), &PluginDir::new()).await;
    let got = get(web(&wrong), "/over-tls").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.header("x-wasmgate-error"), Some("backend-tls"));
    let refused = ws_refused(web(&wrong), "/ws", &[]).await;
    assert_eq!(refused.header("x-wasmgate-error"), Some("backend-tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_the_systems_roots_decide_and_skip_verify_accepts_anything() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", &["backend.test"]);
    let backend = Backend::start_tls("private", pki.server(&cert, &key)).await;
    let listener = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n";
    let pool = |tls: &str| {
        format!(
            "[[pool]]\nname = \"app\"\nservers = [\"{}\"]\nprotocol = \"https\"\n{tls}\n[pool.probe]\ninterval_s = 60\n",
            backend.addr
        )
    };
    // The system's roots do not know the test CA.
    let system =
        start_gateway(&format!("{listener}{}", pool("tls_server_name = \"backend.test\"")), &PluginDir::new()).await;
    let got = get(web(&system), "/x").await;
    assert_eq!((got.status, got.header("x-wasmgate-error")), (StatusCode::BAD_GATEWAY, Some("backend-tls")));
    // A lab pool that skips verification reaches it (by IP, no name needed).
    let lab = start_gateway(&format!("{listener}{}", pool("insecure_skip_verify = true")), &PluginDir::new()).await;
    let got = get(web(&lab), "/x").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert!(got.body.contains("backend=private"), "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_serves_new_connections_while_open_wss_keeps_echoing() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let first = der_of(&cert);
    let app = Backend::start("app").await;
    let config = https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], "");
    let gateway = start_gateway(
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n{config}"),
        &PluginDir::new(),
    )
    .await;
    let (addr, admin) = (web(&gateway), gateway.admin_addr().unwrap());
    let certificates = |status: serde_json::Value| status["listeners"][0]["certificates"].clone();

    let tls = tls_connect(addr, "gw.test", pki.client(&[b"http/1.1"])).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://gw.test/ws", tls).await.unwrap();
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)));

    // A broken pair (another certificate's key) is refused; the old one stays.
    let (_, other_key) = pki.issue("other", &["gw.test"]);
    std::fs::copy(&other_key, &key).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let certs = certificates(status(admin).await);
        if certs["rejected"].as_u64() >= Some(1) {
            break certs;
        }
        assert!(std::time::Instant::now() < deadline, "the broken pair was never tried: {certs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reason = refused["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains(&cert.display().to_string()), "the refusal names the file: {reason}");
    assert_eq!(served_certificate(addr, &pki, "gw.test").await, Some(first.clone()));

    // A good new pair is served to new connections.
    let (new_cert, new_key) = pki.issue("renewed", &["gw.test"]);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let renewed = der_of(&new_cert);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while served_certificate(addr, &pki, "gw.test").await != Some(renewed.clone()) {
        assert!(std::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"), "the open wss was not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https_without_losing_bodies() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test", "*.apps.test"]);
    let app = Backend::start("app").await;
    let config = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nredirect_to_https = true\n{}",
        https_config(&plain_pool(&app), &[(&["gw.test", "*.apps.test"], &cert, &key)], "")
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let plain = gateway.listener_addr("plain").unwrap();
    let https_port = web(&gateway).port();

    let got = get(plain, "/page?x=1").await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(got.header("location"), Some(format!("https://gw.test:{https_port}/page?x=1").as_str()));
    let posted = request(plain, "POST", "/form", &[], b"a=1".to_vec()).await;
    assert_eq!(posted.status, StatusCode::OK, "a request with a body is not redirected");
    assert!(posted.body.contains("body_len=3"));

    // `Host` is the client's word: a Location only names a host the HTTPS
    // listener has a certificate for (here `gw.test` and `*.apps.test`).
    let sub = request(plain, "GET", "/x", &[("host", "a.apps.test")], vec![]).await;
    assert_eq!(sub.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(sub.header("location"), Some(format!("https://a.apps.test:{https_port}/x").as_str()));
    for forged in ["evil.example", "a.b.apps.test", "apps.test", "gw.test.evil.example"] {
        let got = request(plain, "GET", "/x", &[("host", forged)], vec![]).await;
        assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST, "{forged}");
        assert_eq!(got.header("location"), None, "{forged}");
    }
    assert_eq!(app.requests().len(), 1, "only the POST reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_keeps_its_http2_connection_past_the_client_idle_timeout() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let config = format!(
        "{}[limits]\nclient_idle_timeout_s = 1\n",
        https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], "")
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let mut h2 = h2_sender(web(&gateway), &pki).await;
    let mut response = h2_websocket(&mut h2, "https://gw.test/ws", "https://gw.test").await;
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(&mut response).await.expect("h2 stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)), "greeting");
    // Quiet for twice the connection's idle timeout: the WebSocket (whose
    // own idle timeout is 5 minutes) keeps the connection.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_sni_match_refuses_a_host_other_than_the_sni() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["a.test", "b.test"]);
    let app = Backend::start("app").await;
    let gateway = start_gateway(
        &https_config(&plain_pool(&app), &[(&["a.test", "b.test"], &cert, &key)], "require_sni_match = true"),
        &PluginDir::new(),
    )
    .await;
    let addr = web(&gateway);
    // A connection made for a.test asking for b.test (domain fronting).
    for (host, status) in [("a.test", "200"), ("A.TEST:443", "200"), ("b.test", "421")] {
        let mut tls = tls_connect(addr, "a.test", pki.client(&[b"http/1.1"])).await.unwrap();
        tls.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{host}: {answer}");
    }
    assert_eq!(app.requests().len(), 2, "only the matching hosts reached the backend");
}

/// A Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data ->
/// ..TIMESTAMP`, rotated by renaming a new `..data` into place; the files
/// the config names never change themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_by_a_data_symlink_swap_is_served_to_new_connections() {
    let pki = Pki::new();
    let files = |(cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
        [("tls.crt", std::fs::read(cert).unwrap()), ("tls.key", std::fs::read(key).unwrap())]
    };
    let first = pki.issue("gw", &["gw.test"]);
    let [(c, cert_pem), (k, key_pem)] = files(&first);
    let mut secret = KubeVolume::new(&[(c, &cert_pem), (k, &key_pem)]);
    let (cert, key) = (secret.path().join("tls.crt"), secret.path().join("tls.key"));
    let app = Backend::start("app").await;
    let gateway =
        start_gateway(&https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], ""), &PluginDir::new()).await;
    let addr = web(&gateway);
    assert_eq!(served_certificate(addr, &pki, "gw.test").await, Some(der_of(&first.0)));
    let tls = tls_connect(addr, "gw.test", pki.client(&[b"http/1.1"])).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://gw.test/ws", tls).await.unwrap();
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)));

    // The kubelet's rotation: a new directory, a new link, one rename.
    let renewed = pki.issue("renewed", &["gw.test"]);
    let [(c, cert_pem), (k, key_pem)] = files(&renewed);
    secret.update(&[(c, &cert_pem), (k, &key_pem)]);
    let swapped = std::time::Instant::now();
    while served_certificate(addr, &pki, "gw.test").await != Some(der_of(&renewed.0)) {
        assert!(swapped.elapsed() < Duration::from_secs(1) + CI_MARGIN, "the rotated certificate was not served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"), "the open wss was not touched");
}

/// Sends a 1 MiB binary message and checks its echo comes back whole.
/// Then closes the WebSocket.
async fn bulk_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut ws: WebSocketStream<S>, seed: u8) {
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 ^ seed).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert!(next_message(&mut ws).await == Message::binary(big), "the 1 MiB echo came back whole");
    ws.close(None).await.unwrap();
    while futures_util::StreamExt::next(&mut ws).await.is_some() {}
}

const SPLICED: &str = "wasmgate_websocket_spliced_bytes_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_websocket_payload_is_spliced_only_over_a_socket_the_websocket_owns() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", &["gw.test"]);
    let app = Backend::start("app").await;
    let admin_and_plain = "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n";
    let listeners = https_config(&plain_pool(&app), &[(&["gw.test"], &cert, &key)], "");
    let config = format!("[websocket]\nsplice = true\n{admin_and_plain}{listeners}");
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let admin = gateway.admin_addr().unwrap();
    let plain = gateway.listener_addr("plain").unwrap();

    // Over TLS the socket carries ciphertext: nothing is spliced.
    let tls = tls_connect(web(&gateway), "gw.test", pki.client(&[b"http/1.1"])).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://gw.test/ws", tls).await.expect("wss handshake");
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)), "greeting");
    bulk_echo(ws, 1).await;
    crate::admin::websockets_closed(admin, 1.0).await;
    assert_eq!(crate::admin::counter(admin, SPLICED).await, 0.0, "nothing spliced over TLS");

    // Over HTTP/2 (h2c) the WebSocket is one stream among the connection's:
    // nothing is spliced either.
    let tcp = tokio::net::TcpStream::connect(plain).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2c handshake");
    tokio::spawn(connection);
    let mut response = h2_websocket(&mut h2, "http://gw.test/ws", "http://gw.test").await;
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(&mut response).await.expect("h2 stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    assert!(matches!(next_message(&mut ws).await, Message::Text(_)), "greeting");
    bulk_echo(ws, 2).await;
    crate::admin::websockets_closed(admin, 2.0).await;
    assert_eq!(crate::admin::counter(admin, SPLICED).await, 0.0, "nothing spliced over HTTP/2");

    // An HTTP/1.1 upgrade on a plain connection to a plain server: the
    // payload of both 1 MiB frames is spliced, all but their first read.
    let (ws, _) = ws_connect(plain, "/ws", &[]).await;
    bulk_echo(ws, 3).await;
    crate::admin::websockets_closed(admin, 3.0).await;
    let spliced = crate::admin::counter(admin, SPLICED).await;
    assert!((1.8 * 1048576.0..=2.0 * 1048576.0).contains(&spliced), "{spliced} bytes spliced");

    // Without `splice = true`, nothing is.
    let gateway = start_gateway(&format!("{admin_and_plain}{}", plain_pool(&app)), &PluginDir::new()).await;
    let admin = gateway.admin_addr().unwrap();
    let (ws, _) = ws_connect(gateway.listener_addr("plain").unwrap(), "/ws", &[]).await;
    bulk_echo(ws, 4).await;
    crate::admin::websockets_closed(admin, 1.0).await;
    assert_eq!(crate::admin::counter(admin, SPLICED).await, 0.0, "splicing is off by default");
}
