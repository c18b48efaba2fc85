//! The export request lifecycle in the database: pending → processing →
//! completed | failed, then expired or deleted. Every query is scoped to
//! the owning user *and* company, so another party's id reads as absent.

use handover::model::{format_timestamp, Manifest};
use serde_json::{json, Value};
use sqlx::{Row, SqlitePool};
use time::OffsetDateTime;

use crate::audit::AuditEntry;
use crate::auth::Scope;
use crate::datatypes::Range;
use crate::AppState;

/// Exports are kept this long (API reference: "Exports expire after 30 days").
pub const RETENTION: time::Duration = time::Duration::days(30);

/// The request states of the API reference.
pub const STATUSES: [&str; 5] = ["pending", "processing", "completed", "failed", "expired"];

/// One export request as stored.
#[derive(Debug, Clone)]
pub struct ExportRow {
    pub id: String,
    pub user_id: String,
    pub company_id: String,
    pub status: String,
    pub delivery: String,
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
}

impl ExportRow {
    fn from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Self> {
        let json = |col: &str| -> anyhow::Result<Value> {
            Ok(serde_json::from_str(&r.try_get::<String, _>(col)?)?)
        };
        Ok(Self {
            id: r.try_get("id")?,
            user_id: r.try_get("user_id")?,
            company_id: r.try_get("company_id")?,
            status: r.try_get("status")?,
            delivery: r.try_get("delivery")?,
            export_format: r.try_get("export_format")?,
            data_types: serde_json::from_value(json("data_types")?)?,
            date_start: r.try_get("date_start")?,
            date_end: r.try_get("date_end")?,
            metadata: json("metadata")?,
            manifest: serde_json::from_value(json("manifest")?)?,
            estimated_records: r.try_get("estimated_records")?,
            estimated_bytes: r.try_get("estimated_bytes")?,
            records_served: r.try_get("records_served")?,
            current_type: r.try_get("current_type")?,
            attempts: r.try_get("attempts")?,
            record_count: r.try_get("record_count")?,
            byte_size: r.try_get("byte_size")?,
            sha256: r.try_get("sha256")?,
            failure_reason: r.try_get("failure_reason")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            completed_at: r.try_get("completed_at")?,
            failed_at: r.try_get("failed_at")?,
            expires_at: r.try_get("expires_at")?,
        })
    }

    /// The date range as the data type queries take it.
    pub fn range(&self) -> Range {
        Range {
            start: self.date_start.clone(),
            end: self.date_end.clone(),
        }
    }

    /// Whether the browser may still fetch pages and report the outcome.
    pub fn is_open(&self) -> bool {
        self.status == "pending" || self.status == "processing"
    }

    fn date_range(&self) -> Value {
        json!({ "start": self.date_start, "end": self.date_end })
    }

    fn download_url(&self) -> Option<String> {
        (self.status == "completed" && self.delivery != "client")
            .then(|| format!("/api/data/export/{}/download", self.id))
    }

    fn mb(bytes: Option<i64>) -> Option<f64> {
        bytes.map(|b| ((b as f64) / 1_048_576.0 * 100.0).round() / 100.0)
    }

    /// The create response of the API reference (plus `delivery`).
    pub fn created_view(&self) -> Value {
        json!({
            "request_id": self.id,
            "status": self.status,
            "export_format": self.export_format,
            "data_types": self.data_types,
            "date_range": self.date_range(),
            "estimated_records": self.estimated_records,
            "estimated_size_mb": Self::mb(Some(self.estimated_bytes)),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "metadata": self.metadata,
            "delivery": self.delivery,
        })
    }

    /// An item of the list response.
    pub fn list_view(&self) -> Value {
        json!({
            "request_id": self.id,
            "status": self.status,
            "export_format": self.export_format,
            "data_types": self.data_types,
            "delivery": self.delivery,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "download_url": self.download_url(),
            "file_size_mb": Self::mb(self.byte_size),
            "record_count": self.record_count,
            "metadata": self.metadata,
        })
    }

