//! The wasmgate plugin SDK: everything a Rust author needs to write a router or
//! WAF plugin for wasmgate.
//!
//! A plugin is a crate with `crate-type = ["cdylib"]`, built with
//! `cargo build --release --target wasm32-wasip2`. It implements [`Router`] or
//! [`Waf`] and exports itself with [`export_router!`] or [`export_waf!`]:
//!
//! ```ignore
//! use wasmgate_sdk::*;
//!
//! struct Hello;
//!
//! impl Router for Hello {
//!     fn route(req: RequestHead) -> RouteDecision {
//!         if req.path.starts_with("/api/") {
//!             RouteDecision::Forward(Upstream::pool("api"))
//!         } else {
//!             RouteDecision::Respond(Response::text(404, "nothing here"))
//!         }
//!     }
//! }
//!
//! export_router!(Hello);
//! ```
//!
//! The types are generated from the gateway's WIT contract (`wit/plugin.wit`),
//! the same files the gateway generates its side from.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "router-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        default_bindings_module: "::wasmgate_sdk::bindings",
        generate_all,
    });

    /// The WAF world shares the `types` and `host` interfaces with the router
    /// world; only its export differs.
    pub mod waf_world {
        wit_bindgen::generate!({
            path: "../wit",
            world: "waf-plugin",
            pub_export_macro: true,
            export_macro_name: "__export_waf_world",
            default_bindings_module: "::wasmgate_sdk::bindings::waf_world",
            with: {
                "wasmgate:plugin/types@0.2.0": crate::bindings::wasmgate::plugin::types,
                "wasmgate:plugin/host@0.2.0": crate::bindings::wasmgate::plugin::host,
            },
        });
    }
}

mod helpers;

pub use bindings::exports::wasmgate::plugin::router::Guest as Router;
pub use bindings::waf_world::exports::wasmgate::plugin::waf::Guest as Waf;
pub use bindings::wasmgate::plugin::host;
pub use bindings::wasmgate::plugin::types::{
    Header, Level, RequestHead, Response, RouteDecision, TlsInfo, Upstream, Verdict, WebsocketHandshake,
};
pub use helpers::*;

/// Exports a type implementing [`Router`] as this component's router.
#[macro_export]
macro_rules! export_router {
    ($ty:ident) => {
        // Only components get the exports; a native build (unit tests,
        // clippy) keeps the plugin's logic without wasm-only symbols.
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_router_world!($ty with_types_in $crate::bindings);
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn($crate::RequestHead) -> $crate::RouteDecision = <$ty as $crate::Router>::route;
    };
}

/// Exports a type implementing [`Waf`] as this component's WAF.
#[macro_export]
macro_rules! export_waf {
    ($ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::waf_world::__export_waf_world!($ty with_types_in $crate::bindings::waf_world);
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn($crate::RequestHead) -> $crate::Verdict = <$ty as $crate::Waf>::inspect;
    };
}
