//! The page at `/` in a real browser: headless Chromium driven through
//! chromedriver (W3C WebDriver over HTTP, see `kit/src/webdriver.rs`).
//!
//! Alice opens the page; messages inserted with plain SQL appear; Bob's
//! typing shows and hides; what Alice types and sends reaches the server;
//! and when hark restarts the page's own EventSource resumes with
//! Last-Event-ID and shows what was sent meanwhile exactly once. A send
//! refused over the write limit says when to try again. Bob's online dot
//! and "Seen" under Alice's last read message come and go. On a phone
//! (390×844) the layout holds (screenshots in target/), and a token that
//! expires is asked for again without losing the room. The page is built
//! on `/hark.js`; client.rs tests the module itself.
//!
//! Needs `chromium` and `chromedriver` (`.ci/run` installs them): without
//! them this test fails, it does not skip.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::kit::webdriver::Browser;
use crate::kit::*;
use serde_json::{json, Value};

/// Bound for anything the page should do "soon".
const SOON: Duration = Duration::from_secs(20);

/// Runs in every document before the page's scripts: collects uncaught
/// errors, unhandled rejections and CSP violations, and counts what the
/// page's EventSources open and receive (`message` events per message id),
/// so the test sees the server's replay and not only the page's
/// de-duplicated list.
const INSTRUMENT: &str = r#"
(function () {
  var Native = window.EventSource;
  var sse = window.__sse = { opened: [], received: {} };
  var Wrapped = function (url, init) {
    if (window.__garbleFirstCursor && !sse.opened.length) {
      // A position the server cannot continue: it must answer `reset`.
      url = String(url).replace(/last_event_id=[^&]*/, 'last_event_id=garbage');
    }
    var es = new Native(url, init);
    sse.opened.push(String(url).replace(/access_token=[^&]*/, 'access_token=…'));
    es.addEventListener('message', function (e) {
      try {
        var id = JSON.parse(e.data).id;
        sse.received[id] = (sse.received[id] || 0) + 1;
      } catch (err) { /* counted by the page's own handler */ }
    });
    return es;
  };
  Wrapped.prototype = Native.prototype;
  Wrapped.CONNECTING = Native.CONNECTING;
  Wrapped.OPEN = Native.OPEN;
  Wrapped.CLOSED = Native.CLOSED;
  window.EventSource = Wrapped;
})();
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

/// What the page shows, for failure messages.
const PAGE_STATE: &str = r#"
var q = function (s) { var e = document.querySelector(s); return e ? e.textContent : null; };
return {
  url: location.href,
  status: q('#status'),
  state: (document.querySelector('#status') || {dataset: {}}).dataset.state,
  typing: q('#typing'),
  messages: Array.from(document.querySelectorAll('#messages [data-id]')).map(function (e) { return e.dataset.id; }),
  errors: window.__testErrors,
  sse: window.__sse,
  roomError: q('#room-error'),
  sendError: q('#send-error'),
  online: Array.from(document.querySelectorAll('#room-people [data-online]')).map(function (e) { return Number(e.dataset.user); }),
  roomsOnline: Array.from(document.querySelectorAll('#rooms [data-room]')).map(function (e) { return [Number(e.dataset.room), e.dataset.online || '']; }),
  seen: Array.from(document.querySelectorAll('#messages [data-seen-by]')).map(function (e) { return [Number(e.dataset.id), e.dataset.seenBy]; }),
};
"#;

