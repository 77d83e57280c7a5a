//! HTTP basics every stage shares, importing nothing of the gateway: the
//! body type of every response, the responses the gateway makes itself, and
//! header helpers (hop-by-hop removal, token lists).

pub mod body;
pub mod error;
pub mod headers;

pub use body::ResponseBody;
pub use error::{ERROR_HEADER, GatewayError, WAF_DENY};