    /// The details response, with `progress` while the export runs.
    pub fn details_view(&self) -> Value {
        let total = self
            .manifest
            .total_records()
            .max(self.estimated_records as u64);
        let processed = match self.status.as_str() {
            "completed" => self.record_count.unwrap_or(self.records_served) as u64,
            _ => self.records_served as u64,
        };
        let percentage = match (self.status.as_str(), total) {
            ("completed", _) => 100,
            (_, 0) => 0,
            _ => ((processed * 100) / total).min(99),
        };
        let estimated_completion = self.estimated_completion(processed, total);
        let mut v = json!({
            "request_id": self.id,
            "status": self.status,
            "export_format": self.export_format,
            "data_types": self.data_types,
            "delivery": self.delivery,
            "date_range": self.date_range(),
            "progress": {
                "percentage": percentage,
                "current_type": self.current_type,
                "records_processed": processed,
                "total_records": total,
                "estimated_completion": estimated_completion,
            },
            "created_at": self.created_at,
            "started_at": self.started_at,
            "estimated_completion": estimated_completion,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "metadata": self.metadata,
            "record_count": self.record_count,
            "file_size_mb": Self::mb(self.byte_size),
            "byte_size": self.byte_size,
            "sha256": self.sha256,
            "download_url": self.download_url(),
        });
        if let Some(reason) = &self.failure_reason {
            v["failure_reason"] = json!(reason);
        }
        v
    }

    fn estimated_completion(&self, processed: u64, total: u64) -> Option<String> {
        if self.status != "processing" || processed == 0 || processed >= total {
            return self.completed_at.clone();
        }
        let started = self
            .started_at
            .as_deref()
            .and_then(handover::model::parse_timestamp)?;
        let elapsed = OffsetDateTime::now_utc() - started;
        let remaining = elapsed * ((total - processed) as f64 / processed as f64);
        Some(format_timestamp(OffsetDateTime::now_utc() + remaining))
    }
}

pub fn now() -> String {
    format_timestamp(OffsetDateTime::now_utc())
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

/// The export `id` if it belongs to the scope's user and company and is not deleted.
///
/// # Errors
///
/// Database errors.
pub async fn find(db: &SqlitePool, scope: &Scope, id: &str) -> anyhow::Result<Option<ExportRow>> {
    if !plausible_id(id) {
        return Ok(None);
    }
    let row = sqlx::query("SELECT * FROM export_requests WHERE id = ? AND user_id = ? AND company_id = ? AND deleted_at IS NULL")
        .bind(id)
        .bind(&scope.user_id)
        .bind(&scope.company_id)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(ExportRow::from_row).transpose()
}

/// The export `id` whoever owns it (for workers).
///
/// # Errors
///
/// Database errors.
pub async fn find_any(db: &SqlitePool, id: &str) -> anyhow::Result<Option<ExportRow>> {
    let row = sqlx::query("SELECT * FROM export_requests WHERE id = ? AND deleted_at IS NULL")
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(ExportRow::from_row).transpose()
}

/// A page of the scope's exports, newest first, and the total.
///
/// # Errors
///
/// Database errors.
pub async fn list(
    db: &SqlitePool,
    scope: &Scope,
    status: Option<&str>,
    limit: u32,
    offset: u64,
) -> anyhow::Result<(Vec<ExportRow>, u64)> {
    let total: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM export_requests WHERE user_id = ? AND company_id = ? AND deleted_at IS NULL AND (?3 IS NULL OR status = ?3)",
    )
    .bind(&scope.user_id)
    .bind(&scope.company_id)
    .bind(status)
    .fetch_one(db)
    .await?;
    let rows = sqlx::query(
        "SELECT * FROM export_requests WHERE user_id = ?1 AND company_id = ?2 AND deleted_at IS NULL AND (?3 IS NULL OR status = ?3) \
         ORDER BY created_at DESC, id DESC LIMIT ?4 OFFSET ?5",
    )
    .bind(&scope.user_id)
    .bind(&scope.company_id)
    .bind(status)
    .bind(i64::from(limit))
    .bind(offset as i64)
    .fetch_all(db)
    .await?;
    let rows = rows
        .iter()
        .map(ExportRow::from_row)
        .collect::<anyhow::Result<_>>()?;
    Ok((rows, total as u64))
}

