//! Everything handover keeps in its database, on SQLite (the embedded
//! default) or PostgreSQL (several instances sharing one database), chosen
//! by `DATABASE_URL`. Both engines run the same schema and the same SQL
//! (sqlx's `Any` driver); where they differ — how a write transaction
//! serialises, how a build is claimed — the engine decides here and nowhere
//! else. Routes never hold SQL.
//!
//! - [`exports`]: the export lifecycle, typed; every transition in one
//!   transaction with its audit row.
//! - [`audit`]: the hash-chained audit log.
//! - [`limits`]: sliding-window rate limits.
//! - [`tokens`]: API tokens.
//! - [`files`]: encrypted export files' keys and, on PostgreSQL, their
//!   bytes.

pub mod audit;
pub mod copies;
pub mod exports;
pub mod files;
pub mod limits;
pub mod tokens;
pub mod webhooks;

use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor as _, Transaction};

/// The engine behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// An SQLite file: one server (and the CLI beside it).
    Sqlite,
    /// PostgreSQL: any number of server instances.
    Postgres,
}

impl Engine {
    /// The engine a database URL names.
    ///
    /// # Errors
    ///
    /// Anything but `sqlite:` and `postgres://`/`postgresql://`.
    pub fn of(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            anyhow::bail!(
                "DATABASE_URL {url:?}: use sqlite://FILE (embedded) or postgres://USER@HOST/DB"
            )
        }
    }
}

/// handover's own database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// SQLite takes one writer at a time; writers of this process queue
    /// here instead of spinning on the file lock (other processes, such as
    /// the CLI, still meet the lock and its busy timeout).
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Keys the audit chain (HMAC-SHA256): derived from the master key,
    /// never stored in the database, so rows cannot be re-chained by
    /// someone who can only write the database.
    audit_key: Option<[u8; 32]>,
    /// Seals secrets the server must read back (webhook signing secrets):
    /// derived from the master key too, so a copy of the database alone
    /// does not hold them.
    secrets_key: Option<[u8; 32]>,
    /// An append-only file outside the database that receives each new
    /// head of the audit chain, so that removing the newest rows shows.
    head_file: Option<std::sync::Arc<HeadFile>>,
    /// Requests' audit rows waiting for the next group commit.
    audit_queue: std::sync::Arc<std::sync::Mutex<audit::Queue>>,
    /// Wrapped keys were deleted since the last checkpoint: their old
    /// page images may still be in the write-ahead log.
    erased: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A key for one purpose (`label`), derived from the master key by
