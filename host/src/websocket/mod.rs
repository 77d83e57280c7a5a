//! After the routing decision, for WebSocket handshakes: the handshake on
//! both sides ([`handshake`]), the session that holds a capacity slot and
//! runs the relay ([`session`]), and the relay itself ([`relay`]), which
//! reads frame headers only.

pub mod handshake;
pub mod relay;
pub mod session;
mod splice;

pub use handshake::ClientHandshake;
