//! Test support: a private PostgreSQL cluster per test binary, a fresh
//! database per test, the real `hark` binary per test over real HTTP, and
//! small HTTP / SQL helpers.
//!
//! The cluster lives on a thread of its own with its own runtime, so it
//! outlives each test's runtime. It is started through hark's embedded
//! module with `ephemeral: true`: its watchdog holds a pipe from this
//! process, so when the test binary exits — passing, failing or aborting —
//! PostgreSQL stops and its temporary directory is removed.



pub mod sse;
pub mod webdriver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::NoTls;

pub const SECRET: &str = "test-secret-for-hark";

/// A first request that hark's own HTTP leaves to hyper (a method it does
/// not serve; a 405 that keeps the connection): a request after it on the
/// same connection is served by hyper.
pub const HYPER_FIRST: Option<&str> = Some("PUT /api/chat/messages/");

struct Cluster {
    /// `host=… port=… user=postgres` without a dbname.
    base: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("test-postgres".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let dir = std::env::temp_dir().join(format!(
                        "hark-test-pg-{}-{}",
                        std::process::id(),
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_nanos())
                            .unwrap_or(0)
                    ));
                    let settings = [
                        ("fsync", "off"),
                        ("synchronous_commit", "off"),
                        ("full_page_writes", "off"),
                        ("max_connections", "300"),
                        ("shared_buffers", "64MB"),
                    ];
                    let pg = hark::db::embedded::EmbeddedPg::start(
                        hark::db::embedded::EmbeddedOptions {
                            data_dir: dir,
                            ephemeral: true,
                            settings: settings
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect(),
                        },
                    )
                    .await
                    .expect("start the test PostgreSQL cluster");
                    let base = pg.connection_string("postgres");
                    let base = base
                        .split(' ')
                        .filter(|kv| !kv.starts_with("dbname="))
                        .collect::<Vec<_>>()
                        .join(" ");
                    tx.send(base).expect("send");
                    // Keep the cluster for the life of the process.
                    std::future::pending::<()>().await;
                    drop(pg);
                });
            })
            .expect("spawn the cluster thread");
        let base = rx.recv().expect("the test cluster did not start");
        Cluster { base }
    })
}

/// A fresh, empty database; returns its connection string.
pub async fn fresh_db() -> String {
    let c = cluster();
    let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("t{}_{n}", std::process::id());
    let admin = connect(&format!("{} dbname=postgres", c.base)).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    format!("{} dbname={name}", c.base)
}

pub async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A running `hark` process.
pub struct Hark {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub db: String,
    logs: Arc<Mutex<String>>,
    env: Vec<(String, String)>,
}

impl Hark {
    /// Starts hark on `db` with a random port; `env` adds or overrides settings.
    pub async fn start(db: &str, env: &[(&str, &str)]) -> Hark {
        Hark::start_at(db, "127.0.0.1:0", env).await
    }

