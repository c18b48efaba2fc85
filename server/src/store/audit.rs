//! The tamper-evident audit log: one row per API request and per lifecycle
//! event, each storing the hash of the previous row. Appends take turns
//! (SQLite's write lock; a PostgreSQL advisory lock across instances), so
//! the chain stays one chain whatever appends it. [`Store::verify_audit`]
//! finds the first altered, removed or reordered row.

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;

use super::{int, lock, now, opt_int, opt_text, text, Store, Tx};

/// The prefix of keyed (HMAC-SHA256) row hashes.
pub const KEYED: &str = "hmac:";

/// The audit chain's key, derived from the master key.
pub fn derive_key(master: &handover::crypto::DataKey) -> [u8; 32] {
    super::derive_key(master, b"handover audit chain v1")
}

/// Appends `seq hash` as a line to the head file; `create`: make the file
/// (readable by its owner only) when it is missing.
///
/// The line goes out in one `write` on a file opened for appending, so the
/// lines of two writers (`serve` and an operator command) never mix. After
/// a write that was cut short (a crash, a full disk) the file does not end
/// in a newline: the new line then starts on a line of its own, rather than
/// finishing the torn one into a head that was never written.
///
/// # Errors
///
/// The file cannot be opened, read or written.
pub fn append_head(
    path: &std::path::Path,
    seq: i64,
    hash: &str,
    create: bool,
) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _, Write as _};
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(create);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    let mut last = [b'\n'];
    if f.metadata()?.len() > 0 {
        f.seek(std::io::SeekFrom::End(-1))?;
        f.read_exact(&mut last)?;
    }
    let sep = if last[0] == b'\n' { "" } else { "\n" };
    f.write_all(format!("{sep}{seq} {hash}\n").as_bytes())
}

/// One head as a head file records it, held compactly: `audit verify`
/// keeps every head of the file (one per commit) while it walks the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Head {
    /// The row.
    pub seq: i64,
    keyed: bool,
    digest: [u8; 32],
}

impl Head {
    /// Whether `hash` (a row's stored hash) is this head's.
    pub fn is(&self, hash: &str) -> bool {
        parse_hash(hash) == Some((self.keyed, self.digest))
    }

    /// As a head file line's `(seq, hash)`.
    pub fn to_pair(&self) -> (i64, String) {
        let prefix = if self.keyed { KEYED } else { "" };
        (self.seq, format!("{prefix}{}", hex::encode(self.digest)))
    }
}

/// A row hash (`hmac:` and 64 lowercase hex digits, or the 64 digits alone).
fn parse_hash(hash: &str) -> Option<(bool, [u8; 32])> {
    let (keyed, hex_digits) = match hash.strip_prefix(KEYED) {
        Some(h) => (true, h),
        None => (false, hash),
    };
    if hex_digits.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let digest = hex::decode(hex_digits).ok()?.try_into().ok()?;
    Some((keyed, digest))
}

/// A head file's line, when it is one whole head: a positive row number, a
/// space, and a row hash.
fn parse_head(line: &str) -> Option<Head> {
    let (seq, hash) = line.trim().split_once(' ')?;
    if !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: i64 = seq.parse().ok().filter(|s| *s > 0)?;
    let (keyed, digest) = parse_hash(hash)?;
    Some(Head { seq, keyed, digest })
}

/// The heads a head file records, and how many of its lines are not heads.
#[derive(Debug, Default)]
pub struct Heads {
    /// In the file's order.
    pub heads: Vec<Head>,
    /// Lines that are not one whole head (writes cut short by a crash or a
    /// full disk), skipped.
    pub torn: usize,
}

/// Every head recorded in a head file (the whole file is read: `audit
/// verify` checks each of them against the chain).
///
/// # Errors
///
/// The file cannot be read.
pub fn read_heads(path: &std::path::Path) -> anyhow::Result<Heads> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the audit head file {}", path.display()))?;
    Ok(heads_in(&bytes, true))
}

/// The heads among `bytes`' complete lines (and, unless `from_start`, past
/// its first line, which may be the end of one).
fn heads_in(bytes: &[u8], from_start: bool) -> Heads {
    let complete = &bytes[..bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)];
    let mut lines = complete.split(|b| *b == b'\n');
    if !from_start {
        lines.next();
    }
    let mut out = Heads::default();
    for line in lines.filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
        match std::str::from_utf8(line).ok().and_then(parse_head) {
            Some(head) => out.heads.push(head),
            None => out.torn += 1,
        }
    }
    out
}

