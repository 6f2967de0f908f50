//! `/hark.js`, the browser client, in real Chromium (see browser.rs for
//! the page built on it).
//!
//! The module is imported on hark's own page and driven from here through
//! `execute`. Every subscription records each message id its `onMessage`
//! gets, in order; the tests compare that with every message written, so
//! a duplicate, a gap or a reordering fails, whatever the page would have
//! de-duplicated:
//!
//! - across a restart of hark, both over a stream and over long polls;
//! - when streams are refused, cut every 1.5 s or held up without a byte
//!   by a proxy in front of hark, the subscription falls back to long
//!   polls and still gets every message exactly once;
//! - with tokens good for 3 s, a conversation goes on through several
//!   renewals (`getToken`) without losing or doubling a message.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, CONNECTION, HOST, TRANSFER_ENCODING};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::kit::webdriver::{truthy, Browser};
use crate::kit::*;

/// Bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(30);

/// Runs in every document first: collects uncaught errors (an exception
/// in a callback is reported as one), unhandled rejections and CSP
/// violations.
const ERRORS: &str = r#"
window.__testErrors = [];
window.addEventListener('error', function (e) {
  window.__testErrors.push('error: ' + e.message + ' at ' + e.filename + ':' + e.lineno);
});
window.addEventListener('unhandledrejection', function (e) {
  window.__testErrors.push('unhandled rejection: ' + String(e.reason && (e.reason.stack || e.reason.message) || e.reason));
});
document.addEventListener('securitypolicyviolation', function (e) {
  window.__testErrors.push('CSP violation: ' + e.violatedDirective + ' blocked ' + e.blockedURI);
});
"#;

/// Imports the module from the page's origin.
const IMPORT: &str = r#"
window.__hark = null;
import(location.origin + '/hark.js').then(function (m) { window.__hark = m; },
  function (e) { window.__testErrors.push('import: ' + e); });
return true;
"#;

/// A client (token: `arguments[0]`) whose `getToken` waits for the test
/// to hand a token (`give_tokens`), and `__subscribe(name, options)`,
/// which records what a subscription delivers in `__rec[name]`.
const HARNESS: &str = r#"
window.__tokens = { asked: 0, given: 0, waiting: [], why: [] };
window.__client = window.__hark.createClient({
  token: arguments[0],
  getToken: function (why) {
    window.__tokens.asked++;
    window.__tokens.why.push(why.status + ' ' + why.code);
    return new Promise(function (resolve) { window.__tokens.waiting.push(resolve); });
  }
});
window.__subs = {};
window.__rec = {};
window.__subscribe = function (name, opts) {
  var rec = window.__rec[name] = { order: [], transports: [], deleted: [], resets: 0, ready: [], states: [], errors: [], state: 'connecting', transport: null, typing: [], presence: [], read: [] };
  window.__subs[name] = window.__client.subscribe(Object.assign({}, opts, {
    onMessage: function (m, info) { rec.order.push(m.id); rec.transports.push(info.transport); },
    onDelete: function (d) { rec.deleted.push(d.id); },
    onReset: function () { rec.resets++; },
    onReady: function (info) { rec.ready.push([info.transport, info.resumed]); },
    onState: function (state, info) { rec.states.push(state + '/' + info.transport); rec.state = state; rec.transport = info.transport; },
    onError: function (e) { rec.errors.push(e.status + ' ' + e.code); },
    onTyping: function (e) { rec.typing.push([e.room, e.user.id, e.is_typing]); },
    onPresence: function (e) { rec.presence.push([e.room, e.user.id, e.online]); },
    onRead: function (e) { rec.read.push([e.room, e.user.id, typeof e.read_at]); }
  }));
  rec.transport = window.__subs[name].transport;
  return true;
};
window.__sent = [];
window.__send = function (room, text) {
  window.__client.send(room, text).then(function (m) { window.__sent.push(m.id); },
    function (e) { window.__testErrors.push('send: ' + e.status + ' ' + e.code); });
  return true;
};
return true;
"#;

