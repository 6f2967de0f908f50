//! The edge's half of the listener's direct writes
//! ([`crate::delivery::park`]): sockets as [`Wire`]s, and the bytes of a
//! parked stream's events and of a parked poll's answer, built by the same
//! functions the stream and the poll use for their own.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper::header::HeaderValue;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use super::cors::Cors;
use super::h1::codec;
use super::{events, poll};
use crate::cursor::{Cursor, Lower, Origin, Position, Snapshot};
use crate::delivery::park::{Encode, Wire};
use crate::message::StoredMessage;

impl Wire for TcpStream {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl Wire for OwnedWriteHalf {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        OwnedWriteHalf::try_write(self, buf)
    }
}

/// Builds what a parked stream or poll is due as the lean connection would
/// write it: chunked event frames, or a whole keep-alive answer with the
/// CORS headers for the poll's `Origin` (its park's variant).
pub(crate) struct Frames {
    pub(crate) cors: Cors,
}

impl Encode for Frames {
    fn stream_page(
        &self,
        origin: Origin,
        at: &Arc<Snapshot>,
        head: &Arc<Snapshot>,
        rows: &[Arc<StoredMessage>],
    ) -> Bytes {
        let lower = Lower::Snapshot(at.clone());
        let next = Position::At(head.clone());
        let mut out = BytesMut::new();
        events::push_messages(&mut out, origin, Some((&lower, head)), &next, rows);
        codec::frame_chunk(&out)
    }

    fn poll_answer(
        &self,
        origin: Origin,
        head: &Arc<Snapshot>,
        rows: &[Arc<StoredMessage>],
        has_more: bool,
        variant: Option<&Bytes>,
    ) -> Option<Bytes> {
        let mut answer = poll::answer(rows, &Cursor::at(origin, head.clone()), has_more);
        let request_origin = variant.and_then(|v| HeaderValue::from_maybe_shared(v.clone()).ok());
        self.cors
            .apply(request_origin.as_ref(), answer.headers_mut());
        codec::answer_bytes(answer).map(Bytes::from)
    }
}