    pub async fn start_at(db: &str, bind: &str, env: &[(&str, &str)]) -> Hark {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hark"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", db)
            .env("HARK_BIND", bind)
            .env("HARK_JWT_SECRET", SECRET)
            .env("HARK_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn hark");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("hark is listening on http://") {
                    return rest.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let _ = child.start_kill();
            tokio::time::sleep(Duration::from_millis(200)).await;
            panic!("hark did not start; its log:\n{}", logs.lock().unwrap());
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Hark {
            child: Some(child),
            addr,
            db: db.to_string(),
            logs,
            env,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    /// SIGTERM, then wait for the exit; returns how long it took.
    pub async fn stop(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .expect("hark did not exit within 15 s of SIGTERM")
                .expect("wait");
            assert!(
                status.success(),
                "hark exited with {status}; log:\n{}",
                self.logs()
            );
        }
        started.elapsed()
    }

    /// Stops and starts again on the same address and settings.
    pub async fn restart(&mut self) {
        self.stop().await;
        let env: Vec<(String, String)> = self.env.clone();
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let addr = self.addr.to_string();
        // The port may linger briefly in the kernel; retry a few times.
        for attempt in 0..20 {
            let next = tokio::time::timeout(
                Duration::from_secs(40),
                Hark::try_start_at(&self.db, &addr, &env_ref),
            )
            .await;
            if let Ok(Some(h)) = next {
                *self = h;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        panic!("hark did not restart on {addr}");
    }

    async fn try_start_at(db: &str, bind: &str, env: &[(&str, &str)]) -> Option<Hark> {
        let h = tokio::spawn({
            let (db, bind) = (db.to_string(), bind.to_string());
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            async move {
                let env_ref: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Hark::start_at(&db, &bind, &env_ref).await
            }
        })
        .await;
        h.ok()
    }

    /// Waits until /readyz says 200 (bounded).
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok((StatusCode::OK, _, _)) =
                try_request(Method::GET, &self.url("/readyz"), None, None, &[]).await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("hark never became ready; log:\n{}", self.logs());
    }

    /// Polls /metrics until `name` equals `value` (bounded).
    pub async fn wait_for_metric(&self, name: &str, value: f64) {
        for _ in 0..400 {
            if self.metric(name).await == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{name} never reached {value} (now {})",
            self.metric(name).await
        );
    }

    /// A metric's value from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = request(Method::GET, &self.url("/metrics"), None, None).await;
        let text = String::from_utf8_lossy(&body).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }
}

/// A simplejwt-shaped access token for `user` signed with [`SECRET`].
pub fn token(user: i64) -> String {
    token_for(user, chrono::Duration::hours(1))
}

/// The same, good for `ttl` (its `exp`: now + ttl, in whole seconds).
pub fn token_for(user: i64, ttl: chrono::Duration) -> String {
    hark::auth::issue(SECRET.as_bytes(), user, ttl)
}

pub type Headers = hyper::HeaderMap;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request; panics on a transport error.
pub async fn request(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Headers, Bytes) {
    let ct: &[(&str, &str)] = if body.is_some() {
        &[("content-type", "application/json")]
    } else {
        &[]
    };
    try_request(method, url, token, body, ct)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// One request with explicit extra headers.
pub async fn try_request(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Headers, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

pub async fn get_json(url: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = request(Method::GET, url, token, None).await;
    (s, json(&b))
}

pub async fn post_json(
    url: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = request(Method::POST, url, token, Some(body)).await;
    (s, json(&b))
}

/// Chat fixtures written with plain SQL, as Django or psql would.
pub struct Fixture {
    pub db: tokio_postgres::Client,
}

impl Fixture {
    pub async fn new(conn: &str) -> Fixture {
        Fixture {
            db: connect(conn).await,
        }
    }

    pub async fn user(&self, username: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO users_user (username, first_name, last_name) VALUES ($1::text, initcap($1::text), 'Test') RETURNING id",
                &[&username],
            )
            .await
            .expect("insert user")
            .get(0)
    }

    pub async fn room(&self, name: &str, members: &[i64]) -> i64 {
        let id: i64 = self
            .db
            .query_one(
                "INSERT INTO chat_chatroom (type, name) VALUES ('group', $1) RETURNING id",
                &[&name],
            )
            .await
            .expect("insert room")
            .get(0);
        for m in members {
            self.join(id, *m).await;
        }
        id
    }

    pub async fn join(&self, room: i64, user: i64) {
        self.db
            .execute(
                "INSERT INTO chat_chatroom_participants (chatroom_id, user_id) VALUES ($1, $2)",
                &[&room, &user],
            )
            .await
            .expect("insert participant");
    }

    /// Every message id in `room`, ascending.
    pub async fn message_ids(&self, room: i64) -> Vec<i64> {
        self.db
            .query(
                "SELECT id FROM chat_chatmessage WHERE room_id = $1 ORDER BY id",
                &[&room],
            )
            .await
            .expect("read message ids")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// A plain SQL insert, as any writer would do it.
    pub async fn insert(&self, room: i64, sender: i64, content: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) VALUES ($1, $2, $3, now()) RETURNING id",
                &[&room, &sender, &content],
            )
            .await
            .expect("insert message")
            .get(0)
    }

    /// `n` messages in one statement, so one commit: readers see all or
    /// none. Returns their ids in order.
    pub async fn insert_many(&self, room: i64, sender: i64, n: i64, tag: &str) -> Vec<i64> {
        let rows = self
            .db
            .query(
                "INSERT INTO chat_chatmessage (room_id, sender_id, content, created_at) \
                 SELECT $1, $2, $3 || g, now() FROM generate_series(1, $4::int8) g RETURNING id",
                &[&room, &sender, &tag, &n],
            )
            .await
            .expect("insert messages");
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        ids
    }
}

/// Terminates the LISTEN backend(s) of hark processes on `db`'s database,
/// first waiting (bounded) until one is connected — after an earlier kill
/// the replacement may still be on its way. Returns how many were killed.
pub async fn kill_listener(db: &tokio_postgres::Client) -> i64 {
    for _ in 0..400 {
        let killed: i64 = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'hark-listener' AND datname = current_database()",
                &[],
            )
            .await
            .expect("terminate the listener")
            .get(0);
        if killed > 0 {
            return killed;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    0
}

/// Starts hark on a fresh database (its schema applied) and returns both.
pub async fn setup(env: &[(&str, &str)]) -> (Hark, Fixture) {
    let db = fresh_db().await;
    let hark = Hark::start(&db, env).await;
    hark.wait_ready().await;
    let fx = Fixture::new(&db).await;
    (hark, fx)
}

/// The poll URL for a room and optional cursor.
pub fn poll_url(hark: &Hark, room: i64, since: Option<&str>, extra: &str) -> String {
    let mut u = format!("/api/chat/messages/poll/?room_id={room}");
    if let Some(s) = since {
        u.push_str("&since=");
        u.push_str(&form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>());
    }
    u.push_str(extra);
    hark.url(&u)
}

/// Asserts that hark refuses `var=value` at start with clap's "invalid
/// value" naming the value. Were the value accepted, hark would stop at
/// once all the same (a database URL without a secret is refused before
/// connecting), so a wrong acceptance fails on the message, not a hang.
pub fn assert_refused_at_start(var: &str, value: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hark"))
        .env_clear()
        .env("DATABASE_URL", "host=/nonexistent dbname=none")
        .env(var, value)
        .output()
        .expect("run hark");
    assert!(!out.status.success(), "{var}={value} was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value") && err.contains(value),
        "{var}={value}: {err}"
    );
}

pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hark-test-{}-{name}", std::process::id()))
}

