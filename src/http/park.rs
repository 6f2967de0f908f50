//! Parked event streams and polls: a catch-up's rows written by the
//! listener's task straight to the sockets of idle streams and waiting
//! polls, with no task wake-up for each (DESIGN §8).
//!
//! An idle stream on a lean HTTP/1.1 connection ([`super::lean`])
//! that watches one room *parks*: it leaves its position here and waits.
//! After a catch-up the hub hands [`deliver`] each room's new rows with the
//! room's parked streams. The events for one position are built once and
//! written to every stream parked there with one non-blocking write, which
//! moves that stream's parked position on. Whatever cannot be done so — a
//! socket that takes nothing, a position outside the catch-up's range, a
//! membership change not yet checked, a page over the backlog bound — is
//! left to the stream, which is woken as it would be without parking.
//!
//! Exactly once: the position and the right to write change hands under
//! the park's lock. The listener writes only to a parked stream and moves
//! its position in the same critical section; the stream takes its
//! position back (unparks) before it writes anything itself, and parks only
//! when everything due has been written. The tail of a write the socket
//! took only part of stays here, and the connection writes it before
//! anything else.
//!
//! A waiting long poll on a lean connection parks too (DESIGN §8): the
//! listener writes its whole answer — the one the poll would have written
//! — and the connection takes note lazily, when its client sends the next
//! request (or goes away, or the poll's own timer fires). One answer per
//! request: the right to answer changes hands under the park's lock, as a
//! stream's position does.

use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use hyper::header::HeaderValue;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::cors::Cors;
use super::events::push_message;
use crate::cursor::{Cursor, Lower, Origin, Position, Snapshot};
use crate::hub::{Delivery, Parked};
use crate::metrics::Metrics;

/// Writes between two yields of the listener's task: a fan-out to many
/// thousands of sockets must not hold a runtime thread for its whole
/// length.
const YIELD_EVERY: usize = 256;
/// Parked streams in one room above which its writes are split over the
/// runtime's threads.
const SPLIT_ABOVE: usize = 512;

/// One stream's, or one lean connection's, parking place.
pub struct Park {
    state: Mutex<State>,
}

/// The socket a park writes to: an event stream's own, or the write half
/// of a lean connection serving requests, whose loop keeps the read half.
#[derive(Clone)]
enum Wire {
    Whole(Arc<TcpStream>),
    Half(Arc<OwnedWriteHalf>),
}

impl Wire {
    fn socket(&self) -> &TcpStream {
        match self {
            Wire::Whole(s) => s,
            Wire::Half(h) => (**h).as_ref(),
        }
    }
}

/// What a waiting poll's own answer would depend on besides the rows.
pub struct PollForm {
    pub limit: usize,
    /// The request's `Origin`, for the CORS headers.
    pub origin: Option<HeaderValue>,
}

#[derive(Default)]
struct State {
    /// Set while the stream (or poll) is parked: every row visible in it
    /// has been written to the socket.
    at: Option<Arc<Snapshot>>,
    /// None once the connection is ending.
    sock: Option<Wire>,
    /// Set while a waiting poll is parked; None for a stream.
    poll: Option<PollForm>,
    /// When the listener answered the request in flight; the connection
    /// has not taken note yet.
    answered: Option<Instant>,
    /// The client sent more while its request was in flight: an answer
    /// written here could go unnoticed behind that input, so the poll
    /// answers itself.
    input: bool,
    /// A membership change of the room was heard and the stream has not
    /// checked it yet: nothing is written for it here meanwhile.
    stale: bool,
    /// The part of a direct write the socket did not take.
    rest: Bytes,
}

impl Park {
    pub fn new(sock: Arc<TcpStream>) -> Arc<Park> {
        Park::with(Wire::Whole(sock))
    }

    /// A lean connection's park, for the polls it serves one at a time.
    pub fn for_requests(sock: Arc<OwnedWriteHalf>) -> Arc<Park> {
        Park::with(Wire::Half(sock))
    }