/// Lines at the end of a head file among which the newest head is sought:
/// writers in two processes append after their commits, so the last line
/// may trail the one before it by a commit or two.
const HEAD_WINDOW: usize = 16;

/// The end of a head file (its last 64 KiB), and whether that is all of it.
fn read_tail(path: &std::path::Path) -> anyhow::Result<(Vec<u8>, bool)> {
    use std::io::{Read as _, Seek as _};
    const TAIL: u64 = 64 * 1024;
    let read = || -> std::io::Result<(Vec<u8>, bool)> {
        let mut f = std::fs::File::open(path)?;
        let start = f.metadata()?.len().saturating_sub(TAIL);
        f.seek(std::io::SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok((bytes, start == 0))
    };
    read().with_context(|| format!("reading the audit head file {}", path.display()))
}

/// The newest head among `tail`'s last lines.
fn newest_head(tail: &[u8], from_start: bool) -> Option<(i64, String)> {
    heads_in(tail, from_start)
        .heads
        .iter()
        .rev()
        .take(HEAD_WINDOW)
        .max_by_key(|h| h.seq)
        .map(Head::to_pair)
}

/// The newest head recorded in a head file: the highest row among the
/// heads on its last lines (only the file's end is read).
///
/// # Errors
///
/// The file cannot be read.
pub fn last_head(path: &std::path::Path) -> anyhow::Result<Option<(i64, String)>> {
    let (tail, from_start) = read_tail(path)?;
    Ok(newest_head(&tail, from_start))
}

/// How a head file stands towards a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadFileState {
    /// There is no such file.
    Missing,
    /// Empty (or blank): no row was written beside it yet.
    Empty,
    /// Not empty, yet without one whole head: not a head file, or only torn lines.
    NoWholeHead,
    /// Its newest head is a row of this database, with that hash.
    Ours,
    /// Its newest head, row `seq`, is not a row of this database as
    /// recorded: another database's file, or the log was altered.
    Foreign {
        /// The row the file names.
        seq: i64,
    },
}

/// The previous-hash of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows in one group commit, at most.
const MAX_BATCH: usize = 256;

/// A row, and where to say whether it was committed.
type Waiting = (AuditEntry, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Requests' rows waiting for a group commit ([`Store::audit`]).
#[derive(Debug, Default)]
pub(crate) struct Queue {
    waiting: Vec<Waiting>,
    /// Whether a task is committing them.
    draining: bool,
}

/// Why a group commit failed: one of its rows, or the transaction itself
/// (it could not begin or commit: the database is away or locked).
enum BatchError {
    Row(anyhow::Error),
    Tx(anyhow::Error),
}

/// Resets the audit queue when its task ends any other way than by
/// emptying it (a panic, a runtime shutting down): the rows still waiting
/// fail, and the next row starts a new task, instead of every later
/// request waiting for ever.
pub(crate) struct Abandon {
    queue: std::sync::Arc<std::sync::Mutex<Queue>>,
    finished: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.finished {
            if let Ok(mut queue) = self.queue.lock() {
                queue.waiting.clear();
                queue.draining = false;
            }
        }
    }
}

/// One row to append (time, sequence number and hashes are added).
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub request_id: Option<String>,
    pub actor: Option<String>,
    pub company_id: Option<String>,
    pub action: String,
    pub resource: Option<String>,
    /// `allowed`, `refused`, `error` for requests; `event` for lifecycle events.
    pub outcome: String,
    pub status: Option<u16>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: Value,
}

impl AuditEntry {
    /// A lifecycle event (`export.created`, `export.completed`, …).
    pub fn event(action: &str, actor: &str, company: &str, resource: &str, details: Value) -> Self {
        Self {
            actor: Some(actor.to_string()),
            company_id: Some(company.to_string()),
            action: action.to_string(),
            resource: Some(resource.to_string()),
            outcome: "event".into(),
            details,
            ..Self::default()
        }
    }

    /// The same entry for the request `request_id`.
    pub fn for_request(mut self, request_id: Option<&str>) -> Self {
        self.request_id = request_id.map(str::to_string);
        self
    }

