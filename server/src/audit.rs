//! The tamper-evident audit log: one row per API request and per lifecycle
//! event, each storing the hash of the previous row. `verify` finds the
//! first altered, removed or reordered row.

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::{Row, SqlitePool};

/// The previous-hash of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    fn compute_hash(&self) -> String {
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
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    pub(crate) fn from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Self> {
        let details: String = r.try_get("details")?;
        Ok(Self {
            seq: r.try_get("seq")?,
            at: r.try_get("at")?,
            request_id: r.try_get("request_id")?,
            actor: r.try_get("actor")?,
            company_id: r.try_get("company_id")?,
            action: r.try_get("action")?,
            resource: r.try_get("resource")?,
            outcome: r.try_get("outcome")?,
            status: r.try_get("status")?,
            ip: r.try_get("ip")?,
            user_agent: r.try_get("user_agent")?,
            details: serde_json::from_str(&details).unwrap_or(Value::String(details)),
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
        })
    }
}

/// Appends rows; serialises appends within the process, and uses the
/// sequence number as an optimistic lock across processes (the CLI may
/// append while the server runs).
#[derive(Debug, Default)]
pub struct AuditLog {
    lock: tokio::sync::Mutex<()>,
}

impl AuditLog {
    /// Appends `entry` to the chain.
    ///
    /// # Errors
    ///
    /// Database errors, or a chain head that keeps moving (after retries).
    pub async fn append(&self, db: &SqlitePool, entry: AuditEntry) -> anyhow::Result<()> {
        let _guard = self.lock.lock().await;
        for _ in 0..20 {
            let head = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(db)
                .await?;
            let (last_seq, prev_hash) = match head {
                Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
                None => (0, GENESIS.to_string()),
            };
            let mut row = AuditRow {
                seq: last_seq + 1,
                at: handover::model::format_timestamp(time::OffsetDateTime::now_utc()),
                request_id: entry.request_id.clone(),
                actor: entry.actor.clone(),
                company_id: entry.company_id.clone(),
                action: entry.action.clone(),
                resource: entry.resource.clone(),
                outcome: entry.outcome.clone(),
                status: entry.status.map(i64::from),
                ip: entry.ip.clone(),
                user_agent: entry.user_agent.clone(),
                details: entry.details.clone(),
                prev_hash,
                hash: String::new(),
            };
            row.hash = row.compute_hash();
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at, request_id, actor, company_id, action, resource, outcome, status, ip, \
                 user_agent, details, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(seq) DO NOTHING",
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
            .execute(db)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(());
            }
        }
        anyhow::bail!("audit chain head kept moving; gave up after 20 attempts")
    }
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Every row checks out.
    Intact { rows: u64 },
    /// The first row that does not.
    Broken { seq: i64, reason: String },
}

/// Walks the whole chain in order and reports the first bad row.
///
/// # Errors
///
/// Database errors only; a broken chain is a [`Verification::Broken`].
pub async fn verify(db: &SqlitePool) -> anyhow::Result<Verification> {
    use futures_util::StreamExt as _;
    let mut rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq").fetch(db);
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
        if row.compute_hash() != row.hash {
            return Ok(Verification::Broken {
                seq: row.seq,
                reason: format!(
                    "row {} was altered: its content does not match its hash",
                    row.seq
                ),
            });
        }
        prev = row.hash;
        expected_seq += 1;
        count += 1;
    }
    Ok(Verification::Intact { rows: count })
}
