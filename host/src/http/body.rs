//! The body of every response the gateway sends.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A backend's streamed body, or a whole one the gateway or a plugin made.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// A whole body the gateway or a plugin made.
pub fn whole(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(bytes.into()))
}
