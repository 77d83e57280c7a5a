//! HTTP basics every stage shares, importing nothing of the gateway: the
//! body type of every response, reused HTTP/1.1 connections to a server,
//! the responses the gateway makes itself, header helpers (hop-by-hop
//! removal, token lists), path normalization, request IDs and trace
//! context, and what is known of a client connection.

pub mod body;
pub mod client;
pub mod conn;
pub mod error;
pub mod headers;
pub mod target;
pub mod trace;

pub use body::ResponseBody;
pub use conn::{ConnInfo, TlsDetails, TunnelGuard, Tunnels};
pub use error::{ERROR_HEADER, GatewayError, WAF_DENY};
