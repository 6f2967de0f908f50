//! A private PostgreSQL cluster through hark's embedded module.
//!
//! [`Cluster::start`] starts one with `ephemeral: true`: its watchdog holds
//! a pipe from this process, so when the process exits — passing, failing
//! or aborting — PostgreSQL stops and its temporary directory is removed.
//! Tests share one per process ([`shared`]) and take a fresh database per
//! test ([`fresh_db`]); a benchmark starts its own with its settings.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use hark::db::embedded::{EmbeddedOptions, EmbeddedPg};
use tokio_postgres::NoTls;

/// Settings every cluster here gets: durability is not what is tested or
/// measured.
const FAST: [(&str, &str); 3] = [
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
];

/// A running cluster.
pub struct Cluster {
    pg: Option<EmbeddedPg>,
    /// `host=… port=… user=postgres` without a dbname.
    pub base: String,
}

impl Cluster {
    /// Starts a cluster in a fresh temp directory named `prefix-…`, with
    /// fsync off and `settings` (`-c name=value`) on top.
    pub async fn start(prefix: &str, settings: &[(&str, &str)]) -> crate::Result<Cluster> {
        let pg = EmbeddedPg::start(EmbeddedOptions {
            data_dir: crate::fresh_temp_dir(prefix),
            ephemeral: true,
            settings: FAST
                .iter()
                .chain(settings)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await?;
        let base = pg
            .connection_string("postgres")
            .split(' ')
            .filter(|kv| !kv.starts_with("dbname="))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Cluster { pg: Some(pg), base })
    }

    /// The connection string of database `name`, created if missing.
    pub async fn database(&self, name: &str) -> crate::Result<String> {
        if let Some(pg) = &self.pg {
            pg.ensure_database(name).await?;
        }
        Ok(format!("{} dbname={name}", self.base))
    }

    /// Stops the server and removes its directory.
    pub async fn stop(mut self) {
        if let Some(pg) = self.pg.take() {
            if let Err(e) = pg.stop().await {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// The base connection string of this process's shared test cluster.
///
/// The cluster lives on a thread of its own with its own runtime, so it
/// outlives each test's runtime, and stops when the process exits.
pub fn shared() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("test-postgres".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let settings = [("max_connections", "300"), ("shared_buffers", "64MB")];
                    let cluster = Cluster::start("hark-test-pg", &settings)
                        .await
                        .unwrap_or_else(|e| panic!("start the test PostgreSQL cluster: {e}"));
                    tx.send(cluster.base.clone()).expect("send");
                    // Keep the cluster for the life of the process.
                    std::future::pending::<()>().await;
                    drop(cluster);
                });
            })
            .expect("spawn the cluster thread");
        rx.recv().expect("the test cluster did not start")
    })
}

/// A fresh, empty database on the shared cluster; returns its connection
/// string.
pub async fn fresh_db() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = shared();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("t{}_{n}", std::process::id());
    let admin = connect(&format!("{base} dbname=postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    format!("{base} dbname={name}")
}

/// A connection (its driver on a task of the current runtime); panics if
/// the database cannot be reached.
pub async fn connect(conn: &str) -> tokio_postgres::Client {
    try_connect(conn)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// The same, as a result.
pub async fn try_connect(conn: &str) -> crate::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A private cluster that can be stopped and started again on the same
/// data directory and socket: a PostgreSQL restart under running clients
/// (the soak's fault). Not ephemeral, so that a stop keeps the data:
/// [`Restartable::remove`] (or, best effort, drop) stops the server and
/// deletes its directories. Should this process die instead, the watchdog
/// still stops the server (its pipe closes), but the directory stays.
pub struct Restartable {
    pg: Option<EmbeddedPg>,
    opts: EmbeddedOptions,
    socket_dir: std::path::PathBuf,
    /// `host=… port=… user=postgres` without a dbname.
    pub base: String,
}

impl Restartable {
    /// Starts a cluster in a fresh temp directory named `prefix-…`, with
    /// fsync off and `settings` (`-c name=value`) on top.
    pub async fn start(prefix: &str, settings: &[(&str, &str)]) -> crate::Result<Restartable> {
        let opts = EmbeddedOptions {
            data_dir: crate::fresh_temp_dir(prefix),
            ephemeral: false,
            settings: FAST
                .iter()
                .chain(settings)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let pg = match EmbeddedPg::start(opts.clone()).await {
            Ok(pg) => pg,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&opts.data_dir);
                return Err(e.into());
            }
        };
        let base = pg
            .connection_string("postgres")
            .split(' ')
            .filter(|kv| !kv.starts_with("dbname="))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Restartable {
            socket_dir: pg.socket_dir().to_path_buf(),
            pg: Some(pg),
            opts,
            base,
        })
    }

    /// The connection string of database `name`, created if missing.
    pub async fn database(&self, name: &str) -> crate::Result<String> {
        let pg = self.pg.as_ref().ok_or_else(|| crate::err("stopped"))?;
        pg.ensure_database(name).await?;
        Ok(format!("{} dbname={name}", self.base))
    }

    /// A fast shutdown (every session is terminated, a checkpoint is
    /// written), then a start on the same directory and socket; returns
    /// once it accepts connections again, with how long it was away.
    pub async fn restart(&mut self) -> crate::Result<std::time::Duration> {
        let began = std::time::Instant::now();
        if let Some(pg) = self.pg.take() {
            pg.stop().await?;
        }
        self.pg = Some(EmbeddedPg::start(self.opts.clone()).await?);
        Ok(began.elapsed())
    }

    /// Stops the server and deletes its directories (drop deletes them).
    pub async fn remove(mut self) {
        if let Some(pg) = self.pg.take() {
            if let Err(e) = pg.stop().await {
                eprintln!("warning: {e}");
            }
        }
    }

    fn remove_dirs(&self) {
        let _ = std::fs::remove_dir_all(&self.opts.data_dir);
        if !self.socket_dir.starts_with(&self.opts.data_dir) {
            let _ = std::fs::remove_dir_all(&self.socket_dir);
        }
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        if let Some(pg) = self.pg.take() {
            // Closing the watchdog's pipe stops the server; wait (bounded)
            // until it has let go of the directory before deleting it.
            drop(pg);
            let pidfile = self.opts.data_dir.join("postmaster.pid");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while pidfile.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        self.remove_dirs();
    }
}
