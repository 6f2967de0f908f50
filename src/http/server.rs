//! The accept loop and its limits, and each connection to its end: on
//! hark's own HTTP/1.1 ([`super::h1`]) while its requests are ones it
//! serves, on hyper's otherwise; shutdown drains them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::error::ApiError;
use super::h1::{self, codec, ConnectionKill};
use super::log::Seen;
use super::replay::Replay;
use super::shared::Shared;
use super::{router, send_timeout, Body};
use crate::shutdown::Shutdown;

/// Time a client has to send its request head (slowloris guard): the
/// first from when its connection is accepted, each later one from when
/// the connection waits for it.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for connections that are not polls or streams.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(2500);

/// One request: route, turn errors into responses, add CORS, log a line.
async fn handle(app: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let seen = Seen::new(&req);
    let result = router::route(&app, req).await;
    Ok(seen.finish(&app, result))
}

/// Accepts connections until shutdown, then drains. Long polls and event
/// streams finish themselves on the same signal; everything else gets
/// DRAIN_TIMEOUT.
pub(crate) async fn serve(app: Arc<Shared>, listener: TcpListener, mut shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(app.config.max_connections as usize));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        // `max_buf_size` alone is no head limit: a read fills the buffer's
        // spare room, and heads of up to 128 KiB got through.
        .max_header_size(codec::MAX_HEAD)
        .max_buf_size(codec::MAX_HEAD);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => { backoff = Duration::from_millis(5); a }
                Err(e) => {
                    // EMFILE and friends: keep serving those already here.
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let first_deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let _ = stream.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let app = app.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    app.metrics.connection_opened();
                    serve_connection(&app, stream, first_deadline, &builder, watcher).await;
                    app.metrics.connection_closed();
                    drop(permit);
                });
            }
            Err(_) => {
                app.metrics.rejected_connections.fetch_add(1, Relaxed);
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    // Through Seen like any answer: a browser must be
                    // able to read the 503 (CORS), and it is logged.
                    service_fn({
                        let app = app.clone();
                        move |req| {
                            let seen = Seen::new(&req);
                            let mut resp = seen.finish(
                                &app,
                                Err(ApiError::Unavailable {
                                    message: "Too many connections; try again shortly",
                                    retry_after_s: 1,
                                }),
                            );
                            resp.headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                            std::future::ready(Ok::<_, Infallible>(resp))
                        }
                    }),
                );
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
                });
            }
        }
    }
    drop(listener);
    // Streams on the lean path are not hyper's to watch; they end
    // themselves on the same signal and return their permits.
    let all_closed = async {
        graceful.shutdown().await;
        let _ = limit.acquire_many(app.config.max_connections).await;
    };
    tokio::select! {
        _ = all_closed => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
    }
}

/// One accepted connection, to the end: on hark's own HTTP/1.1
/// ([`h1`]) while its requests are ones the codec serves (GET, HEAD, POST
/// and OPTIONS with no body or one plain Content-Length), hyper's
/// otherwise. Its first request head must
/// arrive by `first_deadline` on either path: the wait for the first byte
/// counts towards it.
async fn serve_connection(
    app: &Arc<Shared>,
    mut stream: tokio::net::TcpStream,
    first_deadline: Instant,
    builder: &http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let mut first = [0u8; codec::PEEK_LEN];
    let peeked = tokio::time::timeout_at(first_deadline, stream.peek(&mut first)).await;
    let n = match peeked {
        Ok(Ok(n)) if n > 0 => n,
        // Silence, a reset or end of stream before a byte: nothing to answer.
        _ => return,
    };
    // The request loop, hyper's connection and the stream are awaited in
    // place: never live at once, they share the task's room, so a waiting
    // poll or an open stream costs one task and nothing beside it (a box
    // for the loop cost every waiting poll 768 bytes more; the size test
    // below holds the task to what was measured).
    if !codec::wants_lean(&first[..n]) {
        // hyper's header timer starts when hyper first reads: the first
        // head is read here, by the deadline, and handed over whole.
        let Ok(Some(head)) =
            tokio::time::timeout_at(first_deadline, read_first_head(&mut stream)).await
        else {
            // As hyper does when a head does not arrive: close, silently.
            return;
        };
        return serve_hyper(app, Replay::new(stream, head), builder, watcher).await;
    }
    let (stream, req) = match h1::serve(app, stream, first_deadline).await {
        h1::Served::Closed => return,
        h1::Served::Hyper(stream, read) => {
            return serve_hyper(app, Replay::new(stream, read), builder, watcher).await
        }
        h1::Served::Stream(stream, req) => (stream, req),
    };
    h1::serve_stream(app, stream, req).await
}