    /// A lifecycle event, stamped with what it lacks of the request this
    /// task is serving (see [`REQUEST_ORIGIN`]).
    fn stamped(mut self) -> Self {
        if self.outcome == "event" {
            let _ = REQUEST_ORIGIN.try_with(|o| {
                self.request_id.get_or_insert_with(|| o.request_id.clone());
                self.ip = self.ip.take().or_else(|| o.ip.clone());
                self.user_agent = self.user_agent.take().or_else(|| o.user_agent.clone());
            });
        }
        self
    }
}

/// The request a task is serving: the lifecycle events it causes are
/// stamped with its id, address and user agent, as its own row is.
#[derive(Debug, Clone)]
pub struct RequestOrigin {
    pub request_id: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

tokio::task_local! {
    /// Set by the request middleware around each request's handler; absent
    /// in background jobs and operator commands, whose events no request
    /// caused.
    pub static REQUEST_ORIGIN: RequestOrigin;
}

/// A stored row, as `GET /api/audit` returns it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditRow {
    pub seq: i64,
    pub at: String,
    pub request_id: Option<String>,
    pub actor: Option<String>,
    pub company_id: Option<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: String,
    pub status: Option<i64>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRow {
    fn compute_hash(&self, key: Option<&[u8; 32]>) -> String {
        // A JSON array is an unambiguous encoding of the fields, in order.
        let canonical = json!([
            self.seq,
            self.at,
            self.request_id,
            self.actor,
            self.company_id,
            self.action,
            self.resource,
            self.outcome,
            self.status,
            self.ip,
            self.user_agent,
            self.details,
            self.prev_hash
        ]);
        match key {
            Some(k) => {
                let mut mac =
                    <Hmac<Sha256> as Mac>::new_from_slice(k).expect("HMAC takes any key size");
                mac.update(canonical.to_string().as_bytes());
                format!("{KEYED}{}", hex::encode(mac.finalize().into_bytes()))
            }
            None => hex::encode(Sha256::digest(canonical.to_string().as_bytes())),
        }
    }

    fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        let details = text(r, "details")?;
        Ok(Self {
            seq: int(r, "seq")?,
            at: text(r, "at")?,
            request_id: opt_text(r, "request_id")?,
            actor: opt_text(r, "actor")?,
            company_id: opt_text(r, "company_id")?,
            action: text(r, "action")?,
            resource: opt_text(r, "resource")?,
            outcome: text(r, "outcome")?,
            status: opt_int(r, "status")?,
            ip: opt_text(r, "ip")?,
            user_agent: opt_text(r, "user_agent")?,
            details: serde_json::from_str(&details).unwrap_or(Value::String(details)),
            prev_hash: text(r, "prev_hash")?,
            hash: text(r, "hash")?,
        })
    }
}

/// Result of [`Store::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Every row checks out.
    Intact { rows: u64 },
    /// The first row that does not.
    Broken { seq: i64, reason: String },
}

/// Which rows `GET /api/audit` lists.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub company_id: String,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub outcome: Option<String>,
    pub resource: Option<String>,
}