/// HMAC-SHA256, so that no two purposes share a key and none is stored.
fn derive_key(master: &handover::crypto::DataKey, label: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(master.as_bytes())
        .expect("HMAC takes any key size");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

/// The fingerprint of a master key: a key derived from it (it reveals
/// nothing of the master key), recorded in the database it was first used
/// with.
fn master_key_fingerprint(master: &handover::crypto::DataKey) -> String {
    hex::encode(derive_key(master, b"handover master key fingerprint v1"))
}

impl Store {
    /// The fingerprint of the master key this database was set up with,
    /// if one was recorded.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn recorded_master_key(&self) -> anyhow::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT fingerprint FROM master_key_check WHERE id = 1")
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Records `master` as this database's master key when none is yet;
    /// whether `master` is the recorded one.
    ///
    /// # Errors
    ///
    /// Database errors.
    async fn claim_master_key(&self, master: &handover::crypto::DataKey) -> anyhow::Result<bool> {
        let mine = master_key_fingerprint(master);
        sqlx::query(
            "INSERT INTO master_key_check (id, fingerprint) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&mine)
        .execute(self.pool())
        .await?;
        Ok(self.recorded_master_key().await?.as_deref() == Some(mine.as_str()))
    }

    /// Refuses `master` when the database was set up with another master
    /// key; `writes` records it when none is recorded yet.
    ///
    /// # Errors
    ///
    /// [`WRONG_MASTER_KEY`], or database errors.
    pub async fn check_master_key(
        &self,
        master: &handover::crypto::DataKey,
        writes: bool,
    ) -> anyhow::Result<()> {
        let ours = if writes {
            self.claim_master_key(master).await?
        } else {
            self.recorded_master_key()
                .await?
                .is_none_or(|f| f == master_key_fingerprint(master))
        };
        anyhow::ensure!(ours, "{WRONG_MASTER_KEY}");
        Ok(())
    }
}

/// Why a server or operator command with another master key than the
/// database's first one is refused.
pub const WRONG_MASTER_KEY: &str = "HANDOVER_MASTER_KEY / HANDOVER_MASTER_KEY_FILE: this is not the master key this database was set up with \
     (its export files, cursors and audit chain need that one): restore that key, or use another database";

/// Where the heads of the audit chain are appended.
#[derive(Debug)]
pub(crate) struct HeadFile {
    path: std::path::PathBuf,
    /// Whether a missing file is created.
    create: bool,
}

/// A write transaction; on SQLite it also holds the process's writer turn.
pub struct Tx<'s> {
    pub(crate) tx: Transaction<'static, Any>,
    _turn: Option<tokio::sync::MutexGuard<'s, ()>>,
    /// The audit head this transaction appended, written to the head file
    /// once it commits.
    pub(crate) head: Option<(i64, String)>,
    head_file: Option<std::sync::Arc<HeadFile>>,
    /// Set when this transaction deletes wrapped keys: once it commits,
    /// the next checkpoint empties the write-ahead log.
    pub(crate) erases: bool,
    erased: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl Tx<'_> {
    /// Commits.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn commit(self) -> anyhow::Result<()> {
        self.tx.commit().await?;
        if self.erases {
            self.erased
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if let (Some((seq, hash)), Some(file)) = (&self.head, &self.head_file) {
            // After the commit: the head file never names a row that was
            // rolled back. Failing to write it is logged, not fatal: the
            // change is already stored.
            if let Err(e) = audit::append_head(&file.path, *seq, hash, file.create) {
                tracing::error!(file = %file.path.display(), error = %e, "writing the audit head failed");
            }
        }
        Ok(())
    }
}

/// Keys of PostgreSQL's transaction-level advisory locks.
pub(crate) mod lock {
    /// The audit chain's head: appends take turns.
    pub const AUDIT: i64 = 0x6876_6175_6469_7400;
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`:
    /// `sqlite://FILE` or `postgres://…`.
    ///
    /// # Errors
    ///
    /// An unknown URL, a database that cannot be opened, a failed migration.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of(url)?;
        let (url, max) = match engine {
            Engine::Sqlite => {
                let mut u = url.to_string();
                if !u.contains("mode=") {
                    u.push_str(if u.contains('?') {
                        "&mode=rwc"
                    } else {
                        "?mode=rwc"
                    });
                }
                (u, 8)
            }
            Engine::Postgres => (url.to_string(), 16),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // FULL: a commit is on disk before it returns, so the
                        // audit head written after it never names a row that
                        // a power cut takes back (NORMAL may lose the last
                        // commits, and verify would then call the rows
                        // written again under their numbers a rewrite). It
                        // costs one sync of the log per (group) commit.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 15000; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON; \
                             PRAGMA wal_autocheckpoint = 10000; PRAGMA journal_size_limit = 16777216;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("opening the database {}", redact(&url)))?;
        let migrated = match engine {
            Engine::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await,
            Engine::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await,
        };
        migrated.context("migrating the database")?;
        Ok(Self {
            pool,
            engine,
            writer: Default::default(),
            // A restart may follow deletes whose log was never truncated.
            erased: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            audit_key: None,
            secrets_key: None,
            head_file: None,
            audit_queue: Default::default(),
        })
    }

    /// Keys the audit chain, and the sealing of stored secrets, with keys
    /// derived from the master key.
    #[must_use]
    pub fn with_master_key(mut self, master: &handover::crypto::DataKey) -> Self {
        self.audit_key = Some(audit::derive_key(master));
        self.secrets_key = Some(webhooks::derive_key(master));
        self
    }

    /// Appends each new audit head to `path` (created when missing).
    #[must_use]
    pub fn with_head_file(mut self, path: std::path::PathBuf) -> Self {
        self.head_file = Some(std::sync::Arc::new(HeadFile { path, create: true }));
        self
    }

    /// Appends each new audit head to `path`, which the server created: an
    /// operator command must not create the server's file as another user.
    #[must_use]
    pub fn with_existing_head_file(mut self, path: std::path::PathBuf) -> Self {
        self.head_file = Some(std::sync::Arc::new(HeadFile {
            path,
            create: false,
        }));
        self
    }

    /// Copies the write-ahead log into the database file (SQLite; nothing
    /// to do on PostgreSQL). The server calls it every second, in the
    /// background: left to SQLite, the checkpoint runs inside whichever
    /// commit fills the log, and that request waits for it. Connections
    /// still checkpoint on their own once the log passes 10,000 pages
    /// (about 40 MB), so tools that write without the server stay bounded;
    /// a log that grew is cut back to 16 MiB when it restarts. After wrapped
    /// keys were deleted the checkpoint truncates the log: `secure_delete`
    /// overwrites them in the database file, and the log's older page
    /// images, which still hold them, go too.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        if self.engine == Engine::Sqlite {
            let truncate = self.erased.swap(false, Ordering::AcqRel);
            let sql = if truncate {
                "PRAGMA wal_checkpoint(TRUNCATE)"
            } else {
                "PRAGMA wal_checkpoint(PASSIVE)"
            };
            // Its first column is 1 when it was busy: unless the log was
            // emptied, the next checkpoint tries again.
            let done: anyhow::Result<(i64, i64, i64)> = sqlx::query_as(sql)
                .fetch_one(&self.pool)
                .await
                .context("checkpointing the write-ahead log");
            if truncate && !matches!(done, Ok((0, _, _))) {
                self.erased.store(true, Ordering::Release);
            }
            done?;
        }
        Ok(())
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The connection pool (tests and tools reach behind the API with it).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a write transaction. On SQLite it is `BEGIN IMMEDIATE` (the
    /// write lock up front, so a read-then-write cannot fail half-way).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub(crate) async fn write(&self) -> anyhow::Result<Tx<'_>> {
        match self.engine {
            Engine::Sqlite => {
                let turn = self.writer.lock().await;
                let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                Ok(Tx {
                    tx,
                    _turn: Some(turn),
                    head: None,
                    head_file: self.head_file.clone(),
                    erases: false,
                    erased: self.erased.clone(),
                })
            }
            Engine::Postgres => Ok(Tx {
                tx: self.pool.begin().await?,
                _turn: None,
                head: None,
                head_file: self.head_file.clone(),
                erases: false,
                erased: self.erased.clone(),
            }),
        }
    }

    /// Takes a transaction-level lock on `key` (PostgreSQL; on SQLite the
    /// write transaction holds the whole database already).
    pub(crate) async fn lock(&self, tx: &mut Tx<'_>, key: i64) -> anyhow::Result<()> {
        if self.engine == Engine::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *tx.tx)
                .await?;
        }
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs SQL with no parameters (demo schemas, seeds).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn execute_script(&self, sql: &str) -> anyhow::Result<()> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }

    /// A count query with no parameters; `None` when it fails (e.g. the
    /// table does not exist).
    pub async fn count(&self, sql: &str) -> Option<i64> {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .ok()
    }
}

