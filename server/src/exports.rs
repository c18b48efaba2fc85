//! What the API says about an export request (the views of the API
//! reference's responses), and the metrics its lifecycle moves. The
//! lifecycle itself, and every query, is in [`crate::store::exports`].

use handover::model::format_timestamp;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::store::exports::{Completion, CopyStage, Delivery, ExportRow, Status};
use crate::AppState;

impl ExportRow {
    fn date_range(&self) -> Value {
        json!({ "start": self.date_start, "end": self.date_end })
    }

    /// Where the file downloads: a server build's file, or the browser's
    /// kept encrypted copy.
    fn download_url(&self) -> Option<String> {
        let kept = match self.delivery {
            Delivery::Server => true,
            Delivery::Client => self.copy.stage == CopyStage::Kept,
            Delivery::Direct | Delivery::Cli => false,
        };
        (self.status == Status::Completed && kept && !self.is_past_expiry())
            .then(|| format!("/api/data/export/{}/download", self.id))
    }

    /// `encrypted_copy` in the views: where the browser's copy stands.
    fn add_copy(&self, v: &mut Value) {
        if self.copy.stage != CopyStage::None {
            v["encrypted_copy"] = self.copy_view();
        }
    }

    /// Megabytes to two decimals, as the API reference shows them; below
    /// 0.01, to three significant digits, so that a small file does not
    /// read as empty.
    fn mb(bytes: Option<i64>) -> Option<f64> {
        bytes.map(|b| {
            let mb = (b.max(0) as f64) / 1_048_576.0;
            let decimals = if mb >= 0.01 || mb == 0.0 {
                2
            } else {
                2 - mb.log10().floor() as i32
            };
            let scale = 10f64.powi(decimals);
            (mb * scale).round() / scale
        })
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
        let mut v = json!({
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
        });
        if let Some(reason) = &self.failure_reason {
            v["failure_reason"] = json!(reason);
        }
        self.add_outcomes(&mut v);
        self.add_copy(&mut v);
        v
    }

    /// The details response, with `progress` while the export runs.
    pub fn details_view(&self) -> Value {
        let total = self
            .manifest
            .total_records()
            .max(self.estimated_records as u64);
        let processed = match self.status {
            Status::Completed => self.record_count.unwrap_or(self.records_served) as u64,
            _ => self.records_served as u64,
        };
        let percentage = match (self.status, total) {
            (Status::Completed, _) => 100,
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
        self.add_outcomes(&mut v);
        self.add_copy(&mut v);
        v
    }

    /// Beside the status (one of the five), what became of each data type:
    /// `outcome` is `complete` or `partial` once completed, and
    /// `data_type_outcomes` says which types are in the file and which were
    /// left out, and why.
    fn add_outcomes(&self, v: &mut Value) {
        if self.status != Status::Completed {
            return;
        }
        let outcomes: serde_json::Map<String, Value> = self
            .data_types
            .iter()
            .map(|t| {
                let o = match self.failed_types.iter().find(|f| &f.data_type == t) {
                    Some(f) => json!({ "status": "failed", "reason": f.reason }),
                    None => json!({ "status": "completed" }),
                };
                (t.clone(), o)
            })
            .collect();
        v["outcome"] = json!(if self.failed_types.is_empty() {
            "complete"
        } else {
            "partial"
        });
        v["data_type_outcomes"] = Value::Object(outcomes);
        v["failed_data_types"] = json!(self.failed_types);
    }

    fn estimated_completion(&self, processed: u64, total: u64) -> Option<String> {
        if self.status != Status::Processing || processed == 0 || processed >= total {
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

/// Counts a completed export in the metrics.
pub fn count_completed(state: &AppState, row: &ExportRow, done: &Completion) {
    let processing = handover::model::parse_timestamp(&row.created_at)
        .map(|c| (OffsetDateTime::now_utc() - c).unsigned_abs())
        .unwrap_or_default();
    state
        .metrics
        .export_completed(done.byte_size, done.records, processing);
}