fn target_dir() -> PathBuf {
    // target/<profile>/hark → target
    PathBuf::from(HARK)
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// A script: true when message `id` is shown exactly once.
fn shown_once(id: i64) -> String {
    format!(r#"return document.querySelectorAll('#messages [data-id="{id}"]').length === 1;"#)
}

struct Page<'a> {
    browser: &'a Browser,
}

impl Page<'_> {
    async fn state(&self) -> Value {
        self.browser
            .execute(PAGE_STATE, json!([]))
            .await
            .unwrap_or_else(|e| json!({ "unavailable": e }))
    }

    /// Waits until `script` is truthy; on timeout fails with what the page
    /// shows and hark's log.
    async fn wait(&self, what: &str, script: &str, hark: &Hark) -> Value {
        match self.browser.wait_for(script, SOON).await {
            Ok(v) => v,
            Err(e) => panic!(
                "waiting for {what}: {e}\npage: {:#}\nhark log:\n{}",
                self.state().await,
                hark.logs()
            ),
        }
    }

    async fn eval(&self, script: &str) -> Value {
        self.browser
            .execute(script, json!([]))
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    async fn assert_no_errors(&self, when: &str) {
        let errors = self
            .eval("return window.__testErrors || ['the error hook is missing'];")
            .await;
        assert_eq!(
            errors,
            json!([]),
            "JavaScript errors on the page {when}; page: {:#}",
            self.state().await
        );
    }

    /// Every message id on the page, in order.
    async fn message_ids(&self) -> Vec<i64> {
        let v = self
            .eval("return Array.from(document.querySelectorAll('#messages [data-id]')).map(function (e) { return Number(e.dataset.id); });")
            .await;
        serde_json::from_value(v).expect("ids")
    }
}

/// Typists of `room` as `user` sees them in the rooms API.
async fn typing_ids(hark: &Hark, room: i64, as_user: i64) -> Vec<i64> {
    let (status, v) = get_json(
        &hark.url(&format!("/api/chat/rooms/{room}/")),
        Some(&token(as_user)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["typing_users"]
        .as_array()
        .map(|a| a.iter().filter_map(|u| u["id"].as_i64()).collect())
        .unwrap_or_default()
}

/// Polls the rooms API until `check` holds (bounded).
async fn wait_typing(
    hark: &Hark,
    room: i64,
    as_user: i64,
    what: &str,
    check: impl Fn(&[i64]) -> bool,
) {
    let held = within(SOON, || async {
        check(&typing_ids(hark, room, as_user).await)
    })
    .await;
    if !held {
        let ids = typing_ids(hark, room, as_user).await;
        panic!("{what}: typing_users still {ids:?} after {SOON:?}");
    }
}

/// hark, with alice and bob in the room "General": (hark, fixture, alice,
/// bob, room).
async fn general() -> (Hark, Fixture, i64, i64, i64) {
    let (hark, fx) = setup(&[]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;
    (hark, fx, alice, bob, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_messages_and_typing_and_survives_a_restart() {
    // Fail (not skip) at once when the browser is missing.
    webdriver::require_browser();
    let started = Instant::now();

    let (mut hark, fx, alice, bob, room) = general().await;
    let old = fx.insert(room, alice, "An old message, from history").await;

    let browser = Browser::launch(1100, 760).await;
    let page = Page { browser: &browser };
    browser.on_new_document(INSTRUMENT).await;
    browser
        .goto(&hark.url(&format!("/?token={}&room={room}", token(alice))))
        .await;

    // History, then the stream.
    page.wait(
        "the stream to be live",
        "var s = document.querySelector('#status'); return s && s.dataset.state === 'live' && /live/i.test(s.textContent);",
        &hark,
    )
    .await;
    assert_eq!(page.message_ids().await, vec![old], "history");
    let shown = page.eval(
        "return {who: document.querySelector('#whoami').textContent, title: document.querySelector('#room-title').textContent, search: location.search, rooms: document.querySelector('#rooms').textContent};",
    ).await;
    assert!(shown["who"].as_str().unwrap().contains("Alice"), "{shown}");
    assert_eq!(shown["title"], "General", "{shown}");
    assert!(
        shown["rooms"].as_str().unwrap().contains("General"),
        "{shown}"
    );
    assert!(
        !shown["search"].as_str().unwrap().contains("token"),
        "the token stays in the address bar: {shown}"
    );

    // A message written with plain SQL appears live.
    let from_sql = fx
        .insert(room, bob, "Hi Alice, this came through psql")
        .await;
    page.wait("the SQL message", &shown_once(from_sql), &hark)
        .await;

    // Bob's typing shows, and goes away on false (well before the 5 s
    // server TTL and the page's 6 s safety net).
    let typing_url = hark.url(&format!("/api/chat/rooms/{room}/typing/"));
    let (s, v) = post_json(&typing_url, Some(&token(bob)), r#"{"is_typing": true}"#).await;
    assert_eq!(s, 200, "{v}");
    page.wait(
        "Bob is typing",
        "return /Bob is typing/.test(document.querySelector('#typing').textContent);",
        &hark,
    )
    .await;
    let (s, v) = post_json(&typing_url, Some(&token(bob)), r#"{"is_typing": false}"#).await;
    assert_eq!(s, 200, "{v}");
    let cleared = Instant::now();
    page.wait(
        "the typing line to clear",
        "return document.querySelector('#typing').textContent.trim() === '';",
        &hark,
    )
    .await;
    assert!(
        cleared.elapsed() < Duration::from_secs(4),
        "the typing line cleared only after {:?}: not by the false event",
        cleared.elapsed()
    );

    // Alice types: the page tells the server; Bob sees her typing.
    let composer = browser.find("#composer").await;
    browser
        .send_keys(&composer, "Hello Bob, from the browser")
        .await;
    wait_typing(&hark, room, bob, "Alice typing in the composer", |ids| {
        ids.contains(&alice)
    })
    .await;
    // She sends: the message shows once and her typing stops.
    let send = browser.find("#send").await;
    browser.click(&send).await;
    let sent: i64 = page
        .wait(
            "the sent message",
            "var m = Array.from(document.querySelectorAll('#messages li.mine[data-id]')).filter(function (e) { return /Hello Bob, from the browser/.test(e.textContent); }); return m.length === 1 && document.querySelector('#composer').value === '' && Number(m[0].dataset.id);",
            &hark,
        )
        .await
        .as_i64()
        .expect("an id");
    wait_typing(&hark, room, bob, "Alice's typing after sending", |ids| {
        !ids.contains(&alice)
    })
    .await;
    let (_, v) = get_json(&poll_url(&hark, room, None, "&limit=10"), Some(&token(bob))).await;
    let stored: Vec<(i64, String)> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        stored.contains(&(sent, "Hello Bob, from the browser".to_string())),
        "the server has {stored:?}"
    );
    page.assert_no_errors("before the restart").await;

    // hark goes away: the page notices; a message is written meanwhile.
    hark.stop().await;
    page.wait(
        "the page to notice the restart",
        "return document.querySelector('#status').dataset.state === 'reconnecting';",
        &hark,
    )
    .await;
    let while_down = fx.insert(room, bob, "Written while hark was down").await;
    hark.restart().await; // the same port; the page's EventSource resumes
    page.wait(
        "the message written while hark was down",
        &shown_once(while_down),
        &hark,
    )
    .await;
    // A later message is a barrier: the stream is in commit order, so any
    // duplicate of the earlier ones would have come before it.
    let after = fx.insert(room, bob, "And one after the restart").await;
    page.wait(
        "the stream to be live again",
        "return document.querySelector('#status').dataset.state === 'live';",
        &hark,
    )
    .await;
    page.wait("the message after the restart", &shown_once(after), &hark)
        .await;
    assert_eq!(
        page.message_ids().await,
        vec![old, from_sql, sent, while_down, after],
        "each message exactly once, in order"
    );
    // The browser's own reconnect (one EventSource, resumed with its
    // Last-Event-ID header), and the server replayed each message once.
    let sse = page.eval("return window.__sse;").await;
    assert_eq!(
        sse["opened"].as_array().map(Vec::len),
        Some(1),
        "the page opened more than one EventSource: {sse}"
    );
    let mut expected = serde_json::Map::new();
    for id in [from_sql, sent, while_down, after] {
        expected.insert(id.to_string(), json!(1));
    }
    assert_eq!(
        sse["received"],
        Value::Object(expected),
        "message events over the stream (id → times)"
    );
    // Resumed, not reset: the page loaded history once.
    let history_loads = page
        .eval("return performance.getEntriesByType('resource').filter(function (e) { return e.name.indexOf('/api/chat/messages/poll/') >= 0; }).length;")
        .await;
    assert_eq!(
        history_loads,
        json!(1),
        "the page reloaded its history (a reset?)"
    );
    page.assert_no_errors("after the restart").await;

    // Pictures for a person: a desktop window and a 360 px phone.
    let dir = target_dir();
    let (s, v) = post_json(&typing_url, Some(&token(bob)), r#"{"is_typing": true}"#).await;
    assert_eq!(s, 200, "{v}");
    page.wait(
        "Bob is typing (for the screenshot)",
        "return /Bob is typing/.test(document.querySelector('#typing').textContent);",
        &hark,
    )
    .await;
    let desktop = dir.join("browser-screenshot.png");
    browser.screenshot(&desktop).await;
    browser.set_window_size(360, 740).await;
    let layout = page
        .wait(
            "a 360 px wide viewport",
            "var d = document.documentElement; return window.innerWidth <= 400 && {inner: window.innerWidth, scroll: d.scrollWidth, client: d.clientWidth};",
            &hark,
        )
        .await;
    assert!(
        layout["scroll"].as_i64() <= layout["client"].as_i64(),
        "horizontal scroll at 360 px: {layout}"
    );
    let narrow = dir.join("browser-screenshot-360.png");
    browser.screenshot(&narrow).await;
    println!(
        "screenshots: {} and {}",
        desktop.display(),
        narrow.display()
    );

    // Signing out closes the stream and asks for a token again.
    let signout = browser.find("#signout").await;
    browser.click(&signout).await;
    page.wait(
        "the sign-in form",
        "return !document.querySelector('#signin').hidden && document.querySelector('#app').hidden && document.activeElement.id === 'token-input' && document.querySelector('#status').dataset.state === 'offline';",
        &hark,
    )
    .await;
    browser
        .screenshot(&dir.join("browser-screenshot-signin.png"))
        .await;

    page.assert_no_errors("at the end").await;
    // The console too (chromedriver's log): nothing severe but failed
    // requests while hark was down.
    let console = browser
        .console_log()
        .await
        .unwrap_or_else(|e| panic!("read the browser console: {e}"));
    let severe: Vec<&Value> = console
        .iter()
        .filter(|e| e["level"] == "SEVERE" && e["source"] != "network")
        .collect();
    assert!(severe.is_empty(), "console errors: {console:#?}");
    browser.quit().await;
    println!("browser test took {:?}", started.elapsed());
}

/// A stream that cannot resume (`event: reset`) makes the page reload its
/// history without losing or doubling anything; a refused token brings
/// back the sign-in form with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reloads_on_reset_and_asks_again_for_a_refused_token() {
    webdriver::require_browser();
    let (hark, fx, alice, bob, room) = general().await;
    let old = fx.insert(room, bob, "Before the reset").await;

    let browser = Browser::launch(900, 700).await;
    let page = Page { browser: &browser };
    browser
        .on_new_document("window.__garbleFirstCursor = true;")
        .await;
    browser.on_new_document(INSTRUMENT).await;
    browser
        .goto(&hark.url(&format!("/?token={}&room={room}", token(alice))))
        .await;
    page.wait(
        "live, with the history loaded again after the reset",
        "return document.querySelector('#status').dataset.state === 'live' && performance.getEntriesByType('resource').filter(function (e) { return e.name.indexOf('/api/chat/messages/poll/') >= 0; }).length === 2;",
        &hark,
    )
    .await;
    let opened = page.eval("return window.__sse.opened;").await;
    assert!(
        opened[0]
            .as_str()
            .unwrap()
            .contains("last_event_id=garbage"),
        "{opened}"
    );
    let new = fx.insert(room, bob, "After the reset").await;
    page.wait("the message after the reset", &shown_once(new), &hark)
        .await;
    assert_eq!(page.message_ids().await, vec![old, new]);
    page.assert_no_errors("after a reset").await;

    // A token the server refuses (its user does not exist).
    browser
        .goto(&hark.url(&format!("/?token={}", token(alice + bob + 1000))))
        .await;
    page.wait(
        "the sign-in form with the reason",
        "return !document.querySelector('#signin').hidden && /refused/.test(document.querySelector('#signin-error').textContent) && !sessionStorage.getItem('hark.token');",
        &hark,
    )
    .await;
    page.assert_no_errors("after a refused token").await;
    browser.quit().await;
}

/// Answers the page's sends and typing POSTs as hark does over the write
/// limit (tests/it/ratelimit.rs checks hark's side), and lets the rest
/// through. The real limit cannot refuse a browser's click reliably: at
/// its slowest it refills a write a second.
const STUB_429: &str = r#"
window.__realFetch = window.__realFetch || window.fetch;
window.__refused = [];
window.fetch = function (url, init) {
  var path = new URL(String(url), location.href).pathname;
  if (init && init.method === 'POST' && /^\/api\/chat\/(messages|rooms\/\d+\/typing)\/$/.test(path)) {
    window.__refused.push(path);
    var body = JSON.stringify({error: 'Sending too fast; try again in 7 seconds', code: 'rate_limited'});
    return Promise.resolve(new Response(body, {status: 429, headers: {
      'Content-Type': 'application/json', 'Cache-Control': 'no-store', 'Retry-After': '7'}}));
  }
  return window.__realFetch.apply(this, arguments);
};
return true;
"#;

/// A 429 on sending shows when to try again and keeps the text; a 429 on
/// typing shows nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_when_it_sends_too_fast() {
    webdriver::require_browser();
    let (hark, fx, alice, _bob, room) = general().await;

    let browser = Browser::launch(900, 700).await;
    let page = Page { browser: &browser };
    browser.on_new_document(INSTRUMENT).await;
    browser
        .goto(&hark.url(&format!("/?token={}&room={room}", token(alice))))
        .await;
    page.wait(
        "the stream to be live",
        "return document.querySelector('#status').dataset.state === 'live';",
        &hark,
    )
    .await;
    page.eval(STUB_429).await;

    // Typing is refused: nothing shows.
    let composer = browser.find("#composer").await;
    browser.send_keys(&composer, "Too fast").await;
    page.wait(
        "the refused typing POST",
        "return window.__refused.some(function (p) { return /typing/.test(p); });",
        &hark,
    )
    .await;
    let shown = page
        .eval("return document.querySelector('#send-error').textContent;")
        .await;
    assert_eq!(shown, "", "a refused typing POST showed something");

    // Sending is refused: the page says when to try again, keeps the text.
    let send = browser.find("#send").await;
    browser.click(&send).await;
    page.wait(
        "the too-fast message",
        "return /sending too fast, try again in 7 s/.test(document.querySelector('#send-error').textContent) && document.querySelector('#composer').value === 'Too fast' && !document.querySelector('#send').disabled;",
        &hark,
    )
    .await;
    page.assert_no_errors("after the refusals").await;
    let picture = target_dir().join("browser-screenshot-too-fast.png");
    browser.screenshot(&picture).await;
    println!("screenshot: {}", picture.display());

    // Once the server takes writes again, the same text goes out.
    page.eval("window.fetch = window.__realFetch; return true;")
        .await;
    browser.click(&send).await;
    page.wait(
        "the message sent after the refusal",
        "return Array.from(document.querySelectorAll('#messages li.mine[data-id]')).some(function (e) { return /Too fast/.test(e.textContent); }) && document.querySelector('#send-error').textContent === '' && document.querySelector('#composer').value === '';",
        &hark,
    )
    .await;
    assert_eq!(fx.message_ids(room).await.len(), 1, "one message stored");
    page.assert_no_errors("at the end").await;
    browser.quit().await;
}

/// An SQL UPDATE and an SQL DELETE change the open page without a reload:
/// the edit in place, marked edited; the deleted message gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sql_edit_and_delete_change_the_open_page() {
    webdriver::require_browser();
    let (hark, fx, alice, bob, room) = general().await;
    let kept = fx.insert(room, bob, "This one stays").await;
    let edited = fx.insert(room, bob, "Typo hree").await;
    let deleted = fx.insert(room, bob, "Something to moderate").await;
    let browser = Browser::launch(1100, 760).await;
    let page = Page { browser: &browser };
    browser.on_new_document(INSTRUMENT).await;
    browser
        .goto(&hark.url(&format!("/?token={}&room={room}", token(alice))))
        .await;
    page.wait(
        "the stream to be live",
        "var s = document.querySelector('#status'); return s && s.dataset.state === 'live';",
        &hark,
    )
    .await;
    assert_eq!(page.message_ids().await, vec![kept, edited, deleted]);
    // Gone with a reload: it shows there was none.
    page.eval("window.__sameDocument = true; return true;")
        .await;

    fx.db
        .execute(
            "UPDATE chat_chatmessage SET content = 'Typo here' WHERE id = $1",
            &[&edited],
        )
        .await
        .unwrap();
    page.wait(
        "the edit in place",
        &format!(
            r#"var li = document.querySelector('#messages [data-id="{edited}"]');
               return li && li.querySelector('.content').textContent === 'Typo here'
                 && /edited/.test(li.querySelector('.meta').textContent);"#
        ),
        &hark,
    )
    .await;
    fx.db
        .execute("DELETE FROM chat_chatmessage WHERE id = $1", &[&deleted])
        .await
        .unwrap();
    page.wait(
        "the deleted message gone",
        &format!(r#"return !document.querySelector('#messages [data-id="{deleted}"]');"#),
        &hark,
    )
    .await;
    assert_eq!(page.message_ids().await, vec![kept, edited], "in order");
    assert_eq!(
        page.eval("return window.__sameDocument === true;").await,
        true,
        "reloaded"
    );
    page.assert_no_errors("after the edit and the delete").await;
    browser.quit().await;
}

/// A script: true when the page shows `user` online (`on`) or not, both in
/// the room header's participants and in `room`'s entry of the rooms list.
fn online_shown(room: i64, user: i64, on: bool) -> String {
    format!(
        r#"var p = document.querySelector('#room-people [data-user="{user}"]');
           var b = document.querySelector('#rooms [data-room="{room}"]');
           if (!p || !b) return false;
           var inHeader = p.dataset.online === 'true' && !!p.querySelector('.online-dot');
           var inList = (b.dataset.online || '').split(',').indexOf('{user}') >= 0 && !!b.querySelector('.online-dot');
           return inHeader === {on} && inList === {on};"#
    )
}

/// A script: true when "Seen" shows under exactly these messages, each
/// with the readers' ids (`data-seen-by`).
fn seen_is(expected: &[(i64, &str)]) -> String {
    let expected = serde_json::to_string(&json!(expected)).unwrap();
    format!(
        r#"var s = Array.from(document.querySelectorAll('#messages [data-seen-by]')).map(function (e) {{
             var note = e.querySelector('.seen');
             return [Number(e.dataset.id), note && /^Seen\b/.test(note.textContent) ? e.dataset.seenBy : 'no text'];
           }});
           return JSON.stringify(s) === '{expected}';"#
    )
}

impl Page<'_> {
    /// Alice types `text` and sends it: its id once it shows as hers.
    async fn send(&self, text: &str, hark: &Hark) -> i64 {
        let composer = self.browser.find("#composer").await;
        self.browser.send_keys(&composer, text).await;
        let send = self.browser.find("#send").await;
        self.browser.click(&send).await;
        let script = format!(
            "var m = Array.from(document.querySelectorAll('#messages li.mine[data-id]')).filter(function (e) {{ return e.querySelector('.content').textContent === {text:?}; }}); return m.length === 1 && document.querySelector('#composer').value === '' && Number(m[0].dataset.id);"
        );
        self.wait(&format!("the sent message {text:?}"), &script, hark)
            .await
            .as_i64()
            .expect("an id")
    }
}

/// Bob's stream of `room`, open up to its `ready`: he is online while it is.
async fn events_of(hark: &Hark, room: i64, user: i64) -> sse::Sse {
    let auth = format!("Bearer {}", token(user));
    let mut s = sse::Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &auth)],
    )
    .await;
    let (reset, _) = sse::open(&mut s).await;
    assert_eq!(reset, None);
    s
}

