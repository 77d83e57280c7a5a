//! The body of every request the gateway forwards and of every response it
//! sends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};

use super::client::Lease;

/// A backend's streamed body, or a whole one the gateway or a plugin made.
pub type ResponseBody = Either<Upstream, Full<Bytes>>;

/// The body of a forwarded request: the client's, or none (for requests
/// without one, so they can be sent again to another server).
pub type ForwardBody = Either<Incoming, Empty<Bytes>>;

/// A whole body the gateway or a plugin made.
pub fn whole(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(bytes.into()))
}

/// A backend's response body, streamed. When it came over a reused
/// connection, the connection is given back for the next request once the
/// body has been read to its end (and closed if the body is dropped before).
#[derive(Debug)]
pub struct Upstream {
    body: Incoming,
    lease: Option<Lease>,
}

impl Upstream {
    /// A body whose connection is not reused (or is hyper's to reuse).
    pub fn new(body: Incoming) -> ResponseBody {
        Either::Left(Upstream { body, lease: None })
    }

    /// A body whose connection goes back to its idle connections at the end.
    pub fn leased(body: Incoming, lease: Lease) -> ResponseBody {
        Either::Left(Upstream { body, lease: Some(lease) })
    }

    fn release_at_end(&mut self) {
        if self.body.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.release();
        }
    }
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            // The end: hyper's reader saw the whole body.
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            // An error ends the exchange: the lease closes its connection.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            // Servers stop polling once `is_end_stream` says the length is
            // reached, so the last frame may be the last poll.
            Poll::Ready(Some(Ok(_))) => self.release_at_end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Upstream {
    /// A body never polled because it was empty from the start (HEAD, 204,
    /// `content-length: 0`) is at its end too.
    fn drop(&mut self) {
        self.release_at_end();
    }
}