    fn with(wire: Wire) -> Arc<Park> {
        Arc::new(Park {
            state: Mutex::new(State {
                sock: Some(wire),
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
    pub fn checking(&self) {
        self.lock().stale = false;
    }

    /// Parks the stream at `at`. False (not parked) when a membership
    /// change is unchecked, a tail is unwritten, or the connection ends.
    pub fn park(&self, at: &Arc<Snapshot>) -> bool {
        let mut st = self.lock();
        if st.stale || !st.rest.is_empty() || st.sock.is_none() {
            return false;
        }
        st.at = Some(at.clone());
        true
    }

    /// Takes the stream's position back, moved on by whatever was written
    /// while it was parked. None when it was not parked.
    pub fn unpark(&self) -> Option<Arc<Snapshot>> {
        self.lock().at.take()
    }

    /// Parks a waiting poll at `at`. False (not parked) when a change of
    /// its user's access is unchecked, the client sent more, the request
    /// was answered already, or the connection ends.
    pub fn park_poll(&self, at: &Arc<Snapshot>, form: PollForm) -> bool {
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
    pub fn unpark_poll(&self) -> bool {
        let mut st = self.lock();
        st.at = None;
        st.poll = None;
        st.answered.is_some()
    }

    /// The client sent bytes while its request was in flight. True when
    /// the listener answered that request; otherwise a parked poll is
    /// taken back, and no poll parks until the next request.
    pub fn input_arrived(&self) -> bool {
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
    pub fn finish_request(&self) -> Option<(Instant, Bytes)> {
        let mut st = self.lock();
        st.input = false;
        let at = st.answered.take()?;
        Some((at, std::mem::take(&mut st.rest)))
    }

    /// A direct write was cut short: the connection must write this first.
    pub fn take_rest(&self) -> Bytes {
        std::mem::take(&mut self.lock().rest)
    }

    pub fn has_rest(&self) -> bool {
        !self.lock().rest.is_empty()
    }

    /// The room's membership changed: write nothing until the stream has
    /// checked it (the hub wakes the stream too).
    pub fn revoke(&self) {
        self.lock().stale = true;
    }

    /// The connection is ending: no more writes, and the socket is the
    /// connection's alone again.
    pub fn close(&self) {
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
    /// None for streams; for polls, the `Origin` their answers are for.
    poll: Option<Option<HeaderValue>>,
    /// Rows in it, for each parked one's limit.
    rows: usize,
    /// Framed for the wire; None when such streams must see to it
    /// themselves.
    bytes: Option<Bytes>,
}

/// What every write of one catch-up shares.
pub struct Ctx<'a> {
    pub origin: Origin,
    pub metrics: &'a Arc<Metrics>,
    pub cors: &'a Cors,
}

/// Writes each delivery's rows to its parked streams and polls, and wakes
/// every one that could not be served so. Runs on the listener's task
/// after the catch-up that read the rows and returns when every write is
/// done, before the next catch-up starts, so writes to one stream are in
/// catch-up order. A large room is split over the runtime's threads: one
/// thread alone spends as long on the kernel's side of the writes as the
/// whole runtime does waking each stream's task.
pub async fn deliver(deliveries: Vec<Delivery>, ctx: &Ctx<'_>) {
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
                let (origin, metrics, cors) = (ctx.origin, ctx.metrics.clone(), ctx.cors.clone());
                let range = i * per..((i + 1) * per).min(d.parked.len());
                tokio::spawn(async move {
                    let ctx = Ctx {
                        origin,
                        metrics: &metrics,
                        cors: &cors,
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
        (Some(form), _) => (form.limit, Some(&form.origin)),
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
    let written = match sock.socket().try_write(bytes) {
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
/// catch-up's rows not visible in `at`, framed as events or as a poll's
/// whole answer. Valid only when `at` lies between the catch-up's lower
/// snapshot and its head — then the rows due are exactly those, and the
/// next position is the head — and when something is due.
fn build(
    d: &Delivery,
    at: &Arc<Snapshot>,
    poll: Option<&Option<HeaderValue>>,
    ctx: &Ctx<'_>,
) -> Page {
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
    if let Some(origin) = poll {
        let cursor = Cursor::at(ctx.origin, d.head.clone());
        let answer = super::poll::answer(&due, &cursor, d.beyond);
        page.bytes = super::lean::answer_bytes(answer, ctx.cors, origin.as_ref()).map(Bytes::from);
        return page;
    }
    let mut events = BytesMut::new();
    for (i, row) in due.iter().enumerate() {
        // The same ids a stream reading this page itself would write
        // (`reader::Page::position_after`).
        let position = if i + 1 < due.len() {
            Position::Paging {
                lower: Lower::Snapshot(at.clone()),
                upper: d.head.clone(),
                after_id: row.id,
            }
        } else {
            Position::At(d.head.clone())
        };
        let id = Cursor {
            origin: ctx.origin,
            position,
        }
        .encode();
        push_message(&mut events, &id, &row.json);
    }
    page.bytes = Some(frame_chunk(&events));
    page
}

/// `data` as one HTTP/1.1 chunk.
pub fn frame_chunk(data: &[u8]) -> Bytes {
    let mut c = Vec::with_capacity(data.len() + 12);
    let _ = write!(c, "{:x}\r\n", data.len());
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Lag, Parked};
    use crate::message::{Message, StoredMessage, User};
    use chrono::Utc;
    use futures::FutureExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;
    use tokio::time::Instant;

    const ORIGIN: Origin = Origin {
        system_id: 7,
        timeline: 1,
    };

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(xmin, xmax, xip.to_vec()).unwrap())
    }

    fn msg(id: i64, txid: u64, content: String) -> Arc<StoredMessage> {
        let m = Message {
            id,
            room: 1,
            sender: User {
                id: 2,
                username: "bob".into(),
                first_name: String::new(),
                last_name: String::new(),
            },
            content,
            created_at: Utc::now(),
        };
        Arc::new(StoredMessage::new(&m, txid))
    }

    /// A loopback connection: the server side (what a park writes to) and
    /// the client side.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Arc::new(server), client)
    }

    struct Stream {
        park: Arc<Park>,
        notify: Arc<Notify>,
        lag: Arc<Lag>,
        client: TcpStream,
    }

    async fn stream() -> Stream {
        let (server, client) = pair().await;
        Stream {
            park: Park::new(server),
            notify: Arc::new(Notify::new()),
            lag: Lag::new(100, None),
            client,
        }
    }

    /// A stream or a poll, as the hub lists it in a delivery.
    trait Parkable {
        fn parked(&self) -> Parked;
    }

    impl Parkable for Stream {
        fn parked(&self) -> Parked {
            Parked {
                park: self.park.clone(),
                notify: self.notify.clone(),
                lag: Some(self.lag.clone()),
            }
        }
    }

    fn delivery<T: Parkable>(
        lower: &Arc<Snapshot>,
        head: &Arc<Snapshot>,
        rows: Vec<Arc<StoredMessage>>,
        parked: &[&T],
    ) -> Delivery {
        Delivery {
            lower: lower.clone(),
            head: head.clone(),
            rows,
            heard: Instant::now(),
            beyond: false,
            parked: parked.iter().map(|p| p.parked()).collect(),
        }
    }

    /// What a stream reading the same rows after `at` writes itself.
    fn expected(at: &Arc<Snapshot>, head: &Arc<Snapshot>, rows: &[&Arc<StoredMessage>]) -> Bytes {
        let mut events = BytesMut::new();
        for (i, row) in rows.iter().enumerate() {
            let position = if i + 1 < rows.len() {
                Position::Paging {
                    lower: Lower::Snapshot(at.clone()),
                    upper: head.clone(),
                    after_id: row.id,
                }
            } else {
                Position::At(head.clone())
            };
            let id = Cursor {
                origin: ORIGIN,
                position,
            }
            .encode();
            push_message(&mut events, &id, &row.json);
        }
        frame_chunk(&events)
    }

    async fn run(d: Delivery, metrics: &Arc<Metrics>) {
        let cors = Cors::new(None);
        let ctx = Ctx {
            origin: ORIGIN,
            metrics,
            cors: &cors,
        };
        deliver(vec![d], &ctx).await;
    }

    fn woken(n: &Notify) -> bool {
        n.notified().now_or_never().is_some()
    }

    fn nothing_to_read(c: &TcpStream) -> bool {
        let mut b = [0u8; 16];
        matches!(c.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    #[tokio::test]
    async fn a_parked_stream_gets_exactly_the_rows_it_does_not_see_and_moves_to_the_head() {
        let lower = snap(10, 10, &[]);
        let head = snap(13, 13, &[]);
        let rows = vec![
            msg(1, 10, "a".into()),
            msg(2, 11, "b".into()),
            msg(3, 12, "c".into()),
        ];
        // Two streams parked at different positions inside the range: one
        // at the catch-up's lower snapshot, one that has seen txid 10.
        let mut s1 = stream().await;
        let mut s2 = stream().await;
        assert!(s1.park.park(&lower));
        let seen10 = snap(11, 11, &[]);
        assert!(s2.park.park(&seen10));
        let metrics = Arc::new(Metrics::default());
        let d = delivery(&lower, &head, rows.clone(), &[&s1, &s2]);
        run(d, &metrics).await;

        for (s, at, due) in [
            (&mut s1, &lower, vec![&rows[0], &rows[1], &rows[2]]),
            (&mut s2, &seen10, vec![&rows[1], &rows[2]]),
        ] {
            let want = expected(at, &head, &due);
            let mut got = vec![0u8; want.len()];
            s.client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want);
            assert!(nothing_to_read(&s.client));
            assert_eq!(s.park.unpark(), Some(head.clone()));
            assert!(!woken(&s.notify), "served streams are not woken");
        }
        assert_eq!(metrics.stream_direct_writes.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn streams_it_cannot_serve_are_woken_and_nothing_is_written_for_them() {
        let lower = snap(10, 10, &[]);
        let head = snap(12, 12, &[]);
        let rows = vec![msg(1, 10, "a".into()), msg(2, 11, "b".into())];

        let not_parked = stream().await;
        // A membership change heard after its check: even parked, it is
        // not written to.
        let revoked = stream().await;
        revoked.park.checking();
        assert!(revoked.park.park(&lower));
        revoked.park.revoke();
        // Parked before the catch-up's lower snapshot: rows of an earlier
        // catch-up may be due too, which this delivery does not carry.
        let older = stream().await;
        let old = snap(9, 9, &[]);
        assert!(older.park.park(&old));
        // Due more than its backlog bound allows in one page.
        let mut bounded = stream().await;
        bounded.lag = Lag::new(1, None);
        assert!(bounded.park.park(&lower));
        // Already sees every row (parked at the head): nothing to write.
        let current = stream().await;
        assert!(current.park.park(&head));

        let all = [&not_parked, &revoked, &older, &bounded, &current];
        let d = delivery(&lower, &head, rows, &all);
        run(d, &Arc::new(Metrics::default())).await;
        for (name, s, at) in [
            ("not parked", &not_parked, None),
            ("revoked", &revoked, Some(&lower)),
            ("older", &older, Some(&old)),
            ("bounded", &bounded, Some(&lower)),
            ("current", &current, Some(&head)),
        ] {
            assert!(woken(&s.notify), "{name}");
            assert!(nothing_to_read(&s.client), "{name}");
            assert_eq!(s.park.unpark().as_ref(), at, "{name}: position moved");
        }
        // A revoked stream parks again only after checking.
        assert!(!revoked.park.park(&lower));
        revoked.park.checking();
        assert!(revoked.park.park(&lower));
    }

    #[tokio::test]
    async fn a_closed_park_is_not_written_to() {
        let lower = snap(10, 10, &[]);
        let head = snap(11, 11, &[]);
        let s = stream().await;
        assert!(s.park.park(&lower));
        s.park.close();
        assert!(!s.park.park(&lower));
        let d = delivery(&lower, &head, vec![msg(1, 10, "a".into())], &[&s]);
        run(d, &Arc::new(Metrics::default())).await;
        assert!(woken(&s.notify));
        assert!(nothing_to_read(&s.client));
    }

    #[tokio::test]
    async fn a_write_the_socket_takes_in_part_leaves_its_tail_to_the_connection() {
        let lower = snap(10, 10, &[]);
        let head = snap(11, 11, &[]);
        // Far more than a loopback socket buffers while nobody reads.
        let row = msg(1, 10, "x".repeat(16 << 20));
        let mut s = stream().await;
        assert!(s.park.park(&lower));
        let d = delivery(&lower, &head, vec![row.clone()], &[&s]);
        run(d, &Arc::new(Metrics::default())).await;

        assert!(s.park.has_rest(), "the socket took it all");
        assert!(woken(&s.notify), "the stream must write the tail");
        assert_eq!(s.park.unpark(), Some(head.clone()));
        assert!(!s.park.park(&head), "parked with a tail unwritten");
        // As the connection does: the tail, then whatever comes next.
        let rest = s.park.take_rest();
        let wire = s.park.lock().sock.clone().unwrap();
        let sock = wire.socket();
        let want = expected(&lower, &head, &[&row]);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; want.len()];
            s.client.read_exact(&mut got).await.unwrap();
            assert!(got == want, "the bytes on the wire are not the page");
        });
        let mut rest: &[u8] = &rest;
        while !rest.is_empty() {
            sock.writable().await.unwrap();
            if let Ok(n) = sock.try_write(rest) {
                rest = &rest[n..];
            }
        }
        reader.await.unwrap();
    }

    /// A waiting poll parked on a lean connection's write half.
    struct Poll {
        park: Arc<Park>,
        notify: Arc<Notify>,
        client: TcpStream,
        // The connection's read half: the socket stays open with it.
        _rd: tokio::net::tcp::OwnedReadHalf,
    }

    async fn poll_conn() -> Poll {
        let (server, client) = pair().await;
        let server = Arc::try_unwrap(server).unwrap();
        let (rd, wr) = server.into_split();
        Poll {
            park: Park::for_requests(Arc::new(wr)),
            notify: Arc::new(Notify::new()),
            client,
            _rd: rd,
        }
    }

    fn form(limit: usize) -> PollForm {
        PollForm {
            limit,
            origin: None,
        }
    }

    impl Parkable for Poll {
        fn parked(&self) -> Parked {
            Parked {
                park: self.park.clone(),
                notify: self.notify.clone(),
                lag: None,
            }
        }
    }

    /// Reads one whole answer with a Content-Length body.
    async fn read_answer(c: &mut TcpStream) -> (String, serde_json::Value) {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if buf.len() == end + 4 + len {
                return (head, serde_json::from_slice(&buf[end + 4..]).unwrap());
            }
        }
    }

    #[tokio::test]
    async fn a_parked_poll_gets_its_whole_answer_and_is_counted_out() {
        let lower = snap(10, 10, &[]);
        let head = snap(13, 13, &[]);
        let rows = vec![
            msg(1, 10, "a".into()),
            msg(2, 11, "b".into()),
            msg(3, 12, "c".into()),
        ];
        let mut p = poll_conn().await;
        // Has seen txid 10: due the other two.
        let seen10 = snap(11, 11, &[]);
        assert!(p.park.park_poll(&seen10, form(100)));
        let metrics = Arc::new(Metrics::default());
        metrics.waiting_polls.store(1, Relaxed);
        let mut d = delivery(&lower, &head, rows, &[&p]);
        // A NOTIFY came after the catch-up began.
        d.beyond = true;
        run(d, &metrics).await;

        let (h, body) = read_answer(&mut p.client).await;
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(h.contains("cache-control: no-store"), "{h}");
        assert!(!h.contains("connection: close"), "{h}");
        let ids: Vec<i64> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(body["cursor"], Cursor::at(ORIGIN, head.clone()).encode());
        assert_eq!(body["has_more"], true, "a NOTIFY came after the catch-up");
        assert!(nothing_to_read(&p.client));
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
        let lower = snap(10, 10, &[]);
        let head = snap(12, 12, &[]);
        let rows = vec![msg(1, 10, "a".into()), msg(2, 11, "b".into())];
        // Due two rows, takes one: pages itself.
        let small = poll_conn().await;
        assert!(small.park.park_poll(&lower, form(1)));
        // Its client sent more while it waited: taken back.
        let input = poll_conn().await;
        assert!(input.park.park_poll(&lower, form(100)));
        assert!(!input.park.input_arrived());
        assert!(
            !input.park.park_poll(&lower, form(100)),
            "parks again after input"
        );
        // Parked before the catch-up's lower snapshot.
        let older = poll_conn().await;
        assert!(older.park.park_poll(&snap(9, 9, &[]), form(100)));
        // Its room's membership changed while it waited.
        let revoked = poll_conn().await;
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
            assert!(nothing_to_read(&p.client), "{name}");
            assert!(!p.park.unpark_poll(), "{name}: answered");
            assert_eq!(p.park.finish_request(), None, "{name}");
        }
        assert_eq!(metrics.poll_direct_answers.load(Relaxed), 0);
        // A revoked poll parks again only once it has checked its access.
        assert!(!revoked.park.park_poll(&lower, form(100)));
        revoked.park.checking();
        assert!(revoked.park.park_poll(&lower, form(100)));
    }

    #[tokio::test]
    async fn a_poll_answer_the_socket_takes_in_part_leaves_its_tail() {
        let lower = snap(10, 10, &[]);
        let head = snap(11, 11, &[]);
        let p = poll_conn().await;
        assert!(p.park.park_poll(&lower, form(100)));
        let row = msg(1, 10, "x".repeat(16 << 20));
        let metrics = Arc::new(Metrics::default());
        run(delivery(&lower, &head, vec![row], &[&p]), &metrics).await;
        assert!(woken(&p.notify), "the connection must write the tail");
        assert!(p.park.unpark_poll(), "answered, in part");
        let (_, rest) = p.park.finish_request().expect("answered");
        assert!(!rest.is_empty() && rest.len() < 16 << 20);
        assert_eq!(metrics.poll_direct_answers.load(Relaxed), 1);
    }
}
