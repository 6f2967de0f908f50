//! hark — typing indicators and real-time message sync for chat applications
//! on PostgreSQL.
//!
//! hark sits beside an existing (Django) chat backend and shares its
//! database. It serves a true long poll (`/api/chat/messages/poll/`) and a
//! Server-Sent Events stream (`/events`), both woken by PostgreSQL
//! `LISTEN/NOTIFY` through one listener connection per process, and a typing
//! state that expires on its own. The contract is `API.md`; the reasoning
//! behind the cursor and the hub is in `docs/DESIGN.md`.
//!
//! The crate is built in floors, each importing only the floors below it
//! (CI checks there is no import loop):
//!
//! 1. core types: [`config`], [`cursor`] (the lossless position),
//!    [`message`] (the wire objects), [`auth`] (tokens), and the small
//!    shared pieces `metrics`, `shutdown`, `ratelimit`, `stream_quota`;
//! 2. [`db`]: the pool, the queries, the migrations, the embedded cluster;
//! 3. `delivery`: the hub, the LISTEN connection, the registry of parked
//!    positions, typing — it knows nothing of HTTP;
//! 4. `http`: hark's own HTTP/1.1 and hyper, the router and its handlers;
//! 5. `app`: start-up and wiring ([`run`]).
//!
//! The public items are what the binary, the tests and the benchmarks
//! use; everything else is the crate's own.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(unreachable_pub, rust_2018_idioms)]

mod app;
#[cfg(test)]
mod architecture;
pub mod auth;
pub mod config;
pub mod cursor;
pub mod db;
mod delivery;
mod http;
pub mod message;
mod metrics;
mod ratelimit;
mod shutdown;
mod stream_quota;
mod trim;

pub use app::run;
pub use config::Config;
