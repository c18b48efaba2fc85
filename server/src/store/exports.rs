//! The export request lifecycle: pending → processing → completed | failed,
//! then expired, and deleted at any time. Every transition runs in one
//! transaction with its audit row, and is conditional on the state it
//! leaves, so it happens once however many instances try (a build is
//! claimed by one; a sweeper on every instance is safe). Every read is
//! scoped to the owning user *and* company, so another party's id reads as
//! absent. A deleted export never comes back: completion, requeueing and
//! expiry all skip it, and deleting removes its files and keys.

use std::fmt;
use std::str::FromStr;

use handover::model::{FailedDataType, Manifest};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;

use super::audit::AuditEntry;
use super::files::FileRef;
use super::{int, now, opt_int, opt_text, text, Engine, Store, Tx};
use crate::auth::Scope;
use crate::datatypes::Range;

/// Exports are kept this long (API reference: "Exports expire after 30 days").
pub const RETENTION: time::Duration = time::Duration::days(30);

/// The request states of the API reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Processing,
    Completed,
    Failed,
    Expired,
}

impl Status {
    /// Every state, in lifecycle order.
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// Whether the export may still make progress.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Processing)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown export status {s:?}"))
    }
}

/// Who builds the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The browser, from record pages.
    Client,
    /// A server worker; the file is kept encrypted for download.
    Server,
    /// The privacy officer's CLI, to a file of their own.
    Cli,
    /// `POST /api/privacy/export`: streamed to the caller, no copy kept.
    Direct,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
            Self::Cli => "cli",
            Self::Direct => "direct",
        }
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Delivery {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "client" => Ok(Self::Client),
            "server" => Ok(Self::Server),
            "cli" => Ok(Self::Cli),
            "direct" => Ok(Self::Direct),
            _ => anyhow::bail!("unknown delivery {s:?}"),
        }
    }
}

/// The limit a create is admitted under (see [`crate::ratelimit`]).
#[derive(Debug, Clone)]
pub struct AdmitLimit {
    pub bucket: String,
    pub max: u32,
    pub window_ms: i64,
}

/// An `Idempotency-Key` with the fingerprint of the body it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub fingerprint: String,
}

/// What a live idempotency key points at.
#[derive(Debug, Clone)]
pub struct IdempotentExport {
    pub fingerprint: String,
    pub export_id: String,
}

/// What [`Store::create_admitted`] did.
#[derive(Debug)]
pub enum Created {
    /// Stored, admitted as the window's `used`-th create.
    New(Box<ExportRow>, crate::store::limits::Admission),
    /// Refused by the limit: nothing stored.
    Limited(crate::store::limits::Admission),
    /// A create with the same key got there first: nothing stored, no slot.
    Replay(IdempotentExport),
}

/// How long an idempotency key is honoured.
pub const IDEMPOTENCY_WINDOW: time::Duration = time::Duration::hours(24);

fn idempotency_cutoff() -> String {
    handover::model::format_timestamp(time::OffsetDateTime::now_utc() - IDEMPOTENCY_WINDOW)
}

/// One export request as stored.
#[derive(Debug, Clone)]
pub struct ExportRow {
    pub id: String,
    pub user_id: String,
    pub company_id: String,
    pub status: Status,
    pub delivery: Delivery,
    pub export_format: String,
    pub data_types: Vec<String>,
    pub date_start: Option<String>,
    pub date_end: Option<String>,
    pub metadata: Value,
    pub manifest: Manifest,
    pub estimated_records: i64,
    pub estimated_bytes: i64,
    pub records_served: i64,
    pub current_type: Option<String>,
    pub attempts: i64,
    pub record_count: Option<i64>,
    pub byte_size: Option<i64>,
    pub sha256: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub failed_at: Option<String>,
    pub expires_at: String,
    pub deleted_at: Option<String>,
    /// Data types a completed export left out because they could not be read.
    pub failed_types: Vec<FailedDataType>,
    /// `attempts` when the export was last retried by hand.
    pub retry_base: i64,
    /// The browser's end-to-end encrypted copy (client delivery only).
    pub copy: CopyState,
}

