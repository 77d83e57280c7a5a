//! How a request ended, as a type: every phase that answers the client hands
//! the logging phase an [`Answer`] — the response, its [`Outcome`], and
//! where it was routed — so the metrics and the access log never decode a
//! cause back out of the response's headers.

use std::sync::Arc;

use http::Response;

use crate::http::{GatewayError, ResponseBody, WAF_DENY};
use crate::telemetry::metrics::HandshakeResult;
use crate::upstream::{Pool, Server};

/// Why the client got the response it got.
#[derive(Debug)]
pub enum Outcome {
    /// A server answered (including a server declining an upgrade).
    Served,
    /// A WebSocket handshake was upgraded; its relay runs on its own.
    Upgraded,
    /// A WAF plugin denied the request with its answer.
    WafDenied,
    /// The router plugin answered the request itself.
    PluginAnswered,
    /// The gateway answered itself.
    Gateway(GatewayError),
}

impl Outcome {
    /// The `x-wasmgate-error` code of an answer the gateway made, for the
    /// access log.
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            Outcome::WafDenied => Some(WAF_DENY),
            Outcome::Gateway(error) => Some(error.code()),
            Outcome::Served | Outcome::Upgraded | Outcome::PluginAnswered => None,
        }
    }

    /// How a WebSocket handshake with this outcome ended.
    pub fn handshake_result(&self) -> HandshakeResult {
        match self {
            Outcome::Upgraded => HandshakeResult::Upgraded,
            Outcome::WafDenied => HandshakeResult::WafDenied,
            Outcome::Gateway(GatewayError::AtCapacity { .. }) => HandshakeResult::AtCapacity,
            Outcome::Gateway(_) => HandshakeResult::Error,
            Outcome::Served | Outcome::PluginAnswered => HandshakeResult::Refused,
        }
    }
}

/// The client's response with what the logging phase needs to know of it.
pub struct Answer {
    pub response: Response<ResponseBody>,
    pub outcome: Outcome,
    /// The pool the request was routed to, if it got that far.
    pub pool: Option<Arc<Pool>>,
    /// The server that answered, if one did.
    pub server: Option<Arc<Server>>,
}

impl Answer {
    /// An answer made before or without routing.
    pub fn new(response: Response<ResponseBody>, outcome: Outcome) -> Answer {
        Answer { response, outcome, pool: None, server: None }
    }

    /// A server's answer.
    pub fn served(response: Response<ResponseBody>, outcome: Outcome, pool: &Arc<Pool>, server: Arc<Server>) -> Answer {
        Answer { response, outcome, pool: Some(pool.clone()), server: Some(server) }
    }

    /// Notes the pool the request was routed to.
    pub fn routed_to(mut self, pool: &Arc<Pool>) -> Answer {
        self.pool = Some(pool.clone());
        self
    }
}

impl From<GatewayError> for Answer {
    fn from(error: GatewayError) -> Answer {
        Answer::new(error.response(), Outcome::Gateway(error))
    }
}
