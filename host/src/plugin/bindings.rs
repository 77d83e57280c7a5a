//! The host side of the plugin contract, generated from `wit/` by
//! `wasmtime::component::bindgen!`. The SDK generates the guest side from the
//! same files.
//!
//! Exports are called asynchronously: a plugin runs on a fiber, so WASI calls
//! and the epoch deadline work on tokio's worker threads without blocking.

mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router-plugin",
        exports: { default: async },
    });
}

mod waf_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "waf-plugin",
        exports: { default: async },
        with: {
            "wasmgate:plugin/types": super::router_world::wasmgate::plugin::types,
            "wasmgate:plugin/host": super::router_world::wasmgate::plugin::host,
        },
    });
}

pub use router_world::wasmgate::plugin::{host, types};
pub use router_world::{RouterPlugin, RouterPluginPre};
pub use types::{Header, Level, RequestHead, Response, RouteDecision, TlsInfo, Upstream, Verdict, WebsocketHandshake};
pub use waf_world::{WafPlugin, WafPluginPre};