/// Where the browser's encrypted copy of a client export stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyStage {
    /// None was asked for (or none has arrived yet).
    None,
    /// Parts are arriving.
    Uploading,
    /// Every byte arrived and was checked: downloads return it.
    Kept,
}

/// The copy's stage and what has arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyState {
    pub stage: CopyStage,
    /// Ciphertext bytes stored so far.
    pub received: u64,
    /// Parts stored so far (files `copy.NNNNNN`).
    pub parts: u64,
    /// SHA-256 of the whole ciphertext, once kept.
    pub sha256: Option<String>,
}

impl ExportRow {
    fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        Ok(Self {
            id: text(r, "id")?,
            user_id: text(r, "user_id")?,
            company_id: text(r, "company_id")?,
            status: text(r, "status")?.parse()?,
            delivery: text(r, "delivery")?.parse()?,
            export_format: text(r, "export_format")?,
            data_types: serde_json::from_str(&text(r, "data_types")?)?,
            date_start: opt_text(r, "date_start")?,
            date_end: opt_text(r, "date_end")?,
            metadata: serde_json::from_str(&text(r, "metadata")?)?,
            manifest: serde_json::from_str(&text(r, "manifest")?)?,
            estimated_records: int(r, "estimated_records")?,
            estimated_bytes: int(r, "estimated_bytes")?,
            records_served: int(r, "records_served")?,
            current_type: opt_text(r, "current_type")?,
            attempts: int(r, "attempts")?,
            record_count: opt_int(r, "record_count")?,
            byte_size: opt_int(r, "byte_size")?,
            sha256: opt_text(r, "sha256")?,
            failure_reason: opt_text(r, "failure_reason")?,
            created_at: text(r, "created_at")?,
            started_at: opt_text(r, "started_at")?,
            completed_at: opt_text(r, "completed_at")?,
            failed_at: opt_text(r, "failed_at")?,
            expires_at: text(r, "expires_at")?,
            deleted_at: opt_text(r, "deleted_at")?,
            failed_types: match opt_text(r, "failed_types")? {
                Some(t) => serde_json::from_str(&t)?,
                None => Vec::new(),
            },
            retry_base: int(r, "retry_base")?,
            copy: CopyState {
                stage: match opt_text(r, "copy_state")?.as_deref() {
                    None => CopyStage::None,
                    Some("uploading") => CopyStage::Uploading,
                    Some("kept") => CopyStage::Kept,
                    Some(other) => anyhow::bail!("unknown copy_state {other:?}"),
                },
                received: int(r, "copy_received")? as u64,
                parts: int(r, "copy_parts")? as u64,
                sha256: opt_text(r, "copy_sha256")?,
            },
        })
    }

    /// The date range as the data type queries take it (stored as the
    /// caller gave it).
    pub fn range(&self) -> Range {
        Range {
            start: self.date_start.clone(),
            end: self.date_end.clone(),
        }
        .canonical()
    }

    /// Whether its retention has ended (the sweeper expires it soon, if it
    /// has not yet): timestamps of one format compare as text.
    pub fn is_past_expiry(&self) -> bool {
        self.expires_at < now()
    }

    /// Whether the export may still make progress.
    pub fn is_open(&self) -> bool {
        self.status.is_open()
    }

    /// Who owns it.
    pub fn owner(&self) -> Scope {
        Scope {
            user_id: self.user_id.clone(),
            company_id: self.company_id.clone(),
        }
    }

    /// What a webhook says about this export: ids, status and counts,
    /// never personal data.
    fn webhook_data(&self, status: &str) -> Value {
        json!({ "request_id": self.id, "company_id": self.company_id, "status": status,
                "delivery": self.delivery, "export_format": self.export_format, "data_types": self.data_types })
    }

    pub(crate) fn event(&self, action: &str, details: Value) -> AuditEntry {
        AuditEntry::event(action, &self.user_id, &self.company_id, &self.id, details)
    }
}

