//! hark's integration tests: one binary, a module per area, one kit.
//!
//! Every module runs the real `hark` binary over real HTTP (or hark's
//! library against a real PostgreSQL); they share the process's private
//! PostgreSQL cluster (a fresh database per test) and the kit: `kit.rs`
//! over the `hark_kit` crate (`kit/`), which the benchmarks use too.

mod kit;

mod api;
mod browser;
mod client;
mod cluster;
mod cursors;
mod django;
mod django_real;
mod embedded;
mod events;
mod lifecycle;
mod lossless;
mod malformed;
mod memory;
mod openapi;
mod poll;
mod presence;
mod quickstart;
mod ratelimit;
mod soak;
