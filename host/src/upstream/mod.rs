//! Backends: the pools of servers with their health and the choice of one
//! ([`pool`]), the probes that move their health ([`probe`]), and the
//! connections to them ([`connect`], with [`tls`] for `https` pools, each
//! counted in the process's and its pool's [`budget`]).
//!
//! This floor knows servers and sockets, never a client's request: it takes
//! a request head already made for upstream and hands back the response.

pub mod budget;
pub mod connect;
pub mod pool;
pub mod probe;
pub mod tls;

pub use connect::SendError;
pub use pool::{Pool, Pools, Server};
