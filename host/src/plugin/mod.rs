//! Plugins: WebAssembly components that make the gateway's decisions.
//!
//! - [`bindings`]: the host side of the WIT contract, generated from `wit/`.
//! - [`runtime`]: the wasmtime engine, the linker (WASI with nothing granted,
//!   plus the `host` interface) and the epoch ticker behind call deadlines.
//! - [`host_api`]: what a plugin can ask of the gateway (`log`, `config`,
//!   `healthy-servers`, `count`).
//! - [`loaded`]: one compiled plugin, its pool of reusable instances, and the
//!   guarded call (deadline, memory cap, trap containment).
//! - [`registry`]: the plugins by name, swappable as a whole, and the loader
//!   that turns the plugin directory into them.
//! - [`cache`]: compiled components kept by content hash across restarts.
//! - [`inspect`]: `wasmgate plugin inspect`.
//! - [`watcher`]: reconciles the registry with the directory as it changes.
//! - [`validate`]: checks on everything a plugin returns.

pub mod bindings;
pub mod cache;
pub mod host_api;
pub mod inspect;
pub mod loaded;
pub mod registry;
pub mod runtime;
pub mod validate;
pub mod watcher;

pub use loaded::{LoadedPlugin, PluginError, PluginIdentity, PluginKind, PluginStats};
pub use registry::{Loader, Registry};
pub use runtime::Runtime;
