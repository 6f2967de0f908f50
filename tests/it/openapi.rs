//! `docs/openapi.json` against the running hark.
//!
//! schemathesis (PyPI), a fuzzer no one here wrote, reads the document
//! hark serves, generates requests for every operation from it (valid and
//! invalid ones, boundary values, chains that follow its links) and checks
//! every answer against it. `/events` is an endless stream it cannot judge,
//! so its answers are checked here against what the document says. And
//! the limits the served document states are the ones the server enforces,
//! from both sides of each bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kit::sse::{open, Opts, Sse};
use crate::kit::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::process::Command;

/// Small limits, so that the served document differs from the file in
/// every limit it states, and a generated long poll that waits ends
/// within a second. No write limit: the fuzzer writes far faster than a
/// person, and a 429 would only hide what it sends.
const SMALL: &[(&str, &str)] = &[
    ("HARK_POLL_TIMEOUT_MAX_S", "1"),
    ("HARK_POLL_LIMIT_MAX", "50"),
    ("HARK_MAX_CONTENT_CHARS", "500"),
    ("HARK_MAX_BODY_BYTES", "8192"),
    ("HARK_WRITE_RATE", "0"),
];

const T: Duration = Duration::from_secs(10);

/// Who and what the tests use: alice and bob share `general`; bob and
/// carol share `other`, which alice is not in.
struct Seeded {
    alice: i64,
    bob: i64,
    general: i64,
    other: i64,
}

async fn seed(fx: &Fixture) -> Seeded {
    let alice = fx.user("alice").await;
    let bob = fx.user("bob").await;
    let carol = fx.user("carol").await;
    let general = fx.room("general", &[alice, bob]).await;
    let other = fx.room("other", &[bob, carol]).await;
    for text in ["hello", "hi alice", "how are you?"] {
        fx.insert(general, bob, text).await;
    }
    fx.insert(other, carol, "not for alice").await;
    Seeded {
        alice,
        bob,
        general,
        other,
    }
}

async fn served_document(hark: &Hark) -> Value {
    let (status, headers, body) =
        request(Method::GET, &hark.url("/openapi.json"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    json(&body)
}

fn repo_document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("read docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// `value`, or what it refers to when it is a `$ref` into `doc`.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("a local $ref");
            resolve(doc, doc.pointer(pointer).unwrap_or_else(|| panic!("{r}")))
        }
        None => value,
    }
}

// ------------------------------------------------------- the document itself