impl Store {
    /// Appends `entry` inside `tx` (with the change it records).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub(crate) async fn append_audit(
        &self,
        tx: &mut Tx<'_>,
        entry: AuditEntry,
    ) -> anyhow::Result<()> {
        let entry = entry.stamped();
        // A transaction that appended already holds the chain's lock and
        // knows its head: a batch of rows reads it once, not per row.
        let head = match tx.head.take() {
            Some(head) => Some(head),
            None => {
                self.lock(tx, lock::AUDIT).await?;
                sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                    .fetch_optional(&mut *tx.tx)
                    .await?
            }
        };
        let (last_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_string()));
        let mut row = AuditRow {
            seq: last_seq + 1,
            at: now(),
            request_id: entry.request_id,
            actor: entry.actor,
            company_id: entry.company_id,
            action: entry.action,
            resource: entry.resource,
            outcome: entry.outcome,
            status: entry.status.map(i64::from),
            ip: entry.ip,
            user_agent: entry.user_agent,
            details: entry.details,
            prev_hash,
            hash: String::new(),
        };
        row.hash = row.compute_hash(self.audit_key.as_ref());
        sqlx::query(
            "INSERT INTO audit_log (seq, at, request_id, actor, company_id, action, resource, outcome, status, ip, \
             user_agent, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(row.seq)
        .bind(&row.at)
        .bind(&row.request_id)
        .bind(&row.actor)
        .bind(&row.company_id)
        .bind(&row.action)
        .bind(&row.resource)
        .bind(&row.outcome)
        .bind(row.status)
        .bind(&row.ip)
        .bind(&row.user_agent)
        .bind(row.details.to_string())
        .bind(&row.prev_hash)
        .bind(&row.hash)
        .execute(&mut *tx.tx)
        .await?;
        // Only a row that is in: the next append chains onto it.
        tx.head = Some((row.seq, row.hash));
        Ok(())
    }

    /// Appends `entry` on its own (a request's row), and returns once it
    /// is committed.
    ///
    /// Rows of concurrent requests are committed together: while one
    /// transaction writes, the rows that arrive queue, and the next
    /// transaction takes them all. A burst (ten refused requests of a
    /// flood at once, say) then costs the writer one or two commits, not
    /// ten, so the rows of other requests do not wait behind it. The
    /// transaction runs in a task of its own, so a request that goes away
    /// while it waits neither loses its row nor breaks the others'.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn audit(&self, entry: AuditEntry) -> anyhow::Result<()> {
        // Here, in the caller's task: the queue is written by another.
        let entry = entry.stamped();
        let (done, committed) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = self
                .audit_queue
                .lock()
                .map_err(|_| anyhow::anyhow!("the audit queue is poisoned"))?;
            queue.waiting.push((entry, done));
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            // Made before the task: it resets the queue even if the task is
            // dropped before it first runs (a runtime shutting down).
            let abandon = Abandon {
                queue: self.audit_queue.clone(),
                finished: false,
            };
            tokio::spawn(self.clone().drain_audit_queue(abandon));
        }
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => anyhow::bail!("the audit writer stopped before committing the row"),
        }
    }

    /// Commits queued rows, a batch per transaction, until none are left.
    async fn drain_audit_queue(self, mut abandon: Abandon) {
        loop {
            let batch = {
                let Ok(mut queue) = self.audit_queue.lock() else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.draining = false;
                    abandon.finished = true;
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let entries: Vec<AuditEntry> = batch.iter().map(|(e, _)| e.clone()).collect();
            match self.append_batch(entries).await {
                Ok(()) => {
                    for (_, done) in batch {
                        let _ = done.send(Ok(()));
                    }
                }
                // A row that cannot be written must not fail the others.
                Err(BatchError::Row(e)) if batch.len() > 1 => {
                    tracing::warn!(error = %format!("{e:#}"), rows = batch.len(), "an audit row failed its batch; committing the rows one by one");
                    self.commit_each(batch).await;
                }
                // The database itself failed: every row of the batch fails
                // at once, not one wait after another.
                Err(BatchError::Row(e) | BatchError::Tx(e)) => {
                    let e = format!("{e:#}");
                    tracing::error!(error = %e, rows = batch.len(), "an audit batch could not be committed");
                    for (_, done) in batch {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Commits each row of a failed batch on its own, until the
    /// transaction itself fails: then the rest fail with it at once.
    async fn commit_each(&self, batch: Vec<Waiting>) {
        let mut broken: Option<String> = None;
        for (entry, done) in batch {
            let alone = match &broken {
                Some(e) => Err(e.clone()),
                None => match self.append_batch(vec![entry]).await {
                    Ok(()) => Ok(()),
                    Err(BatchError::Row(e)) => Err(format!("{e:#}")),
                    Err(BatchError::Tx(e)) => Err(broken.insert(format!("{e:#}")).clone()),
                },
            };
            let _ = done.send(alone);
        }
    }

    async fn append_batch(&self, entries: Vec<AuditEntry>) -> Result<(), BatchError> {
        let mut tx = self.write().await.map_err(BatchError::Tx)?;
        for entry in entries {
            self.append_audit(&mut tx, entry)
                .await
                .map_err(BatchError::Row)?;
        }
        tx.commit().await.map_err(BatchError::Tx)
    }

    /// Whether the audit log has no row yet: a fresh install.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn audit_is_empty(&self) -> anyhow::Result<bool> {
        let rows: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM audit_log LIMIT 1) AS first_row",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(rows == 0)
    }

    /// Whether this database holds row `seq` of the audit log with `hash`:
    /// whether a head file belongs to it.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn holds_audit_head(&self, seq: i64, hash: &str) -> anyhow::Result<bool> {
        let stored: Option<String> =
            sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
                .bind(seq)
                .fetch_optional(self.pool())
                .await?;
        Ok(stored.as_deref() == Some(hash))
    }

    /// How the head file at `path` stands towards this database (only its
    /// end is read, but for a file whose end is blank).
    ///
    /// # Errors
    ///
    /// The file cannot be read; database errors.
    pub async fn head_file_state(&self, path: &std::path::Path) -> anyhow::Result<HeadFileState> {
        if !path.exists() {
            return Ok(HeadFileState::Missing);
        }
        let (tail, from_start) = read_tail(path)?;
        Ok(match newest_head(&tail, from_start) {
            Some((seq, hash)) if self.holds_audit_head(seq, &hash).await? => HeadFileState::Ours,
            Some((seq, _)) => HeadFileState::Foreign { seq },
            None if !tail.iter().all(u8::is_ascii_whitespace) => HeadFileState::NoWholeHead,
            None if from_start || std::fs::read(path)?.iter().all(u8::is_ascii_whitespace) => {
                HeadFileState::Empty
            }
            None => HeadFileState::NoWholeHead,
        })
    }

    /// Walks the whole chain in order and reports the first bad row. With
    /// the audit key (the store's), every row must carry its keyed hash;
    /// with `head` (the last head written outside the database), the chain
    /// must still hold that row, so removing the newest rows shows too.
    ///
    /// # Errors
    ///
    /// Database errors, or a keyed chain checked without the key; a broken
    /// chain is a [`Verification::Broken`].
    pub async fn verify_audit(&self, head: Option<(i64, String)>) -> anyhow::Result<Verification> {
        let head = head.map(|(seq, hash)| {
            // A head that is not a row hash at all can match no row.
            let (keyed, digest) = parse_hash(&hash).unwrap_or((true, [0; 32]));
            Head { seq, keyed, digest }
        });
        self.verify_audit_heads(head.into_iter().collect()).await
    }

    /// [`Store::verify_audit`] against every head a head file recorded
    /// ([`read_heads`]): each must still be a row of the chain with the hash
    /// it had, so rows removed and then written again under the same numbers
    /// show too, however many rows were appended since.
    ///
    /// # Errors
    ///
    /// As [`Store::verify_audit`].
    pub async fn verify_audit_heads(&self, mut heads: Vec<Head>) -> anyhow::Result<Verification> {
        use futures_util::StreamExt as _;
        heads.sort();
        heads.dedup();
        let mut next_head = 0;
        let key = self.audit_key.as_ref();
        let mut rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq").fetch(self.pool());
        let mut expected_seq = 1;
        let mut prev = GENESIS.to_string();
        let mut count = 0;
        while let Some(r) = rows.next().await {
            let row = AuditRow::from_row(&r.context("reading the audit log")?)?;
            if row.seq != expected_seq {
                return Ok(Verification::Broken {
                    seq: expected_seq,
                    reason: format!("row {expected_seq} is missing (next row is {})", row.seq),
                });
            }
            if row.prev_hash != prev {
                return Ok(Verification::Broken {
                    seq: row.seq,
                    reason: format!(
                        "row {} does not follow row {}: rows were removed, reordered or altered",
                        row.seq,
                        row.seq - 1
                    ),
                });
            }
            let keyed = row.hash.starts_with(KEYED);
            anyhow::ensure!(
                !keyed || key.is_some(),
                "the audit chain is keyed with the master key: set HANDOVER_MASTER_KEY (or HANDOVER_MASTER_KEY_FILE) to verify it"
            );
            if key.is_some() && !keyed {
                return Ok(Verification::Broken {
                    seq: row.seq,
                    reason: format!(
                        "row {} carries no keyed hash: it was written without the master key, or re-chained",
                        row.seq
                    ),
                });
            }
            if row.compute_hash(key) != row.hash {
                return Ok(Verification::Broken {
                    seq: row.seq,
                    reason: format!(
                        "row {} was altered: its content does not match its hash",
                        row.seq
                    ),
                });
            }
            while let Some(head) = heads.get(next_head).filter(|h| h.seq == row.seq) {
                if !head.is(&row.hash) {
                    return Ok(Verification::Broken {
                        seq: row.seq,
                        reason: format!(
                            "row {} is not the row the head file recorded: the log was rewritten from there on",
                            row.seq
                        ),
                    });
                }
                next_head += 1;
            }
            prev = row.hash;
            expected_seq += 1;
            count += 1;
        }
        if let Some(Head { seq, .. }) = heads.last().filter(|_| next_head < heads.len()) {
            return Ok(Verification::Broken {
                seq: *seq,
                reason: format!(
                    "the head file records row {seq}, but the log ends at row {}: its newest rows were removed",
                    expected_seq - 1
                ),
            });
        }
        Ok(Verification::Intact { rows: count })
    }

    /// A page of a company's audit rows, newest first, and the total.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn list_audit(
        &self,
        filter: &AuditFilter,
        limit: u64,
        offset: u64,
    ) -> anyhow::Result<(Vec<AuditRow>, u64)> {
        let cond = "FROM audit_log WHERE company_id = $1 AND ($2 IS NULL OR action = $2) AND ($3 IS NULL OR actor = $3) \
                    AND ($4 IS NULL OR outcome = $4) AND ($5 IS NULL OR resource = $5)";
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {cond}"))
            .bind(&filter.company_id)
            .bind(&filter.action)
            .bind(&filter.actor)
            .bind(&filter.outcome)
            .bind(&filter.resource)
            .fetch_one(self.pool())
            .await?;
        let rows = sqlx::query(&format!(
            "SELECT * {cond} ORDER BY seq DESC LIMIT $6 OFFSET $7"
        ))
        .bind(&filter.company_id)
        .bind(&filter.action)
        .bind(&filter.actor)
        .bind(&filter.outcome)
        .bind(&filter.resource)
        .bind(limit as i64)
        .bind(offset as i64)
        .fetch_all(self.pool())
        .await?;
        let rows = rows
            .iter()
            .map(AuditRow::from_row)
            .collect::<anyhow::Result<_>>()?;
        Ok((rows, total as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::{append_head, last_head, read_heads};

    fn hash(c: char) -> String {
        format!("hmac:{}", c.to_string().repeat(64))
    }

    #[test]
    fn the_newest_whole_head_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.head");
        std::fs::write(&file, "").unwrap();
        assert_eq!(last_head(&file).unwrap(), None);
        append_head(&file, 7, &hash('a'), false).unwrap();
        // A second writer's earlier row landing after a later one.
        append_head(&file, 9, &hash('c'), false).unwrap();
        append_head(&file, 8, &hash('b'), false).unwrap();
        assert_eq!(last_head(&file).unwrap(), Some((9, hash('c'))));
        // A line cut short is not a head, and the next one is not glued to it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"1"))
            .unwrap();
        assert_eq!(last_head(&file).unwrap(), Some((9, hash('c'))));
        append_head(&file, 10, &hash('d'), false).unwrap();
        assert_eq!(last_head(&file).unwrap(), Some((10, hash('d'))));
        let heads = read_heads(&file).unwrap();
        assert_eq!(heads.torn, 1, "{heads:?}");
        assert_eq!(
            heads.heads.iter().map(|h| h.seq).collect::<Vec<_>>(),
            [7, 9, 8, 10]
        );
        assert_eq!(heads.heads[1].to_pair(), (9, hash('c')));
        assert!(heads.heads[1].is(&hash('c')) && !heads.heads[1].is(&hash('d')));
        // Only whole heads count: a bad number, a short hash, garbage.
        std::fs::write(
            &file,
            format!("7 {}\n-1 {}\n8 hmac:ab\ngarbage\n", hash('a'), hash('b')),
        )
        .unwrap();
        assert_eq!(last_head(&file).unwrap(), Some((7, hash('a'))));
        assert_eq!(read_heads(&file).unwrap().torn, 3);
    }

    #[test]
    fn only_the_end_of_a_long_head_file_is_read_for_the_newest_head() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.head");
        let lines: String = (1..=5000).map(|i| format!("{i} {}\n", hash('e'))).collect();
        std::fs::write(&file, lines).unwrap();
        assert_eq!(last_head(&file).unwrap(), Some((5000, hash('e'))));
        assert_eq!(read_heads(&file).unwrap().heads.len(), 5000);
    }

    #[cfg(unix)]
    #[test]
    fn a_new_head_file_is_readable_by_its_owner_only_and_made_only_when_asked() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.head");
        assert!(append_head(&file, 1, &hash('a'), false).is_err());
        assert!(!file.exists());
        append_head(&file, 1, &hash('a'), true).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
