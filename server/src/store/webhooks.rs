//! Completion notifications: each company's endpoint, and the outbox of
//! events to deliver. Events are queued in the transaction of the
//! transition they report, so none is lost and none is sent for a
//! transition that rolled back.

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{json, Value};

use super::audit::AuditEntry;
use super::{int, now, opt_int, text, Engine, Store, Tx};

/// How a sealed secret starts in the database; a value without it is a
/// secret stored in clear by an older version (sealed at the next start).
const SEALED: &str = "sealed:v1:";

/// The key that seals webhook secrets, derived from the master key.
pub(crate) fn derive_key(master: &handover::crypto::DataKey) -> [u8; 32] {
    super::derive_key(master, b"handover stored secrets v1")
}

/// What a sealed secret is bound to: its company's endpoint.
fn context(company: &str) -> Vec<u8> {
    format!("handover webhook secret {company}").into_bytes()
}

/// A company's webhook endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub company_id: String,
    pub url: String,
    /// `whsec_` and the base64 of the signing key.
    pub secret: String,
}

/// An event due for delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub company_id: String,
    pub event_type: String,
    pub payload: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
}

impl Store {
    fn secrets_key(&self) -> anyhow::Result<handover::crypto::DataKey> {
        self.secrets_key
            .map(handover::crypto::DataKey::from_bytes)
            .context("webhook secrets are stored sealed under the master key, which this store was not given")
    }

    fn seal_secret(&self, company: &str, secret: &str) -> anyhow::Result<String> {
        let sealed = self
            .secrets_key()?
            .seal(secret.as_bytes(), &context(company))?;
        Ok(format!(
            "{SEALED}{}",
            base64::engine::general_purpose::STANDARD.encode(sealed)
        ))
    }

    fn open_secret(&self, company: &str, stored: &str) -> anyhow::Result<String> {
        let Some(sealed) = stored.strip_prefix(SEALED) else {
            return Ok(stored.to_string());
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .context("a sealed webhook secret is not base64")?;
        let plain = self
            .secrets_key()?
            .open(&sealed, &context(company))
            .with_context(|| {
                format!("the webhook secret of {company} does not open under this master key")
            })?;
        String::from_utf8(plain).context("a webhook secret is not UTF-8")
    }

    /// Seals the webhook secrets an older version stored in clear; returns
    /// how many. Run at start: each is replaced only if still the same.
    ///
    /// # Errors
    ///
    /// Database errors, or no master key.
    pub async fn seal_clear_webhook_secrets(&self) -> anyhow::Result<u64> {
        let clear: Vec<(String, String)> = sqlx::query_as(
            "SELECT company_id, secret FROM webhooks WHERE secret NOT LIKE 'sealed:v1:%'",
        )
        .fetch_all(self.pool())
        .await?;
        let mut sealed = 0;
        for (company, secret) in clear {
            let value = self.seal_secret(&company, &secret)?;
            let mut tx = self.write().await?;
            sealed += sqlx::query(
                "UPDATE webhooks SET secret = $1 WHERE company_id = $2 AND secret = $3",
            )
            .bind(&value)
            .bind(&company)
            .bind(&secret)
            .execute(&mut *tx.tx)
            .await?
            .rows_affected();
            tx.commit().await?;
        }
        Ok(sealed)
    }

    /// Sets (or replaces) `company`'s endpoint, audited as
    /// `webhook.configured`; the secret is stored sealed.
    ///
    /// # Errors
    ///
    /// Database errors, or no master key.
    pub async fn set_webhook(&self, e: &Endpoint, by: &str) -> anyhow::Result<()> {
        let secret = self.seal_secret(&e.company_id, &e.secret)?;
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO webhooks (company_id, url, secret, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (company_id) DO UPDATE SET url = excluded.url, secret = excluded.secret, created_at = excluded.created_at",
        )
        .bind(&e.company_id)
        .bind(&e.url)
        .bind(&secret)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.append_audit(
            &mut tx,
            AuditEntry::event(
                "webhook.configured",
                by,
                &e.company_id,
                &format!("webhook_{}", e.company_id),
                json!({ "url": e.url, "by": by }),
            ),
        )
        .await?;
        tx.commit().await
    }

    /// Removes `company`'s endpoint; false when it had none.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn remove_webhook(&self, company: &str, by: &str) -> anyhow::Result<bool> {
        let mut tx = self.write().await?;
        let r = sqlx::query("DELETE FROM webhooks WHERE company_id = $1")
            .bind(company)
            .execute(&mut *tx.tx)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE webhook_deliveries SET status = 'cancelled' WHERE company_id = $1 AND status = 'pending'")
            .bind(company)
            .execute(&mut *tx.tx)
            .await?;
        self.append_audit(
            &mut tx,
            AuditEntry::event(
                "webhook.removed",
                by,
                company,
                &format!("webhook_{company}"),
                json!({ "by": by }),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// `company`'s endpoint, if any, its secret opened.
    ///
    /// # Errors
    ///
    /// Database errors, or a sealed secret that does not open under this
    /// master key.
    pub async fn webhook(&self, company: &str) -> anyhow::Result<Option<Endpoint>> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT url, secret FROM webhooks WHERE company_id = $1")
                .bind(company)
                .fetch_optional(self.pool())
                .await?;
        row.map(|(url, stored)| {
            Ok(Endpoint {
                company_id: company.to_string(),
                secret: self.open_secret(company, &stored)?,
                url,
            })
        })
        .transpose()
    }

    /// Queues `event_type` with `data` for `company`, inside the
    /// transition's transaction; nothing when the company has no endpoint.
    pub(crate) async fn queue_webhook(
        &self,
        tx: &mut Tx<'_>,
        company: &str,
        event_type: &str,
        data: Value,
    ) -> anyhow::Result<()> {
        let id = format!("msg_{}", hex::encode(rand::random::<[u8; 12]>()));
        let at = now();
        let payload = json!({ "type": event_type, "timestamp": at, "data": data }).to_string();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, company_id, event_type, payload, status, attempts, next_attempt_at, created_at) \
             SELECT $1, company_id, $2, $3, 'pending', 0, $4, $4 FROM webhooks WHERE company_id = $5",
        )
        .bind(&id)
        .bind(event_type)
        .bind(&payload)
        .bind(&at)
        .bind(company)
        .execute(&mut *tx.tx)
        .await?;
        Ok(())
    }