/// What a new request holds.
#[derive(Debug, Clone)]
pub struct NewExport {
    pub user_id: String,
    pub company_id: String,
    pub delivery: String,
    pub export_format: String,
    pub data_types: Vec<String>,
    pub range: Range,
    pub metadata: Value,
    pub manifest: Manifest,
    pub estimated_bytes: u64,
}

/// Stores a new request (status `pending`) and its `export.created` event.
///
/// # Errors
///
/// Database or audit errors.
pub async fn insert(
    state: &AppState,
    new: NewExport,
    request_id: Option<&str>,
) -> anyhow::Result<ExportRow> {
    let id = new_id();
    let created = OffsetDateTime::now_utc();
    sqlx::query(
        "INSERT INTO export_requests (id, user_id, company_id, status, delivery, export_format, data_types, date_start, date_end, \
         metadata, manifest, estimated_records, estimated_bytes, created_at, expires_at, last_activity_at) \
         VALUES (?,?,?,'pending',?,?,?,?,?,?,?,?,?,?,?,?)",
    )
    .bind(&id)
    .bind(&new.user_id)
    .bind(&new.company_id)
    .bind(&new.delivery)
    .bind(&new.export_format)
    .bind(serde_json::to_string(&new.data_types)?)
    .bind(&new.range.start)
    .bind(&new.range.end)
    .bind(new.metadata.to_string())
    .bind(serde_json::to_string(&new.manifest)?)
    .bind(new.manifest.total_records() as i64)
    .bind(new.estimated_bytes as i64)
    .bind(format_timestamp(created))
    .bind(format_timestamp(created + RETENTION))
    .bind(format_timestamp(created))
    .execute(&state.db)
    .await?;
    let mut entry = AuditEntry::event(
        "export.created",
        &new.user_id,
        &new.company_id,
        &id,
        json!({ "export_format": new.export_format, "data_types": new.data_types, "delivery": new.delivery,
                "date_range": { "start": new.range.start, "end": new.range.end },
                "estimated_records": new.manifest.total_records() }),
    );
    entry.request_id = request_id.map(str::to_string);
    state.audit.append(&state.db, entry).await?;
    state.metrics.export_created();
    find_any(&state.db, &id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("export {id} vanished after insert"))
}

/// Writes a lifecycle event for `row`.
///
/// # Errors
///
/// Audit errors.
pub async fn event(
    state: &AppState,
    row: &ExportRow,
    action: &str,
    request_id: Option<&str>,
    details: Value,
) -> anyhow::Result<()> {
    let mut entry = AuditEntry::event(action, &row.user_id, &row.company_id, &row.id, details);
    entry.request_id = request_id.map(str::to_string);
    state.audit.append(&state.db, entry).await
}

