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
//!     fn route(req: &Request) -> RouteDecision {
//!         if req.path().starts_with("/api/") {
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
//! - The [`Request`] is the gateway's: each accessor (`path()`, `header()`,
//!   ...) fetches one field when called, so read only what you need.
//! - `init` (optional, on both traits) runs once per instance before any
//!   request: parse your `NAME.toml` there and return `Err` to have the
//!   gateway refuse the plugin with your message (`wasmgate check`, reloads
//!   and swaps all report it).
//! - A panic's message and anything logged with the [`log`] crate's macros
//!   reach the gateway's log under the plugin's name.
//! - [`testing`] runs a plugin's logic natively, in `cargo test`, against a
//!   mock host and requests built in the test.
//!
//! The types are generated from the gateway's WIT contract (`wit/plugin.wit`),
//! the same files the gateway generates its side from.

/// The guest side of the contract. Each plugin export is generated from its
/// own small world (`wit-component` unions the worlds a component's code
/// carries), so the `lifecycle` export that routers and WAFs share is
/// generated once.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "package wasmgate:sdk;
                 world router-decision {
                     import wasmgate:plugin/host@0.3.0;
                     export wasmgate:plugin/router@0.3.0;
                 }",
        world: "wasmgate:sdk/router-decision",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        default_bindings_module: "::wasmgate_sdk::bindings",
        generate_all,
    });

    pub mod waf_world {
        wit_bindgen::generate!({
            path: "../wit",
            inline: "package wasmgate:sdk;
                     world waf-decision {
                         import wasmgate:plugin/host@0.3.0;
                         export wasmgate:plugin/waf@0.3.0;
                     }",
            world: "wasmgate:sdk/waf-decision",
            pub_export_macro: true,
            export_macro_name: "__export_waf_world",
            default_bindings_module: "::wasmgate_sdk::bindings::waf_world",
            with: {
                "wasmgate:plugin/types@0.3.0": crate::bindings::wasmgate::plugin::types,
                "wasmgate:plugin/host@0.3.0": crate::bindings::wasmgate::plugin::host,
            },
        });
    }

    pub mod lifecycle_world {
        wit_bindgen::generate!({
            path: "../wit",
            inline: "package wasmgate:sdk;
                     world init-export {
                         export wasmgate:plugin/lifecycle@0.3.0;
                     }",
            world: "wasmgate:sdk/init-export",
            pub_export_macro: true,
            export_macro_name: "__export_lifecycle_world",
            default_bindings_module: "::wasmgate_sdk::bindings::lifecycle_world",
        });
    }
}

mod helpers;
mod host_calls;
mod request;
#[doc(hidden)]
pub mod runtime;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use bindings::wasmgate::plugin::types::{
    Header, Level, Response, RouteDecision, TlsInfo, Upstream, Verdict, WebsocketHandshake,
};
pub use helpers::*;
pub use host_calls::*;
pub use log;
pub use request::Request;

/// A router plugin: picks the pool for each request, or answers it.
pub trait Router {
    /// Runs once per instance, before any request: check the plugin's
    /// configuration ([`config`]) here. An `Err` refuses the plugin.
    fn init() -> Result<(), String> {
        Ok(())
    }

    fn route(req: &Request) -> RouteDecision;
}

/// A WAF plugin: allows or denies each request before the router runs.
pub trait Waf {
    /// Runs once per instance, before any request: check the plugin's
    /// configuration ([`config`]) here. An `Err` refuses the plugin.
    fn init() -> Result<(), String> {
        Ok(())
    }

    fn inspect(req: &Request) -> Verdict;
}

/// Exports a type implementing [`Router`] as this component's router.
#[macro_export]
macro_rules! export_router {
    ($ty:ident) => {
        // Only components get the exports; a native build (unit tests,
        // clippy) keeps the plugin's logic without wasm-only symbols.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WasmgateExports;
            impl $crate::bindings::exports::wasmgate::plugin::router::Guest for WasmgateExports {
                fn route(req: &$crate::bindings::wasmgate::plugin::types::Request) -> $crate::RouteDecision {
                    <$ty as $crate::Router>::route(&$crate::runtime::request(req))
                }
            }
            impl $crate::bindings::lifecycle_world::exports::wasmgate::plugin::lifecycle::Guest for WasmgateExports {
                fn init() -> Result<(), String> {
                    $crate::runtime::install();
                    <$ty as $crate::Router>::init()
                }
            }
    $crate::bindings::__export_router_world!(WasmgateExports with_types_in $crate::bindings);
            $crate::bindings::lifecycle_world::__export_lifecycle_world!(
                WasmgateExports with_types_in $crate::bindings::lifecycle_world
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(&$crate::Request) -> $crate::RouteDecision = <$ty as $crate::Router>::route;
    };
}

/// Exports a type implementing [`Waf`] as this component's WAF.
#[macro_export]
macro_rules! export_waf {
    ($ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WasmgateExports;
            impl $crate::bindings::waf_world::exports::wasmgate::plugin::waf::Guest for WasmgateExports {
                fn inspect(req: &$crate::bindings::wasmgate::plugin::types::Request) -> $crate::Verdict {
                    <$ty as $crate::Waf>::inspect(&$crate::runtime::request(req))
                }
            }
            impl $crate::bindings::lifecycle_world::exports::wasmgate::plugin::lifecycle::Guest for WasmgateExports {
                fn init() -> Result<(), String> {
                    $crate::runtime::install();
                    <$ty as $crate::Waf>::init()
                }
            }
    $crate::bindings::waf_world::__export_waf_world!(WasmgateExports with_types_in $crate::bindings::waf_world);
            $crate::bindings::lifecycle_world::__export_lifecycle_world!(
                WasmgateExports with_types_in $crate::bindings::lifecycle_world
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(&$crate::Request) -> $crate::Verdict = <$ty as $crate::Waf>::inspect;
    };
}