#[tokio::test]
async fn the_document_is_served_with_this_servers_limits() {
    let (hark, _fx) = setup(SMALL).await;
    let doc = served_document(&hark).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
    assert_eq!(
        doc["info"]["x-hark-limits"],
        json!({
            "poll_timeout_default_s": 1,
            "poll_timeout_max_s": 1,
            "poll_limit_max": 50,
            "max_content_chars": 500,
            "max_body_bytes": 8192,
            "max_rooms_per_stream": 100,
        })
    );
    let params = &doc["components"]["parameters"];
    assert_eq!(params["PollTimeout"]["schema"]["maximum"], 1);
    assert_eq!(params["PollTimeout"]["schema"]["default"], 1);
    assert_eq!(params["PollLimit"]["schema"]["maximum"], 50);
    assert_eq!(
        doc["components"]["schemas"]["SendMessageRequest"]["properties"]["content"]["maxLength"],
        500
    );
    // Everything but the limits is the file's.
    let file = repo_document();
    assert_eq!(doc["paths"], file["paths"]);
    assert_eq!(
        doc["components"]["responses"],
        file["components"]["responses"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"],
        file["components"]["securitySchemes"]
    );

    // No token needed, with and without the slash, and HEAD: the same
    // bytes (one serialisation, built at start), or their length.
    let (s, h, first) = request(Method::GET, &hark.url("/openapi.json"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    let cache = h["cache-control"].to_str().unwrap();
    assert!(cache.contains("max-age="), "{cache}");
    let (s, _, again) = request(Method::GET, &hark.url("/openapi.json/"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(first, again);
    let mut raw = Raw::connect(hark.addr).await;
    raw.send(b"HEAD /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let head = raw.answer_to_head().await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", first.len())),
        "{head}"
    );
    // A wrong method is a 405 that says what the path allows.
    let (s, h, _) = request(Method::POST, &hark.url("/openapi.json"), None, Some("{}")).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "GET, HEAD, OPTIONS");
}

/// Each bound the served document states holds at the server, from both
/// sides: its value is accepted and the next one is refused. (The fuzzer
/// checks that what the document refuses the server refuses; this checks
/// that what the document allows the server allows.)
#[tokio::test]
async fn the_documented_bounds_are_the_enforced_ones() {
    let (hark, fx) = setup(SMALL).await;
    let s = seed(&fx).await;
    let doc = served_document(&hark).await;
    let tok = token(s.alice);
    let schema = |name: &str| doc["components"]["parameters"][name]["schema"].clone();
    let int = |v: &Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("{v} is not a whole number"))
    };

    let poll = |query: String| {
        let url = hark.url(&format!(
            "/api/chat/messages/poll/?room_id={}&{query}",
            s.general
        ));
        let tok = tok.clone();
        async move { get_json(&url, Some(&tok)).await }
    };
    for (name, param, code) in [
        ("timeout", "PollTimeout", "invalid_timeout"),
        ("limit", "PollLimit", "invalid_limit"),
    ] {
        let schema = schema(param);
        let (min, max) = (int(&schema["minimum"]), int(&schema["maximum"]));
        for ok in [min, max] {
            let (status, body) = poll(format!("{name}={ok}")).await;
            assert_eq!(status, StatusCode::OK, "{name}={ok}: {body}");
        }
        let below = min
            .checked_sub(1)
            .map_or("-1".to_string(), |b| b.to_string());
        for bad in [below, (max + 1).to_string()] {
            let (status, body) = poll(format!("{name}={bad}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}={bad}: {body}");
            assert_eq!(body["code"], code);
        }
    }
    // The documented default timeout is the wait of a poll that names
    // none: after a `since` in the future nothing is due.
    let default = int(&schema("PollTimeout")["default"]);
    let started = Instant::now();
    let (status, body) = poll("since=2999-01-01T00:00:00Z".into()).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["messages"], json!([]));
    assert!(
        waited >= Duration::from_secs(default) && waited < Duration::from_secs(default + 3),
        "waited {waited:?} for a default of {default} s"
    );

    let max_chars = int(
        &doc["components"]["schemas"]["SendMessageRequest"]["properties"]["content"]["maxLength"],
    ) as usize;
    let send = |content: String| {
        let url = hark.url("/api/chat/messages/");
        let body = json!({"room_id": s.general, "content": content}).to_string();
        let tok = tok.clone();
        async move { post_json(&url, Some(&tok), &body).await }
    };
    // Characters, not bytes: each of these is three bytes of UTF-8.
    let (status, body) = send("€".repeat(max_chars)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send("€".repeat(max_chars + 1)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_content");

    let max_body = int(&doc["info"]["x-hark-limits"]["max_body_bytes"]) as usize;
    let typing = |len: usize| {
        let url = hark.url(&format!("/api/chat/rooms/{}/typing/", s.general));
        let mut body = String::from(r#"{"is_typing": true}"#);
        body.push_str(&" ".repeat(len - body.len()));
        let tok = tok.clone();
        async move { post_json(&url, Some(&tok), &body).await }
    };
    let (status, body) = typing(max_body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = typing(max_body + 1).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
}

// ------------------------------------------------------------------ /events

/// Asserts that an answer of `method path` is one the document describes:
/// a documented status, a documented media type, the required headers
/// with the values their schemas fix, and for an error the error object.
fn assert_documented(
    doc: &Value,
    what: &str,
    method: &str,
    status: u16,
    headers: &[(String, String)],
    body: Option<&str>,
) {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let op = &doc["paths"]["/events"][method];
    let responses = op["responses"].as_object().expect("responses");
    let documented = responses.get(&status.to_string()).unwrap_or_else(|| {
        panic!(
            "{what}: {status} is not documented ({:?})",
            responses.keys()
        )
    });
    let response = resolve(doc, documented);
    let content = response["content"].as_object().expect("content");
    let media = header("content-type")
        .unwrap_or_else(|| panic!("{what}: no content-type"))
        .split(';')
        .next()
        .unwrap()
        .trim();
    assert!(
        content.contains_key(media),
        "{what}: {media} is not among {:?}",
        content.keys()
    );
    for (name, spec) in response["headers"].as_object().into_iter().flatten() {
        let spec = resolve(doc, spec);
        let value = header(name);
        if spec["required"] == true {
            assert!(value.is_some(), "{what}: no {name} header");
        }
        let (Some(value), schema) = (value, &spec["schema"]) else {
            continue;
        };
        if let Some(c) = schema.get("const") {
            assert_eq!(value, c.as_str().unwrap(), "{what}: {name}");
        }
        // The one header pattern the document has: the Bearer challenge.
        if schema.get("pattern").is_some() {
            assert_eq!(name, "WWW-Authenticate");
            assert!(value.starts_with("Bearer"), "{what}: {name}: {value}");
        }
        if schema["type"] == "integer" {
            let n: i64 = value
                .parse()
                .unwrap_or_else(|_| panic!("{what}: {name}: {value} is not an integer"));
            assert!(n >= schema["minimum"].as_i64().unwrap_or(i64::MIN));
        }
    }
    if let Some(body) = body {
        if content[media]["schema"]["$ref"] == "#/components/schemas/Error" {
            let err: Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
            assert!(err["error"].is_string(), "{what}: {body}");
            let code = err["code"].as_str().unwrap_or("");
            assert!(
                !code.is_empty()
                    && code.starts_with(|c: char| c.is_ascii_lowercase())
                    && code
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{what}: code {code:?} is not snake_case"
            );
        }
    }
}

/// A request to `/events` and the status hark answers it with.
struct Case<'a> {
    what: &'a str,
    query: String,
    headers: &'a [(&'a str, &'a str)],
    status: u16,
}

fn case<'a>(
    what: &'a str,
    query: &str,
    headers: &'a [(&'a str, &'a str)],
    status: u16,
) -> Case<'a> {
    Case {
        what,
        query: query.to_string(),
        headers,
        status,
    }
}

/// `/events` is left out of the fuzzing (an endless body: every request
/// would end in the fuzzer's timeout, judged an error), so here are its
/// real answers, each held against what the document says of it: on hark's
/// own HTTP and on hyper's, GET and HEAD.
#[tokio::test]
async fn every_answer_of_events_is_one_the_document_describes() {
    let (hark, fx) = setup(SMALL).await;
    let s = seed(&fx).await;
    let doc = served_document(&hark).await;
    let alice = format!("Bearer {}", token(s.alice));
    let auth = [("Authorization", alice.as_str())];

    let many: String = (1..=101).map(|r| format!("room_id={r}&")).collect();
    let same: String = (1..=101)
        .map(|_| format!("room_id={}&", s.general))
        .collect();
    let general = format!("?room_id={}", s.general);
    let garbage_id = [
        ("Authorization", alice.as_str()),
        ("Last-Event-ID", "garbage"),
    ];
    let bad_token = [("Authorization", "Bearer not-a-token")];
    let other = s.other;
    let cases = [
        case("one room", &general, &auth, 200),
        case("every room", "", &auth, 200),
        case("a room named 101 times", &format!("?{same}"), &auth, 200),
        case("a garbage Last-Event-ID", &general, &garbage_id, 200),
        case(
            "the token as access_token",
            &format!("?access_token={}", token(s.alice)),
            &[],
            200,
        ),
        case("no token", &general, &[], 401),
        case("a bad token", &general, &bad_token, 401),
        case("a room of others", &format!("?room_id={other}"), &auth, 403),
        case(
            "one of them a room of others",
            &format!("{general}&room_id={other}"),
            &auth,
            403,
        ),
        case("no such room", "?room_id=999999", &auth, 404),
        case(
            "no such room beside a room of others",
            &format!("?room_id={other}&room_id=999999"),
            &auth,
            404,
        ),
        case("a room id that is not a number", "?room_id=abc", &auth, 400),
        case("room id 0", "?room_id=0", &auth, 400),
        case("101 different rooms", &format!("?{many}"), &auth, 400),
    ];
    for Case {
        what,
        query,
        headers,
        status: want,
    } in &cases
    {
        for (path_name, first) in [("lean", None), ("hyper", Some("PUT /api/chat/messages/"))] {
            for head in [false, true] {
                let what = format!(
                    "{what} ({path_name}, {})",
                    if head { "HEAD" } else { "GET" }
                );
                let opts = Opts {
                    first,
                    head,
                    ..Opts::default()
                };
                let mut sse =
                    Sse::connect_with(hark.addr, &format!("/events{query}"), headers, opts).await;
                assert_eq!(sse.status, *want, "{what}: {:?}", sse.headers);
                let method = if head { "head" } else { "get" };
                let body = if *want != 200 && !head {
                    Some(sse.body_text(T).await)
                } else {
                    None
                };
                assert_documented(
                    &doc,
                    &what,
                    method,
                    sse.status,
                    &sse.headers,
                    body.as_deref(),
                );
                if *want == 200 && !head {
                    let (reset, ready) = open(&mut sse).await;
                    let resumes = headers.iter().any(|(k, _)| *k == "Last-Event-ID");
                    assert_eq!(reset.is_some(), resumes, "{what}");
                    assert!(ready.id.is_some(), "{what}: {ready:?}");
                }
            }
        }
    }

    // Resuming with `last_event_id`: `ready` carries the cursor passed in.
    let mut first = Sse::connect(hark.addr, &format!("/events{general}"), &auth).await;
    let (_, ready) = open(&mut first).await;
    let cursor = ready.id.expect("ready has an id");
    drop(first);
    let mut resumed = Sse::connect(
        hark.addr,
        &format!("/events{general}&last_event_id={cursor}"),
        &auth,
    )
    .await;
    assert_documented(
        &doc,
        "resumed",
        "get",
        resumed.status,
        &resumed.headers,
        None,
    );
    let (reset, ready) = open(&mut resumed).await;
    assert_eq!((reset, ready.id), (None, Some(cursor)));

    // Over the streams a user may hold: 429 with Retry-After. On a hark
    // of its own, so that none of the streams above (freed once hark
    // notices their connections closed) holds a place.
    let env: Vec<(&str, &str)> = SMALL
        .iter()
        .copied()
        .chain([("HARK_MAX_STREAMS_PER_USER", "1")])
        .collect();
    let (capped, fx) = setup(&env).await;
    let s = seed(&fx).await;
    let bob = format!("Bearer {}", token(s.bob));
    let bob_auth = [("Authorization", bob.as_str())];
    let mut held = Sse::connect(capped.addr, "/events", &bob_auth).await;
    open(&mut held).await;
    let mut over = Sse::connect(capped.addr, "/events", &bob_auth).await;
    assert_eq!(over.status, 429);
    let body = over.body_text(T).await;
    assert_documented(
        &doc,
        "a second stream",
        "get",
        429,
        &over.headers,
        Some(&body),
    );
}

// ------------------------------------------------------------- schemathesis

/// The pinned fuzzer and everything it pulls in.
const REQUIREMENTS: &str = include_str!("../requirements-schemathesis.txt");

/// Operations the fuzzer leaves alone: `GET /events` answers with a body
/// that never ends (it would end each request in `--request-timeout`,
/// which schemathesis reports as an error, and could only ever judge the
/// headers). Its answers are checked in
/// `every_answer_of_events_is_one_the_document_describes`; `HEAD /events`
/// ends and is fuzzed.
const NOT_FUZZED: &[&str] = &["streamEvents"];

/// What each answer is held to. Not `positive_data_acceptance`: it wants
/// a 2xx for any schema-valid request, and a `since` that is a well-formed
/// but made-up cursor is rightly a 400 (a cursor is opaque: no schema can
/// describe only the ones hark issued), as is a `content` of only
/// whitespace (which no JSON Schema pattern tells apart as Rust's `trim`
/// does); the bounds that check would guard are checked from that side
/// by `the_documented_bounds_are_the_enforced_ones`.
/// Not the checks that need DELETE or object ownership (hark has no
/// DELETE, and one token).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_headers_conformance,response_schema_conformance,negative_data_rejection,\
missing_required_header,unsupported_method,allow_header_conformance,ignored_auth";

/// A virtualenv with the pinned schemathesis under target/, named by a
/// hash of the pins: made on the first run (about 20 s, from PyPI), reused
/// until the pins change. `python3` (CPython 3.11 or later, with venv) must
/// be on PATH; .ci/run installs it.
async fn schemathesis_venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "schemathesis-venv-{:016x}",
        fnv1a(REQUIREMENTS.as_bytes())
    ));
    let exe = dir.join("bin/schemathesis");
    // Written last: a venv without it is one whose making was cut short.
    let done = dir.join("hark-complete");
    if done.exists() {
        let mut version = Command::new(&exe);
        version.arg("--version");
        // One whose Python went away (a pyenv switch) is made again.
        if run(&mut version, "schemathesis --version", T)
            .await
            .status
            .success()
        {
            return dir;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let python = match Command::new("python3").arg("--version").output().await {
        Ok(out) if out.status.success() => "python3",
        Ok(out) => panic!("python3 --version failed: {}", text(&out)),
        Err(e) => panic!(
            "the OpenAPI fuzz test needs python3 (CPython 3.11 or later, with venv) \
             on PATH, and cannot start it: {e}. On Debian: apt-get install python3 \
             python3-venv (.ci/run does)."
        ),
    };
    let out = run(
        Command::new(python).args(["-m", "venv"]).arg(&dir),
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
    let requirements =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/requirements-schemathesis.txt");
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
        "pip install schemathesis",
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
    dir
}

/// schemathesis, against a hark with a participant's token, finds no
/// answer that breaks the document: no 5xx, no undocumented status,
/// media type or header, no body outside its schema, no invalid request
/// accepted, no wrong method answered but with 405 and `Allow`, no
/// protected operation served without a valid token.
#[tokio::test]
async fn schemathesis_finds_no_answer_that_breaks_the_document() {
    let venv = schemathesis_venv().await;
    let env: Vec<(&str, &str)> = SMALL
        .iter()
        .copied()
        .chain([("HARK_LOG", "warn")])
        .collect();
    let (hark, fx) = setup(&env).await;
    let s = seed(&fx).await;
    // The document's examples name room 1 and user 1: on this fresh
    // database they are alice and a room of hers, so the examples phase
    // reaches the 200s, not only 404s.
    assert_eq!((s.alice, s.general), (1, 1));
    let doc = served_document(&hark).await;
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();

    let work = temp_path("schemathesis");
    std::fs::create_dir_all(&work).expect("a working directory");
    let mut cmd = Command::new(venv.join("bin/schemathesis"));
    cmd.arg("run")
        .arg(hark.url("/openapi.json"))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", token(s.alice)),
        ])
        .args(["--checks", CHECKS])
        .args([
            "--max-examples",
            "25",
            "--seed",
            "22",
            "--request-timeout",
            "5",
        ])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--output-truncate", "false"]);
    for id in NOT_FUZZED {
        cmd.args(["--exclude-operation-id", id]);
    }
    // Reports and any schemathesis.toml are looked for here, not in the
    // repository; nothing between it and hark.
    cmd.current_dir(&work)
        .env("NO_PROXY", "127.0.0.1,localhost");
    let started = Instant::now();
    let out = run(&mut cmd, "schemathesis run", Duration::from_secs(300)).await;
    let output = text(&out);
    println!("schemathesis ran {:?}:\n{output}", started.elapsed());
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        out.status.success(),
        "schemathesis found answers that break docs/openapi.json ({}):\n{output}\n\
         hark's warnings and errors:\n{}",
        out.status,
        hark.logs()
    );
    // A run that tested nothing would pass too. Every operation is
    // tested but those left out and the document's own GET (schemathesis
    // loads the document from it rather than fuzzing it).
    let tested = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no count of tested operations in:\n{output}"));
    assert_eq!(tested, operations - NOT_FUZZED.len() - 1, "{output}");
    assert!(output.contains("No issues found"), "{output}");
}
