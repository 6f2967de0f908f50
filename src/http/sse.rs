//! The one writer of Server-Sent Events frames (the `text/event-stream`
//! format of the WHATWG HTML standard, §9.2).
//!
//! Every event hark sends — `retry`, `reset`, `ready`, `message`, `typing`,
//! the `: ping` comment — is appended here, by the stream handler and by
//! the listener's direct writes to parked streams alike: a stream that
//! resumes from any event's `id` relies on both writing the same bytes.
//!
//! Appending to a caller's buffer, rather than building an event value,
//! keeps a fan-out to thousands of streams free of allocations per event.
//! A field value never holds a line break: `data` is split into one
//! `data:` line per line (a Message's JSON is one line, so this is a scan),
//! and a line break in `event` or `id`, which the format cannot carry, is
//! dropped with what follows it.

use bytes::BytesMut;

/// `retry: <ms>`, the reconnection delay a browser uses.
pub(crate) fn push_retry(out: &mut BytesMut, ms: u64) {
    out.extend_from_slice(b"retry: ");
    out.extend_from_slice(ms.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// `event: <event>`, an optional `id: <id>`, and `data`.
pub(crate) fn push_event(out: &mut BytesMut, event: &str, id: Option<&str>, data: &[u8]) {
    out.reserve(event.len() + id.map_or(0, str::len) + data.len() + 32);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(one_line(event.as_bytes()));
    out.extend_from_slice(b"\n");
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(one_line(id.as_bytes()));
        out.extend_from_slice(b"\n");
    }
    if memchr::memchr2(b'\n', b'\r', data).is_none() {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\n");
    } else {
        for line in lines(data) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.extend_from_slice(b"\n");
        }
    }
    out.extend_from_slice(b"\n");
}

/// A comment line (`: <text>`), which clients ignore: the idle ping.
pub(crate) fn push_comment(out: &mut BytesMut, text: &str) {
    out.extend_from_slice(b": ");
    out.extend_from_slice(one_line(text.as_bytes()));
    out.extend_from_slice(b"\n\n");
}

/// The part of `v` before its first line break.
fn one_line(v: &[u8]) -> &[u8] {
    match memchr::memchr2(b'\n', b'\r', v) {
        Some(i) => &v[..i],
        None => v,
    }
}

/// The lines of `data` as the format reads them: split at CRLF, LF or CR.
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr2(b'\n', b'\r', r) {
            None => {
                rest = None;
                Some(r)
            }
            Some(i) => {
                let skip = if r[i] == b'\r' && r.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&r[i + skip..]);
                Some(&r[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut out = BytesMut::new();
        f(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn events_are_written_byte_for_byte() {
        assert_eq!(text(|o| push_retry(o, 2000)), "retry: 2000\n\n");
        assert_eq!(
            text(|o| push_event(o, "message", Some("AbC-_1"), br#"{"id":7}"#)),
            "event: message\nid: AbC-_1\ndata: {\"id\":7}\n\n"
        );
        assert_eq!(
            text(|o| push_event(o, "typing", None, br#"{"room":1}"#)),
            "event: typing\ndata: {\"room\":1}\n\n"
        );
        assert_eq!(text(|o| push_comment(o, "ping")), ": ping\n\n");
    }

    #[test]
    fn data_with_line_breaks_becomes_one_data_line_per_line() {
        assert_eq!(
            text(|o| push_event(o, "x", None, b"a\nb\r\nc\rd")),
            "event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(
            text(|o| push_event(o, "x", None, b"a\n")),
            "event: x\ndata: a\ndata: \n\n"
        );
        assert_eq!(
            text(|o| push_event(o, "x", None, b"")),
            "event: x\ndata: \n\n"
        );
    }

    #[test]
    fn a_line_break_cannot_smuggle_a_field_through_event_or_id() {
        assert_eq!(
            text(|o| push_event(o, "message\ndata: forged", Some("1\nevent: x"), b"{}")),
            "event: message\nid: 1\ndata: {}\n\n"
        );
        assert_eq!(text(|o| push_comment(o, "p\n\nevent: x")), ": p\n\n");
    }
}
