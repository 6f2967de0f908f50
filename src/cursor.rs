//! The lossless cursor: a PostgreSQL snapshot, not a timestamp or an id.
//!
//! Every message row carries the id of the transaction that wrote it
//! (`hark_txid xid8 DEFAULT pg_current_xact_id()`). A cursor `At(S)` means
//! "the client has seen every row whose transaction is visible in snapshot
//! S". The rows due after it are those visible now and not visible in S —
//! whatever order writers committed in, because visibility is decided by
//! commit, not by id or clock. See `docs/DESIGN.md` §1.
//!
//! A page of a large batch is `Paging { lower, upper, after_id }`: the
//! changes that are new relative to `lower` and visible in `upper`, of which
//! those with a paging key up to `after_id` were delivered (a message's key
//! is its id; deletions' keys come before every id). `lower` is a snapshot,
//! or — for the seed frontend's ISO `since` — a creation time.
//!
//! Cursors name their database (system identifier and timeline) so that one
//! from another cluster, a restored backup or a promoted replica is refused
//! (`cursor_reset`) rather than silently skipping rows.
//!
//! This module is pure: encoding, decoding (which refuses anything no
//! PostgreSQL snapshot or timestamp could be, so that no cursor a client
//! sends makes the SQL fail) and the visibility rule that the hub applies
//! in memory. The SQL form of the same rule lives in
//! [`crate::db::messages`]; tests check that the two agree.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

/// Longest cursor text accepted; a snapshot with thousands of in-progress
/// transactions still fits, and a forged giant is refused before decoding.
pub const MAX_CURSOR_CHARS: usize = 16 * 1024;
/// Most in-progress transaction ids a snapshot may list (PostgreSQL bounds
/// it by max_connections; this bounds the work a forged cursor can cause).
const MAX_XIP: usize = 8192;
const VERSION: u8 = 1;

/// A PostgreSQL `pg_snapshot`: transactions below `xmin` are finished,
/// those from `xmax` on had not started, and `xip` lists the ones in
/// between that were still running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Sorted, each in `xmin..xmax`.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses PostgreSQL's text form `xmin:xmax:xip,xip,…`.
    pub fn parse_pg(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let mut xip = Vec::new();
        if !rest.is_empty() {
            for x in rest.split(',') {
                xip.push(x.parse().ok()?);
            }
        }
        Snapshot::new(xmin, xmax, xip)
    }

    /// A snapshot with the invariants of one PostgreSQL issues (xmin > 0,
    /// xmin ≤ xmax, each running id in `xmin..xmax`, a bounded count), or
    /// None. Its bounds are ones PostgreSQL's `pg_snapshot` input takes
    /// (see `pg_bound`), so any snapshot made here reads through the SQL
    /// of [`crate::db::messages`] without an error.
    pub fn new(xmin: u64, xmax: u64, mut xip: Vec<u64>) -> Option<Snapshot> {
        if xmin == 0 || xmin > xmax || xip.len() > MAX_XIP {
            return None;
        }
        xip.sort_unstable();
        xip.dedup();
        if xip.iter().any(|&x| x < xmin || x >= xmax) {
            return None;
        }
        let (xmin, xmax) = (pg_bound(xmin), pg_bound(xmax));
        // A running id at the old xmin is now below it, where PostgreSQL
        // refuses it; it names no transaction (see pg_bound), so it goes.
        xip.retain(|&x| x >= xmin);
        Some(Snapshot { xmin, xmax, xip })
    }

    /// PostgreSQL's text form, for `$n::text::pg_snapshot`.
    pub fn to_pg(&self) -> String {
        let mut s = format!("{}:{}:", self.xmin, self.xmax);
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&x.to_string());
        }
        s
    }

    /// `pg_visible_in_snapshot(txid, self)`.
    pub fn is_visible(&self, txid: u64) -> bool {
        if txid < self.xmin {
            true
        } else if txid >= self.xmax {
            false
        } else {
            self.xip.binary_search(&txid).is_err()
        }
    }

    /// True when every transaction visible in `older` is visible in `self`
    /// (so rows new relative to `self` are a subset of rows new relative to
    /// `older`). Holds for any snapshot taken after `older`; a forged or
    /// foreign one may fail it, and then the hub defers to the database.
    pub fn contains(&self, older: &Snapshot) -> bool {
        if self.xmax < older.xmax {
            return false;
        }
        // Anything still running in `self` below older.xmax must have been
        // running (invisible) in `older` too.
        self.xip
            .iter()
            .take_while(|&&x| x < older.xmax)
            .all(|&x| !older.is_visible(x))
    }
}