/// A raw HTTP/1.1 connection, for what a client library hides: several
/// requests on one connection, pipelining, exact bytes. Reads answers that
/// have a `Content-Length` body (or are a 204 or 304).
pub struct Raw {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: tokio::net::TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next answer: its head (lower-cased) and body. Panics if the
    /// connection ends first or nothing comes within `wait`.
    pub async fn answer_within(&mut self, wait: Duration) -> (String, Vec<u8>) {
        self.next_answer(wait, true).await
    }

    /// The next answer to a `HEAD`: its head, which gives the length of a
    /// body that is not sent.
    pub async fn answer_to_head(&mut self) -> String {
        self.next_answer(Duration::from_secs(10), false).await.0
    }

    async fn next_answer(&mut self, wait: Duration, with_body: bool) -> (String, Vec<u8>) {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                // 204 and 304 have no body, and no length to say so; nor
                // need an answer to a HEAD have one.
                let bodiless = !with_body || [" 204 ", " 304 "].iter().any(|c| head.contains(c));
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().expect("a length"))
                    .or(bodiless.then_some(0))
                    .unwrap_or_else(|| panic!("no content-length: {head}"));
                let start = end + 4;
                let len = if with_body { len } else { 0 };
                if self.buf.len() >= start + len {
                    let body = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return (head, body);
                }
            }
            let n = self.read_some(wait).await;
            assert!(
                n > 0,
                "the connection ended before a whole answer: {}",
                self.shown()
            );
        }
    }

    /// What is buffered, cut short for a panic message.
    fn shown(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf[..self.buf.len().min(600)]);
        format!("{text:?} ({} bytes)", self.buf.len())
    }

    pub async fn answer(&mut self) -> (String, Vec<u8>) {
        self.answer_within(Duration::from_secs(10)).await
    }

    /// Whether the server ends the connection within `wait`, sending
    /// nothing more first.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        self.read_some(wait).await == 0 && self.buf.is_empty()
    }

    async fn read_some(&mut self, wait: Duration) -> usize {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing from the server within {wait:?}; have {}",
                self.shown()
            ),
            Ok(Err(_)) => 0,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
        }
    }
}

/// Polls `check` until it holds, within a generous bound (state the server
/// reaches on its own, e.g. after a NOTIFY, is looked at, not slept on).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 15 s");
}
