//! The README's first command: hark with no DATABASE_URL starts its own
//! PostgreSQL under its data directory, seeds a demo and prints a token per
//! demo user; the next start reuses the cluster, the secret and the demo.

use std::process::Stdio;
use std::time::Duration;

use crate::kit::*;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts the binary in embedded mode; returns it, its address and the
/// demo links it printed.
async fn start_embedded(data_dir: &std::path::Path) -> (Child, String, Vec<String>) {
    let mut child = Command::new(HARK)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HARK_DATA_DIR", data_dir)
        .env("HARK_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hark");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut links = Vec::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("hark is listening on http://") {
                addr = Some(a.trim().to_string());
            }
            if line.trim_start().starts_with("demo user") {
                links.push(line.clone());
            }
            if links.len() == 2 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("hark printed its address and demo users");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr.expect("an address"), links)
}

fn token_of(line: &str) -> String {
    line.split("?token=")
        .nth(1)
        .expect("a token")
        .trim()
        .to_string()
}

async fn sigterm(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("hark stopped")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn without_database_url_hark_runs_its_own_postgres_and_a_demo() {
    let dir = temp_path("quickstart");
    let _ = std::fs::remove_dir_all(&dir);

    let (child, addr, links) = start_embedded(&dir).await;
    assert!(
        links[0].contains("alice") && links[1].contains("bob"),
        "{links:?}"
    );
    let alice = token_of(&links[0]);
    let (s, _, body) = request(
        Method::GET,
        &format!("http://{addr}/api/chat/rooms/"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let rooms = json(&body);
    assert_eq!(rooms[0]["name"], "General");
    assert_eq!(rooms[0]["participants"].as_array().unwrap().len(), 2);
    let room = rooms[0]["id"].as_i64().unwrap();
    let (s, sent) = post_json(
        &format!("http://{addr}/api/chat/messages/"),
        Some(&token_of(&links[1])),
        &format!(r#"{{"room_id": {room}, "content": "kept across restarts"}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{sent}");
    // The page is served, and the client module it is built on.
    let (s, _, page) = request(Method::GET, &format!("http://{addr}/"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("./hark.js"));
    let (s, _, module) = request(Method::GET, &format!("http://{addr}/hark.js"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&module).contains("EventSource"));
    sigterm(child).await;

    let secret = std::fs::read_to_string(dir.join("jwt-secret")).expect("the secret is kept");
    // Second start: same cluster, same secret (the old token still works), no second demo.
    let (child, addr, _) = start_embedded(&dir).await;
    let (s, _, body) = request(
        Method::GET,
        &format!("http://{addr}/api/chat/rooms/"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the token from the first run is still valid"
    );
    let rooms = json(&body);
    assert_eq!(
        rooms.as_array().unwrap().len(),
        1,
        "the demo was not seeded twice"
    );
    assert_eq!(rooms[0]["last_message"]["content"], "kept across restarts");
    sigterm(child).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("jwt-secret")).unwrap(),
        secret
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without PostgreSQL installed (its directory hidden in a private mount
/// namespace) and without DATABASE_URL: one clear sentence, exit code 1.
#[tokio::test]
async fn without_postgres_installed_hark_says_so_in_one_sentence() {
    let empty = temp_path("no-postgres-empty");
    let data = temp_path("no-postgres-data");
    std::fs::create_dir_all(&empty).unwrap();
    let script = format!(
        "mount --bind {empty} /usr/lib/postgresql && exec env -i PATH=/usr/bin:/bin HARK_DATA_DIR={data} HARK_BIND=127.0.0.1:0 {bin}",
        empty = empty.display(),
        data = data.display(),
        bin = HARK,
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("mount:") && !stderr.contains("unshare:"),
        "this test hides /usr/lib/postgresql in a mount namespace and needs root: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence: {stderr}");
    assert!(lines[0].contains("PostgreSQL is not installed"), "{stderr}");
    assert!(lines[0].contains("DATABASE_URL"), "{stderr}");
    let _ = std::fs::remove_dir_all(&empty);
    let _ = std::fs::remove_dir_all(&data);
}

/// A port another process holds: hark says so at once, names HARK_BIND,
/// and has not started the embedded cluster (its data directory is not
/// even created).
#[tokio::test]
async fn a_port_in_use_is_refused_before_the_embedded_cluster_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let data = temp_path("port-in-use");
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new(HARK)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HARK_DATA_DIR", &data)
            .env("HARK_BIND", addr.to_string())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("hark exits at once")
    .expect("run hark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("set HARK_BIND"), "{stderr}");
    assert!(!data.exists(), "the embedded cluster was started");
}
