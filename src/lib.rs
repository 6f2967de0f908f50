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
//! The crate is organised by ownership: [`config`] parses settings, [`db`]
//! owns the pool, the migrations and the embedded cluster, [`cursor`] the
//! lossless position, [`hub`] the in-process fan-out, [`listener`] the one
//! LISTEN connection, [`http`] everything on the wire.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(unreachable_pub, rust_2018_idioms)]

pub mod app;
pub mod auth;
pub mod config;
pub mod cursor;
pub mod db;
pub mod delivery;
pub mod http;
pub mod message;
pub mod metrics;
pub mod ratelimit;
pub mod shutdown;
pub mod stream_quota;
pub mod trim;

pub use app::{run, App};
pub use config::Config;
