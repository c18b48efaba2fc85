//! Sliding-window rate limits whose state lives in the database, so they
//! hold across restarts and across server instances. Admission counts the
//! window and records the request under one lock (the SQLite write lock; a
//! PostgreSQL advisory lock on the bucket), so racing requests, on one
//! instance or several, can never overshoot.

use super::{lock, Store, Tx};

/// What admission decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    /// Requests in the window, this one included when admitted.
    pub used: u32,
    /// Milliseconds until the oldest request in the window leaves it.
    pub reset_ms: u64,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The advisory-lock key of a bucket.
fn bucket_key(bucket: &str) -> i64 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bucket.as_bytes());
    i64::from_be_bytes(d[..8].try_into().unwrap_or_default()) ^ lock::AUDIT
}

impl Store {
    /// Admits one request in `bucket` when fewer than `max` were admitted in
    /// the last `window_ms`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn admit(&self, bucket: &str, max: u32, window_ms: i64) -> anyhow::Result<Admission> {
        let mut tx = self.write().await?;
        let a = self.admit_in(&mut tx, bucket, max, window_ms).await?;
        tx.commit().await?;
        Ok(a)
    }

    /// [`Store::admit`] inside a write transaction, so that what the
    /// request then does and its slot commit (or roll back) together.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub(crate) async fn admit_in(
        &self,
        tx: &mut Tx<'_>,
        bucket: &str,
        max: u32,
        window_ms: i64,
    ) -> anyhow::Result<Admission> {
        let now = now_ms();
        let since = now - window_ms;
        self.lock(tx, bucket_key(bucket)).await?;
        let (used, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(at_ms) FROM rate_events WHERE bucket = $1 AND at_ms > $2",
        )
        .bind(bucket)
        .bind(since)
        .fetch_one(&mut *tx.tx)
        .await?;
        let admitted = used < i64::from(max);
        if admitted {
            sqlx::query("INSERT INTO rate_events (bucket, at_ms) VALUES ($1, $2)")
                .bind(bucket)
                .bind(now)
                .execute(&mut *tx.tx)
                .await?;
            // Old events are of no further use; keep the table small.
            sqlx::query("DELETE FROM rate_events WHERE bucket = $1 AND at_ms <= $2")
                .bind(bucket)
                .bind(since)
                .execute(&mut *tx.tx)
                .await?;
        }
        let used = used + i64::from(admitted);
        let oldest = oldest.unwrap_or(now);
        Ok(Admission {
            admitted,
            used: used as u32,
            reset_ms: (oldest + window_ms - now).max(0) as u64,
        })
    }
}
