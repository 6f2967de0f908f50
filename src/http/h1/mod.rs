//! hark's own HTTP/1.1, for the connections that stay open in numbers.
//!
//! hyper keeps two 8 KiB buffers per HTTP/1 connection for the
//! connection's whole life (one to read requests into, one for response
//! heads). The connections that stay open in numbers — event streams, and
//! long polls that wait and then come back on the same connection — carry
//! bodiless `GET`s, which need little of HTTP/1.1; a browser's connections
//! also carry its `POST`s and CORS preflights, and any of them may carry
//! its next poll or stream. So a connection whose first bytes are `GET /`,
//! `HEAD /`, `POST /` or `OPTIONS /` is served here (DESIGN §7):
//!
//! - [`codec`]: request heads to requests and the framing decision,
//!   responses to head bytes, chunk framing — pure functions;
//! - [`conn`]: the connection loop on top of it.
//!
//! The first request the codec does not serve hands the connection to
//! hyper with the bytes already read ([`Served::Hyper`]), and hyper keeps
//! it to the end. This module knows no route: a [`Service`] (the router)
//! answers requests and says which of them stream or may park.

pub(crate) mod codec;
mod conn;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

pub(crate) use conn::{serve, serve_stream, Served};

use crate::shutdown::Shutdown;

/// Every response body: small JSON in one frame, or an event stream.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// What the transport must know of a request's route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Answered, then the connection waits for the next request.
    Answer,
    /// An answer that may be written by the listener while the handler
    /// waits (a long poll: [`crate::delivery::park`]), on a connection
    /// kept alive with nothing read behind it.
    MayPark,
    /// An endless answer (an event stream): it ends the connection, and is
    /// served by [`serve_stream`] once the request loop has let go.
    Stream,
}

/// Why the transport refused a request before any handler saw it.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The head is over [`codec::MAX_HEAD`] or has too many fields (431).
    HeadTooLarge,
    /// The head does not parse (400); what is wrong.
    Malformed(String),
    /// The body did not arrive within the head's time (400).
    BodyTimeout,
}

/// An answer to await.
pub(crate) type Pending<'a, E> =
    Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send + 'a>>;

/// The application behind the transport.
pub(crate) trait Service: Send + Sync + 'static {
    /// What the request log (and CORS) keep of a request, taken before
    /// the handler consumes it.
    type Seen: Send;
    type Error: Send;

    /// The transport's limits, one set for the process.
    fn limits(&self) -> &Limits;
    fn kind(&self, req: &Request<()>) -> Kind;
    fn begin<B>(&self, req: &Request<B>) -> Self::Seen;
    /// A request's answer. Boxed on its own, so that a waiting poll's task
    /// holds only its handler's state.
    fn call(&self, req: Request<Full<Bytes>>) -> Pending<'_, Self::Error>;
    /// A [`Kind::Stream`] request's answer.
    fn call_stream(&self, req: Request<()>) -> Pending<'_, Self::Error>;
    /// The response for a result: errors become responses, CORS is added,
    /// the request is logged.
    fn finish(
        &self,
        seen: Self::Seen,
        result: Result<Response<Body>, Self::Error>,
    ) -> Response<Body>;
    /// The request was answered by the listener at `at`: log it.
    fn done(&self, seen: Self::Seen, status: StatusCode, at: Instant);
    /// The response to a request the transport refused.
    fn refuse(&self, why: Refusal) -> Response<Body>;
}

/// The transport's limits.
pub(crate) struct Limits {
    /// Time a client has to send each request head after the first (and
    /// an idle keep-alive connection's life between requests).
    pub(crate) header: Duration,
    /// Time a write may make no progress before the connection is closed.
    pub(crate) stall: Duration,
    /// Largest request body served here; a larger one goes to hyper's path,
    /// where a handler that reads a body answers 413.
    pub(crate) max_body: u64,
    /// Whether streams and polls may park (`HARK_DIRECT_WRITES`).
    pub(crate) parking: bool,
    pub(crate) shutdown: Shutdown,
}

/// Closes the connection a request arrived on (an event stream whose
/// reader fell too far behind). Handlers find it in the request extensions.
#[derive(Clone)]
pub(crate) struct ConnectionKill(pub Arc<Notify>);
