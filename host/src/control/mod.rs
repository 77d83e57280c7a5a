//! Starting and changing the running gateway, the top floor: [`gateway`]
//! (start-up, signals, drain), [`reload`] (applying a config whole or not at
//! all), [`admin`] (the admin listener and its dashboard),
//! [`live_state`] (the metrics read from live state at scrape time),
//! [`plugin_test`] (`wasmgate plugin test`: one plugin, described requests)
//! and [`plugin_project`] (`wasmgate plugin new` and `plugin build`).

pub mod admin;
pub mod build_info;
pub mod gateway;
pub mod live_state;
pub mod plugin_project;
pub mod plugin_test;
pub mod reload;

pub use gateway::Gateway;
