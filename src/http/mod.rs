//! The HTTP edge: hark's own HTTP/1.1 ([`h1`]) and hyper behind one
//! accept loop ([`server`]), the router and its handlers, and what they
//! share: reading requests ([`request`]), errors as responses
//! ([`error`]), the request log ([`log`]), CORS ([`cors`]), the SSE
//! encoder ([`sse`]) and the edge's half of the listener's direct writes
//! ([`parked`]).

pub(crate) mod chat;
pub(crate) mod cors;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod h1;
pub(crate) mod log;
pub(crate) mod openapi;
pub(crate) mod ops;
pub(crate) mod parked;
pub(crate) mod poll;
pub(crate) mod replay;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod router;
pub(crate) mod routes;
pub(crate) mod send_timeout;
pub(crate) mod server;
pub(crate) mod shared;
pub(crate) mod sse;

pub(crate) use h1::{Body, ConnectionKill};
pub(crate) use server::serve;