/// Bob comes online and goes away: his dot shows and clears on Alice's
/// page. Bob reads: "Seen" shows under Alice's message; she sends another:
/// "Seen" is not under it until Bob reads again; a reload shows the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_online_dot_and_seen_and_clears_them() {
    webdriver::require_browser();
    // A short grace: Bob is offline soon after his stream closes.
    let (hark, fx) = setup(&[("HARK_PRESENCE_GRACE_MS", "300")]).await;
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let room = fx.room("General", &[alice, bob]).await;
    let read_url = hark.url(&format!("/api/chat/rooms/{room}/read/"));
    let page_url = hark.url(&format!("/?token={}&room={room}", token(alice)));

    let browser = Browser::launch(1100, 760).await;
    let page = Page { browser: &browser };
    browser.on_new_document(INSTRUMENT).await;
    browser.goto(&page_url).await;
    page.wait(
        "the stream to be live",
        "return document.querySelector('#status').dataset.state === 'live';",
        &hark,
    )
    .await;
    page.wait("no dot for Bob", &online_shown(room, bob, false), &hark)
        .await;

    // Bob opens a stream: his dot appears, labelled for everyone.
    let bob_stream = events_of(&hark, room, bob).await;
    page.wait("Bob's online dot", &online_shown(room, bob, true), &hark)
        .await;
    let labels = page
        .eval(&format!(
            r#"var h = document.querySelector('#room-people [data-user="{bob}"] .online-dot');
               var l = document.querySelector('#rooms [data-room="{room}"] .online-dot');
               return [h.getAttribute('aria-label'), h.title, h.getAttribute('role'), l.getAttribute('aria-label')];"#
        ))
        .await;
    assert_eq!(
        labels,
        json!(["online", "online", "img", "Bob online"]),
        "the dots' labels"
    );
    let own = page
        .eval(&format!(
            r#"return document.querySelector('#room-people [data-user="{alice}"]').dataset.online || null;"#
        ))
        .await;
    assert_eq!(own, Value::Null, "a dot for oneself");

    // Bob goes away: after the grace his dot clears.
    drop(bob_stream);
    page.wait("Bob's dot to clear", &online_shown(room, bob, false), &hark)
        .await;
    page.assert_no_errors("after Bob came and went").await;

    // Alice writes; Bob reads: "Seen" under her message.
    let first = page.send("First, from the browser", &hark).await;
    assert_eq!(page.eval(&seen_is(&[])).await, true, "seen before reading");
    let (s, v) = post_json(&read_url, Some(&token(bob)), "{}").await;
    assert!(s.is_success(), "{s}: {v}");
    let by_bob = bob.to_string();
    page.wait(
        "Seen under the first message",
        &seen_is(&[(first, &by_bob)]),
        &hark,
    )
    .await;
    let text = page
        .eval(&format!(
            r#"return document.querySelector('#messages [data-id="{first}"] .seen').textContent;"#
        ))
        .await;
    assert_eq!(text, "Seen", "a direct word for a room of two");

    // A newer message of hers: Bob has not read it, so no "Seen" under it
    // (the mark stays with what he read) until he reads again.
    let second = page.send("Second, not read yet", &hark).await;
    assert_eq!(
        page.eval(&seen_is(&[(first, &by_bob)])).await,
        true,
        "\"Seen\" moved to the unread message; page: {:#}",
        page.state().await
    );
    let (s, v) = post_json(&read_url, Some(&token(bob)), "{}").await;
    assert!(s.is_success(), "{s}: {v}");
    page.wait(
        "Seen under the second message only",
        &seen_is(&[(second, &by_bob)]),
        &hark,
    )
    .await;
    page.assert_no_errors("after the receipts").await;

    // A reload: "Seen" from the rooms list's read markers, and the dot from
    // who is online now.
    let bob_stream = events_of(&hark, room, bob).await;
    page.wait("Bob's dot again", &online_shown(room, bob, true), &hark)
        .await;
    browser.goto(&page_url).await;
    page.wait(
        "the reloaded page, live, with Bob online and Seen",
        &format!(
            "return document.querySelector('#status').dataset.state === 'live' && ({})() && ({})();",
            format_args!("function () {{ {} }}", online_shown(room, bob, true)),
            format_args!("function () {{ {} }}", seen_is(&[(second, &by_bob)])),
        ),
        &hark,
    )
    .await;
    let picture = target_dir().join("browser-screenshot-presence.png");
    browser.screenshot(&picture).await;
    println!("screenshot: {}", picture.display());
    drop(bob_stream);
    page.wait(
        "Bob's dot to clear after the reload",
        &online_shown(room, bob, false),
        &hark,
    )
    .await;
    page.assert_no_errors("at the end").await;
    browser.quit().await;
}

