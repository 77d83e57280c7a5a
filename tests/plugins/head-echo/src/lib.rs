//! Test router: answers every request with what it reads through the request
//! resource, every accessor, one `field: value` per line, so tests can check
//! what plugins see.
//!
//! Its `init` refuses the configuration when `[config] refuse` is set, with
//! that text as the reason: tests use it to prove a refusing `init` keeps a
//! plugin out of `check`, reloads and swaps.
use wasmgate_sdk::*;

struct HeadEcho;

impl Router for HeadEcho {
    fn init() -> Result<(), String> {
        match config("refuse") {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    fn route(req: &Request) -> RouteDecision {
        let mut out = String::new();
        out.push_str(&format!("method: {}\n", req.method()));
        out.push_str(&format!("scheme: {}\n", req.scheme()));
        out.push_str(&format!("version: {}\n", req.version()));
        match req.tls() {
            Some(tls) => out.push_str(&format!("tls: sni={:?} alpn={:?}\n", tls.sni, tls.alpn)),
            None => out.push_str("tls: none\n"),
        }
        out.push_str(&format!("authority: {}\n", req.authority()));
        out.push_str(&format!("path: {}\n", req.path()));
        out.push_str(&format!("query: {:?}\n", req.query()));
        out.push_str(&format!("client-ip: {}\n", req.client_ip()));
        out.push_str(&format!("listener: {}\n", req.listener()));
        match req.websocket() {
            Some(ws) => out.push_str(&format!(
                "websocket: version={} subprotocols={:?} origin={:?} extensions={:?}\n",
                ws.version, ws.subprotocols, ws.origin, ws.extensions
            )),
            None => out.push_str("websocket: none\n"),
        }
        for h in req.headers() {
            out.push_str(&format!("header {}: {}\n", h.name, h.value));
        }
        // One header by name, as `?header=NAME` asks: every line of it.
        if let Some(name) = req.query_param("header") {
            out.push_str(&format!("header({name}): {:?}\n", req.header(&name)));
        }
        RouteDecision::Respond(Response::text(200, out))
    }
}

export_router!(HeadEcho);