/// A snapshot bound as PostgreSQL's `pg_snapshot` input takes it. That
/// input refuses a bound whose low 32 bits are 0 (it reads them as the
/// invalid transaction id, whatever the epoch above them): `4294967296` is
/// refused and `4294967297` taken. PostgreSQL never assigns such an id —
/// its counter skips ids 0 to 2 of every epoch — so no row carries one,
/// and the next id is the same bound for every row: a forged cursor that
/// lies in the database's future then reads like any other and is a
/// `cursor_reset`, and one in its past reads as the bound it means.
fn pg_bound(x: u64) -> u64 {
    if x as u32 == 0 {
        x + 1
    } else {
        x
    }
}

/// Earliest instant PostgreSQL's `timestamptz` holds (4714-11-24 00:00 BC,
/// Unix microseconds); an earlier parameter is `22008 timestamp out of
/// range`. Its latest (294276 AD) lies beyond what `chrono` represents.
pub const PG_MIN_MICROS: i64 = -211_813_488_000_000_000 + 946_684_800_000_000;

/// What a cursor's batch is measured against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lower {
    /// Rows not visible in this snapshot are new.
    Snapshot(Arc<Snapshot>),
    /// Rows created after this instant are new (the ISO `since` mode).
    CreatedAfter(DateTime<Utc>),
}

/// A position in the message history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// Everything visible in the snapshot has been seen.
    At(Arc<Snapshot>),
    /// Inside a batch: changes new relative to `lower` and visible in
    /// `upper` with a paging key up to `after_id` have been seen; the rest
    /// of the batch, then everything after `upper`, is due.
    Paging {
        lower: Lower,
        upper: Arc<Snapshot>,
        after_id: i64,
    },
}

/// Which database a cursor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub system_id: u64,
    pub timeline: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub origin: Origin,
    pub position: Position,
}

/// Why a cursor text was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a cursor hark could have issued: bad base64, truncated, or
    /// values no PostgreSQL snapshot or timestamp has (see
    /// [`Snapshot::new`], [`PG_MIN_MICROS`]). Checked here, before any
    /// SQL sees the cursor, so a forged one is a client error (400, or a
    /// stream's `reset`), never a database error.
    Malformed,
}

impl Cursor {
    pub fn at(origin: Origin, snapshot: Arc<Snapshot>) -> Cursor {
        Cursor {
            origin,
            position: Position::At(snapshot),
        }
    }