/// A database URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A text column of a row.
pub(crate) fn text(r: &AnyRow, col: &str) -> anyhow::Result<String> {
    use sqlx::Row as _;
    Ok(r.try_get::<String, _>(col)?)
}

/// An optional text column of a row.
pub(crate) fn opt_text(r: &AnyRow, col: &str) -> anyhow::Result<Option<String>> {
    use sqlx::Row as _;
    Ok(r.try_get::<Option<String>, _>(col)?)
}

/// An integer column of a row.
pub(crate) fn int(r: &AnyRow, col: &str) -> anyhow::Result<i64> {
    use sqlx::Row as _;
    Ok(r.try_get::<i64, _>(col)?)
}

/// An optional integer column of a row.
pub(crate) fn opt_int(r: &AnyRow, col: &str) -> anyhow::Result<Option<i64>> {
    use sqlx::Row as _;
    Ok(r.try_get::<Option<i64>, _>(col)?)
}

/// The current time as the database stores it.
/// The API's timestamp `d` from now.
pub fn timestamp_in(d: std::time::Duration) -> String {
    handover::model::format_timestamp(time::OffsetDateTime::now_utc() + d)
}

pub fn now() -> String {
    handover::model::format_timestamp(time::OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_kept_out_of_messages() {
        assert_eq!(
            super::redact("postgres://app:s3cret@db:5432/handover"),
            "postgres://app:***@db:5432/handover"
        );
        assert_eq!(super::redact("sqlite://x.db"), "sqlite://x.db");
    }
}
