//! The HTTP/1.1 codec of hark's own connection loop: bytes to a request
//! head and the decision of how its body is framed, a response to head
//! bytes, and chunk framing. Pure functions over buffers, with no I/O and
//! no knowledge of hark's routes; [`super::conn`] drives them.
//!
//! What it serves is the framing RFC 9112 leaves no room to read two ways:
//! `GET`, `HEAD`, `POST` and `OPTIONS` of an origin-form target, with no
//! body or one plain `Content-Length` within the body limit. Anything else
//! — another method, a chunked or oversized body, several or malformed
//! lengths, `Expect` — is [`Head::Hyper`]: the connection goes to hyper,
//! which has the rules for those (docs/DESIGN.md §7 says why they are not
//! refused instead).

use std::io::Write as _;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};

use super::{Body, Refusal};

/// Longest request head (request line, fields and the empty line), and
/// most header fields: the same on hyper's path (`max_header_size` in
/// `http::server::serve`, hyper's default count), so a head gets the same
/// answer on either path.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

pub(crate) const MAX_HEADERS: usize = 100;

/// Whether a connection that starts with these bytes is this module's:
/// a `GET`, `HEAD`, `POST` or `OPTIONS` of an origin-form target. Too few bytes to
/// tell is a no: hyper serves everything.
pub(crate) fn wants_lean(first: &[u8]) -> bool {
    [&b"GET /"[..], b"HEAD /", b"POST /", b"OPTIONS /"]
        .iter()
        .any(|m| first.starts_with(m))
}

/// Bytes [`wants_lean`] needs to see.
pub(crate) const PEEK_LEN: usize = "OPTIONS /".len();

/// Whether the `Connection` header has `option` (`close`, `keep-alive`).
pub(crate) fn has_option(headers: &HeaderMap, option: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|o| o.trim().eq_ignore_ascii_case(option)))
    })
}

/// HTTP/1.1 keeps a connection unless told to close; HTTP/1.0 closes it
/// unless asked to keep it (`ab -k`, for one, asks), as hyper does. A
/// `close` wins over a `keep-alive` beside it.
pub(crate) fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    !has_option(headers, "close")
        && (version == Version::HTTP_11 || has_option(headers, "keep-alive"))
}

/// What a complete request head asks of this module.
// Only ever returned, once per request: boxing the request would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Head {
    /// A request served here, and the lengths of its head and body in the
    /// buffer (the body may not be there yet).
    Lean(Request<()>, usize, usize),
    /// A request for hyper; the buffer holds it from its first byte.
    Hyper,
}

/// The request at the start of `buf`, or None when its head is not
/// complete yet. A body is served here only when one plain Content-Length
/// of at most `max_body` frames it (a body on a GET, HEAD or OPTIONS is
/// read past and left unused).
pub(crate) fn parse_head(buf: &[u8], max_body: u64) -> Result<Option<Head>, Refusal> {
    let bad = |what: &str| Refusal::Malformed(what.to_string());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        // A read may bring more than the limit at once: the head's own
        // length decides, as hyper's `max_header_size` does.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(Refusal::HeadTooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(e) => return Err(bad(&e.to_string())),
    };
    let method = match parsed.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some("OPTIONS") => Method::OPTIONS,
        _ => return Ok(Some(Head::Hyper)),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri: Uri = parsed
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("request target"))?;
    let body_len = match body_length(parsed.headers) {
        // On a GET, HEAD or OPTIONS too: rare, ignored by the handler,
        // but read past, as its length says.
        Some(n) if n <= max_body => n as usize,
        // Anything else has rules hyper knows: a chunked body, a length
        // that is bad, repeated or too large (a handler that reads a body
        // answers 413 there), `Expect`.
        _ => return Ok(Some(Head::Hyper)),
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let map = req.headers_mut();
    map.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("header value"))?;
        map.append(name, value);
    }
    Ok(Some(Head::Lean(req, len, body_len)))
}

