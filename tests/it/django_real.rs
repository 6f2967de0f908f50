//! hark beside a real Django project: `tests/django_app`, the seed's
//! backend (a custom `users.User`, `chat.ChatRoom`, `chat.ChatMessage`,
//! simplejwt, the Phase 1 endpoints as DRF views), on the same database.
//!
//! Each test takes a fresh database of the test cluster as Django's
//! `manage.py migrate` leaves it (migrate runs once per test process, into
//! a template that each test's database is copied from), starts hark on it
//! (which adds its columns and triggers to Django's tables), serves Django
//! with gunicorn, and drives Django's ORM through `manage.py orm` (a
//! line-oriented command of the app: every write is a model method or a
//! queryset, as a Django view would do it). Django and hark share the
//! signing key, as in docs/deploy.md; every token here is one simplejwt
//! made.
//!
//! The Python side lives in a virtualenv under target/, made once from
//! `tests/django_app/requirements.txt` (pinned) and kept until the pins
//! change. It needs `python3` with venv, and the nginx test needs `nginx`:
//! `.ci/run` installs what is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::kit::sse::{open, Sse};
use crate::kit::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The pins; the virtualenv is named by their hash.
const REQUIREMENTS: &str = include_str!("../django_app/requirements.txt");

/// Django's `SECRET_KEY`, which simplejwt signs with by default, and so
/// hark's `HARK_JWT_SECRET` (not the kit's secret: a token that works
/// here was made by Django).
const DJANGO_SECRET: &str = "django-insecure-hark-test-0123456789-abcdefghijklmnop";

/// The bound of each single step (a request, an ORM command, an event).
const T: Duration = Duration::from_secs(15);

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django_app")
}

// ------------------------------------------------------------ the virtualenv

/// The virtualenv with the pinned Django stack, made once per content of
/// the requirements (the first time about half a minute, from PyPI), shared
/// by the tests of this process and, under a file lock, by other test
/// processes.
async fn django_venv() -> PathBuf {
    static VENV: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    VENV.get_or_init(make_venv).await.clone()
}

async fn make_venv() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join(format!(
        "django-venv-{:016x}",
        fnv1a(REQUIREMENTS.as_bytes())
    ));
    // Another test process making the same venv: wait for it. The lock
    // goes with the file, closed when this function returns.
    let lock_path = tmp.join("django-venv.lock");
    let lock = tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::create(&lock_path)
            .unwrap_or_else(|e| panic!("{}: {e}", lock_path.display()));
        // SAFETY: flock on an open descriptor this closure owns.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", lock_path.display());
        f
    })
    .await
    .expect("lock the venv");
    // Written last: a venv without it is one whose making was cut short.
    let done = dir.join("hark-complete");
    if done.exists() {
        let mut probe = Command::new(dir.join("bin/python"));
        probe.args([
            "-c",
            "import django, rest_framework, rest_framework_simplejwt, psycopg, gunicorn",
        ]);
        // One whose Python went away (a pyenv switch) is made again.
        if run(&mut probe, "the venv's python", T)
            .await
            .status
            .success()
        {
            drop(lock);
            return dir;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    match Command::new("python3").arg("--version").output().await {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("python3 --version failed: {}", text(&out)),
        Err(e) => panic!(
            "the Django tests need python3 (CPython 3.10 or later, with venv) on PATH, \
             and cannot start it: {e}. On Debian: apt-get install python3 python3-venv \
             (.ci/run does)."
        ),
    }
    let out = run(
        Command::new("python3").args(["-m", "venv"]).arg(&dir),
        "python3 -m venv",
        Duration::from_secs(120),
    )
    .await;
    assert!(
        out.status.success(),
        "python3 -m venv {} failed (Debian: apt-get install python3-venv):\n{}",
        dir.display(),
        text(&out)
    );
    let requirements = app_dir().join("requirements.txt");
    let out = run(
        Command::new(dir.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "-r",
            ])
            .arg(&requirements),
        "pip install the Django stack",
        Duration::from_secs(600),
    )
    .await;
    assert!(
        out.status.success(),
        "pip install -r {} failed:\n{}",
        requirements.display(),
        text(&out)
    );
    std::fs::write(&done, REQUIREMENTS).expect("mark the venv complete");
    drop(lock);
    dir
}

// ------------------------------------------------------------ Django's side

/// The environment `project/settings.py` reads: the database of `db` (a
/// connection string of the kit: its host is the cluster's socket
/// directory) and the secret.
fn django_env(db: &str) -> Vec<(String, String)> {
    let config: tokio_postgres::Config = db.parse().expect("a connection string");
    let mut env = vec![
        ("DJANGO_SECRET_KEY".to_string(), DJANGO_SECRET.to_string()),
        (
            "DJANGO_DB_NAME".to_string(),
            config.get_dbname().expect("a dbname").to_string(),
        ),
    ];
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
        };
        env.push(("DJANGO_DB_HOST".into(), host));
    }
    if let Some(port) = config.get_ports().first() {
        env.push(("DJANGO_DB_PORT".into(), port.to_string()));
    }
    if let Some(user) = config.get_user() {
        env.push(("DJANGO_DB_USER".into(), user.to_string()));
    }
    if let Some(pw) = config.get_password() {
        env.push((
            "DJANGO_DB_PASSWORD".into(),
            String::from_utf8_lossy(pw).into_owned(),
        ));
    }
    env
}

/// A program of the venv run in the Django project's directory with a
/// clean environment (and no `__pycache__` left in the source tree).
fn python_cmd(venv: &Path, program: &str, db: &str) -> Command {
    let mut cmd = Command::new(venv.join("bin").join(program));
    cmd.current_dir(app_dir())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .envs(django_env(db));
    cmd
}

/// `manage.py <args>` to its end; panics with its output on failure.
async fn manage(venv: &Path, db: &str, args: &[&str]) -> String {
    let mut cmd = python_cmd(venv, "python", db);
    cmd.arg("manage.py").args(args);
    let what = format!("manage.py {}", args.join(" "));
    let out = run(&mut cmd, &what, Duration::from_secs(120)).await;
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    text(&out)
}

/// Starts a child in a process group of its own (so that the group, the
/// child and what it forks, can be ended) that dies with the thread that
/// started it.
fn spawn_group(cmd: &mut Command, what: &str) -> Child {
    cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    // SAFETY: between fork and exec only the async-signal-safe prctl call.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"))
}