    /// The opaque text form: URL-safe base64 of a compact binary.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(64);
        buf.push(VERSION);
        buf.extend_from_slice(&self.origin.system_id.to_le_bytes());
        buf.extend_from_slice(&self.origin.timeline.to_le_bytes());
        match &self.position {
            Position::At(s) => {
                buf.push(0);
                put_snapshot(&mut buf, s);
            }
            Position::Paging {
                lower,
                upper,
                after_id,
            } => {
                match lower {
                    Lower::Snapshot(l) => {
                        buf.push(1);
                        put_snapshot(&mut buf, l);
                    }
                    Lower::CreatedAfter(t) => {
                        buf.push(2);
                        put_varint(&mut buf, zigzag(t.timestamp_micros()));
                    }
                }
                put_snapshot(&mut buf, upper);
                put_varint(&mut buf, zigzag(*after_id));
            }
        }
        URL_SAFE_NO_PAD.encode(buf)
    }

    pub fn decode(text: &str) -> Result<Cursor, DecodeError> {
        if text.is_empty() || text.len() > MAX_CURSOR_CHARS {
            return Err(DecodeError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| DecodeError::Malformed)?;
        let mut r = Reader { buf: &bytes };
        if r.u8()? != VERSION {
            return Err(DecodeError::Malformed);
        }
        let system_id = u64::from_le_bytes(r.take::<8>()?);
        let timeline = u32::from_le_bytes(r.take::<4>()?);
        let position = match r.u8()? {
            0 => Position::At(Arc::new(r.snapshot()?)),
            tag @ (1 | 2) => {
                let lower = if tag == 1 {
                    Lower::Snapshot(Arc::new(r.snapshot()?))
                } else {
                    let micros = unzigzag(r.varint()?);
                    if micros < PG_MIN_MICROS {
                        return Err(DecodeError::Malformed);
                    }
                    Lower::CreatedAfter(
                        DateTime::from_timestamp_micros(micros).ok_or(DecodeError::Malformed)?,
                    )
                };
                let upper = Arc::new(r.snapshot()?);
                let after_id = unzigzag(r.varint()?);
                Position::Paging {
                    lower,
                    upper,
                    after_id,
                }
            }
            _ => return Err(DecodeError::Malformed),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(Cursor {
            origin: Origin {
                system_id,
                timeline,
            },
            position,
        })
    }

    /// The snapshot the changes due after the cursor are measured against
    /// (None for the ISO `since`'s creation time).
    pub fn lower(&self) -> Option<&Snapshot> {
        match &self.position {
            Position::At(s) => Some(s),
            Position::Paging {
                lower: Lower::Snapshot(l),
                ..
            } => Some(l),
            Position::Paging { .. } => None,
        }
    }

    /// The newest snapshot the cursor mentions: if it lies beyond the
    /// database's present, the cursor came from somewhere else.
    pub fn newest_xmax(&self) -> u64 {
        match &self.position {
            Position::At(s) => s.xmax,
            Position::Paging { lower, upper, .. } => match lower {
                Lower::Snapshot(l) => l.xmax.max(upper.xmax),
                Lower::CreatedAfter(_) => upper.xmax,
            },
        }
    }
}

// Snapshot wire form: xmin, xmax - xmin, count, then ascending deltas —
// a handful of bytes for the usual snapshot with few running transactions.
fn put_snapshot(buf: &mut Vec<u8>, s: &Snapshot) {
    put_varint(buf, s.xmin);
    put_varint(buf, s.xmax - s.xmin);
    put_varint(buf, s.xip.len() as u64);
    let mut prev = s.xmin;
    for &x in &s.xip {
        put_varint(buf, x - prev);
        prev = x;
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Malformed)?;
        self.buf = rest;
        Ok(b)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        if self.buf.len() < N {
            return Err(DecodeError::Malformed);
        }
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        head.try_into().map_err(|_| DecodeError::Malformed)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Malformed);
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Malformed)
    }

    fn snapshot(&mut self) -> Result<Snapshot, DecodeError> {
        let xmin = self.varint()?;
        let xmax = xmin
            .checked_add(self.varint()?)
            .ok_or(DecodeError::Malformed)?;
        let n = self.varint()?;
        if n as usize > MAX_XIP || n as usize > self.buf.len() {
            return Err(DecodeError::Malformed);
        }
        let mut xip = Vec::with_capacity(n as usize);
        let mut prev = xmin;
        for i in 0..n {
            let delta = self.varint()?;
            // Strictly ascending after the first (which may equal xmin).
            if i > 0 && delta == 0 {
                return Err(DecodeError::Malformed);
            }
            prev = prev.checked_add(delta).ok_or(DecodeError::Malformed)?;
            xip.push(prev);
        }
        Snapshot::new(xmin, xmax, xip).ok_or(DecodeError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(xmin, xmax, xip.to_vec()).unwrap())
    }

    const ORIGIN: Origin = Origin {
        system_id: 7_300_000_000_000_000_001,
        timeline: 1,
    };

    #[test]
    fn pg_text_round_trip() {
        let s = Snapshot::parse_pg("100:105:100,103").unwrap();
        assert_eq!(s.xip, vec![100, 103]);
        assert_eq!(s.to_pg(), "100:105:100,103");
        assert_eq!(Snapshot::parse_pg("7:7:").unwrap().to_pg(), "7:7:");
        assert!(Snapshot::parse_pg("9:7:").is_none());
        assert!(Snapshot::parse_pg("1:7:8").is_none());
        assert!(Snapshot::parse_pg("a:7:").is_none());
        assert!(Snapshot::parse_pg("1:7").is_none());
    }

    #[test]
    fn visibility_matches_postgres_rule() {
        let s = snap(100, 105, &[100, 103]);
        assert!(s.is_visible(99));
        assert!(!s.is_visible(100));
        assert!(s.is_visible(101));
        assert!(!s.is_visible(103));
        assert!(s.is_visible(104));
        assert!(!s.is_visible(105));
    }

    #[test]
    fn containment() {
        let old = snap(100, 105, &[100, 103]);
        // 103 finished, 105..108 started, 106 still running.
        let newer = snap(100, 108, &[100, 106]);
        assert!(newer.contains(&old));
        assert!(!old.contains(&newer));
        // 101 was visible in old but is listed as running: not a later snapshot.
        let bogus = snap(100, 108, &[101]);
        assert!(!bogus.contains(&old));
        assert!(old.contains(&old));
    }

    #[test]
    fn encode_decode_round_trip() {
        let cases = [
            Position::At(snap(5, 5, &[])),
            Position::At(snap(
                1 << 40,
                (1 << 40) + 900,
                &[(1 << 40) + 3, (1 << 40) + 899],
            )),
            Position::Paging {
                lower: Lower::Snapshot(snap(10, 20, &[11])),
                upper: snap(12, 30, &[25]),
                after_id: 123_456_789,
            },
            Position::Paging {
                lower: Lower::CreatedAfter(
                    DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
                ),
                upper: snap(12, 30, &[]),
                after_id: -1,
            },
        ];
        for position in cases {
            let c = Cursor {
                origin: ORIGIN,
                position,
            };
            let text = c.encode();
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(Cursor::decode(&text).unwrap(), c);
        }
    }

    /// PostgreSQL 15's `pg_snapshot` input (`parse_snapshot` in
    /// xid8funcs.c), checked against a server by `tests/cursors.rs`:
    /// numbers, `:`, `:`, then ids separated by `,`; each bound's low 32
    /// bits non-zero; xmin ≤ xmax; ids ascending (repeats allowed) in
    /// `[xmin, xmax)`.
    fn pg_accepts(text: &str) -> bool {
        let mut parts = text.splitn(3, ':');
        let (Some(Ok(xmin)), Some(Ok(xmax)), Some(rest)) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
            parts.next(),
        ) else {
            return false;
        };
        if xmin as u32 == 0 || xmax as u32 == 0 || xmax < xmin {
            return false;
        }
        let mut last = 0;
        rest.is_empty()
            || rest.split(',').all(|x| match x.parse::<u64>() {
                Ok(x) if x >= xmin && x < xmax && x >= last => {
                    last = x;
                    true
                }
                _ => false,
            })
    }

    /// A number a forger would try: the edges of each field's range, of
    /// PostgreSQL's 32-bit epochs and of its signed types, or any.
    fn extreme(rng: &mut fastrand::Rng) -> u64 {
        const EDGES: &[u64] = &[
            0,
            1,
            2,
            3,
            (1 << 31) - 1,
            1 << 31,
            (1 << 32) - 1,
            1 << 32,
            (1 << 32) + 1,
            (1 << 32) + 3,
            (1 << 63) - 1,
            1 << 63,
            (1 << 63) + 1,
            u64::MAX - (1 << 32) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        match rng.u8(..4) {
            0 => rng.u64(..),
            1 => rng.u64(..2000),
            _ => EDGES[rng.usize(..EDGES.len())],
        }
    }

    /// A snapshot's wire form with fields as a forger picks them, valid
    /// or not: what `put_snapshot` writes, without its assumptions.
    fn forged_snapshot(rng: &mut fastrand::Rng, buf: &mut Vec<u8>) {
        let xmin = extreme(rng);
        let span = if rng.bool() {
            rng.u64(..20)
        } else {
            extreme(rng)
        };
        put_varint(buf, xmin);
        put_varint(buf, span);
        let n = rng.u64(..4);
        put_varint(buf, n);
        for i in 0..n {
            let delta = match rng.u8(..3) {
                0 if i > 0 => 0,
                1 => extreme(rng),
                _ => rng.u64(..span.clamp(1, 10)),
            };
            put_varint(buf, delta);
        }
    }

    /// Cursors of every tag with fields picked at the edges, at times a
    /// byte changed, and random bytes.
    fn forged(rng: &mut fastrand::Rng) -> Vec<u8> {
        if rng.u8(..10) == 0 {
            return (0..rng.usize(..48)).map(|_| rng.u8(..)).collect();
        }
        let mut b = vec![VERSION];
        b.extend_from_slice(&ORIGIN.system_id.to_le_bytes());
        b.extend_from_slice(&ORIGIN.timeline.to_le_bytes());
        let tag = rng.u8(..3);
        b.push(tag);
        match tag {
            0 => forged_snapshot(rng, &mut b),
            _ => {
                if tag == 1 {
                    forged_snapshot(rng, &mut b);
                } else {
                    let micros = match rng.u8(..4) {
                        0 => rng.i64(..),
                        1 => PG_MIN_MICROS + rng.i64(-2..2),
                        2 => [i64::MIN, i64::MAX, 0, -1][rng.usize(..4)],
                        _ => rng.i64(-250_000 * 31_557_600_000_000..250_000 * 31_557_600_000_000),
                    };
                    put_varint(&mut b, zigzag(micros));
                }
                forged_snapshot(rng, &mut b);
                put_varint(&mut b, zigzag(rng.i64(..)));
            }
        }
        if rng.u8(..4) == 0 {
            let i = rng.usize(13..b.len());
            b[i] = rng.u8(..);
        }
        b
    }

    fn assert_valid(s: &Snapshot, what: &str) {
        assert!(s.xmin > 0 && s.xmin <= s.xmax, "{what}: {s:?}");
        assert!(s.xip.len() <= MAX_XIP, "{what}");
        assert!(s.xip.windows(2).all(|w| w[0] < w[1]), "{what}: {s:?}");
        assert!(
            s.xip.iter().all(|&x| (s.xmin..s.xmax).contains(&x)),
            "{what}: {s:?}"
        );
        assert!(pg_accepts(&s.to_pg()), "{what}: PostgreSQL refuses {s:?}");
    }

    /// Whatever bytes arrive, a cursor that decodes holds every invariant
    /// the SQL relies on, and encodes to a text that decodes to itself.
    /// Seeded: a failure names its case, and `HARK_FUZZ_SEED` explores.
    #[test]
    fn every_cursor_that_decodes_is_one_postgresql_takes() {
        let seed = std::env::var("HARK_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20261206);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut accepted = [0usize; 3];
        for case in 0..200_000 {
            let bytes = forged(&mut rng);
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            let Ok(c) = Cursor::decode(&text) else {
                continue;
            };
            let what = format!("seed {seed}, case {case}: {text}");
            match &c.position {
                Position::At(s) => {
                    accepted[0] += 1;
                    assert_valid(s, &what);
                }
                Position::Paging { lower, upper, .. } => {
                    assert_valid(upper, &what);
                    match lower {
                        Lower::Snapshot(l) => {
                            accepted[1] += 1;
                            assert_valid(l, &what);
                        }
                        Lower::CreatedAfter(t) => {
                            accepted[2] += 1;
                            assert!(t.timestamp_micros() >= PG_MIN_MICROS, "{what}");
                        }
                    }
                }
            }
            assert_eq!(Cursor::decode(&c.encode()).as_ref(), Ok(&c), "{what}");
        }
        // Every tag was tried with cursors that pass, not only refused.
        assert!(accepted.iter().all(|&n| n > 1000), "{accepted:?}");
    }

    #[test]
    fn the_bounds_postgresql_refuses_are_refused_or_read_as_the_next_id() {
        // xmin 0 is before every transaction: no snapshot ever had it.
        assert!(Snapshot::new(0, 0, vec![]).is_none());
        assert!(Snapshot::parse_pg("0:5:").is_none());
        // An id whose low 32 bits are 0 is never assigned: the bound is
        // the next one, and a running id at it goes with it.
        let s = Snapshot::new(1 << 32, (1 << 32) + 5, vec![1 << 32, (1 << 32) + 2]).unwrap();
        assert_eq!(s.to_pg(), "4294967297:4294967301:4294967298");
        let s = Snapshot::new(1 << 63, 1 << 63, vec![]).unwrap();
        assert_eq!(s.to_pg(), "9223372036854775809:9223372036854775809:");
        let s = Snapshot::new(5, 1 << 32, vec![]).unwrap();
        assert_eq!((s.xmin, s.xmax), (5, (1 << 32) + 1));
        assert_eq!(
            DateTime::from_timestamp_micros(PG_MIN_MICROS)
                .unwrap()
                .to_rfc3339(),
            "-4713-11-24T00:00:00+00:00"
        );
        let batch = |lower: Lower, upper: Arc<Snapshot>| {
            Cursor {
                origin: ORIGIN,
                position: Position::Paging {
                    lower,
                    upper,
                    after_id: 1,
                },
            }
            .encode()
        };
        let at = |micros| Lower::CreatedAfter(DateTime::from_timestamp_micros(micros).unwrap());
        assert!(Cursor::decode(&batch(at(PG_MIN_MICROS), snap(5, 9, &[]))).is_ok());
        assert!(Cursor::decode(&batch(at(PG_MIN_MICROS - 1), snap(5, 9, &[]))).is_err());
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let good = Cursor::at(ORIGIN, snap(10, 20, &[11, 15])).encode();
        let bytes = URL_SAFE_NO_PAD.decode(&good).unwrap();
        for cut in 0..bytes.len() {
            let t = URL_SAFE_NO_PAD.encode(&bytes[..cut]);
            assert_eq!(Cursor::decode(&t), Err(DecodeError::Malformed));
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&extra)).is_err());
        for bad in [
            "",
            "!!!",
            "AAAA",
            "2026-01-01T00:00:00Z",
            &"A".repeat(MAX_CURSOR_CHARS + 1),
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
        // Every single-byte corruption either decodes to a valid cursor or is refused.
        for i in 0..bytes.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Ok(c) = Cursor::decode(&URL_SAFE_NO_PAD.encode(&b)) {
                    if let Position::At(s) = c.position {
                        assert!(s.xmin <= s.xmax);
                    }
                }
            }
        }
    }
}