/// The body's length when one plain Content-Length gives it (none: 0);
/// None for any other framing, or `Expect`, which waits for an interim
/// answer.
pub(crate) fn body_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let digits = !h.value.is_empty()
                && h.value.len() <= 18
                && h.value.iter().all(u8::is_ascii_digit);
            if length.is_some() || !digits {
                return None;
            }
            length = std::str::from_utf8(h.value).ok()?.parse().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
    }
    Some(length.unwrap_or(0))
}

/// The status line and headers, ending with the framing this module uses.
pub(crate) fn head_bytes(
    resp: &Response<Body>,
    framing: Framing,
    version: Version,
    keep_alive: bool,
) -> Vec<u8> {
    let status = resp.status();
    // Room for a small body too: an answer of known length is sent in one
    // write, its body appended here.
    let body = match framing {
        Framing::Length(n) => n.min(64 * 1024) as usize,
        _ => 0,
    };
    let mut out = Vec::with_capacity(512 + body);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        if name == CONNECTION || name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !resp.headers().contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        push_date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        // RFC 9110 §8.6: never on a 1xx or a 204 (a preflight's answer).
        Framing::Length(_) if status.is_informational() || status == StatusCode::NO_CONTENT => {}
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A keep-alive answer on the wire, head and body: what the connection
/// would write for `resp` (a parked poll's answer, written by the
/// listener). None unless the body is whole already.
pub(crate) fn answer_bytes(mut resp: Response<Body>) -> Option<Vec<u8>> {
    use futures::FutureExt as _;
    let Ok(body) = resp.body_mut().collect().now_or_never()?;
    let body = body.to_bytes();
    let mut out = head_bytes(
        &resp,
        Framing::Length(body.len() as u64),
        Version::HTTP_11,
        true,
    );
    out.extend_from_slice(&body);
    Some(out)
}

/// `data` as one HTTP/1.1 chunk.
pub(crate) fn frame_chunk(data: &[u8]) -> Bytes {
    let mut c = Vec::with_capacity(data.len() + 12);
    let _ = write!(c, "{:x}\r\n", data.len());
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c.into()
}

/// The `Date` value for now (IMF-fixdate), formatted once a second per
/// thread, as hyper does: formatting it for every answer was over 2% of
/// the CPU of a poll answered from memory.
pub(crate) fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const {
            std::cell::RefCell::new((i64::MIN, String::new()))
        };
    }
    let now = Utc::now();
    LAST.with_borrow_mut(|(second, text)| {
        if *second != now.timestamp() {
            *second = now.timestamp();
            text.clear();
            let _ = std::fmt::Write::write_fmt(
                text,
                format_args!("{}", now.format("%a, %d %b %Y %H:%M:%S GMT")),
            );
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[derive(Clone, Copy)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    /// HTTP/1.0 has no chunks: the body ends where the connection does.
    UntilClose,
}

/// The head bytes, body and framing of `resp`, taken apart before any
/// await: an async fn keeps its arguments for its whole life, and the
/// writing's state is part of every idle stream's memory.
/// `keep_alive` holds only for a body of known length, or none at all:
/// the answer to a `HEAD` (`head_only`) is the head a `GET` would get,
/// but for the framing of a body of unknown length, as hyper answers it.
pub(crate) fn prepare(
    resp: Response<Body>,
    version: Version,
    keep_alive: bool,
    head_only: bool,
) -> Prepared {
    let framing = match hyper::body::Body::size_hint(resp.body()).exact() {
        Some(n) => Framing::Length(n),
        // No framing header.
        None if version == Version::HTTP_10 || head_only => Framing::UntilClose,
        None => Framing::Chunked,
    };
    let keep_alive = keep_alive && (head_only || matches!(framing, Framing::Length(_)));
    let head = head_bytes(&resp, framing, version, keep_alive);
    if head_only {
        // An event stream's body is dropped here, and never opens.
        return Prepared {
            head,
            body: Body::default(),
            framing: Framing::Length(0),
            keep_alive,
        };
    }
    Prepared {
        head,
        body: resp.into_body(),
        framing,
        keep_alive,
    }
}

pub(crate) struct Prepared {
    pub(crate) head: Vec<u8>,
    pub(crate) body: Body,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_connections_that_start_with_the_methods_it_serves() {
        for yes in [
            &b"GET /events?access_token=x HTTP/1.1\r\n"[..],
            b"GET /api/chat/messages/poll/?room_id=1 HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\n",
            b"GET /",
            b"POST /api/chat/messages/ HTTP/1.1\r\n",
            b"OPTIONS /api/chat/messages/poll/ HTTP/1.1\r\n",
            b"HEAD /events HTTP/1.1",
        ] {
            assert!(wants_lean(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"GET "[..],
            b"PUT /api/chat/messages/ HTTP/1.1",
            b"POST *",
            b"OPTIONS * HTTP/1.1",
            b"GET http://h/events HTTP/1.1",
            b"",
        ] {
            assert!(!wants_lean(no), "{}", String::from_utf8_lossy(no));
        }
    }

    const MAX_BODY: u64 = 100;

    fn parsed(raw: &str) -> Result<Option<Head>, Refusal> {
        parse_head(raw.as_bytes(), MAX_BODY)
    }

    /// The request, its head's length and its body's.
    fn lean_body(raw: &str) -> (Request<()>, usize, usize) {
        match parsed(raw) {
            Ok(Some(Head::Lean(req, len, body))) => (req, len, body),
            _ => panic!("not served here: {raw:?}"),
        }
    }

    fn lean(raw: &str) -> (Request<()>, usize) {
        let (req, len, body) = lean_body(raw);
        assert_eq!(body, 0, "{raw:?}");
        (req, len)
    }

    #[test]
    fn parses_a_head_and_refuses_malformed_ones() {
        let raw = "GET /events?room_id=3 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: abc\r\n\r\n";
        let (req, len) = lean(raw);
        assert_eq!(len, raw.len());
        assert_eq!(req.uri().path(), "/events");
        assert_eq!(req.uri().query(), Some("room_id=3"));
        assert_eq!(req.headers()["last-event-id"], "abc");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(matches!(
            parsed("GET /events HTTP/1.1\r\nHost: h\r\n"),
            Ok(None)
        ));
        // The head's length leaves a pipelined request in the buffer.
        let first = "GET /healthz HTTP/1.1\r\n\r\n";
        assert_eq!(
            lean(&format!("{first}GET /readyz HTTP/1.1\r\n\r\n")).1,
            first.len()
        );
        assert_eq!(lean("GET / HTTP/1.0\r\n\r\n").0.version(), Version::HTTP_10);
        for bad in [
            "GET /events HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /events HTTP/9.9\r\n\r\n",
        ] {
            assert!(matches!(parsed(bad), Err(Refusal::Malformed(_))), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(matches!(
            parsed(&format!("GET /events HTTP/1.1\r\n{many}\r\n")),
            Err(Refusal::HeadTooLarge)
        ));
    }

    #[test]
    fn a_post_with_one_length_within_the_limit_is_served_here() {
        let head = "POST /api/chat/messages/ HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n";
        let (req, len, body) = lean_body(&format!("{head}{{}}"));
        assert_eq!((req.method(), len, body), (&Method::POST, head.len(), 2));
        // The head is enough: the body may still be on its way.
        assert_eq!(lean_body(head).2, 2);
        let at_limit = format!("POST / HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        assert_eq!(lean_body(&at_limit).2, MAX_BODY as usize);
        lean("POST /api/chat/rooms/1/read/ HTTP/1.1\r\n\r\n");
        lean("POST /api/chat/rooms/1/read/ HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let (req, _) = lean("OPTIONS /api/chat/messages/ HTTP/1.1\r\nOrigin: o\r\n\r\n");
        assert_eq!(req.method(), Method::OPTIONS);
        assert_eq!(
            lean("HEAD /healthz HTTP/1.1\r\n\r\n").0.method(),
            Method::HEAD
        );
    }

    #[test]
    fn other_bodies_and_methods_are_for_hyper() {
        let over = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        for raw in [
            over.as_str(),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            "PUT /api/chat/messages/ HTTP/1.1\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Ok(Some(Head::Hyper))), "{raw:?}");
        }
        // No body, or one plain length on any method served here: read
        // past, as its length says, and ignored by the handler.
        lean("GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        for raw in [
            "GET /events HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "HEAD /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "OPTIONS / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        ] {
            assert_eq!(lean_body(raw).2, 5, "{raw:?}");
        }
    }

    #[test]
    fn close_is_an_option_of_the_connection_header() {
        let of = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_static(v));
            has_option(&h, "close")
        };
        assert!(of("close"));
        assert!(of("keep-alive, Close"));
        assert!(!of("keep-alive"));
        assert!(!of("closed"));
        assert!(!has_option(&HeaderMap::new(), "close"));
    }

    #[test]
    fn http_1_0_keeps_a_connection_only_when_asked() {
        let with = |v: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(CONNECTION, HeaderValue::from_static(v));
            }
            h
        };
        assert!(wants_keep_alive(Version::HTTP_11, &with(None)));
        assert!(wants_keep_alive(
            Version::HTTP_11,
            &with(Some("keep-alive"))
        ));
        assert!(!wants_keep_alive(Version::HTTP_11, &with(Some("close"))));
        assert!(!wants_keep_alive(Version::HTTP_10, &with(None)));
        assert!(wants_keep_alive(
            Version::HTTP_10,
            &with(Some("Keep-Alive"))
        ));
        assert!(!wants_keep_alive(Version::HTTP_10, &with(Some("close"))));
        assert!(!wants_keep_alive(
            Version::HTTP_10,
            &with(Some("keep-alive, close"))
        ));
    }
}

/// The codec fuzzed (proptest, a bounded number of cases per run): no
/// input panics or claims more than it holds; every request it is given in
/// the framing it serves comes back as sent, and a cut head asks for more;
/// every response head it writes parses back; chunks decode to their data.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const MAX_BODY: u64 = 1024;

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z][A-Za-z0-9-]{0,15}"
    }

    /// A request the codec serves: method, target, fields, body.
    fn request() -> impl Strategy<Value = (String, String, Vec<(String, String)>, Vec<u8>)> {
        (
            prop::sample::select(vec!["GET", "HEAD", "POST", "OPTIONS"]),
            "/[A-Za-z0-9/._~-]{0,40}(\\?[A-Za-z0-9=&%._~-]{0,40})?",
            prop::collection::vec((token(), "[ -~]{0,30}"), 0..12),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(m, t, fields, body)| {
                let fields = fields
                    .into_iter()
                    .filter(|(k, _)| {
                        !["content-length", "transfer-encoding", "expect"]
                            .contains(&k.to_ascii_lowercase().as_str())
                    })
                    .map(|(k, v)| (k, v.trim().to_string()))
                    .collect();
                (m.to_string(), t, fields, body)
            })
    }

    fn wire(method: &str, target: &str, fields: &[(String, String)], body: &[u8]) -> Vec<u8> {
        let mut out = format!("{method} {target} HTTP/1.1\r\n");
        for (k, v) in fields {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn no_input_panics_or_claims_more_than_it_holds(
            bytes in prop::collection::vec(any::<u8>(), 0..4096)
        ) {
            if let Ok(Some(Head::Lean(_, head, body))) = parse_head(&bytes, MAX_BODY) {
                prop_assert!(head <= bytes.len() && head <= MAX_HEAD);
                prop_assert!(body as u64 <= MAX_BODY);
            }
        }

        /// Requests the codec serves, with bytes changed, inserted or cut
        /// (the characters HTTP framing turns on among them).
        #[test]
        fn a_mangled_request_never_panics_or_claims_more_than_it_holds(
            (method, target, fields, body) in request(),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), prop::sample::select(
                    b"\r\n: \t\0\x7f0123456789,;=-abcXYZ\xff".to_vec()
                ), 0u8..3),
                1..8,
            ),
        ) {
            let mut bytes = wire(&method, &target, &fields, &body);
            for (at, b, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = b,
                    1 => bytes.insert(i, b),
                    _ => bytes.truncate(i),
                }
            }
            if let Ok(Some(Head::Lean(_, head, body))) = parse_head(&bytes, MAX_BODY) {
                prop_assert!(head <= bytes.len() && head <= MAX_HEAD);
                prop_assert!(body as u64 <= MAX_BODY);
            }
        }

        #[test]
        fn a_request_in_the_framing_it_serves_comes_back_as_sent(
            (method, target, fields, body) in request()
        ) {
            let bytes = wire(&method, &target, &fields, &body);
            let head_len = bytes.len() - body.len();
            match parse_head(&bytes, MAX_BODY) {
                Ok(Some(Head::Lean(req, head, body_len))) => {
                    prop_assert_eq!(req.method().as_str(), method.as_str());
                    prop_assert_eq!(req.uri().to_string(), target);
                    prop_assert_eq!((head, body_len), (head_len, body.len()));
                    for (k, v) in &fields {
                        let got: Vec<_> = req.headers().get_all(k.as_str()).iter().collect();
                        prop_assert!(got.iter().any(|g| g.as_bytes() == v.as_bytes()), "{k}");
                    }
                }
                Ok(Some(Head::Hyper)) => prop_assert!(false, "handed to hyper"),
                Ok(None) => prop_assert!(false, "not complete"),
                Err(e) => prop_assert!(false, "refused: {e:?}"),
            }
            // Cut anywhere in the head: not a request yet.
            for cut in [0, head_len / 2, head_len - 1] {
                prop_assert!(matches!(parse_head(&bytes[..cut], MAX_BODY), Ok(None)));
            }
        }

        /// Whatever the declared length, a body over the limit is hyper's
        /// (413), and one within it is read by its length.
        #[test]
        fn the_body_limit_holds_for_any_declared_length(
            (method, target, fields, _) in request(),
            len in prop_oneof![0u64..2 * MAX_BODY, any::<u64>()],
        ) {
            let mut bytes = wire(&method, &target, &fields, &[]);
            let at = bytes.len() - 2;
            bytes.splice(at..at, format!("Content-Length: {len}\r\n").into_bytes());
            match parse_head(&bytes, MAX_BODY) {
                Ok(Some(Head::Lean(_, _, body))) => {
                    prop_assert!(len <= MAX_BODY, "{len} served here");
                    prop_assert_eq!(body as u64, len);
                }
                Ok(Some(Head::Hyper)) => prop_assert!(len > MAX_BODY),
                other => prop_assert!(false, "{:?}", other.err()),
            }
        }

        #[test]
        fn a_response_head_parses_back(
            status in 200u16..600,
            fields in prop::collection::vec((token(), "[!-~]{1,30}"), 0..10),
            len in 0u64..100_000,
            keep_alive in any::<bool>(),
        ) {
            let mut resp = Response::new(Body::default());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in &fields {
                resp.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let bytes = head_bytes(&resp, Framing::Length(len), Version::HTTP_11, keep_alive);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            prop_assert_eq!(parsed.parse(&bytes).unwrap(), httparse::Status::Complete(bytes.len()));
            prop_assert_eq!(parsed.code, Some(status));
            let lengths: Vec<_> = parsed
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .collect();
            let bodiless = status == 204 || (100..200).contains(&status);
            prop_assert_eq!(lengths.len(), usize::from(!bodiless));
        }

        #[test]
        fn a_chunk_decodes_to_its_data(data in prop::collection::vec(any::<u8>(), 0..5000)) {
            let chunk = frame_chunk(&data);
            let crlf = chunk.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&chunk[..crlf]).unwrap(), 16).unwrap();
            prop_assert_eq!(size, data.len());
            prop_assert_eq!(&chunk[crlf + 2..crlf + 2 + size], &data[..]);
            prop_assert_eq!(&chunk[crlf + 2 + size..], b"\r\n");
        }
    }
}
