//! Starting and changing the running gateway, the top floor: [`gateway`]
//! (start-up, signals, drain), [`reload`] (applying a config whole or not at
//! all), [`admin`] (the admin listener and its dashboard) and
//! [`live_state`] (the metrics read from live state at scrape time).

pub mod admin;
pub mod gateway;
pub mod live_state;
pub mod reload;

pub use gateway::Gateway;
