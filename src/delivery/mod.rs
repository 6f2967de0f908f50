//! The delivery core: from PostgreSQL's NOTIFYs to the positions of every
//! waiting poll and open stream, with no knowledge of HTTP.
//!
//! - [`listener`] owns the one LISTEN connection and runs the catch-up
//!   query of each wake-up;
//! - [`hub`] keeps, per watched room, who waits and the recent rows, and
//!   answers positions from memory;
//! - [`reader`] turns a position into the next page, from the hub or the
//!   database;
//! - [`park`] is the registry of parked positions the listener writes to
//!   directly, through the [`park::Encode`] and [`park::Wire`] interfaces
//!   that the HTTP edge implements (`app.rs` wires the two);
//! - [`directory`] caches who exists and who belongs where;
//! - [`typing`] keeps typing state and sweeps its expiry.

pub(crate) mod directory;
pub(crate) mod hub;
pub(crate) mod lag;
pub(crate) mod listener;
pub(crate) mod park;
pub(crate) mod presence;
pub(crate) mod reader;
pub(crate) mod typing;
