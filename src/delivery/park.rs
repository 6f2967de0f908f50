//! The registry of parked positions: a catch-up's rows written by the
//! listener's task straight to idle streams and waiting polls, with no task
//! wake-up for each (DESIGN §8).
//!
//! A stream that watches one room, or a waiting poll, *parks* once it has
//! written everything due: it leaves its position here and waits. After a
//! catch-up the hub hands [`deliver`] each room's new rows with the room's
//! parked streams and polls. The bytes for one position are built once —
//! by the edge, through [`Encode`]: this module knows positions, not
//! protocols — and written to every one parked there with one non-blocking
//! write ([`Wire`]), which moves that stream's parked position on (or
//! answers that poll). Whatever cannot be done so — a socket that takes
//! nothing, a position outside the catch-up's range, a loss of access not
//! yet checked, a page over the stream's bound — is left to the stream or
//! poll, which is woken as it would be without parking.
//!
//! Exactly once: the position and the right to write change hands under
//! the park's lock. The listener writes only to a parked stream and moves
//! its position in the same critical section; the stream takes its
//! position back (unparks) before it writes anything itself, and parks only
//! when everything due has been written. The tail of a write the socket
//! took only part of stays here, and the connection writes it before
//! anything else.
//!
//! A waiting poll's whole answer is written the same way, and its
//! connection takes note lazily, when its client sends the next request
//! (or goes away, or the poll's own timer fires). One answer per request:
//! the right to answer changes hands under the park's lock, as a stream's
//! position does.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cursor::{Origin, Snapshot};
use crate::delivery::lag::Lag;
use crate::message::StoredMessage;
use crate::metrics::Metrics;

/// Writes between two yields of the listener's task: a fan-out to many
/// thousands of sockets must not hold a runtime thread for its whole
/// length.
const YIELD_EVERY: usize = 256;
/// Parked streams in one room above which its writes are split over the
/// runtime's threads.
const SPLIT_ABOVE: usize = 512;

/// Where a park's bytes go: the connection's socket (or its write half),
/// written without waiting.
pub(crate) trait Wire: Send + Sync {
    /// Writes what the socket takes now: `WouldBlock` when it takes
    /// nothing, an error when it is gone.
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

/// The edge's encoding of what a parked stream or poll is due: given the
/// rows, it builds the bytes the stream or poll would have written itself.
pub(crate) trait Encode: Send + Sync {
    /// The events for `rows` (ascending id, each due) to a stream parked at
    /// `at`, whose position after them is `head`.
    fn stream_page(
        &self,
        origin: Origin,
        at: &Arc<Snapshot>,
        head: &Arc<Snapshot>,
        rows: &[Arc<StoredMessage>],
    ) -> Bytes;