/// What a new request holds.
#[derive(Debug, Clone)]
pub struct NewExport {
    pub user_id: String,
    pub company_id: String,
    pub delivery: Delivery,
    pub export_format: String,
    pub data_types: Vec<String>,
    pub range: Range,
    pub metadata: Value,
    pub manifest: Manifest,
    pub estimated_bytes: u64,
}

/// What a completed export handed over.
#[derive(Debug, Clone)]
pub struct Completion {
    pub records: u64,
    pub byte_size: u64,
    pub sha256: String,
    /// More for the audit event (e.g. the operator of a CLI export).
    pub details: serde_json::Map<String, Value>,
    /// Data types left out (a partial export).
    pub failed_types: Vec<FailedDataType>,
}

/// What happened to a build that did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// Queued again (the automatic retry).
    Requeued,
    /// Failed for good.
    Failed,
    /// No longer processing (finished, failed or deleted meanwhile).
    Gone,
}

/// Per data type, what a client export has served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeProgress {
    pub data_type: String,
    /// Distinct records served (the furthest position reached).
    pub served: u64,
    /// Records sent in all, re-reads included.
    pub reads: u64,
    /// Whether the last page was served.
    pub done: bool,
}

/// A new request's id.
pub fn new_id() -> String {
    format!("export_{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// Whether `id` could be an export id (anything else is simply not found).
pub fn plausible_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with("export_")
        && id[7..].bytes().all(|b| b.is_ascii_alphanumeric())
}

const OPEN: &str = "status IN ('pending', 'processing')";

impl Store {
    async fn row_in(&self, tx: &mut Tx<'_>, id: &str) -> anyhow::Result<Option<ExportRow>> {
        let r = sqlx::query("SELECT * FROM export_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx.tx)
            .await?;
        r.as_ref().map(ExportRow::from_row).transpose()
    }

    /// The export `id` if it belongs to the scope's user and company and is
    /// not deleted.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn find_export(&self, scope: &Scope, id: &str) -> anyhow::Result<Option<ExportRow>> {
        if !plausible_id(id) {
            return Ok(None);
        }
        let r = sqlx::query(
            "SELECT * FROM export_requests WHERE id = $1 AND user_id = $2 AND company_id = $3 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(&scope.user_id)
        .bind(&scope.company_id)
        .fetch_optional(self.pool())
        .await?;
        r.as_ref().map(ExportRow::from_row).transpose()
    }

    /// The export `id` whoever owns it, unless deleted (workers).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn export_by_id(&self, id: &str) -> anyhow::Result<Option<ExportRow>> {
        let r = sqlx::query("SELECT * FROM export_requests WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        r.as_ref().map(ExportRow::from_row).transpose()
    }

    /// A page of the scope's exports, newest first, and the total.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn list_exports(
        &self,
        scope: &Scope,
        status: Option<Status>,
        limit: u32,
        offset: u64,
    ) -> anyhow::Result<(Vec<ExportRow>, u64)> {
        let status = status.map(Status::as_str);
        let cond = "FROM export_requests WHERE user_id = $1 AND company_id = $2 AND deleted_at IS NULL AND ($3 IS NULL OR status = $3)";
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {cond}"))
            .bind(&scope.user_id)
            .bind(&scope.company_id)
            .bind(status)
            .fetch_one(self.pool())
            .await?;
        let rows = sqlx::query(&format!(
            "SELECT * {cond} ORDER BY created_at DESC, id DESC LIMIT $4 OFFSET $5"
        ))
        .bind(&scope.user_id)
        .bind(&scope.company_id)
        .bind(status)
        .bind(i64::from(limit))
        .bind(offset as i64)
        .fetch_all(self.pool())
        .await?;
        let rows = rows
            .iter()
            .map(ExportRow::from_row)
            .collect::<anyhow::Result<_>>()?;
        Ok((rows, total as u64))
    }

    /// Records requested by the scope since `since` (the daily quota), with
    /// when each request was made, oldest first.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn records_requested_since(
        &self,
        scope: &Scope,
        since: &str,
    ) -> anyhow::Result<Vec<(u64, String)>> {
        // What each export handed over: its records, or, when its pages were
        // read more than once, every record read. Only this user's exports
        // are summed: the query runs for every page.
        let rows: Vec<(i64, i64, String)> = sqlx::query_as(
            "SELECT e.estimated_records, CAST(COALESCE(SUM(p.reads), 0) AS BIGINT), e.created_at \
             FROM export_requests e LEFT JOIN export_progress p ON p.export_id = e.id \
             WHERE e.user_id = $1 AND e.company_id = $2 AND e.created_at > $3 \
             GROUP BY e.id, e.estimated_records, e.created_at ORDER BY e.created_at",
        )
        .bind(&scope.user_id)
        .bind(&scope.company_id)
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(estimated, reads, at)| (estimated.max(reads) as u64, at))
            .collect())
    }

    /// Stores a new request (`pending`) with its `export.created` event.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn create_export(
        &self,
        new: NewExport,
        request_id: Option<&str>,
    ) -> anyhow::Result<ExportRow> {
        let mut tx = self.write().await?;
        let row = self
            .create_with_id(&mut tx, new_id(), &new, request_id)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// A create from the API: admission under the create limit, the
    /// idempotency key and the new request commit in one transaction, so a
    /// create that stores nothing takes no slot, and two creates racing
    /// with one key store one export.
    ///
    /// # Errors
    ///
    /// Database errors (nothing was stored, no slot was taken).
    pub async fn create_admitted(
        &self,
        new: NewExport,
        request_id: Option<&str>,
        limit: &AdmitLimit,
        key: Option<&IdempotencyKey>,
    ) -> anyhow::Result<Created> {
        let mut tx = self.write().await?;
        let admission = self
            .admit_in(&mut tx, &limit.bucket, limit.max, limit.window_ms)
            .await?;
        if !admission.admitted {
            return Ok(Created::Limited(admission));
        }
        let id = new_id();
        if let Some(k) = key {
            // A live key (another create with it won the race) stays; an
            // expired one is taken over.
            let at = now();
            let r = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, company_id, idem_key, body_sha256, export_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id, company_id, idem_key) DO UPDATE SET \
                 body_sha256 = excluded.body_sha256, export_id = excluded.export_id, created_at = excluded.created_at \
                 WHERE idempotency_keys.created_at < $7",
            )
            .bind(&new.user_id)
            .bind(&new.company_id)
            .bind(&k.key)
            .bind(&k.fingerprint)
            .bind(&id)
            .bind(&at)
            .bind(idempotency_cutoff())
            .execute(&mut *tx.tx)
            .await?;
            if r.rows_affected() == 0 {
                drop(tx);
                let prev = self
                    .idempotent_export(&new.user_id, &new.company_id, &k.key)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("idempotency key vanished"))?;
                return Ok(Created::Replay(prev));
            }
        }
        let row = self.create_with_id(&mut tx, id, &new, request_id).await?;
        tx.commit().await?;
        Ok(Created::New(Box::new(row), admission))
    }

    /// The export a live idempotency key of this user and company created.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn idempotent_export(
        &self,
        user_id: &str,
        company_id: &str,
        key: &str,
    ) -> anyhow::Result<Option<IdempotentExport>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT body_sha256, export_id FROM idempotency_keys \
             WHERE user_id = $1 AND company_id = $2 AND idem_key = $3 AND created_at >= $4",
        )
        .bind(user_id)
        .bind(company_id)
        .bind(key)
        .bind(idempotency_cutoff())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(fingerprint, export_id)| IdempotentExport {
            fingerprint,
            export_id,
        }))
    }

    async fn create_with_id(
        &self,
        tx: &mut Tx<'_>,
        id: String,
        new: &NewExport,
        request_id: Option<&str>,
    ) -> anyhow::Result<ExportRow> {
        let created = time::OffsetDateTime::now_utc();
        let at = handover::model::format_timestamp(created);
        sqlx::query(
            "INSERT INTO export_requests (id, user_id, company_id, status, delivery, export_format, data_types, date_start, date_end, \
             metadata, manifest, estimated_records, estimated_bytes, created_at, expires_at, last_activity_at) \
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(&new.user_id)
        .bind(&new.company_id)
        .bind(new.delivery.as_str())
        .bind(&new.export_format)
        .bind(serde_json::to_string(&new.data_types)?)
        .bind(&new.range.start)
        .bind(&new.range.end)
        .bind(new.metadata.to_string())
        .bind(serde_json::to_string(&new.manifest)?)
        .bind(new.manifest.total_records() as i64)
        .bind(new.estimated_bytes as i64)
        .bind(&at)
        .bind(handover::model::format_timestamp(created + RETENTION))
        .bind(&at)
        .execute(&mut *tx.tx)
        .await?;
        let row = self
            .row_in(tx, &id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("export {id} vanished"))?;
        let details = json!({ "export_format": new.export_format, "data_types": new.data_types,
            "delivery": new.delivery, "date_range": { "start": new.range.start, "end": new.range.end },
            "estimated_records": new.manifest.total_records() });
        self.append_audit(
            tx,
            row.event("export.created", details).for_request(request_id),
        )
        .await?;
        Ok(row)
    }

    /// Claims the oldest pending server build for this instance: it becomes
    /// `processing` (with `export.started`). Across instances each build is
    /// claimed once (`FOR UPDATE SKIP LOCKED` on PostgreSQL).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn claim_build(&self) -> anyhow::Result<Option<ExportRow>> {
        let skip = match self.engine() {
            Engine::Postgres => " FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let at = now();
        let mut tx = self.write().await?;
        let id: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE export_requests SET status = 'processing', started_at = $1, attempts = attempts + 1, last_activity_at = $1 \
             WHERE id = (SELECT id FROM export_requests WHERE status = 'pending' AND delivery = 'server' AND deleted_at IS NULL \
             ORDER BY created_at LIMIT 1{skip}) AND status = 'pending' RETURNING id"
        ))
        .bind(&at)
        .fetch_optional(&mut *tx.tx)
        .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let row = self
            .row_in(&mut tx, &id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("export {id} vanished"))?;
        self.append_audit(
            &mut tx,
            row.event(
                "export.started",
                json!({ "delivery": "server", "attempt": row.attempts }),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// A pending client export becomes `processing` when its first records
    /// are read (with `export.started`, once).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn mark_started(
        &self,
        row: &ExportRow,
        request_id: Option<&str>,
    ) -> anyhow::Result<()> {
        if row.status != Status::Pending {
            return Ok(());
        }
        let at = now();
        let mut tx = self.write().await?;
        let r = sqlx::query(
            "UPDATE export_requests SET status = 'processing', started_at = COALESCE(started_at, $1), last_activity_at = $1 \
             WHERE id = $2 AND status = 'pending' AND deleted_at IS NULL",
        )
        .bind(&at)
        .bind(&row.id)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 1 {
            self.append_audit(
                &mut tx,
                row.event("export.started", json!({ "delivery": row.delivery }))
                    .for_request(request_id),
            )
            .await?;
        }
        tx.commit().await
    }

    /// Records that a page (or stream frame) of `data_type` reaching
    /// position `served` was sent with `rows` records; `done` when nothing
    /// follows. Each counter moves atomically, so concurrent requests never
    /// lose counts. Returns the records of `data_type` sent so far,
    /// re-reads included.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn record_progress(
        &self,
        id: &str,
        data_type: &str,
        served: u64,
        rows: u64,
        done: bool,
    ) -> anyhow::Result<u64> {
        let mut tx = self.write().await?;
        let reads: i64 = sqlx::query_scalar(
            "INSERT INTO export_progress (export_id, data_type, served, reads, done) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (export_id, data_type) DO UPDATE SET \
             served = CASE WHEN export_progress.served > excluded.served THEN export_progress.served ELSE excluded.served END, \
             reads = export_progress.reads + excluded.reads, \
             done = CASE WHEN export_progress.done > excluded.done THEN export_progress.done ELSE excluded.done END \
             RETURNING reads",
        )
        .bind(id)
        .bind(data_type)
        .bind(served as i64)
        .bind(rows as i64)
        .bind(i64::from(done))
        .fetch_one(&mut *tx.tx)
        .await?;
        sqlx::query(
            "UPDATE export_requests SET records_served = (SELECT COALESCE(SUM(served), 0) FROM export_progress WHERE export_id = $1), \
             current_type = $2, last_activity_at = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(data_type)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(reads.max(0) as u64)
    }

    /// What was served of each data type of export `id` so far.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn progress(&self, id: &str) -> anyhow::Result<Vec<TypeProgress>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT data_type, served, reads, done FROM export_progress WHERE export_id = $1",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(data_type, served, reads, done)| TypeProgress {
                data_type,
                served: served as u64,
                reads: reads as u64,
                done: done != 0,
            })
            .collect())
    }

    /// A running server build's progress (also its sign of life); false
    /// when the build is no longer this claim's to make (deleted, failed,
    /// or requeued and claimed again), so the builder stops.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn build_progress(
        &self,
        row: &ExportRow,
        records: u64,
        data_type: &str,
    ) -> anyhow::Result<bool> {
        let mut tx = self.write().await?;
        let r = sqlx::query(&format!(
            "UPDATE export_requests SET records_served = $1, current_type = $2, last_activity_at = $3 \
             WHERE id = $4 AND {OPEN} AND attempts = $5 AND deleted_at IS NULL"
        ))
        .bind(records as i64)
        .bind(data_type)
        .bind(now())
        .bind(&row.id)
        .bind(row.attempts)
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Completes an open, undeleted export with what was handed over and the
    /// files kept of it (their keys are stored only now), and writes
    /// `export.completed` (with the checksum: what the privacy officer
    /// proves). False when it was no longer open, was deleted, or (a server
    /// build) was requeued and claimed again since `row` was read: then
    /// nothing was stored, and the caller removes the files' bytes.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn complete_export(
        &self,
        row: &ExportRow,
        done: &Completion,
        files: &[FileRef],
        request_id: Option<&str>,
    ) -> anyhow::Result<bool> {
        let at = now();
        let mut tx = self.write().await?;
        let r = sqlx::query(&format!(
            "UPDATE export_requests SET status = 'completed', completed_at = $1, record_count = $2, byte_size = $3, sha256 = $4, \
             records_served = CASE WHEN records_served > $2 THEN records_served ELSE $2 END, current_type = NULL, last_activity_at = $1, \
             failed_types = $5 WHERE id = $6 AND {OPEN} AND deleted_at IS NULL AND attempts = $7"
        ))
        .bind(&at)
        .bind(done.records as i64)
        .bind(done.byte_size as i64)
        .bind(&done.sha256)
        .bind(if done.failed_types.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&done.failed_types)?)
        })
        .bind(&row.id)
        .bind(row.attempts)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        for f in files {
            self.insert_file(&mut tx, f).await?;
        }
        let mut details = json!({ "delivery": row.delivery, "export_format": row.export_format, "data_types": row.data_types,
            "record_count": done.records, "byte_size": done.byte_size, "sha256": done.sha256 });
        if let Value::Object(d) = &mut details {
            d.extend(done.details.clone());
            if !done.failed_types.is_empty() {
                d.insert("outcome".into(), json!("partial"));
                d.insert("failed_data_types".into(), json!(done.failed_types));
            }
        }
        let mut hook = row.webhook_data("completed");
        hook["record_count"] = json!(done.records);
        hook["byte_size"] = json!(done.byte_size);
        hook["sha256"] = json!(done.sha256);
        hook["outcome"] = json!(if done.failed_types.is_empty() {
            "complete"
        } else {
            "partial"
        });
        hook["failed_data_types"] = json!(done
            .failed_types
            .iter()
            .map(|f| f.data_type.as_str())
            .collect::<Vec<_>>());
        self.notified_event(&mut tx, row, "export.completed", details, request_id, hook)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A transition's audit event and the webhook that reports it (when the
    /// company has one), in the transition's transaction.
    async fn notified_event(
        &self,
        tx: &mut Tx<'_>,
        row: &ExportRow,
        action: &str,
        details: Value,
        request_id: Option<&str>,
        hook: Value,
    ) -> anyhow::Result<()> {
        self.append_audit(tx, row.event(action, details).for_request(request_id))
            .await?;
        self.queue_webhook(tx, &row.company_id, action, hook).await
    }

    /// Fails an open export (with `export.failed`); false when it was no
    /// longer open or was deleted (no `failed` follows `deleted`).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn fail_export(
        &self,
        row: &ExportRow,
        reason: &str,
        request_id: Option<&str>,
    ) -> anyhow::Result<bool> {
        let at = now();
        let mut tx = self.write().await?;
        let r = sqlx::query(&format!(
            "UPDATE export_requests SET status = 'failed', failure_reason = $1, failed_at = $2, last_activity_at = $2 \
             WHERE id = $3 AND {OPEN} AND deleted_at IS NULL"
        ))
        .bind(reason)
        .bind(&at)
        .bind(&row.id)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        self.notified_event(
            &mut tx,
            row,
            "export.failed",
            json!({ "reason": reason }),
            request_id,
            row.webhook_data("failed"),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A build that did not finish (it failed, or its instance stopped):
    /// queued again once (`export.requeued`), then failed.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn retry_build(&self, row: &ExportRow, reason: &str) -> anyhow::Result<Retried> {
        let mut tx = self.write().await?;
        let Some(current) = self.row_in(&mut tx, &row.id).await? else {
            return Ok(Retried::Gone);
        };
        if current.status != Status::Processing
            || current.attempts != row.attempts
            || current.deleted_at.is_some()
        {
            return Ok(Retried::Gone);
        }
        let retried = if current.attempts - current.retry_base < 2 {
            let r = sqlx::query(
                "UPDATE export_requests SET status = 'pending', last_activity_at = $1 WHERE id = $2 AND status = 'processing' AND deleted_at IS NULL",
            )
            .bind(now())
            .bind(&row.id)
            .execute(&mut *tx.tx)
            .await?;
            if r.rows_affected() == 0 {
                return Ok(Retried::Gone);
            }
            self.append_audit(
                &mut tx,
                current.event(
                    "export.requeued",
                    json!({ "reason": reason, "attempt": current.attempts }),
                ),
            )
            .await?;
            Retried::Requeued
        } else {
            let at = now();
            let r = sqlx::query(
                "UPDATE export_requests SET status = 'failed', failure_reason = $1, failed_at = $2, last_activity_at = $2 \
                 WHERE id = $3 AND status = 'processing'",
            )
            .bind(reason)
            .bind(&at)
            .bind(&row.id)
            .execute(&mut *tx.tx)
            .await?;
            if r.rows_affected() == 0 {
                return Ok(Retried::Gone);
            }
            self.notified_event(
                &mut tx,
                &current,
                "export.failed",
                json!({ "reason": reason }),
                None,
                row.webhook_data("failed"),
            )
            .await?;
            Retried::Failed
        };
        tx.commit().await?;
        Ok(retried)
    }

    /// A manual retry of a failed or partial server export: queued again
    /// from scratch (`export.retried`), its earlier file's keys and stored
    /// bytes forgotten; returns the files to remove from disk, or `None`
    /// when the export is not (or no longer) one that can be retried.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn retry_export(
        &self,
        row: &ExportRow,
        request_id: Option<&str>,
    ) -> anyhow::Result<Option<Vec<FileRef>>> {
        let mut tx = self.write().await?;
        let r = sqlx::query(
            "UPDATE export_requests SET status = 'pending', failure_reason = NULL, failed_at = NULL, completed_at = NULL, \
             started_at = NULL, record_count = NULL, byte_size = NULL, sha256 = NULL, failed_types = NULL, records_served = 0, \
             current_type = NULL, retry_base = attempts, last_activity_at = $1 \
             WHERE id = $2 AND delivery = 'server' AND deleted_at IS NULL \
             AND (status = 'failed' OR (status = 'completed' AND failed_types IS NOT NULL))",
        )
        .bind(now())
        .bind(&row.id)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        let files = self.take_files(&mut tx, &row.id).await?;
        let details = json!({ "previous_status": row.status, "failure_reason": row.failure_reason,
            "failed_data_types": row.failed_types });
        self.append_audit(
            &mut tx,
            row.event("export.retried", details).for_request(request_id),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(files))
    }

    /// Expires a completed export past its retention (`export.expired`),
    /// forgetting its files' keys and stored bytes; returns the files to
    /// remove from disk (`None` when it was not due).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn expire_export(&self, id: &str) -> anyhow::Result<Option<Vec<FileRef>>> {
        let at = now();
        let mut tx = self.write().await?;
        let Some(row) = self.row_in(&mut tx, id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "UPDATE export_requests SET status = 'expired', last_activity_at = $1 WHERE id = $2 AND status = 'completed' AND expires_at < $1 AND deleted_at IS NULL",
        )
        .bind(&at)
        .bind(id)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        let files = self.take_files(&mut tx, id).await?;
        self.notified_event(
            &mut tx,
            &row,
            "export.expired",
            json!({ "expires_at": row.expires_at }),
            None,
            row.webhook_data("expired"),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(files))
    }

    /// Deletes an export (`export.deleted`): it is gone for its owner at
    /// once, its files' keys and stored bytes with it; returns when, and the
    /// files to remove from disk.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn delete_export(
        &self,
        row: &ExportRow,
        request_id: Option<&str>,
    ) -> anyhow::Result<(String, Vec<FileRef>)> {
        let at = now();
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE export_requests SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL",
        )
        .bind(&at)
        .bind(&row.id)
        .execute(&mut *tx.tx)
        .await?;
        let files = self.take_files(&mut tx, &row.id).await?;
        self.append_audit(
            &mut tx,
            row.event("export.deleted", json!({ "status_before": row.status }))
                .for_request(request_id),
        )
        .await?;
        tx.commit().await?;
        Ok((at, files))
    }

    /// Writes a lifecycle event of `row` that changes nothing else
    /// (`export.downloaded`).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn export_event(
        &self,
        row: &ExportRow,
        action: &str,
        request_id: Option<&str>,
        details: Value,
    ) -> anyhow::Result<()> {
        self.audit(row.event(action, details).for_request(request_id))
            .await
    }

    /// Open exports sent as they are read (client and direct) idle since
    /// `before`: their reader went away, or their instance stopped.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn idle_client_exports(&self, before: &str) -> anyhow::Result<Vec<ExportRow>> {
        self.rows_where(
            &format!(
                "{OPEN} AND delivery IN ('client', 'direct') AND deleted_at IS NULL AND last_activity_at < $1"
            ),
            before,
        )
        .await
    }

    /// Server builds that stopped giving signs of life since `before` (their
    /// instance stopped).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn stalled_builds(&self, before: &str) -> anyhow::Result<Vec<ExportRow>> {
        self.rows_where(
            "status = 'processing' AND delivery = 'server' AND deleted_at IS NULL AND last_activity_at < $1",
            before,
        )
        .await
    }

    /// Completed exports past their retention at `now`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn due_for_expiry(&self, now: &str) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT id FROM export_requests WHERE status = 'completed' AND expires_at < $1 AND deleted_at IS NULL")
            .bind(now)
            .fetch_all(self.pool())
            .await?)
    }

    async fn rows_where(&self, cond: &str, param: &str) -> anyhow::Result<Vec<ExportRow>> {
        let rows = sqlx::query(&format!("SELECT * FROM export_requests WHERE {cond}"))
            .bind(param)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(ExportRow::from_row).collect()
    }
}
