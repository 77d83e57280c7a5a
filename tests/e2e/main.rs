//! The end-to-end tests, one binary: real sockets on 127.0.0.1, real
//! compiled plugins, a real backend and real clients (hyper,
//! tokio-tungstenite, curl, raw TCP, headless Chromium). Each module is one
//! area of the README; `common` holds what they share.

mod common;

mod admin;
mod claims;
mod cli;
mod cluster;
mod dashboard;
mod deploy;
mod faults;
mod hostile_clients;
mod hostile_plugins;
mod http_routing;
mod languages;
mod layering;
mod limits;
mod plugin_projects;
mod plugin_sandbox;
mod plugin_swap;
mod pools;
mod reload;
mod shutdown;
mod tls;
mod waf_and_errors;
mod websocket;