/// The header's visible children on one row, the page no wider than the
/// window, and where the parts that must not move are.
const PHONE_LAYOUT: &str = r#"
var rect = function (s) {
  var e = typeof s === 'string' ? document.querySelector(s) : s;
  if (!e || e.hidden || !e.getClientRects().length) return null;
  var r = e.getBoundingClientRect();
  return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height, width: r.width};
};
var kids = Array.from(document.querySelector('header').children)
  .map(function (e) { return [e.id || e.tagName.toLowerCase(), rect(e)]; })
  .filter(function (k) { return k[1]; });
var tops = kids.map(function (k) { return k[1].top; });
var bottoms = kids.map(function (k) { return k[1].bottom; });
var d = document.documentElement;
return {
  inner: window.innerWidth,
  scroll: Math.max(d.scrollWidth, document.body.scrollWidth),
  header: kids.map(function (k) { return k[0]; }),
  oneRow: Math.max.apply(null, tops) < Math.min.apply(null, bottoms),
  headerRects: kids,
  whoami: rect('#whoami'),
  nav: rect('nav'),
  card: rect('#rooms li:last-child'),
  title: rect('#room-title'),
  people: rect('#room-people'),
  messages: rect('#messages'),
  typing: rect('#typing'),
  composer: rect('#compose-form'),
};
"#;