/// Marks an open request failed (if it still is) and audits it; false when
/// it was no longer open.
///
/// # Errors
///
/// Database or audit errors.
pub async fn fail(
    state: &AppState,
    row: &ExportRow,
    reason: &str,
    request_id: Option<&str>,
) -> anyhow::Result<bool> {
    let r = sqlx::query(
        "UPDATE export_requests SET status = 'failed', failure_reason = ?, failed_at = ?, last_activity_at = ? \
         WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(reason)
    .bind(now())
    .bind(now())
    .bind(&row.id)
    .execute(&state.db)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    state.metrics.export_failed();
    event(
        state,
        row,
        "export.failed",
        request_id,
        json!({ "reason": reason }),
    )
    .await?;
    Ok(true)
}

/// What a completed export handed over.
#[derive(Debug, Clone)]
pub struct Completion {
    pub records: u64,
    pub byte_size: u64,
    pub sha256: String,
    /// More for the audit event (e.g. the operator of a CLI export).
    pub details: serde_json::Map<String, Value>,
}

/// Marks an open export completed with what was handed over, counts it in
/// the metrics and writes the `export.completed` event (with the checksum:
/// what the privacy officer proves). False when it was no longer open.
///
/// # Errors
///
/// Database or audit errors.
pub async fn mark_completed(
    state: &AppState,
    row: &ExportRow,
    done: &Completion,
    request_id: Option<&str>,
) -> anyhow::Result<bool> {
    let at = now();
    let r = sqlx::query(
        "UPDATE export_requests SET status = 'completed', completed_at = ?, record_count = ?, byte_size = ?, sha256 = ?, \
         records_served = MAX(records_served, ?), current_type = NULL, last_activity_at = ? \
         WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(&at)
    .bind(done.records as i64)
    .bind(done.byte_size as i64)
    .bind(&done.sha256)
    .bind(done.records as i64)
    .bind(&at)
    .bind(&row.id)
    .execute(&state.db)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    let processing = handover::model::parse_timestamp(&row.created_at)
        .map(|c| (OffsetDateTime::now_utc() - c).unsigned_abs())
        .unwrap_or_default();
    state
        .metrics
        .export_completed(done.byte_size, done.records, processing);
    let mut details = json!({ "delivery": row.delivery, "export_format": row.export_format, "data_types": row.data_types,
                              "record_count": done.records, "byte_size": done.byte_size, "sha256": done.sha256 });
    if let Value::Object(d) = &mut details {
        d.extend(done.details.clone());
    }
    event(state, row, "export.completed", request_id, details).await?;
    Ok(true)
}

/// What was served of one data type of a client export.
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

/// Records that a page (or stream frame) of `data_type` reaching position
/// `served` was sent with `rows` records; `done` when nothing follows. One
/// atomic statement per counter, so concurrent requests never lose counts.
///
/// # Errors
///
/// Database errors.
pub async fn record_progress(
    db: &SqlitePool,
    id: &str,
    data_type: &str,
    served: u64,
    rows: u64,
    done: bool,
) -> anyhow::Result<()> {
    let now = now();
    sqlx::query(
        "INSERT INTO export_progress (export_id, data_type, served, reads, done) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (export_id, data_type) DO UPDATE SET served = MAX(served, excluded.served), \
         reads = reads + excluded.reads, done = MAX(done, excluded.done)",
    )
    .bind(id)
    .bind(data_type)
    .bind(served as i64)
    .bind(rows as i64)
    .bind(done)
    .execute(db)
    .await?;
    sqlx::query(
        "UPDATE export_requests SET records_served = (SELECT COALESCE(SUM(served), 0) FROM export_progress WHERE export_id = ?1), \
         current_type = ?2, last_activity_at = ?3 WHERE id = ?1",
    )
    .bind(id)
    .bind(data_type)
    .bind(&now)
    .execute(db)
    .await?;
    Ok(())
}

/// What was served of each data type of export `id` so far.
///
/// # Errors
///
/// Database errors.
pub async fn progress(db: &SqlitePool, id: &str) -> anyhow::Result<Vec<TypeProgress>> {
    let rows = sqlx::query(
        "SELECT data_type, served, reads, done FROM export_progress WHERE export_id = ?",
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TypeProgress {
                data_type: r.try_get("data_type")?,
                served: r.try_get::<i64, _>("served")? as u64,
                reads: r.try_get::<i64, _>("reads")? as u64,
                done: r.try_get::<i64, _>("done")? != 0,
            })
        })
        .collect()
}

/// Moves a pending client export to `processing` when its first records
/// are read, and writes `export.started` once.
///
/// # Errors
///
/// Database or audit errors.
pub async fn mark_started(
    state: &AppState,
    row: &ExportRow,
    request_id: Option<&str>,
) -> anyhow::Result<()> {
    let now = now();
    let r = sqlx::query(
        "UPDATE export_requests SET status = 'processing', started_at = COALESCE(started_at, ?1), last_activity_at = ?1 \
         WHERE id = ?2 AND status = 'pending'",
    )
    .bind(&now)
    .bind(&row.id)
    .execute(&state.db)
    .await?;
    if r.rows_affected() == 1 {
        event(
            state,
            row,
            "export.started",
            request_id,
            json!({ "delivery": row.delivery }),
        )
        .await?;
    }
    Ok(())
}