    /// A waiting poll's whole answer: `rows`, the cursor at `head`, and
    /// `has_more`. `variant` is what else the answer depends on
    /// ([`PollForm::variant`]). None when it cannot be built.
    fn poll_answer(
        &self,
        origin: Origin,
        head: &Arc<Snapshot>,
        rows: &[Arc<StoredMessage>],
        has_more: bool,
        variant: Option<&Bytes>,
    ) -> Option<Bytes>;
}

/// A catch-up's rows for one room, for the room's parked streams and
/// polls: every row of the room visible in `head` and not in `lower` is in
/// `rows`, so one parked at a snapshot between the two is due exactly the
/// rows it does not see.
pub(crate) struct Delivery {
    pub lower: Arc<Snapshot>,
    pub head: Arc<Snapshot>,
    /// Ascending id.
    pub rows: Vec<Arc<StoredMessage>>,
    /// When the NOTIFY that led to them arrived (latency metric).
    pub heard: Instant,
    /// A NOTIFY for the room came after this catch-up began: more may be
    /// due than it read (a poll's `has_more`).
    pub beyond: bool,
    pub parked: Vec<Parked>,
}

/// A stream or a poll that may be parked.
pub(crate) struct Parked {
    pub park: Arc<Park>,
    pub notify: Arc<Notify>,
    /// None for a poll.
    pub lag: Option<Arc<Lag>>,
}

/// One stream's, or one connection's, parking place.
pub(crate) struct Park {
    state: Mutex<State>,
}

/// What a waiting poll's own answer would depend on besides the rows.
pub(crate) struct PollForm {
    pub limit: usize,
    /// Opaque here, handed back to [`Encode::poll_answer`] (the edge keeps
    /// the request's `Origin` here, for its CORS headers). Answers are
    /// built once per distinct position and variant.
    pub variant: Option<Bytes>,
}

#[derive(Default)]
struct State {
    /// Set while the stream (or poll) is parked: every row visible in it
    /// has been written to the socket.
    at: Option<Arc<Snapshot>>,
    /// None once the connection is ending.
    sock: Option<Arc<dyn Wire>>,
    /// Set while a waiting poll is parked; None for a stream.
    poll: Option<PollForm>,
    /// When the listener answered the request in flight; the connection
    /// has not taken note yet.
    answered: Option<Instant>,
    /// The client sent more while its request was in flight: an answer
    /// written here could go unnoticed behind that input, so the poll
    /// answers itself.
    input: bool,
    /// A loss of access to the room was heard and the stream or poll has
    /// not checked it yet: nothing is written for it here meanwhile.
    stale: bool,
    /// The part of a direct write the socket did not take.
    rest: Bytes,
}

impl Park {
    /// A park that writes to `sock`: a stream's socket, or the write half
    /// of a connection serving requests, whose loop keeps the read half.
    pub(crate) fn new(sock: Arc<dyn Wire>) -> Arc<Park> {
        Arc::new(Park {
            state: Mutex::new(State {
                sock: Some(sock),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream or poll is about to read and check its access: a change
    /// heard from now on keeps it from parking until it checks again.
    pub(crate) fn checking(&self) {
        self.lock().stale = false;
    }

    /// Parks the stream at `at`. False (not parked) when a membership
    /// change is unchecked, a tail is unwritten, or the connection ends.
    pub(crate) fn park(&self, at: &Arc<Snapshot>) -> bool {
        let mut st = self.lock();
        if st.stale || !st.rest.is_empty() || st.sock.is_none() {
            return false;
        }
        st.at = Some(at.clone());
        true
    }

    /// Takes the stream's position back, moved on by whatever was written
    /// while it was parked. None when it was not parked.
    pub(crate) fn unpark(&self) -> Option<Arc<Snapshot>> {
        self.lock().at.take()
    }

    /// Parks a waiting poll at `at`. False (not parked) when a change of
    /// its user's access is unchecked, the client sent more, the request
    /// was answered already, or the connection ends.
    pub(crate) fn park_poll(&self, at: &Arc<Snapshot>, form: PollForm) -> bool {
        let mut st = self.lock();
        if st.stale || st.input || st.answered.is_some() || !st.rest.is_empty() || st.sock.is_none()
        {
            return false;
        }
        st.at = Some(at.clone());
        st.poll = Some(form);
        true
    }

    /// Takes a poll back: from now on only the poll answers. True when
    /// the listener answered it already.
    pub(crate) fn unpark_poll(&self) -> bool {
        let mut st = self.lock();
        st.at = None;
        st.poll = None;
        st.answered.is_some()
    }

    /// The client sent bytes while its request was in flight. True when
    /// the listener answered that request; otherwise a parked poll is
    /// taken back, and no poll parks until the next request.
    pub(crate) fn input_arrived(&self) -> bool {
        let mut st = self.lock();
        if st.answered.is_some() {
            return true;
        }
        st.input = true;
        st.at = None;
        st.poll = None;
        false
    }

    /// The request in flight is over; the connection moves to the next.
    /// When the listener answered it: when, and what the socket did not
    /// take of the answer.
    pub(crate) fn finish_request(&self) -> Option<(Instant, Bytes)> {
        let mut st = self.lock();
        st.input = false;
        let at = st.answered.take()?;
        Some((at, std::mem::take(&mut st.rest)))
    }

    /// A direct write was cut short: the connection must write this first.
    pub(crate) fn take_rest(&self) -> Bytes {
        std::mem::take(&mut self.lock().rest)
    }

    pub(crate) fn has_rest(&self) -> bool {
        !self.lock().rest.is_empty()
    }

    /// The room's membership changed: write nothing until the stream has
    /// checked it (the hub wakes the stream too).
    pub(crate) fn revoke(&self) {
        self.lock().stale = true;
    }

    /// The connection is ending: no more writes, and the socket is the
    /// connection's alone again.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.at = None;
        st.poll = None;
        st.sock = None;
    }
}

/// What one direct write did.
enum Written {
    /// The whole page.
    All,
    /// The page, of which a tail is left to the connection.
    Part,
    /// Nothing: the stream must see to it.
    Nothing,
}

/// One page for streams, or polls, parked at one position.
struct Page {
    at: Arc<Snapshot>,
    /// None for streams; for polls, the variant their answers are for.
    poll: Option<Option<Bytes>>,
    /// Rows in it, for each parked one's limit.
    rows: usize,
    /// Ready for the wire; None when such streams must see to it
    /// themselves.
    bytes: Option<Bytes>,
}

/// What every write of one catch-up shares.
pub(crate) struct Ctx<'a> {
    /// The database identity the cursors carry.
    pub origin: Origin,
    /// Most bytes of messages in one poll answer (`HARK_MAX_ANSWER_BYTES`):
    /// a poll due more wakes and pages its answer itself.
    pub answer_bytes: usize,
    pub metrics: &'a Arc<Metrics>,
    pub encode: &'a Arc<dyn Encode>,
}

/// Writes each delivery's rows to its parked streams and polls, and wakes
/// every one that could not be served so. Runs on the listener's task
/// after the catch-up that read the rows and returns when every write is
/// done, before the next catch-up starts, so writes to one stream are in
/// catch-up order. A large room is split over the runtime's threads: one
/// thread alone spends as long on the kernel's side of the writes as the
/// whole runtime does waking each stream's task.
pub(crate) async fn deliver(deliveries: Vec<Delivery>, ctx: &Ctx<'_>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for d in deliveries {
        let parts = threads.min(d.parked.len().div_ceil(SPLIT_ABOVE)).max(1);
        if parts == 1 {
            deliver_part(&d, 0..d.parked.len(), ctx).await;
            continue;
        }
        let d = Arc::new(d);
        let per = d.parked.len().div_ceil(parts);
        let tasks: Vec<_> = (0..parts)
            .map(|i| {
                let d = d.clone();
                let (origin, answer_bytes, metrics, encode) = (
                    ctx.origin,
                    ctx.answer_bytes,
                    ctx.metrics.clone(),
                    ctx.encode.clone(),
                );
                let range = i * per..((i + 1) * per).min(d.parked.len());
                tokio::spawn(async move {
                    let ctx = Ctx {
                        origin,
                        answer_bytes,
                        metrics: &metrics,
                        encode: &encode,
                    };
                    deliver_part(&d, range, &ctx).await
                })
            })
            .collect();
        for t in tasks {
            // A panicked part has woken nobody it did not write to; its
            // streams wake on their ping and read from memory, its polls
            // on their timeout.
            if let Err(e) = t.await {
                tracing::error!(error = %e, "direct delivery task failed");
            }
        }
    }
}

async fn deliver_part(d: &Delivery, range: Range<usize>, ctx: &Ctx<'_>) {
    let mut pages: Vec<Page> = Vec::new();
    for (k, s) in d.parked[range].iter().enumerate() {
        let written = write_parked(s, d, ctx, &mut pages);
        if let Written::All | Written::Part = written {
            ctx.metrics.delivery_latency.observe(d.heard.elapsed());
        }
        if let Written::Part | Written::Nothing = written {
            s.notify.notify_one();
        }
        if (k + 1) % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn write_parked(s: &Parked, d: &Delivery, ctx: &Ctx<'_>, pages: &mut Vec<Page>) -> Written {
    let mut st = s.park.lock();
    if st.stale {
        return Written::Nothing;
    }
    let (Some(at), Some(sock)) = (&st.at, &st.sock) else {
        return Written::Nothing;
    };
    let (limit, poll) = match (&st.poll, &s.lag) {
        (Some(form), _) => (form.limit, Some(&form.variant)),
        (None, Some(lag)) => (lag.limit(), None),
        (None, None) => return Written::Nothing,
    };
    let i = match pages
        .iter()
        .position(|p| (Arc::ptr_eq(&p.at, at) || p.at == *at) && p.poll.as_ref() == poll)
    {
        Some(i) => i,
        None => {
            pages.push(build(d, at, poll, ctx));
            pages.len() - 1
        }
    };
    let page = &pages[i];
    let Some(bytes) = page.bytes.as_ref().filter(|_| page.rows <= limit) else {
        return Written::Nothing;
    };
    let written = match sock.try_write(bytes) {
        Ok(w) if w == bytes.len() => Written::All,
        Ok(w) if w > 0 => {
            st.rest = bytes.slice(w..);
            Written::Part
        }
        // Full, or gone: the stream or poll finds out itself.
        _ => return Written::Nothing,
    };
    if st.poll.is_some() {
        // Answered: the request is over, whatever the poll's task does.
        st.at = None;
        st.poll = None;
        st.answered = Some(Instant::now());
        ctx.metrics.waiting_polls.fetch_sub(1, Relaxed);
        ctx.metrics.poll_direct_answers.fetch_add(1, Relaxed);
        ctx.metrics.polls_answered_from_memory.fetch_add(1, Relaxed);
    } else {
        st.at = Some(d.head.clone());
        // Everything up to the head is on the wire or in the tail, and no
        // catch-up adds more before this returns.
        if let Some(lag) = &s.lag {
            lag.caught_up();
        }
        ctx.metrics.stream_direct_writes.fetch_add(1, Relaxed);
    }
    written
}

/// The page for streams (`poll` None) or polls parked at `at`: the
/// catch-up's rows not visible in `at`, as the edge encodes them. Valid
/// only when `at` lies between the catch-up's lower snapshot and its head
/// — then the rows due are exactly those, and the next position is the
/// head — and when something is due; for polls, when it fits one answer
/// (as [`crate::delivery::reader::fit`] measures it).
fn build(d: &Delivery, at: &Arc<Snapshot>, poll: Option<&Option<Bytes>>, ctx: &Ctx<'_>) -> Page {
    let mut page = Page {
        at: at.clone(),
        poll: poll.cloned(),
        rows: 0,
        bytes: None,
    };
    if !at.contains(&d.lower) || !d.head.contains(at) {
        return page;
    }
    let due: Vec<_> = d
        .rows
        .iter()
        .filter(|m| !at.is_visible(m.txid))
        .cloned()
        .collect();
    page.rows = due.len();
    if due.is_empty() {
        return page;
    }
    let bytes: usize = due.iter().map(|m| m.json.len() + 1).sum();
    if poll.is_some() && due.len() > 1 && bytes > ctx.answer_bytes {
        return page;
    }
    page.bytes = match poll {
        Some(variant) => {
            ctx.encode
                .poll_answer(ctx.origin, &d.head, &due, d.beyond, variant.as_ref())
        }
        None => Some(ctx.encode.stream_page(ctx.origin, at, &d.head, &due)),
    };
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::lag::Lag;
    use crate::message::{Message, User};
    use chrono::Utc;
    use futures::FutureExt;
    use tokio::sync::Notify;

    const ORIGIN: Origin = Origin {
        system_id: 7,
        timeline: 1,
    };

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(xmin, xmax, xip.to_vec()).unwrap())
    }

    fn msg(id: i64, txid: u64) -> Arc<StoredMessage> {
        let m = Message {
            id,
            room: 1,
            sender: User {
                id: 2,
                username: "bob".into(),
                first_name: String::new(),
                last_name: String::new(),
            },
            content: format!("m{id}"),
            created_at: Utc::now(),
            edited: false,
        };
        Arc::new(StoredMessage::new(&m, txid))
    }

    /// A socket that takes at most `room` more bytes.
    struct Sink {
        room: Mutex<usize>,
        got: Mutex<Vec<u8>>,
    }

    impl Sink {
        fn new(room: usize) -> Arc<Sink> {
            Arc::new(Sink {
                room: Mutex::new(room),
                got: Mutex::new(Vec::new()),
            })
        }

        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.got.lock().unwrap())).unwrap()
        }
    }