    /// Takes the deliveries due now for this instance: each is leased until
    /// `lease_until`, so no other instance sends it meanwhile.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn due_webhooks(&self, lease_until: &str, max: i64) -> anyhow::Result<Vec<Delivery>> {
        let skip = match self.engine() {
            Engine::Postgres => " FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let at = now();
        // Most of the time nothing is due: find out without taking the
        // write lock.
        let any: Option<String> = sqlx::query_scalar(
            "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $1 LIMIT 1",
        )
        .bind(&at)
        .fetch_optional(self.pool())
        .await?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, company_id, event_type, payload, attempts, last_status FROM webhook_deliveries \
             WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2{skip}"
        ))
        .bind(&at)
        .bind(max)
        .fetch_all(&mut *tx.tx)
        .await?;
        let mut due = Vec::with_capacity(rows.len());
        for r in &rows {
            let d = Delivery {
                id: text(r, "id")?,
                company_id: text(r, "company_id")?,
                event_type: text(r, "event_type")?,
                payload: text(r, "payload")?,
                attempts: int(r, "attempts")?,
                last_status: opt_int(r, "last_status")?,
            };
            sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id = $2")
                .bind(lease_until)
                .bind(&d.id)
                .execute(&mut *tx.tx)
                .await?;
            due.push(d);
        }
        tx.commit().await?;
        Ok(due)
    }

    /// Records one delivery attempt (audited as `webhook.attempted`):
    /// delivered, retried at `retry_at`, or given up (`retry_at` None).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn webhook_attempted(
        &self,
        d: &Delivery,
        delivered: bool,
        status: Option<u16>,
        error: Option<&str>,
        retry_at: Option<&str>,
    ) -> anyhow::Result<()> {
        let attempt = d.attempts + 1;
        let state = match (delivered, retry_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = $2, last_status = $3, next_attempt_at = $4 WHERE id = $5",
        )
        .bind(state)
        .bind(attempt)
        .bind(status.map(i64::from))
        .bind(retry_at.map_or_else(now, str::to_string))
        .bind(&d.id)
        .execute(&mut *tx.tx)
        .await?;
        let entry = AuditEntry::event(
            "webhook.attempted",
            "handover",
            &d.company_id,
            &d.id,
            json!({ "event_type": d.event_type, "attempt": attempt, "outcome": state,
                    "http_status": status, "error": error, "next_attempt_at": retry_at }),
        );
        self.append_audit(&mut tx, entry).await?;
        tx.commit().await
    }
}
