//! The embedded SQLite database: created and migrated on first start.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// Opens (creating if needed) and migrates the database at `url`
/// (`sqlite://path`, `sqlite::memory:`).
///
/// # Errors
///
/// A URL that is not SQLite, a file that cannot be opened, or a failed migration.
pub async fn connect(url: &str) -> anyhow::Result<SqlitePool> {
    if url.starts_with("postgres") {
        anyhow::bail!(
            "DATABASE_URL {url:?}: PostgreSQL is not supported by this build; use sqlite://FILE"
        );
    }
    let options = SqliteConnectOptions::from_str(url)
        .with_context(|| {
            format!("DATABASE_URL {url:?} is not a valid SQLite URL (e.g. sqlite://handover.db)")
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(15))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .with_context(|| format!("opening database {url}"))?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("migrating the database")?;
    Ok(pool)
}