struct Tab<'a> {
    browser: &'a Browser,
    hark: &'a Hark,
    /// Whose tokens `getToken` is answered with (good for 3 s), if anyone's.
    renew_as: Option<i64>,
}

impl Tab<'_> {
    async fn eval(&self, script: &str, args: Value) -> Value {
        self.browser
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Hands a fresh token to every `getToken` call waiting.
    async fn give_tokens(&self) {
        if let Some(user) = self.renew_as {
            let fresh = token_for(user, chrono::Duration::seconds(3));
            self.eval(
                "var t = arguments[0]; if (!window.__tokens) return 0; var w = window.__tokens.waiting.splice(0); w.forEach(function (r) { r(t); }); window.__tokens.given += w.length; return w.length;",
                json!([fresh]),
            )
            .await;
        }
    }

    /// Waits until `script` is truthy (answering `getToken` meanwhile).
    async fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + SOON;
        loop {
            self.give_tokens().await;
            let v = self.eval(script, json!([])).await;
            if truthy(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waiting for {what}: not within {SOON:?}\nrecords: {:#}\nhark log:\n{}",
                    self.eval("return {rec: window.__rec, tokens: window.__tokens && {asked: window.__tokens.asked, given: window.__tokens.given, why: window.__tokens.why}, errors: window.__testErrors};", json!([])).await,
                    self.hark.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens `origin/` and imports hark.js with a client for `token`.
    async fn open(&self, origin: &str, token: &str) {
        self.browser.on_new_document(ERRORS).await;
        self.browser.goto(&format!("{origin}/")).await;
        self.eval(IMPORT, json!([])).await;
        self.wait(
            "hark.js to load",
            "return !!window.__hark || window.__testErrors.length > 0;",
        )
        .await;
        self.assert_no_errors("loading hark.js").await;
        self.eval(HARNESS, json!([token])).await;
    }

    /// The cursor at the end of `room`'s history, by `client.history`.
    async fn history_cursor(&self, room: i64) -> String {
        self.eval(
            "window.__history = null; window.__client.history(arguments[0]).then(function (a) { window.__history = a; }, function (e) { window.__testErrors.push('history: ' + e.code); }); return true;",
            json!([room]),
        )
        .await;
        let v = self
            .wait(
                "the history",
                "return window.__history && window.__history.cursor;",
            )
            .await;
        v.as_str().expect("a cursor").to_string()
    }

    async fn subscribe(&self, name: &str, options: Value) {
        self.eval(
            "return window.__subscribe(arguments[0], arguments[1]);",
            json!([name, options]),
        )
        .await;
    }

    async fn record(&self, name: &str) -> Value {
        self.eval("return window.__rec[arguments[0]];", json!([name]))
            .await
    }

    /// Waits until subscription `name` is live over `transport`.
    async fn wait_live(&self, name: &str, transport: &str) {
        self.wait(
            &format!("{name} live over {transport}"),
            &format!(
                "var r = window.__rec[{name:?}]; return r.state === 'live' && r.transport === {transport:?};"
            ),
        )
        .await;
    }

    /// Waits until subscription `name` has delivered `id`.
    async fn wait_delivered(&self, name: &str, id: i64) {
        self.wait(
            &format!("message {id} in {name}"),
            &format!("return window.__rec[{name:?}].order.indexOf({id}) >= 0;"),
        )
        .await;
    }

    /// Alice sends `text` through the module; its id once the answer came.
    async fn send(&self, room: i64, text: &str) -> i64 {
        let before = self.eval("return window.__sent.length;", json!([])).await;
        self.eval(
            "return window.__send(arguments[0], arguments[1]);",
            json!([room, text]),
        )
        .await;
        self.wait(
            &format!("the send of {text:?}"),
            &format!("return window.__sent.length > {before} && window.__sent[{before}];"),
        )
        .await
        .as_i64()
        .expect("an id")
    }

    async fn assert_no_errors(&self, when: &str) {
        let errors = self
            .eval(
                "return window.__testErrors || ['the error hook is missing'];",
                json!([]),
            )
            .await;
        assert_eq!(errors, json!([]), "JavaScript errors {when}");
    }
}

/// Asserts that subscription `name` delivered exactly `expected`, each
/// once and in that order, and failed nowhere.
fn assert_exactly_once(name: &str, rec: &Value, expected: &[i64]) {
    let got: Vec<i64> = serde_json::from_value(rec["order"].clone()).expect("ids");
    let mut counts = std::collections::BTreeMap::new();
    for id in &got {
        *counts.entry(*id).or_insert(0) += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !counts.contains_key(id))
        .collect();
    let unknown: Vec<_> = got.iter().filter(|id| !expected.contains(id)).collect();
    assert!(
        twice.is_empty() && missing.is_empty() && unknown.is_empty(),
        "{name}: delivered more than once (id → times): {twice:?}; never delivered: {missing:?}; \
         not written: {unknown:?}\nrecord: {rec:#}"
    );
    assert_eq!(got, expected, "{name}: out of order; record: {rec:#}");
    assert_eq!(rec["errors"], json!([]), "{name}: errors");
    assert_eq!(rec["resets"], json!(0), "{name}: resets");
}

/// Across a restart of hark, a stream and long polls (one subscription
/// each, both from the history's cursor) deliver every message exactly
/// once: before, while hark is down, and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_delivers_each_message_exactly_once_across_a_restart() {
    webdriver::require_browser();
    let (mut hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;
    fx.insert(room, bob, "History: not delivered").await;

    let browser = Browser::launch(1000, 700).await;
    let origin = hark.url("");
    let mut expected = Vec::new();
    {
        let tab = Tab {
            browser: &browser,
            hark: &hark,
            renew_as: None,
        };
        tab.open(&origin, &token(alice)).await;
        let cursor = tab.history_cursor(room).await;
        tab.subscribe("stream", json!({"rooms": [room], "cursor": cursor}))
            .await;
        tab.subscribe(
            "poll",
            json!({"rooms": room, "cursor": cursor, "transport": "poll"}),
        )
        .await;
        tab.wait_live("stream", "stream").await;
        tab.wait_live("poll", "poll").await;

        expected.push(fx.insert(room, bob, "Written with SQL").await);
        expected.push(tab.send(room, "Sent through hark.js").await);
        for name in ["stream", "poll"] {
            tab.wait_delivered(name, *expected.last().unwrap()).await;
        }
        tab.assert_no_errors("before the restart").await;
    }

    hark.stop().await;
    {
        let tab = Tab {
            browser: &browser,
            hark: &hark,
            renew_as: None,
        };
        tab.wait(
            "both to notice",
            "return window.__rec.stream.state === 'reconnecting' && window.__rec.poll.state === 'reconnecting';",
        )
        .await;
    }
    for i in 0..3 {
        expected.push(
            fx.insert(room, bob, &format!("While hark is down, {i}"))
                .await,
        );
    }
    hark.restart().await;
    let tab = Tab {
        browser: &browser,
        hark: &hark,
        renew_as: None,
    };
    for i in 0..2 {
        expected.push(
            fx.insert(room, bob, &format!("After the restart, {i}"))
                .await,
        );
    }
    expected.push(tab.send(room, "And one more through hark.js").await);
    // The last is a barrier: in commit order, a duplicate of any earlier
    // message would have come before it.
    for name in ["stream", "poll"] {
        tab.wait_delivered(name, *expected.last().unwrap()).await;
    }
    for name in ["stream", "poll"] {
        assert_exactly_once(name, &tab.record(name).await, &expected);
    }
    let stream = tab.record("stream").await;
    assert_eq!(
        stream["transport"], "stream",
        "a restart made it fall back: {stream:#}"
    );
    let ready = stream["ready"].as_array().unwrap();
    assert!(
        ready.len() >= 2 && ready.iter().all(|r| *r == json!(["stream", true])),
        "the stream resumed from its cursor each time: {ready:?}"
    );
    let poll = tab.record("poll").await;
    assert!(
        poll["transports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t == "poll"),
        "{poll:#}"
    );
    tab.assert_no_errors("after the restart").await;
    browser.quit().await;
}

// ---- a proxy that will not carry streams ---------------------------------

/// What the proxy does with `/events`; everything else it forwards.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Streams {
    Pass,
    /// Forwarded, and the connection cut after this long.
    Cut(Duration),
    /// 502 at once.
    Refuse,
    /// No answer, not a byte (a proxy that buffers the stream).
    Hold,
}

type ProxyBody = BoxBody<Bytes, BoxError>;

/// An HTTP/1.1 proxy in front of hark (the page's origin in the fallback
/// test), which also serves a page of its own at `/example.html`.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<Mutex<Streams>>,
    /// `/events` requests it has seen.
    streams: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, example: Option<String>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(Mutex::new(Streams::Pass));
        let streams = Arc::new(AtomicUsize::new(0));
        let (m, n) = (mode.clone(), streams.clone());
        let example: Arc<Option<String>> = Arc::new(example);
        let task = tokio::spawn(async move {
            let client = http::client();
            while let Ok((socket, _)) = listener.accept().await {
                let (m, n, client, example) =
                    (m.clone(), n.clone(), client.clone(), example.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let page = (req.uri().path() == "/example.html")
                            .then(|| example.as_ref().clone())
                            .flatten();
                        let forwarded =
                            forward(req, upstream, m.clone(), n.clone(), client.clone());
                        async move {
                            match page {
                                Some(html) => Ok(html_page(html)),
                                None => forwarded.await,
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
            }
        });
        Proxy {
            addr,
            mode,
            streams,
            task,
        }
    }

    fn set(&self, mode: Streams) {
        *self.mode.lock().unwrap() = mode;
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn html_page(html: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(html)).map_err(|e| match e {}).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn proxy_error(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
    mode: Arc<Mutex<Streams>>,
    streams: Arc<AtomicUsize>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
) -> Result<Response<ProxyBody>, Infallible> {
    let mode = if req.uri().path().trim_end_matches('/') == "/events" {
        streams.fetch_add(1, Ordering::SeqCst);
        *mode.lock().unwrap()
    } else {
        Streams::Pass
    };
    match mode {
        Streams::Refuse => {
            return Ok(proxy_error(
                StatusCode::BAD_GATEWAY,
                "streams are refused here",
            ))
        }
        Streams::Hold => {
            tokio::time::sleep(Duration::from_secs(90)).await;
            return Ok(proxy_error(StatusCode::GATEWAY_TIMEOUT, "held"));
        }
        Streams::Pass | Streams::Cut(_) => {}
    }
    let hop = |name: &HeaderName| {
        name == HOST || name == CONNECTION || name == TRANSFER_ENCODING || name == "keep-alive"
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut up = Request::builder()
        .method(parts.method)
        .uri(format!("http://{upstream}{target}"));
    for (k, v) in parts.headers.iter().filter(|(k, _)| !hop(k)) {
        up = up.header(k, v);
    }
    let up = up.body(Full::new(body)).expect("a request");
    let resp = match client.request(up).await {
        Ok(resp) => resp,
        Err(_) => return Ok(proxy_error(StatusCode::BAD_GATEWAY, "hark is away")),
    };
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(CONNECTION);
    parts.headers.remove(TRANSFER_ENCODING);
    let frames = TryStreamExt::map_err(BodyStream::new(body), |e| -> BoxError { Box::new(e) });
    let body = match mode {
        Streams::Cut(after) => {
            // What hark sent until then, then the connection breaks.
            let cut = futures::stream::once(async {
                Err::<Frame<Bytes>, BoxError>(err("cut by the proxy"))
            });
            BodyExt::boxed(StreamBody::new(
                frames.take_until(tokio::time::sleep(after)).chain(cut),
            ))
        }
        _ => BodyExt::boxed(StreamBody::new(frames)),
    };
    Ok(Response::from_parts(parts, body))
}

/// Behind a proxy that refuses streams, cuts them every 1.5 s, or holds
/// them without a byte, a subscription falls back to long polls, and every
/// message written meanwhile (one every 250 ms, before, during and after
/// the switch) is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_falls_back_to_long_polls_when_streams_are_refused_cut_or_held() {
    webdriver::require_browser();
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;
    let proxy = Proxy::start(hark.addr, None).await;

    let browser = Browser::launch(1000, 700).await;
    let tab = Tab {
        browser: &browser,
        hark: &hark,
        renew_as: None,
    };
    tab.open(&format!("http://{}", proxy.addr), &token(alice))
        .await;
    for (name, mode) in [
        ("cut", Streams::Cut(Duration::from_millis(1500))),
        ("refused", Streams::Refuse),
        ("held", Streams::Hold),
    ] {
        proxy.set(mode);
        let streams_before = proxy.streams();
        let cursor = tab.history_cursor(room).await;
        tab.subscribe(
            name,
            json!({"rooms": [room], "cursor": cursor, "readyTimeoutMs": 3000}),
        )
        .await;
        // Messages keep coming until the subscription has been polling
        // for a while.
        let mut expected = Vec::new();
        let started = Instant::now();
        let mut polling_since = None;
        loop {
            expected.push(
                fx.insert(room, bob, &format!("{name} {}", expected.len()))
                    .await,
            );
            let rec = tab.record(name).await;
            if polling_since.is_none() && rec["transport"] == "poll" {
                polling_since = Some(expected.len());
            }
            if polling_since.is_some_and(|n| expected.len() >= n + 4) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "{name}: no fallback to long polls within 40 s; record: {rec:#}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let barrier = fx.insert(room, bob, &format!("{name}: the last")).await;
        expected.push(barrier);
        tab.wait_delivered(name, barrier).await;
        let rec = tab.record(name).await;
        assert_exactly_once(name, &rec, &expected);
        assert_eq!(rec["transport"], "poll", "{name}: {rec:#}");
        assert_eq!(rec["state"], "live", "{name}: {rec:#}");
        let streamed = rec["transports"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| *t == "stream")
            .count();
        let tried = proxy.streams() - streams_before;
        match mode {
            Streams::Cut(_) => {
                // It streamed (and resumed after the cuts) before it gave up.
                assert!(streamed > 0, "{name}: never streamed: {rec:#}");
                assert!(tried >= 3, "{name}: {tried} streams tried");
                assert!(
                    rec["ready"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|r| r[0] == "stream")
                        .all(|r| r[1] == true),
                    "{name}: a stream did not resume from the cursor: {rec:#}"
                );
            }
            Streams::Refuse => {
                assert_eq!(streamed, 0, "{name}: {rec:#}");
                assert!(tried >= 3, "{name}: {tried} streams tried");
            }
            Streams::Hold | Streams::Pass => {
                assert_eq!(streamed, 0, "{name}: {rec:#}");
                assert!(tried >= 1, "{name}: {tried} streams tried");
            }
        }
        // Gone back to polls for good: no stream is tried any more.
        let tried = proxy.streams();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(proxy.streams(), tried, "{name}: streams still tried");
        tab.eval(
            "window.__subs[arguments[0]].close(); return true;",
            json!([name]),
        )
        .await;
    }
    tab.assert_no_errors("after the fallbacks").await;
    browser.quit().await;
}

/// Tokens good for 3 s: alice and bob talk for about 12 s while alice's
/// stream and her long polls follow the room. Each expiry asks the
/// application (`getToken`, answered here a little later), and nothing
/// is lost or doubled; the stream does not take renewals for a failing
/// path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_renewal_in_the_middle_of_a_conversation_loses_nothing() {
    webdriver::require_browser();
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;

    let browser = Browser::launch(1000, 700).await;
    let tab = Tab {
        browser: &browser,
        hark: &hark,
        renew_as: Some(alice),
    };
    tab.open(
        &hark.url(""),
        &token_for(alice, chrono::Duration::seconds(3)),
    )
    .await;
    let cursor = tab.history_cursor(room).await;
    tab.subscribe("stream", json!({"rooms": [room], "cursor": cursor}))
        .await;
    tab.subscribe(
        "poll",
        json!({"rooms": [room], "cursor": cursor, "transport": "poll"}),
    )
    .await;
    tab.wait_live("stream", "stream").await;
    tab.wait_live("poll", "poll").await;

    let mut expected = Vec::new();
    let started = Instant::now();
    let mut turn = 0;
    while started.elapsed() < Duration::from_secs(12) {
        expected.push(fx.insert(room, bob, &format!("Bob, turn {turn}")).await);
        expected.push(tab.send(room, &format!("Alice, turn {turn}")).await);
        tab.give_tokens().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        turn += 1;
    }
    let barrier = fx.insert(room, bob, "Bob: that's all").await;
    expected.push(barrier);
    for name in ["stream", "poll"] {
        tab.wait_delivered(name, barrier).await;
    }
    for name in ["stream", "poll"] {
        assert_exactly_once(name, &tab.record(name).await, &expected);
    }
    let tokens = tab
        .eval(
            "return {asked: window.__tokens.asked, why: window.__tokens.why};",
            json!([]),
        )
        .await;
    assert!(
        tokens["asked"].as_u64() >= Some(2),
        "fewer renewals than expiries: {tokens}"
    );
    assert!(
        tokens["why"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w == "401 token_expired"),
        "{tokens}"
    );
    let stream = tab.record("stream").await;
    assert_eq!(
        stream["transport"], "stream",
        "renewals made it fall back: {stream:#}"
    );
    assert!(
        stream["ready"].as_array().unwrap().len() >= 3,
        "the stream was not renewed: {stream:#}"
    );
    tab.assert_no_errors("after the renewals").await;
    browser.quit().await;
}

/// `/hark.js` is served like `/`: its type, `no-cache`, HEAD, with and
/// without a trailing slash, and CORS for an allowed origin (a page of
/// another origin imports it as a module, which needs CORS).
#[tokio::test]
async fn hark_js_is_served_like_the_page() {
    const ORIGIN: &str = "https://chat.example";
    let (hark, _fx) = setup(&[("HARK_CORS_ORIGINS", ORIGIN)]).await;
    for path in ["/hark.js", "/hark.js/"] {
        let (s, h, body) = try_request(
            hyper::Method::GET,
            &hark.url(path),
            None,
            None,
            &[("origin", ORIGIN)],
        )
        .await
        .expect("GET");
        assert_eq!(s, StatusCode::OK, "{path}");
        assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
        assert_eq!(h["cache-control"], "no-cache");
        assert_eq!(h["access-control-allow-origin"], ORIGIN);
        let text = String::from_utf8(body.to_vec()).expect("UTF-8");
        for part in [
            "// @ts-check",
            "export function createClient",
            "export class HarkClient",
            "@typedef {object} SubscribeOptions",
            "last_event_id",
            "token_expired",
        ] {
            assert!(text.contains(part), "{path} has no {part:?}");
        }
    }
    let (s, h, body) = request(hyper::Method::HEAD, &hark.url("/hark.js"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    let (s, h, _) = request(hyper::Method::POST, &hark.url("/hark.js"), None, Some("{}")).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "GET, HEAD, OPTIONS");
}

/// Counts the typing POSTs the module sends (their `is_typing`).
const COUNT_TYPING_POSTS: &str = r#"
window.__posts = [];
var real = window.fetch;
window.fetch = function (url, init) {
  if (init && init.method === 'POST' && /\/typing\/$/.test(new URL(String(url)).pathname)) {
    window.__posts.push(JSON.parse(init.body).is_typing);
  }
  return real.apply(this, arguments);
};
return true;
"#;

/// Whether `user` is typing in `room`, as `as_user` sees it.
async fn typing_in(hark: &Hark, room: i64, as_user: i64, user: i64) -> bool {
    let (s, v) = get_json(
        &hark.url(&format!("/api/chat/rooms/{room}/")),
        Some(&token(as_user)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["typing_users"]
        .as_array()
        .is_some_and(|a| a.iter().any(|u| u["id"] == user))
}

/// Typing goes out debounced (one `true` for a burst of keys, `false`
/// after the pause, on `stop()` and on blur); Bob's typing, presence and
/// read receipt reach both a stream's callbacks and, from the rooms API,
/// the long polls'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_presence_and_receipts_over_a_stream_and_over_long_polls() {
    webdriver::require_browser();
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", "300")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;

    let browser = Browser::launch(1000, 700).await;
    let tab = Tab {
        browser: &browser,
        hark: &hark,
        renew_as: None,
    };
    tab.open(&hark.url(""), &token(alice)).await;
    tab.subscribe("stream", json!({"rooms": [room]})).await;
    tab.subscribe(
        "poll",
        json!({"rooms": [room], "transport": "poll", "signalsEveryMs": 400}),
    )
    .await;
    tab.wait_live("stream", "stream").await;
    tab.wait_live("poll", "poll").await;

    // Alice: ten keys in a row are one `true`; the pause, one `false`.
    tab.eval(COUNT_TYPING_POSTS, json!([])).await;
    tab.eval(
        "window.__typing = window.__client.typing(arguments[0], {resendMs: 5000, idleMs: 800}); for (var i = 0; i < 10; i++) window.__typing.input(true); return true;",
        json!([room]),
    )
    .await;
    eventually("bob to see alice typing", || {
        typing_in(&hark, room, bob, alice)
    })
    .await;
    tab.wait(
        "the pause to stop it",
        "return JSON.stringify(window.__posts) === '[true,false]' && !window.__typing.active;",
    )
    .await;
    eventually("alice's typing to clear", || async {
        !typing_in(&hark, room, bob, alice).await
    })
    .await;
    // A key, then stop() (a send): `false` at once; stop() again: nothing.
    tab.eval(
        "window.__typing.input(true); window.__typing.stop(); window.__typing.stop(); return true;",
        json!([]),
    )
    .await;
    // attach(): a key in the box, then blur.
    tab.eval(
        r#"var box = document.createElement('input'); document.body.appendChild(box);
           window.__detach = window.__typing.attach(box);
           box.value = 'h'; box.dispatchEvent(new Event('input'));
           box.dispatchEvent(new Event('blur')); return true;"#,
        json!([]),
    )
    .await;
    tab.wait(
        "stop() and blur to send false",
        "return JSON.stringify(window.__posts) === '[true,false,true,false,true,false]';",
    )
    .await;
    eventually("alice's typing to clear again", || async {
        !typing_in(&hark, room, bob, alice).await
    })
    .await;

    // Bob types, comes online, reads; stops typing, goes away.
    let has = |name: &str, field: &str, entry: Value| {
        format!(
            "return window.__rec[{name:?}].{field}.some(function (e) {{ return JSON.stringify(e) === {:?}; }});",
            entry.to_string()
        )
    };
    set_typing(&hark, room, &token(bob), true).await;
    for name in ["stream", "poll"] {
        tab.wait(
            &format!("{name}: Bob typing"),
            &has(name, "typing", json!([room, bob, true])),
        )
        .await;
    }
    set_typing(&hark, room, &token(bob), false).await;
    for name in ["stream", "poll"] {
        tab.wait(
            &format!("{name}: Bob no longer typing"),
            &has(name, "typing", json!([room, bob, false])),
        )
        .await;
    }
    let auth = format!("Bearer {}", token(bob));
    let mut bob_stream = sse::Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &auth)],
    )
    .await;
    sse::open(&mut bob_stream).await;
    for name in ["stream", "poll"] {
        tab.wait(
            &format!("{name}: Bob online"),
            &has(name, "presence", json!([room, bob, true])),
        )
        .await;
    }
    let (s, v) = post_json(
        &hark.url(&format!("/api/chat/rooms/{room}/read/")),
        Some(&token(bob)),
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for name in ["stream", "poll"] {
        tab.wait(
            &format!("{name}: Bob's receipt"),
            &has(name, "read", json!([room, bob, "string"])),
        )
        .await;
    }
    drop(bob_stream);
    for name in ["stream", "poll"] {
        tab.wait(
            &format!("{name}: Bob offline"),
            &has(name, "presence", json!([room, bob, false])),
        )
        .await;
    }
    // Never about oneself.
    for name in ["stream", "poll"] {
        let rec = tab.record(name).await;
        for field in ["typing", "presence", "read"] {
            assert!(
                rec[field].as_array().unwrap().iter().all(|e| e[1] == bob),
                "{name}: {field} about someone else than Bob: {rec:#}"
            );
        }
        assert_eq!(rec["errors"], json!([]), "{name}");
    }
    tab.assert_no_errors("after the signals").await;
    browser.quit().await;
}

/// The README's "Browser client" example, copied as it is (only the
/// address of hark and the room's id changed): on a page of its own
/// origin (the proxy's), it shows the history, a message written with SQL
/// and one sent from its form, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_works_as_copied() {
    webdriver::require_browser();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Browser client\n")
        .nth(1)
        .expect("a \"Browser client\" section in the README");
    let example = section
        .split("```html\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("an html example in the section");
    assert!(example.contains(r#"import { createClient } from "http://127.0.0.1:8080/hark.js";"#));
    assert!(example.contains("const room = 1;"));

    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;
    let old = fx.insert(room, bob, "From history").await;
    let page = format!(
        "<!doctype html>\n<meta charset=\"utf-8\">\n<title>example</title>\n{}\n",
        example
            .replace("http://127.0.0.1:8080/hark.js", "/hark.js")
            .replace("const room = 1;", &format!("const room = {room};"))
    );
    let proxy = Proxy::start(hark.addr, Some(page)).await;
    let origin = format!("http://{}", proxy.addr);

    let browser = Browser::launch(1000, 700).await;
    let tab = Tab {
        browser: &browser,
        hark: &hark,
        renew_as: None,
    };
    browser.on_new_document(ERRORS).await;
    // Signed in the way the example expects: the token in localStorage.
    browser.goto(&format!("{origin}/")).await;
    tab.eval(
        "localStorage.setItem('access', arguments[0]); return true;",
        json!([token(alice)]),
    )
    .await;
    browser.goto(&format!("{origin}/example.html")).await;
    let shown = |ids: &[i64]| {
        format!(
            "return JSON.stringify(Array.from(document.querySelectorAll('#messages [data-id]')).map(function (e) {{ return Number(e.dataset.id); }})) === {:?};",
            serde_json::to_string(ids).unwrap()
        )
    };
    tab.wait("the history", &shown(&[old])).await;
    // A message written elsewhere, then one sent from the example's form.
    let live = fx.insert(room, bob, "Written with SQL").await;
    tab.wait("the live message", &shown(&[old, live])).await;
    let box_ = browser.find("#box").await;
    browser
        .send_keys(&box_, "Sent from the README's example")
        .await;
    let button = browser.find("#send button").await;
    browser.click(&button).await;
    tab.wait(
        "the sent message, once",
        "return document.querySelectorAll('#messages [data-id]').length === 3 && document.querySelector('#box').value === '';",
    )
    .await;
    let stored = fx.message_ids(room).await;
    assert_eq!(stored.len(), 3, "{stored:?}");
    tab.wait("the three, in order", &shown(&stored)).await;
    let text = tab
        .eval(
            "return document.querySelector('#messages').textContent;",
            json!([]),
        )
        .await;
    assert!(
        text.as_str()
            .unwrap()
            .contains("alice: Sent from the README's example"),
        "{text}"
    );
    tab.assert_no_errors("running the README's example").await;
    browser.quit().await;
}