/// What a connection sent up to the end of its first request head (or up
/// to what hyper refuses: a malformed head, one over the size limit); None
/// when it ended first. Whatever arrived with it is kept for hyper too.
async fn read_first_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        buf.reserve(2048);
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) if head_read(&buf) => return Some(buf),
            Ok(_) => {}
        }
    }
}

/// Whether `buf` holds a whole request head, or enough for hyper to refuse
/// it.
fn head_read(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; codec::MAX_HEADERS];
    buf.len() >= codec::MAX_HEAD
        || !matches!(
            httparse::Request::new(&mut headers).parse(buf),
            Ok(httparse::Status::Partial)
        )
}

/// hyper's HTTP/1.1 for the rest of a connection.
async fn serve_hyper(
    app: &Arc<Shared>,
    io: Replay,
    builder: &http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let kill = Arc::new(tokio::sync::Notify::new());
    let kill2 = kill.clone();
    let app2 = app.clone();
    let send_timeout = Duration::from_secs(app.config.send_timeout_s);
    let io = send_timeout::SendTimeout::new(TokioIo::new(io), send_timeout);
    let conn = builder.serve_connection(
        io,
        service_fn(move |mut req| {
            req.extensions_mut().insert(ConnectionKill(kill2.clone()));
            handle(app2.clone(), req)
        }),
    );
    tokio::select! {
        r = watcher.watch(conn) => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
        },
        // Dropping the connection closes the socket, even one whose
        // reader stopped reading.
        _ = kill.notified() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::shared::Shared;

    async fn loopback() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (client, server) = tokio::join!(client, l.accept());
        (server.unwrap().0, client.unwrap())
    }

    /// What the memory per idle stream and per waiting poll relies on
    /// (DESIGN §7): a connection's task (beside the socket, and the boxed
    /// handler future and subscription of a request in flight) holds the
    /// largest of the request loop, hyper's
    /// connection and a stream, not their sum (measured: 1,424 bytes; the
    /// loop alone 736, a stream 1,152). A local kept across an await, or a
    /// state that grows, fails here.
    #[tokio::test]
    async fn connection_tasks_stay_within_their_measured_sizes() {
        let app = Shared::for_tests();
        let builder = http1::Builder::new();
        let graceful = GracefulShutdown::new();
        let (s1, _c1) = loopback().await;
        let task = serve_connection(&app, s1, Instant::now(), &builder, graceful.watcher());
        let (s2, _c2) = loopback().await;
        let request_loop = h1::serve(&app, s2, Instant::now());
        let (s3, _c3) = loopback().await;
        let req = Box::new(Request::get("/events").body(()).unwrap());
        let stream = h1::serve_stream(&app, s3, req);
        let sizes = (
            std::mem::size_of_val(&task),
            std::mem::size_of_val(&request_loop),
            std::mem::size_of_val(&stream),
        );
        assert!(sizes.0 <= 1536, "connection task: {sizes:?}");
        assert!(sizes.1 <= 768, "request loop: {sizes:?}");
        assert!(sizes.2 <= 1280, "stream: {sizes:?}");
    }
}
