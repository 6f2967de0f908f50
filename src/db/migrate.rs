//! Applies `sql/` in order, each file once, each in its own transaction,
//! recorded in `hark_migrations`. An advisory lock serialises concurrent
//! starts (several hark processes on one database).

use tokio_postgres::Client;

use super::DbError;

/// The migrations, compiled into the binary so a deployment is one file.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "chat_tables",
        include_str!("../../sql/0001_chat_tables.sql"),
    ),
    (2, "hark", include_str!("../../sql/0002_hark.sql")),
    (
        3,
        "access_revoked",
        include_str!("../../sql/0003_access_revoked.sql"),
    ),
    (
        4,
        "message_lifecycle",
        include_str!("../../sql/0004_message_lifecycle.sql"),
    ),
    (5, "presence", include_str!("../../sql/0005_presence.sql")),
];

/// Arbitrary but fixed: "hark" in ASCII.
const LOCK_KEY: i64 = 0x6861_726b;

/// Applies what is missing; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, DbError> {
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS hark_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM hark_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO hark_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied.push(version);
    }
    Ok(applied)
}