/// A colour as the page computes it from a CSS expression.
fn computed_colour(css: &str) -> String {
    format!(
        "var p = document.createElement('span'); p.style.color = {css:?}; document.body.appendChild(p); var c = getComputedStyle(p).color; p.remove(); return c;"
    )
}

/// The page on a phone (390×844), as a new user meets it: a token that is
/// not one gets its error in the error colour; after signing in, the
/// header (Sign out included) is one row, nothing scrolls sideways, the
/// room's card shows its last message, the room shows who is in it, no
/// empty band sits under the card, and Bob's typing line coming and going
/// moves nothing. Screenshots go to target/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_fits_a_phone() {
    webdriver::require_browser();
    let (hark, fx, alice, bob, room) = general().await;
    fx.insert(room, alice, "Hi Bob!").await;
    fx.insert(
        room,
        bob,
        "Welcome to the room, Alice: this last message is long enough to be cut short on a phone",
    )
    .await;
    let dir = target_dir();

    let browser = Browser::launch(390, 844).await;
    let page = Page { browser: &browser };
    // A phone's viewport (a window cannot be that narrow in headless
    // Chromium): 390×844 CSS pixels, touch, the viewport meta honoured.
    browser
        .cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
        )
        .await
        .unwrap_or_else(|e| panic!("emulate a phone: {e}"));
    browser.on_new_document(INSTRUMENT).await;
    browser.goto(&hark.url("/")).await;
    let size = page
        .wait(
            "the sign-in form",
            "return !document.querySelector('#signin').hidden && document.activeElement.id === 'token-input' && [innerWidth, innerHeight];",
            &hark,
        )
        .await;
    assert_eq!(size, json!([390, 844]), "the viewport");

    // A new user pastes something that is not a token.
    let input = browser.find("#token-input").await;
    browser.send_keys(&input, "not-a-token").await;
    let submit = browser.find("#signin button[type=submit]").await;
    browser.click(&submit).await;
    page.wait(
        "the sign-in error",
        "return /does not look like an access token/.test(document.querySelector('#signin-error').textContent);",
        &hark,
    )
    .await;
    let shown = page
        .eval("return getComputedStyle(document.querySelector('#signin-error')).color;")
        .await;
    let error = page.eval(&computed_colour("var(--error)")).await;
    let muted = page.eval(&computed_colour("var(--muted)")).await;
    assert_ne!(error, muted);
    assert_eq!(shown, error, "the sign-in error is not in the error colour");
    let layout = page.eval(PHONE_LAYOUT).await;
    assert_eq!(layout["oneRow"], true, "the header wraps: {layout:#}");
    assert!(
        layout["scroll"].as_f64() <= layout["inner"].as_f64(),
        "horizontal overflow: {layout:#}"
    );
    browser
        .screenshot(&dir.join("browser-screenshot-phone-signin.png"))
        .await;

    // Then the token.
    browser.send_keys(&input, &token(alice)).await;
    browser.click(&submit).await;
    page.wait(
        "the stream to be live",
        "return document.querySelector('#status').dataset.state === 'live' && document.querySelectorAll('#messages [data-id]').length === 2;",
        &hark,
    )
    .await;
    page.wait(
        "the rooms list with the names",
        "return /Alice/.test(document.querySelector('#whoami').textContent) && /Bob/.test(document.querySelector('#room-people').textContent);",
        &hark,
    )
    .await;
    let layout = page.eval(PHONE_LAYOUT).await;
    assert_eq!(
        layout["header"],
        json!(["h1", "whoami", "status", "signout"]),
        "{layout:#}"
    );
    assert_eq!(
        layout["oneRow"], true,
        "the header wraps (Sign out on its own row?): {layout:#}"
    );
    assert!(
        layout["whoami"]["width"].as_f64() >= Some(40.0),
        "the name has no room: {layout:#}"
    );
    assert!(
        layout["scroll"].as_f64() <= layout["inner"].as_f64(),
        "horizontal overflow: {layout:#}"
    );
    // "With …" and the last message, visible.
    let texts = page
        .eval(
            r#"var vis = function (s) { var e = document.querySelector(s); return e && e.getClientRects().length > 0 && e.getBoundingClientRect().height > 0 ? e.textContent : null; };
               return {people: vis('#room-people'), preview: vis('#rooms [data-room] .room-meta')};"#,
        )
        .await;
    assert!(
        texts["people"]
            .as_str()
            .is_some_and(|t| t.starts_with("With ") && t.contains("Bob")),
        "the \"With …\" line: {texts}"
    );
    assert!(
        texts["preview"]
            .as_str()
            .is_some_and(|t| t.contains("Welcome to the room")),
        "the last message under the room's name: {texts}"
    );
    // No empty band: the card ends where the list ends (the nav's
    // padding), and the room's title follows the list at once.
    let f = |v: &Value| v.as_f64().expect("a number");
    let below_card = f(&layout["nav"]["bottom"]) - f(&layout["card"]["bottom"]);
    let above_title = f(&layout["title"]["top"]) - f(&layout["nav"]["bottom"]);
    assert!(
        below_card <= 12.0 && above_title <= 12.0,
        "an empty band under the room card: {below_card} px to the list's end, \
         {above_title} px from it to the title; {layout:#}"
    );

    // Bob types: nothing moves, neither when the line comes nor when it goes.
    let parts = ["nav", "card", "title", "messages", "typing", "composer"];
    let before = page.eval(PHONE_LAYOUT).await;
    let typing_url = hark.url(&format!("/api/chat/rooms/{room}/typing/"));
    let (s, v) = post_json(&typing_url, Some(&token(bob)), r#"{"is_typing": true}"#).await;
    assert_eq!(s, 200, "{v}");
    page.wait(
        "Bob is typing, below and in the room's card",
        "return /Bob is typing/.test(document.querySelector('#typing').textContent) && /Bob is typing/.test(document.querySelector('#rooms [data-room] .room-meta').textContent);",
        &hark,
    )
    .await;
    let during = page.eval(PHONE_LAYOUT).await;
    browser
        .screenshot(&dir.join("browser-screenshot-phone.png"))
        .await;
    let (s, v) = post_json(&typing_url, Some(&token(bob)), r#"{"is_typing": false}"#).await;
    assert_eq!(s, 200, "{v}");
    page.wait(
        "the typing line to clear",
        "return document.querySelector('#typing').textContent === '' && /Welcome/.test(document.querySelector('#rooms [data-room] .room-meta').textContent);",
        &hark,
    )
    .await;
    let after = page.eval(PHONE_LAYOUT).await;
    for part in parts {
        for (when, now) in [("appears", &during), ("goes", &after)] {
            assert_eq!(
                before[part], now[part],
                "{part} moved when the typing line {when}"
            );
        }
    }
    assert_eq!(during["oneRow"], true, "{during:#}");
    println!(
        "screenshots: {} and {}",
        dir.join("browser-screenshot-phone-signin.png").display(),
        dir.join("browser-screenshot-phone.png").display()
    );
    page.assert_no_errors("on a phone").await;
    browser.quit().await;
}

/// A token that expires while the page is open: hark.js asks the page for
/// a fresh one (`getToken`), the page asks the person, and once it is
/// pasted everything goes on in the same room without a reload: what was
/// written meanwhile shows once, over a stream resumed from its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_new_token_when_it_expires_and_goes_on() {
    webdriver::require_browser();
    let (hark, fx, alice, bob, room) = general().await;
    let old = fx.insert(room, bob, "Before the token expires").await;

    let browser = Browser::launch(900, 700).await;
    let page = Page { browser: &browser };
    browser.on_new_document(INSTRUMENT).await;
    let short = token_for(alice, chrono::Duration::seconds(3));
    browser
        .goto(&hark.url(&format!("/?token={short}&room={room}")))
        .await;
    page.wait(
        "the stream to be live",
        "return document.querySelector('#status').dataset.state === 'live';",
        &hark,
    )
    .await;
    page.wait(
        "the page to ask for a new token",
        "return !document.querySelector('#signin').hidden && document.querySelector('#app').hidden && /expired/.test(document.querySelector('#signin-error').textContent) && /expired/i.test(document.querySelector('#status').textContent);",
        &hark,
    )
    .await;
    let meanwhile = fx
        .insert(room, bob, "Written while the token was expired")
        .await;
    let fresh = token(alice);
    let input = browser.find("#token-input").await;
    browser.send_keys(&input, &fresh).await;
    let submit = browser.find("#signin button[type=submit]").await;
    browser.click(&submit).await;
    page.wait(
        "live again, in the same room",
        &format!(
            "return document.querySelector('#status').dataset.state === 'live' && !document.querySelector('#app').hidden && document.querySelector('#signin').hidden && ({})();",
            format_args!("function () {{ {} }}", shown_once(meanwhile))
        ),
        &hark,
    )
    .await;
    let after = fx.insert(room, bob, "After the new token").await;
    page.wait("the message after", &shown_once(after), &hark)
        .await;
    assert_eq!(page.message_ids().await, vec![old, meanwhile, after]);
    let state = page
        .eval(
            "return {stored: sessionStorage.getItem('hark.token'), sse: window.__sse, history: performance.getEntriesByType('resource').filter(function (e) { return e.name.indexOf('/api/chat/messages/poll/') >= 0; }).length};",
        )
        .await;
    assert_eq!(state["stored"], json!(fresh), "the new token is kept");
    assert_eq!(state["history"], 1, "the history was loaded again");
    assert_eq!(
        state["sse"]["received"],
        json!({ meanwhile.to_string(): 1, after.to_string(): 1 }),
        "message events over the streams (id → times)"
    );
    assert!(
        state["sse"]["opened"].as_array().map(Vec::len) >= Some(2),
        "{state}"
    );
    page.assert_no_errors("after the new token").await;
    browser.quit().await;
}