/// Kills a process group started by [`spawn_group`] and reaps its leader.
fn kill_group(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        if let Some(pid) = c.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        } else {
            let _ = c.start_kill();
        }
    }
}

/// Django served by gunicorn (one worker process with threads, as the
/// typing cache of the seed needs) on a free port of 127.0.0.1.
struct Django {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Django {
    async fn start(venv: &Path, db: &str) -> Django {
        let log = PathBuf::from(format!("{}.log", fresh_temp_dir("hark-gunicorn").display()));
        let file = std::fs::File::create(&log).expect("gunicorn's log");
        let mut cmd = python_cmd(venv, "gunicorn", db);
        cmd.args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "8",
            "--graceful-timeout",
            "2",
            "--access-logfile",
            "-",
            "--error-logfile",
            "-",
            "project.wsgi:application",
        ])
        .stdout(Stdio::from(file.try_clone().expect("log")))
        .stderr(Stdio::from(file));
        let mut django = Django {
            child: Some(spawn_group(&mut cmd, "gunicorn")),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        // gunicorn names the port it got: "Listening at: http://127.0.0.1:N (pid)".
        let addr = wait_for(Duration::from_secs(30), || async {
            let log = std::fs::read_to_string(&django.log).unwrap_or_default();
            let rest = log.split("Listening at: http://").nth(1)?;
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        })
        .await;
        django.addr =
            addr.unwrap_or_else(|| panic!("gunicorn did not listen; its log:\n{}", django.logs()));
        // Then until the worker answers (any answer: a 404 for `/`).
        let url = django.url("/");
        let up = within(Duration::from_secs(30), || async {
            try_request(Method::GET, &url, None, None, &[])
                .await
                .is_ok()
        })
        .await;
        assert!(up, "Django never answered; its log:\n{}", django.logs());
        django
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Django {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Django's ORM, driven through `manage.py orm` (tests/django_app/chat/
/// management/commands/orm.py): one JSON command a line, one answer a line.
struct Orm {
    _child: Child,
    stdin: ChildStdin,
    out: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl Orm {
    async fn start(venv: &Path, db: &str) -> Orm {
        let log = PathBuf::from(format!("{}.log", fresh_temp_dir("hark-orm").display()));
        let mut cmd = python_cmd(venv, "python", db);
        cmd.args(["manage.py", "orm"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(&log).expect("the ORM's log"),
            ))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start manage.py orm");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut orm = Orm {
            _child: child,
            stdin,
            out,
            log,
        };
        let ready = orm.answer(Duration::from_secs(30)).await;
        assert_eq!(ready, json!({"ok": "ready"}), "{}", orm.logs());
        orm
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn answer(&mut self, limit: Duration) -> Value {
        let line = tokio::time::timeout(limit, self.out.next_line())
            .await
            .unwrap_or_else(|_| panic!("manage.py orm: no answer within {limit:?}"))
            .expect("read manage.py orm");
        let line =
            line.unwrap_or_else(|| panic!("manage.py orm exited; its log:\n{}", self.logs()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("manage.py orm said {line:?}: {e}"))
    }

    /// One command; its result (panics on an error).
    async fn call(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to manage.py orm");
        let mut answer = self.answer(T).await;
        match answer.get_mut("ok") {
            Some(ok) => ok.take(),
            None => panic!("manage.py orm: {cmd} failed: {answer}"),
        }
    }

    async fn user(&mut self, username: &str, password: Option<&str>) -> i64 {
        let first = format!("{}{}", username[..1].to_uppercase(), &username[1..]);
        let cmd = json!({
            "op": "user",
            "username": username,
            "password": password,
            "first_name": first,
            "last_name": "Django",
        });
        self.call(cmd).await.as_i64().expect("a user id")
    }

    async fn room(&mut self, name: &str, members: &[i64]) -> i64 {
        self.call(json!({"op": "room", "name": name, "members": members}))
            .await
            .as_i64()
            .expect("a room id")
    }

    /// simplejwt's (access, refresh) pair for a user.
    async fn tokens(&mut self, user: i64) -> (String, String) {
        let t = self.call(json!({"op": "tokens", "user": user})).await;
        (
            t["access"].as_str().unwrap().to_string(),
            t["refresh"].as_str().unwrap().to_string(),
        )
    }

    /// `ChatMessage.objects.create(...)`: the message as DRF formats it.
    async fn send(&mut self, room: i64, sender: i64, content: &str) -> Value {
        self.call(json!({"op": "send", "room": room, "sender": sender, "content": content}))
            .await
    }

    async fn send_many(&mut self, room: i64, sender: i64, contents: &[&str]) -> Vec<Value> {
        let v = self
            .call(json!({"op": "send_many", "room": room, "sender": sender, "contents": contents}))
            .await;
        v.as_array().expect("messages").clone()
    }
}

impl Drop for Orm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A database Django migrated, with hark, Django (gunicorn) and the ORM on it.
struct Stack {
    db: String,
    venv: PathBuf,
    hark: Hark,
    django: Django,
    orm: Orm,
}

impl Stack {
    async fn start() -> Stack {
        let venv = django_venv().await;
        let db = migrated_db(&venv).await;
        let hark = async {
            let hark = start_hark(&db, &[("HARK_JWT_SECRET", DJANGO_SECRET)]).await;
            hark.wait_ready().await;
            hark
        };
        let (hark, django, orm) =
            tokio::join!(hark, Django::start(&venv, &db), Orm::start(&venv, &db));
        Stack {
            db,
            venv,
            hark,
            django,
            orm,
        }
    }
}

/// A fresh database of the test cluster as `manage.py migrate` leaves it,
/// hark not yet started on it: Django first, as in production, where
/// hark then adds its own columns and triggers to Django's tables.
/// migrate runs once per test process, into a template database that
/// each test's database is copied from.
async fn migrated_db(venv: &Path) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    static COPIES: AtomicU32 = AtomicU32::new(0);
    static COPYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let template = TEMPLATE
        .get_or_init(|| async {
            let db = fresh_db().await;
            manage(venv, &db, &["migrate", "--no-input", "-v", "0"]).await;
            let config: tokio_postgres::Config = db.parse().expect("a connection string");
            config.get_dbname().expect("a dbname").to_string()
        })
        .await;
    let name = format!(
        "dj{}_{}",
        std::process::id(),
        COPIES.fetch_add(1, Ordering::SeqCst)
    );
    let base = pg::shared();
    {
        // One copy at a time: a template may have no other session.
        let _one = COPYING.lock().await;
        connect(&format!("{base} dbname=postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .expect("copy the migrated database");
    }
    format!("{base} dbname={name}")
}

/// A request with a JSON body (or none) and a bearer token; status and JSON
/// (Null for an empty body).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    let (s, _, bytes) = request(method, url, token, body.as_deref()).await;
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        json(&bytes)
    };
    (s, v)
}

fn ids(messages: &Value) -> Vec<i64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {messages}"))
        .iter()
        .map(|m| m["id"].as_i64().expect("an id"))
        .collect()
}

fn instant(ts: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(ts.as_str().unwrap_or_else(|| panic!("{ts}")))
        .unwrap_or_else(|e| panic!("{ts}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// The fields of a Message both Django's serializer and hark send, with
/// the timestamp as an instant (Django leaves out a zero fraction).
fn common_message(m: &Value) -> (Value, Value, Value, Value, chrono::DateTime<chrono::Utc>) {
    (
        m["id"].clone(),
        m["room"].clone(),
        m["sender"].clone(),
        m["content"].clone(),
        instant(&m["created_at"]),
    )
}

/// The JSON payload of a JWT (not verified: what it claims).
fn claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

// ------------------------------------------------------------------ the tests

/// `manage.py migrate` makes exactly the tables hark reads, and hark adds
/// to them only its own columns; the app's migrations match its models.
#[tokio::test]
async fn djangos_migrations_make_the_tables_hark_serves() {
    let s = Stack::start().await;
    let sql = connect(&s.db).await;
    let columns = |table: &'static str| {
        let sql = &sql;
        async move {
            sql.query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_name = $1 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        columns("users_user").await,
        [
            "id",
            "password",
            "last_login",
            "is_superuser",
            "username",
            "first_name",
            "last_name",
            "email",
            "is_staff",
            "is_active",
            "date_joined"
        ]
    );
    assert_eq!(
        columns("chat_chatroom").await,
        ["id", "type", "name", "created_at", "updated_at"]
    );
    assert_eq!(
        columns("chat_chatroom_participants").await,
        ["id", "chatroom_id", "user_id"]
    );
    assert_eq!(
        columns("chat_chatmessage").await,
        [
            "id",
            "content",
            "created_at",
            "sender_id",
            "room_id",
            "hark_txid",
            "hark_edited"
        ]
    );
    let applied: i64 = sql
        .query_one(
            "SELECT count(*) FROM django_migrations WHERE app IN ('users', 'chat')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 3, "users 0001, chat 0001 and 0002");
    // The committed migrations are the models' (nothing left to make), and
    // the project passes Django's checks.
    manage(&s.venv, &s.db, &["makemigrations", "--check", "--dry-run"]).await;
    manage(&s.venv, &s.db, &["check", "--fail-level", "WARNING"]).await;
}

/// simplejwt's TokenObtainPairView, over HTTP: its access token works on
/// hark (and on Django), its refresh token is refused by both; a new
/// access token from TokenRefreshView works again.
#[tokio::test]
async fn a_simplejwt_access_token_works_on_hark_and_a_refresh_token_does_not() {
    let mut s = Stack::start().await;
    let alice = s
        .orm
        .user("alice", Some("correct horse battery staple"))
        .await;
    let bob = s.orm.user("bob", None).await;
    let room = s.orm.room("general", &[alice, bob]).await;

    let (st, pair) = call(
        Method::POST,
        &s.django.url("/api/token/"),
        None,
        Some(json!({"username": "alice", "password": "correct horse battery staple"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{pair}\n{}", s.django.logs());
    let access = pair["access"].as_str().expect("access").to_string();
    let refresh = pair["refresh"].as_str().expect("refresh").to_string();
    // What is tested: simplejwt's own claims, not a copy of them.
    let (a, r) = (claims(&access), claims(&refresh));
    assert_eq!(a["token_type"], "access", "{a}");
    assert_eq!(r["token_type"], "refresh", "{r}");
    // simplejwt 5.5 sends `user_id` as a string of digits.
    assert_eq!(a["user_id"], json!(alice.to_string()), "{a}");
    assert_eq!(r["user_id"], json!(alice.to_string()), "{r}");
    // A wrong password gets no token.
    let (st, _) = call(
        Method::POST,
        &s.django.url("/api/token/"),
        None,
        Some(json!({"username": "alice", "password": "wrong"})),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // The access token: hark's rooms list, stream and send.
    let (st, rooms) = get_json(&s.hark.url("/api/chat/rooms/"), Some(&access)).await;
    assert_eq!(st, StatusCode::OK, "{rooms}");
    assert_eq!(ids(&rooms), [room]);
    assert_eq!(
        rooms[0]["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    let mut sse = Sse::connect(
        s.hark.addr,
        &format!("/events?room_id={room}&access_token={access}"),
        &[],
    )
    .await;
    open(&mut sse).await;
    sse.close();
    let (st, sent) = call(
        Method::POST,
        &s.hark.url("/api/chat/messages/"),
        Some(&access),
        Some(json!({"room_id": room, "content": "with Django's token"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["sender"]["id"], alice);
    // ... and Django's own view takes it too.
    let (st, _) = get_json(&s.django.url("/api/chat/rooms/"), Some(&access)).await;
    assert_eq!(st, StatusCode::OK);

    // The refresh token, signed with the same key, is refused everywhere.
    for (method, path, body) in [
        (Method::GET, "/api/chat/rooms/".to_string(), None),
        (Method::GET, format!("/api/chat/rooms/{room}/"), None),
        (Method::GET, poll_path(room, None, "&timeout=0"), None),
        (
            Method::POST,
            "/api/chat/messages/".to_string(),
            Some(json!({"room_id": room, "content": "with a refresh token"})),
        ),
        (
            Method::POST,
            format!("/api/chat/rooms/{room}/typing/"),
            Some(json!({"is_typing": true})),
        ),
    ] {
        let (st, headers, body) = request(
            method.clone(),
            &s.hark.url(&path),
            Some(&refresh),
            body.map(|b| b.to_string()).as_deref(),
        )
        .await;
        let body = json(&body);
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        assert_eq!(body["code"], "token_not_valid", "{method} {path}: {body}");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{headers:?}"
        );
    }
    let sse = Sse::connect(
        s.hark.addr,
        &format!("/events?room_id={room}&access_token={refresh}"),
        &[],
    )
    .await;
    assert_eq!(sse.status, 401, "a stream with a refresh token");
    let (st, _) = get_json(&s.django.url("/api/chat/rooms/"), Some(&refresh)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "Django refuses it too");
    // Nothing was sent with it.
    let count: i64 = connect(&s.db)
        .await
        .query_one("SELECT count(*) FROM chat_chatmessage", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    // The refresh token's use: a new access token, which hark takes.
    let (st, renewed) = call(
        Method::POST,
        &s.django.url("/api/token/refresh/"),
        None,
        Some(json!({"refresh": refresh})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{renewed}");
    let renewed = renewed["access"].as_str().unwrap();
    assert_ne!(renewed, access);
    let (st, rooms) = get_json(&s.hark.url("/api/chat/rooms/"), Some(renewed)).await;
    assert_eq!(st, StatusCode::OK, "{rooms}");
    assert_eq!(rooms[0]["last_message"]["content"], "with Django's token");
}

/// The next non-ping event that is a message or a delete (typing and
/// presence are other tests' business).
async fn next_change(sse: &mut Sse) -> (String, Value) {
    loop {
        let ev = sse.expect(T).await;
        match ev.kind() {
            "message" | "delete" => {
                assert!(ev.id.is_some(), "{ev:?}");
                return (ev.kind().to_string(), ev.json());
            }
            "typing" | "presence" | "read" => continue,
            _ => panic!("unexpected event {ev:?}"),
        }
    }
}

/// A poll after `cursor` that waits (up to 20 s) for what is due; the
/// answer and its cursor.
async fn poll_after(hark: &Hark, room: i64, token: &str, cursor: &str) -> (Value, String) {
    let (st, body) = get_json(
        &poll_url(hark, room, Some(cursor), "&timeout=20"),
        Some(token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let next = body["cursor"].as_str().expect("a cursor").to_string();
    (body, next)
}

/// Starts that poll now, so that it is waiting when the ORM writes.
fn poll_in_background(
    hark: &Hark,
    room: i64,
    token: &str,
    cursor: &str,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let url = poll_url(hark, room, Some(cursor), "&timeout=20");
    let token = token.to_string();
    tokio::spawn(async move { get_json(&url, Some(&token)).await })
}

async fn answered(poll: tokio::task::JoinHandle<(StatusCode, Value)>) -> (Value, String) {
    let (st, body) = tokio::time::timeout(Duration::from_secs(25), poll)
        .await
        .expect("the poll was not answered")
        .expect("the poll task");
    assert_eq!(st, StatusCode::OK, "{body}");
    let next = body["cursor"].as_str().expect("a cursor").to_string();
    (body, next)
}

/// Messages created, edited (`save()` and `QuerySet.update()`) and deleted
/// (`delete()` on a model and on a queryset) through Django's ORM reach
/// hark's long polls and event streams: in commit order, each once.
#[tokio::test]
async fn orm_creates_edits_and_deletes_reach_polls_and_streams() {
    let mut s = Stack::start().await;
    let alice = s.orm.user("alice", None).await;
    let bob = s.orm.user("bob", None).await;
    let room = s.orm.room("general", &[alice, bob]).await;
    let (bob_token, _) = s.orm.tokens(bob).await;
    let hark = &s.hark;

    let (st, first) = get_json(&poll_url(hark, room, None, "&timeout=0"), Some(&bob_token)).await;
    assert_eq!(st, StatusCode::OK, "{first}");
    assert_eq!(first["messages"], json!([]));
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let mut sse = Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &format!("Bearer {bob_token}"))],
    )
    .await;
    open(&mut sse).await;

    // Created: ChatMessage.objects.create(...), while the poll waits.
    let waiting = poll_in_background(hark, room, &bob_token, &cursor);
    let m1 = s.orm.send(room, alice, "hello from the ORM").await;
    let (body, cursor) = answered(waiting).await;
    assert_eq!(ids(&body["messages"]), [m1["id"].as_i64().unwrap()]);
    let got = &body["messages"][0];
    assert_eq!(common_message(got), common_message(&m1));
    assert_eq!(got["edited"], false);
    assert_eq!(body["deleted"], json!([]));
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!((kind.as_str(), &ev), ("message", got));

    // Edited through the model: save() writes every column.
    let waiting = poll_in_background(hark, room, &bob_token, &cursor);
    s.orm
        .call(json!({"op": "edit", "id": m1["id"], "content": "hello, edited in Django"}))
        .await;
    let (body, cursor) = answered(waiting).await;
    assert_eq!(ids(&body["messages"]), [m1["id"].as_i64().unwrap()]);
    let edited = &body["messages"][0];
    assert_eq!(edited["content"], "hello, edited in Django");
    assert_eq!(edited["edited"], true);
    assert_eq!(instant(&edited["created_at"]), instant(&m1["created_at"]));
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!((kind.as_str(), &ev), ("message", edited));

    // Two in one transaction.atomic(): one commit, both at once.
    let pair = s.orm.send_many(room, alice, &["second", "third"]).await;
    let pair_ids: Vec<i64> = pair.iter().map(|m| m["id"].as_i64().unwrap()).collect();
    let (body, cursor) = poll_after(hark, room, &bob_token, &cursor).await;
    assert_eq!(ids(&body["messages"]), pair_ids);
    for id in &pair_ids {
        let (kind, ev) = next_change(&mut sse).await;
        assert_eq!((kind.as_str(), &ev["id"]), ("message", &json!(id)));
        assert_eq!(ev["edited"], false);
    }

    // Edited through a queryset: one UPDATE, no save().
    let waiting = poll_in_background(hark, room, &bob_token, &cursor);
    let n = s
        .orm
        .call(json!({"op": "update", "ids": pair_ids, "content": "bulk edited"}))
        .await;
    assert_eq!(n, 2);
    let (body, cursor) = answered(waiting).await;
    let mut got = ids(&body["messages"]);
    // The one answer may hold the first part; the rest is due at once.
    let cursor = if got.len() < 2 {
        let (more, c) = poll_after(hark, room, &bob_token, &cursor).await;
        got.extend(ids(&more["messages"]));
        c
    } else {
        cursor
    };
    assert_eq!(got, pair_ids);
    for _ in 0..2 {
        let (kind, ev) = next_change(&mut sse).await;
        assert_eq!(kind, "message");
        assert_eq!(
            (ev["content"].as_str(), ev["edited"].as_bool()),
            (Some("bulk edited"), Some(true))
        );
    }

    // Deleted through the model.
    let waiting = poll_in_background(hark, room, &bob_token, &cursor);
    s.orm.call(json!({"op": "delete", "id": pair_ids[0]})).await;
    let (body, cursor) = answered(waiting).await;
    assert_eq!(body["messages"], json!([]));
    assert_eq!(body["deleted"], json!([{"id": pair_ids[0], "room": room}]));
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!(
        (kind.as_str(), ev),
        ("delete", json!({"id": pair_ids[0], "room": room}))
    );

    // Deleted through a queryset.
    let waiting = poll_in_background(hark, room, &bob_token, &cursor);
    let gone = s
        .orm
        .call(json!({"op": "delete_where", "room": room, "content_prefix": "bulk"}))
        .await;
    assert_eq!(gone, json!([pair_ids[1]]));
    let (body, cursor) = answered(waiting).await;
    assert_eq!(body["deleted"], json!([{"id": pair_ids[1], "room": room}]));
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!(
        (kind.as_str(), ev),
        ("delete", json!({"id": pair_ids[1], "room": room}))
    );

    // A save() that changes nothing is no edit: not delivered.
    s.orm
        .call(json!({"op": "edit", "id": m1["id"], "content": "hello, edited in Django"}))
        .await;

    // Nothing more is due, and the rooms list follows: the edited message
    // is the last one left.
    let (st, after) = get_json(
        &poll_url(hark, room, Some(&cursor), "&timeout=0"),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (&after["messages"], &after["deleted"]),
        (&json!([]), &json!([]))
    );
    let (_, rooms) = get_json(&hark.url("/api/chat/rooms/"), Some(&bob_token)).await;
    assert_eq!(rooms[0]["last_message"]["id"], m1["id"]);
    assert_eq!(
        rooms[0]["last_message"]["content"],
        "hello, edited in Django"
    );
    assert_eq!(rooms[0]["last_message"]["edited"], true);
    sse.expect_quiet(Duration::from_millis(300)).await;
}

/// Membership and users change in Django too: a participant removed with
/// `participants.remove()`, a user renamed with `save()`, a user deleted
/// with `delete()` (Django's collector takes their messages and
/// memberships along, in one transaction). hark follows each.
#[tokio::test]
async fn orm_membership_and_user_changes_reach_hark() {
    let mut s = Stack::start().await;
    let alice = s.orm.user("alice", None).await;
    let bob = s.orm.user("bob", None).await;
    let carol = s.orm.user("carol", None).await;
    let room = s.orm.room("general", &[alice, bob, carol]).await;
    let (bob_token, _) = s.orm.tokens(bob).await;
    let (carol_token, _) = s.orm.tokens(carol).await;
    let carols: Vec<i64> = [
        s.orm.send(room, carol, "carol's first").await,
        s.orm.send(room, carol, "carol's second").await,
    ]
    .iter()
    .map(|m| m["id"].as_i64().unwrap())
    .collect();
    let hark = &s.hark;
    let (_, first) = get_json(&poll_url(hark, room, None, "&timeout=0"), Some(&bob_token)).await;
    assert_eq!(ids(&first["messages"]), carols);
    let bob_cursor = first["cursor"].as_str().unwrap().to_string();
    let mut sse = Sse::connect(
        hark.addr,
        &format!("/events?room_id={room}"),
        &[("Authorization", &format!("Bearer {bob_token}"))],
    )
    .await;
    open(&mut sse).await;

    // Carol is removed from the room while her poll waits: a 403.
    let (_, hers) = get_json(
        &poll_url(hark, room, None, "&timeout=0"),
        Some(&carol_token),
    )
    .await;
    let waiting = poll_in_background(hark, room, &carol_token, hers["cursor"].as_str().unwrap());
    s.orm
        .call(json!({"op": "leave", "room": room, "user": carol}))
        .await;
    let (st, body) = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("carol's poll was not answered")
        .unwrap();
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "not_a_participant", "{body}");
    let (st, rooms) = get_json(&hark.url("/api/chat/rooms/"), Some(&carol_token)).await;
    assert_eq!((st, rooms), (StatusCode::OK, json!([])));

    // Alice renamed through save(): hark's rooms list and her next message
    // carry the new name.
    s.orm
        .call(json!({"op": "rename", "user": alice, "first_name": "Alicia"}))
        .await;
    let room_url = hark.url(&format!("/api/chat/rooms/{room}/"));
    let renamed = within(T, || async {
        let (_, r) = get_json(&room_url, Some(&bob_token)).await;
        r["participants"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["id"] == alice && p["first_name"] == "Alicia")
        })
    })
    .await;
    let (_, r) = get_json(&room_url, Some(&bob_token)).await;
    assert!(renamed, "hark still shows the old name: {r}");
    let m = s.orm.send(room, alice, "after the rename").await;
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!((kind.as_str(), &ev["id"]), ("message", &m["id"]));
    assert_eq!(ev["sender"]["first_name"], "Alicia", "{ev}");

    // Carol deleted: her messages go with her, and bob learns of it.
    s.orm
        .call(json!({"op": "delete_user", "user": carol}))
        .await;
    let mut deleted = Vec::new();
    for _ in 0..2 {
        let (kind, ev) = next_change(&mut sse).await;
        assert_eq!(kind, "delete", "{ev}");
        assert_eq!(ev["room"], room);
        deleted.push(ev["id"].as_i64().unwrap());
    }
    deleted.sort_unstable();
    assert_eq!(deleted, carols);
    let mut messages = Vec::new();
    let mut gone = Vec::new();
    let mut cursor = bob_cursor;
    let deadline = Instant::now() + T;
    while gone.len() < 2 && Instant::now() < deadline {
        let (body, next) = poll_after(hark, room, &bob_token, &cursor).await;
        messages.extend(ids(&body["messages"]));
        for d in body["deleted"].as_array().unwrap() {
            assert_eq!(d["room"], room);
            gone.push(d["id"].as_i64().unwrap());
        }
        cursor = next;
    }
    let complete = gone.len() >= 2;
    assert!(
        complete,
        "bob's poll: messages {messages:?}, deleted {gone:?}"
    );
    gone.sort_unstable();
    assert_eq!((messages, gone), (vec![m["id"].as_i64().unwrap()], carols));
    let (st, body) = get_json(&hark.url("/api/chat/rooms/"), Some(&carol_token)).await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "a deleted user's token: {body}"
    );
    let (_, r) = get_json(&room_url, Some(&bob_token)).await;
    assert_eq!(
        r["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [alice, bob]
    );

    // A message moved to another room through save(): a delete here, a
    // message there.
    let other = s.orm.room("other", &[alice, bob]).await;
    let (_, there) = get_json(&poll_url(hark, other, None, "&timeout=0"), Some(&bob_token)).await;
    let there_cursor = there["cursor"].as_str().unwrap().to_string();
    s.orm
        .call(json!({"op": "move", "id": m["id"], "room": other}))
        .await;
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!(
        (kind.as_str(), ev),
        ("delete", json!({"id": m["id"], "room": room}))
    );
    let (body, _) = poll_after(hark, other, &bob_token, &there_cursor).await;
    assert_eq!(ids(&body["messages"]), [m["id"].as_i64().unwrap()]);
    assert_eq!(body["messages"][0]["room"], other);

    // The room deleted (its memberships with it): hark knows it no more
    // once the NOTIFY is in. (Until then the room's detail may answer 403
    // rather than 404: its cached membership passes, the read finds
    // nothing, and an empty read is taken for a leave.)
    s.orm.call(json!({"op": "delete_room", "room": room})).await;
    for url in [room_url.clone(), poll_url(hark, room, None, "&timeout=0")] {
        let gone = within(T, || async {
            get_json(&url, Some(&bob_token)).await.0 == StatusCode::NOT_FOUND
        })
        .await;
        let (st, body) = get_json(&url, Some(&bob_token)).await;
        assert!(gone, "{url}: {st} {body}");
    }
    let (_, rooms) = get_json(&hark.url("/api/chat/rooms/"), Some(&bob_token)).await;
    assert_eq!(ids(&rooms), [other]);
}

/// A message sent through hark is a row Django reads like its own: its
/// history, its poll and its rooms list show it, field for field as hark
/// sent it; and Django's Phase 1 endpoints and hark's agree in shape.
#[tokio::test]
async fn a_message_sent_through_hark_shows_in_djangos_views() {
    let mut s = Stack::start().await;
    let alice = s.orm.user("alice", None).await;
    let bob = s.orm.user("bob", None).await;
    let room = s.orm.room("general", &[alice, bob]).await;
    let (alice_token, _) = s.orm.tokens(alice).await;
    let (bob_token, _) = s.orm.tokens(bob).await;
    let before = s.orm.send(room, bob, "sent in Django").await;
    let (st, rooms_before) = get_json(&s.django.url("/api/chat/rooms/"), Some(&bob_token)).await;
    assert_eq!(st, StatusCode::OK, "{rooms_before}\n{}", s.django.logs());

    let (st, sent) = call(
        Method::POST,
        &s.hark.url("/api/chat/messages/"),
        Some(&alice_token),
        Some(json!({"room_id": room, "content": "sent through hark ✓"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sent}");
    let id = sent["id"].as_i64().unwrap();

    // Django's history (a view hark does not have).
    let (st, history) = get_json(
        &s.django.url(&format!("/api/chat/rooms/{room}/messages/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{history}");
    assert_eq!(ids(&history), [before["id"].as_i64().unwrap(), id]);
    assert_eq!(common_message(&history[1]), common_message(&sent));
    assert_eq!(history[1]["sender"]["last_name"], "Django");

    // Django's poll, with the ISO since its own serializer gave.
    let since = before["created_at"].as_str().unwrap();
    let (st, polled) = get_json(
        &s.django.url(&poll_path(room, Some(since), "")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{polled}");
    assert_eq!(ids(&polled["messages"]), [id]);
    assert_eq!(
        common_message(&polled["messages"][0]),
        common_message(&sent)
    );
    // hark's poll with the same since gives the same.
    let (st, hark_polled) = get_json(
        &poll_url(&s.hark, room, Some(since), "&timeout=0"),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{hark_polled}");
    assert_eq!(ids(&hark_polled["messages"]), [id]);

    // The ORM reads it; Django's rooms list has it last, and hark moved
    // the room's updated_at.
    let row = s.orm.call(json!({"op": "get", "id": id})).await;
    assert_eq!(common_message(&row), common_message(&sent));
    let (st, rooms) = get_json(&s.django.url("/api/chat/rooms/"), Some(&bob_token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rooms[0]["last_message"]["id"], id);
    assert!(instant(&rooms[0]["updated_at"]) > instant(&rooms_before[0]["updated_at"]));

    // The two rooms lists agree on what both have.
    let (st, hark_rooms) = get_json(&s.hark.url("/api/chat/rooms/"), Some(&bob_token)).await;
    assert_eq!(st, StatusCode::OK);
    for key in ["id", "type", "name", "participants"] {
        assert_eq!(hark_rooms[0][key], rooms[0][key], "{key}");
    }
    for key in ["created_at", "updated_at"] {
        assert_eq!(
            instant(&hark_rooms[0][key]),
            instant(&rooms[0][key]),
            "{key}"
        );
    }
    assert_eq!(
        common_message(&hark_rooms[0]["last_message"]),
        common_message(&rooms[0]["last_message"])
    );
    // Typing: the same answer from both (each keeps its own state).
    for url in [
        s.django.url(&format!("/api/chat/rooms/{room}/typing/")),
        s.hark.url(&format!("/api/chat/rooms/{room}/typing/")),
    ] {
        let (st, body) = call(
            Method::POST,
            &url,
            Some(&alice_token),
            Some(json!({"is_typing": true})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{url}: {body}");
        assert_eq!(
            body,
            json!({"success": true, "message": "Typing status updated"})
        );
    }
    for url in [
        s.django.url(&format!("/api/chat/rooms/{room}/")),
        s.hark.url(&format!("/api/chat/rooms/{room}/")),
    ] {
        let (st, r) = get_json(&url, Some(&bob_token)).await;
        assert_eq!(st, StatusCode::OK, "{url}: {r}");
        assert_eq!(r["typing_user"]["id"], alice, "{url}: {r}");
    }
}

/// The seed frontend's loop, unchanged but for its interval: poll, take
/// the new messages, set `since` to the `created_at` of the last one it
/// has, wait, poll again. Its first `since` comes from Django's history,
/// as Django's serializer formats it; messages come from Django's ORM and
/// Django's own send view meanwhile. The loop gets every message once, in
/// order.
#[tokio::test]
async fn the_seed_frontends_poll_loop_works_unchanged_against_hark() {
    /// The seed waits 3 s between polls; a tenth of it here.
    const INTERVAL: Duration = Duration::from_millis(300);
    let mut s = Stack::start().await;
    let alice = s.orm.user("alice", None).await;
    let bob = s.orm.user("bob", None).await;
    let room = s.orm.room("general", &[alice, bob]).await;
    let (alice_token, _) = s.orm.tokens(alice).await;
    let (bob_token, _) = s.orm.tokens(bob).await;
    s.orm.send(room, alice, "before the page loaded").await;
    s.orm.send(room, bob, "the last one before").await;

    // The page loads the history from Django.
    let (st, history) = get_json(
        &s.django.url(&format!("/api/chat/rooms/{room}/messages/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{history}");
    let since = history[1]["created_at"].as_str().unwrap().to_string();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let poll_base = s.hark.url("");
    let token = bob_token.clone();
    let page = tokio::spawn(async move {
        let mut since = since;
        loop {
            // What the seed sends: room_id and since, no timeout.
            let url = format!("{poll_base}{}", poll_path(room, Some(&since), ""));
            let (st, body) = get_json(&url, Some(&token)).await;
            assert_eq!(st, StatusCode::OK, "{body}");
            for m in body["messages"].as_array().expect("messages") {
                since = m["created_at"].as_str().expect("created_at").to_string();
                if tx.send(m.clone()).is_err() {
                    return;
                }
            }
            tokio::time::sleep(INTERVAL).await;
        }
    });

    // Meanwhile: the ORM one by one and in a transaction, and Django's own
    // send view, at paces under and over the interval.
    let mut expected: Vec<Value> = Vec::new();
    let pauses = [0, 120, 450, 30, 700, 0, 250, 380];
    for (i, pause) in pauses.iter().enumerate() {
        match i % 3 {
            0 => expected.push(s.orm.send(room, alice, &format!("orm {i}")).await),
            1 => expected.extend(
                s.orm
                    .send_many(
                        room,
                        alice,
                        &[&format!("atomic {i}a"), &format!("atomic {i}b")],
                    )
                    .await,
            ),
            _ => {
                let (st, m) = call(
                    Method::POST,
                    &s.django.url("/api/chat/messages/"),
                    Some(&alice_token),
                    Some(json!({"room_id": room, "content": format!("django view {i}")})),
                )
                .await;
                assert_eq!(st, StatusCode::CREATED, "{m}\n{}", s.django.logs());
                expected.push(m);
            }
        }
        tokio::time::sleep(Duration::from_millis(*pause)).await;
    }

    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("the loop ended: {:?}", page.await),
            Err(_) => panic!(
                "the loop got {} of {} messages within 20 s: {:?}",
                got.len(),
                expected.len(),
                ids(&Value::from(got.clone()))
            ),
        }
    }
    // A duplicate would come after the last one: give the loop a few
    // more rounds to show one.
    let extra = tokio::time::timeout(INTERVAL * 4, rx.recv()).await;
    assert!(
        extra.is_err(),
        "a message came twice or uninvited: {extra:?}"
    );
    page.abort();
    assert_eq!(
        ids(&Value::from(got.clone())),
        ids(&Value::from(expected.clone()))
    );
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(common_message(g), common_message(e));
    }
}

// ------------------------------------------------------------------- nginx

/// A private nginx running docs/deploy.md's configuration.
struct Nginx {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nginx block of docs/deploy.md's "Behind a reverse proxy (nginx)".
fn deploy_recipe() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy.md");
    let doc = std::fs::read_to_string(&path).expect("read docs/deploy.md");
    let section = doc
        .split("## Behind a reverse proxy (nginx)")
        .nth(1)
        .expect("docs/deploy.md has its nginx section");
    let block = section
        .split("```nginx\n")
        .nth(1)
        .expect("the section has an nginx block");
    block
        .split("\n```")
        .next()
        .expect("the block ends")
        .to_string()
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "docs/deploy.md's nginx block should have {from:?} once:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// The recipe with this test's addresses: the upstreams, a plain-HTTP
/// listener on 127.0.0.1, no certificate, the access log in `dir`.
/// Everything else as written.
fn localized_recipe(
    recipe: &str,
    hark: SocketAddr,
    django: SocketAddr,
    port: u16,
    dir: &Path,
) -> String {
    let mut conf = replace_once(recipe, "server 127.0.0.1:8080;", &format!("server {hark};"));
    conf = replace_once(
        &conf,
        "server 127.0.0.1:8000;",
        &format!("server {django};"),
    );
    conf = replace_once(
        &conf,
        "listen 443 ssl http2;",
        &format!("listen 127.0.0.1:{port};"),
    );
    conf = replace_once(
        &conf,
        "access_log /var/log/nginx/access.log notoken;",
        &format!("access_log {}/access.log notoken;", dir.display()),
    );
    let before = conf.lines().count();
    conf = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("ssl_certificate"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        before - conf.lines().count(),
        2,
        "the certificate and its key"
    );
    conf
}

fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("the nginx test needs nginx (Debian: apt-get install nginx; .ci/run does)")
        })
}

impl Nginx {
    /// Starts nginx (a master and one worker) with the recipe in front of
    /// `hark` and `django`, on a free port of 127.0.0.1.
    async fn start(hark: SocketAddr, django: SocketAddr) -> Nginx {
        let bin = nginx_binary();
        let recipe = deploy_recipe();
        let mut last_error = String::new();
        // A free port may be taken between finding it and nginx binding it.
        for _ in 0..5 {
            let dir = fresh_temp_dir("hark-nginx");
            std::fs::create_dir_all(dir.join("logs")).expect("nginx's directory");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            std::fs::write(
                dir.join("hark.conf"),
                localized_recipe(&recipe, hark, django, port, &dir),
            )
            .expect("write the recipe");
            // As root, nginx's workers would switch to `nobody`, who may
            // not reach this directory; keep them as the test's user.
            let user = if nix::unistd::geteuid().is_root() {
                "user root;"
            } else {
                ""
            };
            let d = dir.display();
            let main = format!(
                "{user}\nworker_processes 1;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
                 fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
                 scgi_temp_path {d}/scgi;\n    access_log off;\n    include {d}/hark.conf;\n}}\n"
            );
            std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
            let mut cmd = Command::new(&bin);
            cmd.arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.join("stderr.log")).expect("stderr log"),
                ));
            let mut nginx = Nginx {
                child: Some(spawn_group(&mut cmd, "nginx")),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
            let addr = nginx.addr;
            let listening = within(Duration::from_secs(15), || {
                let exited = nginx
                    .child
                    .as_mut()
                    .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
                async move { exited || tokio::net::TcpStream::connect(addr).await.is_ok() }
            })
            .await;
            let running = nginx
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if listening && running {
                return nginx;
            }
            last_error = nginx.logs();
            if !last_error.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start:\n{last_error}");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// docs/deploy.md's nginx configuration, run: behind one origin, hark's
/// endpoints reach hark and everything else reaches Django. Which one
/// answered shows in what only it has: hark's `typing_users` and
/// `cursor`, its typing state, its stream; Django's token views and
/// message history.
#[tokio::test]
async fn the_deploy_guides_nginx_recipe_routes_to_hark_and_django() {
    let mut s = Stack::start().await;
    let alice = s.orm.user("alice", Some("alice's password")).await;
    let bob = s.orm.user("bob", None).await;
    let room = s.orm.room("general", &[alice, bob]).await;
    let (bob_token, _) = s.orm.tokens(bob).await;
    let nginx = Nginx::start(s.hark.addr, s.django.addr).await;
    let logs = |what: &str| {
        format!(
            "{what}\nnginx:\n{}\nDjango:\n{}",
            nginx.logs(),
            s.django.logs()
        )
    };

    // `/` → Django: simplejwt's view.
    let (st, pair) = call(
        Method::POST,
        &nginx.url("/api/token/"),
        None,
        Some(json!({"username": "alice", "password": "alice's password"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", logs(&pair.to_string()));
    let token = pair["access"].as_str().unwrap().to_string();

    // The rooms list and one room → hark (Django's have no `typing_users`).
    for path in [
        "/api/chat/rooms/".to_string(),
        format!("/api/chat/rooms/{room}"),
        format!("/api/chat/rooms/{room}/"),
    ] {
        let (st, body) = get_json(&nginx.url(&path), Some(&token)).await;
        assert_eq!(st, StatusCode::OK, "{path}: {}", logs(&body.to_string()));
        let r = if body.is_array() { &body[0] } else { &body };
        assert!(
            r.get("typing_users").is_some() && r.get("online_users").is_some(),
            "{path}: {body}"
        );
    }
    // Typing → hark: hark's rooms list shows it, Django's does not.
    let (st, body) = call(
        Method::POST,
        &nginx.url(&format!("/api/chat/rooms/{room}/typing/")),
        Some(&token),
        Some(json!({"is_typing": true})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (_, r) = get_json(
        &s.hark.url(&format!("/api/chat/rooms/{room}/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(r["typing_user"]["id"], alice, "{r}");
    let (_, r) = get_json(
        &s.django.url(&format!("/api/chat/rooms/{room}/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(r["typing_user"], Value::Null, "typing went to Django: {r}");
    // The read marker → hark.
    let (st, body) = call(
        Method::POST,
        &nginx.url(&format!("/api/chat/rooms/{room}/read/")),
        Some(&bob_token),
        Some(json!({})),
    )
    .await;
    assert_eq!((st, body), (StatusCode::OK, json!({"success": true})));

    // A waiting long poll and a stream through nginx; then a send through
    // nginx (→ hark: its Message has `edited`) reaches both.
    let (st, first) = get_json(
        &nginx.url(&poll_path(room, None, "&timeout=0")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{first}");
    let cursor = first["cursor"].as_str().expect("hark's cursor").to_string();
    let url = nginx.url(&poll_path(room, Some(&cursor), "&timeout=20"));
    let t = bob_token.clone();
    let waiting = tokio::spawn(async move { get_json(&url, Some(&t)).await });
    let mut sse = Sse::connect(
        nginx.addr,
        &format!("/events?room_id={room}&access_token={bob_token}"),
        &[],
    )
    .await;
    open(&mut sse).await;
    let (st, sent) = call(
        Method::POST,
        &nginx.url("/api/chat/messages/"),
        Some(&token),
        Some(json!({"room_id": room, "content": "through nginx"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["edited"], false, "hark's Message: {sent}");
    let (polled, _) = answered(waiting).await;
    assert_eq!(ids(&polled["messages"]), [sent["id"].as_i64().unwrap()]);
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!((kind.as_str(), &ev), ("message", &sent));
    // A message from Django's ORM reaches the stream through nginx too.
    let m = s.orm.send(room, alice, "from the ORM, through nginx").await;
    let (kind, ev) = next_change(&mut sse).await;
    assert_eq!(
        (kind.as_str(), common_message(&ev)),
        ("message", common_message(&m))
    );
    sse.close();

    // Message history → Django (hark has no such path: its 404).
    let (st, history) = get_json(
        &nginx.url(&format!("/api/chat/rooms/{room}/messages/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{history}");
    assert_eq!(
        ids(&history),
        [sent["id"].as_i64().unwrap(), m["id"].as_i64().unwrap()]
    );
    let (st, direct) = get_json(
        &s.hark.url(&format!("/api/chat/rooms/{room}/messages/")),
        Some(&bob_token),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{direct}");

    // The access log keeps the stream's path but not its token.
    let logged = within(Duration::from_secs(10), || async {
        nginx.access_log().contains("\"GET /events\"")
    })
    .await;
    let access = nginx.access_log();
    assert!(logged, "the stream was not logged:\n{access}");
    assert!(
        !access.contains(&bob_token),
        "a token in the access log:\n{access}"
    );
    assert!(access.contains("\"POST /api/token/\" 200"), "{access}");
}
