//! Plugins: WebAssembly components that make the gateway's decisions. This
//! floor is the sandbox; it never sees a socket or a response, and never
//! imports the request path (which calls into it).
//!
//! - [`bindings`]: the host side of the WIT contract, generated from `wit/`.
//! - [`runtime`]: the wasmtime engine, the linker (WASI with nothing granted,
//!   plus the `host` interface) and the epoch ticker behind call deadlines;
//!   [`wasi`] makes WASI's waiting calls fail instead of blocking a worker.
//! - [`host_api`]: what a plugin can ask of the gateway (`log`, `config`,
//!   `healthy-servers`, `count`), with [`counter`] behind `count`.
//! - [`output`]: a plugin's stdout and stderr, into the log, rate-limited.
//! - [`view`]: the request as plugins see it (the `request` resource).
//! - [`loaded`]: one compiled plugin, its instances (one per worker thread),
//!   its `init`, and the guarded call (deadline, memory cap, trap containment).
//! - [`breaker`]: the crash-loop breaker that quarantines a failing plugin.
//! - [`registry`]: the plugins by name, swappable as a whole, and the loader
//!   that turns the plugin directory into them.
//! - [`cache`]: compiled components kept by content hash across restarts.
//! - [`inspect`]: `wasmgate plugin inspect`.
//! - [`watcher`]: reconciles the registry with the directory as it changes.

pub mod bindings;
pub mod breaker;
pub mod cache;
pub mod host_api;
pub mod inspect;
pub mod loaded;
pub mod output;
pub mod registry;
pub mod runtime;
pub mod view;
pub mod wasi;
pub mod watcher;

pub use loaded::{CONTRACT_VERSION, LoadedPlugin, PluginError, PluginIdentity, PluginStats};
pub use registry::{Loader, PluginSlot, Registry};
pub use runtime::Runtime;
pub use view::RequestView;
