//! The host side of the plugin contract, generated from `wit/` by
//! `wasmtime::component::bindgen!`. The SDK generates the guest side from the
//! same files.
//!
//! Calls are synchronous: a plugin runs on the calling worker thread until it
//! returns or its epoch deadline traps. Host functions may trap (a request
//! handle used outside its call, say), so every import returns a
//! `wasmtime::Result`.

mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router-plugin",
        imports: { default: trappable },
        with: { "wasmgate:plugin/types.request": crate::plugin::view::RequestHandle },
    });
}

mod waf_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "waf-plugin",
        imports: { default: trappable },
        with: {
            "wasmgate:plugin/types": super::router_world::wasmgate::plugin::types,
            "wasmgate:plugin/host": super::router_world::wasmgate::plugin::host,
        },
    });
}

pub use router_world::RouterPlugin;
pub use router_world::exports::wasmgate::plugin::{lifecycle, router};
pub use router_world::wasmgate::plugin::{host, types};
pub use types::{Header, Level, Response, RouteDecision, TlsInfo, Upstream, Verdict, WebsocketHandshake};
pub use waf_world::exports::wasmgate::plugin::waf;