    impl Wire for Sink {
        fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            let n = buf.len().min(*room);
            if n == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            *room -= n;
            self.got.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    /// Names what it was asked to build, so a test reads who got what.
    struct Names;

    fn ids(rows: &[Arc<StoredMessage>]) -> String {
        rows.iter()
            .map(|m| m.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    impl Encode for Names {
        fn stream_page(
            &self,
            _: Origin,
            at: &Arc<Snapshot>,
            head: &Arc<Snapshot>,
            rows: &[Arc<StoredMessage>],
        ) -> Bytes {
            format!("stream {}..{}: {};", at.to_pg(), head.to_pg(), ids(rows)).into()
        }

        fn poll_answer(
            &self,
            _: Origin,
            head: &Arc<Snapshot>,
            rows: &[Arc<StoredMessage>],
            has_more: bool,
            variant: Option<&Bytes>,
        ) -> Option<Bytes> {
            let v = variant.map_or("-".into(), |v| String::from_utf8_lossy(v).into_owned());
            let s = format!("poll {v} {}: {} more={has_more};", head.to_pg(), ids(rows));
            Some(s.into())
        }
    }

    /// A parked stream (with a lag) or poll (without), on its sink.
    struct Parker {
        park: Arc<Park>,
        sink: Arc<Sink>,
        notify: Arc<Notify>,
        lag: Option<Arc<Lag>>,
    }

    fn stream_with(room: usize, limit: usize) -> Parker {
        let sink = Sink::new(room);
        Parker {
            park: Park::new(sink.clone()),
            sink,
            notify: Arc::new(Notify::new()),
            lag: Some(Lag::new(limit, None)),
        }
    }

    fn stream() -> Parker {
        stream_with(usize::MAX, 100)
    }

    fn poll_with(room: usize) -> Parker {
        Parker {
            lag: None,
            ..stream_with(room, 0)
        }
    }

    fn poll() -> Parker {
        poll_with(usize::MAX)
    }

    fn form(limit: usize) -> PollForm {
        PollForm {
            limit,
            variant: None,
        }
    }

    fn delivery(
        lower: &Arc<Snapshot>,
        head: &Arc<Snapshot>,
        rows: Vec<Arc<StoredMessage>>,
        parked: &[&Parker],
    ) -> Delivery {
        Delivery {
            lower: lower.clone(),
            head: head.clone(),
            rows,
            heard: Instant::now(),
            beyond: false,
            parked: parked
                .iter()
                .map(|p| Parked {
                    park: p.park.clone(),
                    notify: p.notify.clone(),
                    lag: p.lag.clone(),
                })
                .collect(),
        }
    }

    async fn run(d: Delivery, metrics: &Arc<Metrics>) {
        let encode: Arc<dyn Encode> = Arc::new(Names);
        let ctx = Ctx {
            origin: ORIGIN,
            answer_bytes: usize::MAX,
            metrics,
            encode: &encode,
        };
        deliver(vec![d], &ctx).await;
    }

    fn woken(n: &Notify) -> bool {
        n.notified().now_or_never().is_some()
    }

    #[tokio::test]
    async fn a_parked_stream_gets_exactly_the_rows_it_does_not_see_and_moves_to_the_head() {
        let (lower, head) = (snap(10, 10, &[]), snap(13, 13, &[]));
        let rows = vec![msg(1, 10), msg(2, 11), msg(3, 12)];
        // Parked at the catch-up's lower snapshot, and one that has seen
        // txid 10; a third at the same position as the first shares its
        // page.
        let (s1, s2, s3) = (stream(), stream(), stream());
        let seen10 = snap(11, 11, &[]);
        assert!(s1.park.park(&lower));
        assert!(s2.park.park(&seen10));
        assert!(s3.park.park(&lower));
        let metrics = Arc::new(Metrics::default());
        run(delivery(&lower, &head, rows, &[&s1, &s2, &s3]), &metrics).await;
        assert_eq!(s1.sink.take(), "stream 10:10:..13:13:: 1,2,3;");
        assert_eq!(s2.sink.take(), "stream 11:11:..13:13:: 2,3;");
        assert_eq!(s3.sink.take(), "stream 10:10:..13:13:: 1,2,3;");
        for s in [&s1, &s2, &s3] {
            assert_eq!(s.park.unpark(), Some(head.clone()));
            assert!(!woken(&s.notify), "served streams are not woken");
        }
        assert_eq!(metrics.stream_direct_writes.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn streams_it_cannot_serve_are_woken_and_nothing_is_written_for_them() {
        let (lower, head) = (snap(10, 10, &[]), snap(12, 12, &[]));
        let rows = vec![msg(1, 10), msg(2, 11)];
        let not_parked = stream();
        // A loss of access heard after its check: even parked, it is not
        // written to.
        let revoked = stream();
        revoked.park.checking();
        assert!(revoked.park.park(&lower));
        revoked.park.revoke();
        // Parked before the catch-up's lower snapshot: rows of an earlier
        // catch-up may be due too, which this delivery does not carry.
        let older = stream();
        let old = snap(9, 9, &[]);
        assert!(older.park.park(&old));
        // Due more than its bound allows in one page.
        let bounded = stream_with(usize::MAX, 1);
        assert!(bounded.park.park(&lower));
        // Already sees every row (parked at the head): nothing to write.
        let current = stream();
        assert!(current.park.park(&head));
        // A socket that takes nothing.
        let full = stream_with(0, 100);
        assert!(full.park.park(&lower));
        // Closed: the connection is ending.
        let closed = stream();
        assert!(closed.park.park(&lower));
        closed.park.close();

        let all = [
            &not_parked,
            &revoked,
            &older,
            &bounded,
            &current,
            &full,
            &closed,
        ];
        run(
            delivery(&lower, &head, rows, &all),
            &Arc::new(Metrics::default()),
        )
        .await;
        for (name, s, at) in [
            ("not parked", &not_parked, None),
            ("revoked", &revoked, Some(&lower)),
            ("older", &older, Some(&old)),
            ("bounded", &bounded, Some(&lower)),
            ("current", &current, Some(&head)),
            ("full", &full, Some(&lower)),
            ("closed", &closed, None),
        ] {
            assert!(woken(&s.notify), "{name}");
            assert_eq!(s.sink.take(), "", "{name}");
            assert_eq!(s.park.unpark().as_ref(), at, "{name}: position moved");
        }
        // A revoked stream parks again only after checking; a closed one never.
        assert!(!revoked.park.park(&lower));
        revoked.park.checking();
        assert!(revoked.park.park(&lower));
        assert!(!closed.park.park(&lower));
    }

    #[tokio::test]
    async fn a_write_the_socket_takes_in_part_leaves_its_tail_to_the_connection() {
        let (lower, head) = (snap(10, 10, &[]), snap(11, 11, &[]));
        let s = stream_with(5, 100);
        assert!(s.park.park(&lower));
        run(
            delivery(&lower, &head, vec![msg(1, 10)], &[&s]),
            &Arc::new(Metrics::default()),
        )
        .await;
        assert!(s.park.has_rest(), "the socket took it all");
        assert!(woken(&s.notify), "the stream must write the tail");
        assert_eq!(s.park.unpark(), Some(head.clone()));
        assert!(!s.park.park(&head), "parked with a tail unwritten");
        // As the connection does: the tail, then whatever comes next.
        let rest = s.park.take_rest();
        assert_eq!(
            format!("{}{}", s.sink.take(), String::from_utf8_lossy(&rest)),
            "stream 10:10:..11:11:: 1;"
        );
        assert!(s.park.park(&head));
    }

    #[tokio::test]
    async fn a_parked_poll_gets_its_whole_answer_and_is_counted_out() {
        let (lower, head) = (snap(10, 10, &[]), snap(13, 13, &[]));
        let rows = vec![msg(1, 10), msg(2, 11), msg(3, 12)];
        let p = poll();
        // Has seen txid 10: due the other two.
        let seen10 = snap(11, 11, &[]);
        let variant = PollForm {
            limit: 100,
            variant: Some(Bytes::from_static(b"https://a.example")),
        };
        assert!(p.park.park_poll(&seen10, variant));
        let metrics = Arc::new(Metrics::default());
        metrics.waiting_polls.store(1, Relaxed);
        let mut d = delivery(&lower, &head, rows, &[&p]);
        // A NOTIFY came after the catch-up began.
        d.beyond = true;
        run(d, &metrics).await;

        assert_eq!(
            p.sink.take(),
            "poll https://a.example 13:13:: 2,3 more=true;"
        );
        assert!(!woken(&p.notify), "an answered poll is not woken");
        assert_eq!(metrics.waiting_polls.load(Relaxed), 0);
        assert_eq!(metrics.poll_direct_answers.load(Relaxed), 1);
        assert_eq!(metrics.polls_answered_from_memory.load(Relaxed), 1);
        // Over: it cannot park again before the next request, and its own
        // task learns it was answered.
        assert!(!p.park.park_poll(&head, form(100)));
        assert!(p.park.unpark_poll());
        assert_eq!(
            p.park.finish_request().map(|(_, rest)| rest),
            Some(Bytes::new())
        );
        assert!(p.park.park_poll(&head, form(100)), "the next request parks");
    }

    #[tokio::test]
    async fn polls_it_cannot_answer_are_woken_and_keep_their_request() {
        let (lower, head) = (snap(10, 10, &[]), snap(12, 12, &[]));
        let rows = vec![msg(1, 10), msg(2, 11)];
        // Due two rows, takes one: pages itself.
        let small = poll();
        assert!(small.park.park_poll(&lower, form(1)));
        // Its client sent more while it waited: taken back.
        let input = poll();
        assert!(input.park.park_poll(&lower, form(100)));
        assert!(!input.park.input_arrived());
        assert!(
            !input.park.park_poll(&lower, form(100)),
            "parks again after input"
        );
        // Parked before the catch-up's lower snapshot.
        let older = poll();
        assert!(older.park.park_poll(&snap(9, 9, &[]), form(100)));
        // Its user's access changed while it waited.
        let revoked = poll();
        assert!(revoked.park.park_poll(&lower, form(100)));
        revoked.park.revoke();
        let metrics = Arc::new(Metrics::default());
        let all = [&small, &input, &older, &revoked];
        run(delivery(&lower, &head, rows, &all), &metrics).await;
        for (name, p) in [
            ("small", &small),
            ("input", &input),
            ("older", &older),
            ("revoked", &revoked),
        ] {
            assert!(woken(&p.notify), "{name}");
            assert_eq!(p.sink.take(), "", "{name}");
            assert!(!p.park.unpark_poll(), "{name}: answered");
            assert_eq!(p.park.finish_request(), None, "{name}");
        }
        assert_eq!(metrics.poll_direct_answers.load(Relaxed), 0);
        // A revoked poll parks again only once it has checked its access.
        assert!(!revoked.park.park_poll(&lower, form(100)));
        revoked.park.checking();
        assert!(revoked.park.park_poll(&lower, form(100)));
    }

    /// What the poll would answer itself: no more than one answer's bytes
    /// of messages (a single larger message alone).
    #[tokio::test]
    async fn a_poll_due_more_than_one_answer_holds_is_woken_to_page_itself() {
        let (lower, head) = (snap(10, 10, &[]), snap(12, 12, &[]));
        let rows = vec![msg(1, 10), msg(2, 11)];
        let bytes: usize = rows.iter().map(|m| m.json.len() + 1).sum();
        let encode: Arc<dyn Encode> = Arc::new(Names);
        let metrics = Arc::new(Metrics::default());
        for (budget, answered) in [(bytes - 1, false), (bytes, true), (1, false)] {
            let p = poll();
            assert!(p.park.park_poll(&lower, form(100)));
            let ctx = Ctx {
                origin: ORIGIN,
                answer_bytes: budget,
                metrics: &metrics,
                encode: &encode,
            };
            deliver(vec![delivery(&lower, &head, rows.clone(), &[&p])], &ctx).await;
            assert_eq!(!p.sink.take().is_empty(), answered, "budget {budget}");
            assert_eq!(woken(&p.notify), !answered, "budget {budget}");
        }
        // One message larger than the budget goes alone.
        let p = poll();
        assert!(p.park.park_poll(&snap(11, 11, &[]), form(100)));
        let ctx = Ctx {
            origin: ORIGIN,
            answer_bytes: 1,
            metrics: &metrics,
            encode: &encode,
        };
        deliver(vec![delivery(&lower, &head, rows, &[&p])], &ctx).await;
        assert!(!p.sink.take().is_empty());
    }

    #[tokio::test]
    async fn a_poll_answer_the_socket_takes_in_part_leaves_its_tail() {
        let (lower, head) = (snap(10, 10, &[]), snap(11, 11, &[]));
        let p = poll_with(4);
        assert!(p.park.park_poll(&lower, form(100)));
        let metrics = Arc::new(Metrics::default());
        run(delivery(&lower, &head, vec![msg(1, 10)], &[&p]), &metrics).await;
        assert!(woken(&p.notify), "the connection must write the tail");
        assert!(p.park.unpark_poll(), "answered, in part");
        let (_, rest) = p.park.finish_request().expect("answered");
        assert_eq!(
            format!("{}{}", p.sink.take(), String::from_utf8_lossy(&rest)),
            "poll - 11:11:: 1 more=false;"
        );
        assert_eq!(metrics.poll_direct_answers.load(Relaxed), 1);
    }
}
