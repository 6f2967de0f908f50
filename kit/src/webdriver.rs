//! A minimal W3C WebDriver client over hyper, driving headless Chromium
//! through `chromedriver` (Debian's `chromium` and `chromium-driver`
//! packages; `.ci/run` installs them).
//!
//! [`Browser::launch`] starts `chromedriver` on a free port as a child
//! process (killed on drop) and opens a session on a fresh profile;
//! [`Browser::quit`] deletes the session. When a test panics first, `Drop`
//! deletes the session with a blocking request so Chromium does not
//! outlive the test.
//!
//! Not a WebDriver crate: fantoccini 0.22 (default features off, over
//! hyper's plain HTTP connector) was measured against this client. It adds
//! 83 crates to the tree (the `webdriver` crate with icu_segmenter, url
//! and idna, time, two versions of cookie and of http) and about 75 s of
//! CPU to a cold build, and it has no command for the chromedriver
//! extensions the browser test uses (`goog/cdp/execute`, `se/log`), which
//! would need custom commands all the same. thirtyfour brings reqwest on
//! top. This client is the hyper client the kit already has.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Upper bound for one WebDriver command (session creation included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where Chromium and chromedriver are; panics (never skips) when either
/// is missing.
pub struct Binaries {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub fn require_browser() -> Binaries {
    let chromium = find_on_path("chromium");
    let chromedriver = find_on_path("chromedriver");
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Binaries {
            chromium,
            chromedriver,
        },
        (chromium, chromedriver) => panic!(
            "the browser test needs headless Chromium and its WebDriver, and {} not found on PATH \
             or in /usr/bin. Install them: run .ci/run, or \
             `apt-get install chromium chromium-driver`.",
            match (chromium.is_none(), chromedriver.is_none()) {
                (true, true) => "`chromium` and `chromedriver` were",
                (true, false) => "`chromium` was",
                _ => "`chromedriver` was",
            }
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Chromium's profile and chromedriver's log.
    dir: PathBuf,
    closed: bool,
}

impl Browser {
    /// Starts chromedriver and a Chromium session with a `width`×`height`
    /// window.
    pub async fn launch(width: u32, height: u32) -> Browser {
        let bins = require_browser();
        let dir = std::env::temp_dir().join(format!(
            "hark-browser-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(dir.join("profile")).expect("create the browser profile dir");
        let client = Client::builder(TokioExecutor::new()).build_http();

        // The port may be taken between finding it and chromedriver's bind.
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut driver = Command::new(&bins.chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!(
                    "--log-path={}",
                    dir.join("chromedriver.log").display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bins.chromedriver.display()));
            match wait_driver_ready(&client, addr, &mut driver).await {
                Ok(()) => {
                    let mut browser = Browser {
                        driver,
                        addr,
                        session: String::new(),
                        client,
                        dir,
                        closed: true,
                    };
                    browser.new_session(&bins.chromium, width, height).await;
                    return browser;
                }
                Err(e) => {
                    last_err = e;
                    let _ = driver.kill().await;
                }
            }
        }
        panic!(
            "chromedriver did not start: {last_err}\n{}",
            read_log(&dir.join("chromedriver.log"))
        );
    }

    async fn new_session(&mut self, chromium: &Path, width: u32, height: u32) {
        let profile = self.dir.join("profile");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--hide-scrollbars",
                            format!("--window-size={width},{height}"),
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        });
        let value = self
            .raw(Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start a Chromium session: {e}\n{}",
                    read_log(&self.dir.join("chromedriver.log"))
                )
            });
        self.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {value}"))
            .to_string();
        self.closed = false;
    }

    /// One WebDriver command; `path` is relative to the session
    /// (`"/url"` → `/session/{id}/url`). Returns the `value`.
    pub async fn cmd(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let full = format!("/session/{}{path}", self.session);
        self.raw(method, &full, body).await
    }

    async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let uri = format!("http://{}{path}", self.addr);
        let req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_else(|| {
                    if method == Method::POST {
                        "{}".into()
                    } else {
                        String::new()
                    }
                }),
            )))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(COMMAND_TIMEOUT, async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| format!("{method} {path}: no answer within {COMMAND_TIMEOUT:?}"))??;
        let (status, bytes) = resp;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{method} {path}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status} {}: {}",
                value["error"].as_str().unwrap_or("?"),
                value["message"].as_str().unwrap_or("")
            ));
        }
        Ok(value)
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Runs `script` (a function body: use `return`) in the page.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value, String> {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` every 100 ms until it returns something truthy
    /// (not null/false/0/""), for at most `timeout`. Returns that value.
    pub async fn wait_for(&self, script: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.execute(script, json!([])).await;
            match &last {
                Ok(v) if truthy(v) => return Ok(v.clone()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not true within {timeout:?} (last answer: {last:?}): {script}"
                ));
            }
            // Polling the page: it announces nothing to WebDriver.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A Chrome DevTools Protocol command (chromedriver's extension).
    pub async fn cdp(&self, cmd: &str, params: Value) -> Result<Value, String> {
        self.cmd(
            Method::POST,
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    /// Installs `source` to run in every document before its own scripts.
    pub async fn on_new_document(&self, source: &str) {
        self.cdp(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": source }),
        )
        .await
        .unwrap_or_else(|e| panic!("install a script on new documents: {e}"));
    }

    /// The browser console since the last call (chromedriver's log
    /// extension): `[{level, message, source, timestamp}]`.
    pub async fn console_log(&self) -> Result<Vec<Value>, String> {
        let v = self
            .cmd(Method::POST, "/se/log", Some(json!({ "type": "browser" })))
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The element matching a CSS selector.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: no element reference in {v}"))
            .to_string()
    }

    pub async fn send_keys(&self, element: &str, text: &str) {
        self.cmd(
            Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .unwrap_or_else(|e| panic!("type into {element}: {e}"));
    }

    pub async fn click(&self, element: &str) {
        self.cmd(Method::POST, &format!("/element/{element}/click"), None)
            .await
            .unwrap_or_else(|e| panic!("click {element}: {e}"));
    }

    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.cmd(
            Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await
        .unwrap_or_else(|e| panic!("resize the window to {width}x{height}: {e}"));
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .cmd(Method::GET, "/screenshot", None)
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a base64 screenshot"))
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot dir");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Ends the session (Chromium exits), then chromedriver.
    pub async fn quit(mut self) {
        if !self.closed {
            self.closed = true;
            let session = format!("/session/{}", self.session);
            if let Err(e) = self.raw(Method::DELETE, &session, None).await {
                eprintln!("deleting the WebDriver session: {e}");
            }
        }
        let _ = self.driver.kill().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.closed {
            // A panic skipped quit(): end the session synchronously so
            // Chromium exits with it (chromedriver is killed on drop).
            let _ = blocking_delete(self.addr, &format!("/session/{}", self.session));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn blocking_delete(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}

async fn wait_driver_ready(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    driver: &mut Child,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = driver.try_wait() {
            return Err(format!("chromedriver exited with {status}"));
        }
        let req = Request::get(format!("http://{addr}/status"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(2), client.request(req)).await
        {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            if let Ok(body) = body {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v["value"]["ready"].as_bool() == Some(true) {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("chromedriver on {addr} not ready within 15 s"));
        }
        // Polling /status (bounded above): chromedriver's way to say ready.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_log(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let tail: Vec<&str> = s.lines().rev().take(40).collect();
            format!(
                "chromedriver log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
        Err(_) => String::new(),
    }
}

/// JavaScript truthiness of a JSON value.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
