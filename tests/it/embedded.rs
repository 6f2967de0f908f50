//! The embedded cluster against a real PostgreSQL: start, serve, stop,
//! clean up, and reuse; and a server error as `DbError` shows it. Skipped
//! (with a note) where PostgreSQL is not installed.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hark::db::embedded::{find_bindir, EmbeddedError, EmbeddedOptions, EmbeddedPg};
use tokio_postgres::NoTls;

/// Every test must stay well under this.
const BUDGET: Duration = Duration::from_secs(25);

fn installed() -> bool {
    if find_bindir().is_none() {
        eprintln!("skipping: PostgreSQL is not installed");
        return false;
    }
    true
}

/// A fresh, empty directory of our own, short enough for the socket to live
/// inside it.
fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hark-emb-{tag}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&dir).expect("create temp dir");
    dir
}

/// Removes a directory even when the test fails half-way.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &Path, ephemeral: bool) -> EmbeddedOptions {
    EmbeddedOptions {
        data_dir: dir.to_path_buf(),
        ephemeral,
        settings: vec![("fsync".into(), "off".into())],
    }
}

async fn connect(pg: &EmbeddedPg, db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.connection_string(db), NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn ephemeral_cluster_serves_and_then_disappears() {
    if !installed() {
        return;
    }
    let started = Instant::now();
    let dir = fresh_dir("eph");
    let _guard = RemoveOnDrop(dir.clone());

    let pg = EmbeddedPg::start(options(&dir, true))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let client = connect(&pg, "postgres").await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let listen: String = client
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listen, "", "the cluster must not listen on TCP");
    drop(client);

    pg.ensure_database("x").await.expect("create x");
    pg.ensure_database("x").await.expect("x again is a no-op");
    let client = connect(&pg, "x").await;
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "x");
    drop(client);

    let socket = pg.socket_dir().join(".s.PGSQL.5432");
    assert!(
        UnixStream::connect(&socket).is_ok(),
        "listening before stop"
    );
    let conn_str = pg.connection_string("postgres");

    pg.stop().await.unwrap_or_else(|e| panic!("stop: {e}"));
    assert!(!dir.exists(), "an ephemeral data dir is removed on stop");
    assert!(
        UnixStream::connect(&socket).is_err(),
        "nothing listens after stop"
    );
    assert!(tokio_postgres::connect(&conn_str, NoTls).await.is_err());
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn persistent_cluster_is_reused_without_reinit() {
    if !installed() {
        return;
    }
    let started = Instant::now();
    let dir = fresh_dir("keep");
    let _guard = RemoveOnDrop(dir.clone());

    let pg = EmbeddedPg::start(options(&dir, false))
        .await
        .unwrap_or_else(|e| panic!("first start: {e}"));
    pg.ensure_database("hark").await.expect("create hark");
    let client = connect(&pg, "hark").await;
    client
        .batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('first run')")
        .await
        .unwrap();
    drop(client);
    pg.stop()
        .await
        .unwrap_or_else(|e| panic!("first stop: {e}"));
    assert!(dir.exists(), "a persistent data dir survives stop");

    let pg = EmbeddedPg::start(options(&dir, false))
        .await
        .unwrap_or_else(|e| panic!("second start: {e}"));
    pg.ensure_database("hark")
        .await
        .expect("hark exists already");
    let client = connect(&pg, "hark").await;
    let kept: String = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, "first run",
        "the cluster was reused, not re-initialised"
    );
    drop(client);
    pg.stop()
        .await
        .unwrap_or_else(|e| panic!("second stop: {e}"));

    std::fs::remove_dir_all(&dir).expect("remove the data dir");
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn dropping_without_stop_still_shuts_down_and_cleans_up() {
    if !installed() {
        return;
    }
    let dir = fresh_dir("drop");
    let _guard = RemoveOnDrop(dir.clone());

    let pg = EmbeddedPg::start(options(&dir, true))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let socket = pg.socket_dir().join(".s.PGSQL.5432");
    // The same path as the parent dying: the watchdog's pipe closes.
    drop(pg);

    let gone = crate::kit::within(Duration::from_secs(15), || async {
        !dir.exists() && UnixStream::connect(&socket).is_err()
    })
    .await;
    assert!(gone, "still running 15 s after drop");
}

#[tokio::test]
async fn a_foreign_non_empty_directory_is_refused() {
    if !installed() {
        return;
    }
    let dir = fresh_dir("foreign");
    let _guard = RemoveOnDrop(dir.clone());
    std::fs::write(dir.join("notes.txt"), "not a cluster").unwrap();

    let err = EmbeddedPg::start(options(&dir, true))
        .await
        .expect_err("must refuse");
    assert!(
        matches!(err, EmbeddedError::DataDirNotEmpty(_)),
        "unexpected error: {err}"
    );
    assert!(
        dir.join("notes.txt").exists(),
        "an ephemeral start must not delete what is not its own"
    );
}

/// A query the server rejects becomes `DbError::Query`, which operators
/// see with its SQLSTATE and which keeps the server's error as its source.
#[tokio::test]
async fn a_query_error_keeps_its_sqlstate_and_source() {
    use std::error::Error as _;
    if !installed() {
        return;
    }
    let dir = fresh_dir("dberr");
    let _guard = RemoveOnDrop(dir.clone());

    let pg = EmbeddedPg::start(options(&dir, true))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let client = connect(&pg, "postgres").await;
    let e = client.batch_execute("SELEC 1").await.expect_err("not SQL");
    let err = hark::db::DbError::from(e);
    assert!(matches!(err, hark::db::DbError::Query(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("database error: 42601: syntax error"),
        "{err}"
    );
    let source = err.source().expect("the server's error is kept");
    assert!(source.downcast_ref::<tokio_postgres::Error>().is_some());
    drop(client);
    pg.stop().await.unwrap_or_else(|e| panic!("stop: {e}"));
}
