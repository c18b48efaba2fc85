//! Sliding-window rate limits whose state lives in the database, so they
//! hold across restarts and across server instances. Admission is one
//! atomic INSERT … WHERE (count in window) < limit, so racing requests
//! cannot overshoot.

use sqlx::{Row, SqlitePool};

use crate::error::ApiError;

/// One limit of the API reference's table.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Key prefix, e.g. `data_export` (the key is `{name}:{user}:{company}`).
    pub name: &'static str,
    pub max: u32,
    pub window_secs: u64,
}

/// Create: 5 per rolling hour per user and company.
pub const CREATE: Limit = Limit {
    name: "data_export",
    max: 5,
    window_secs: 3600,
};
/// List and details: 60 per minute.
pub const READ: Limit = Limit {
    name: "data_export_read",
    max: 60,
    window_secs: 60,
};
/// Download: 10 per minute.
pub const DOWNLOAD: Limit = Limit {
    name: "data_export_download",
    max: 10,
    window_secs: 60,
};
/// Delete: 20 per minute.
pub const DELETE: Limit = Limit {
    name: "data_export_delete",
    max: 20,
    window_secs: 60,
};
/// Record pages: generous; a million records at 5,000 per page is 200 pages.
pub const RECORDS: Limit = Limit {
    name: "data_export_records",
    max: 1200,
    window_secs: 60,
};
/// complete / fail reports from the browser.
pub const REPORT: Limit = Limit {
    name: "data_export_report",
    max: 60,
    window_secs: 60,
};
/// Summary and audit reads.
pub const OTHER_READ: Limit = Limit {
    name: "data_read",
    max: 120,
    window_secs: 60,
};

/// What the `RateLimit-*` headers say after a request was admitted.
#[derive(Debug, Clone, Copy)]
pub struct RateState {
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Admits one request of `user` in `company` under `limit`, or refuses it.
///
/// # Errors
///
/// [`ApiError::RateLimited`] with the seconds until the oldest request in
/// the window falls out; database errors as [`ApiError::Internal`].
pub async fn admit(
    db: &SqlitePool,
    limit: Limit,
    user: &str,
    company: &str,
) -> Result<RateState, ApiError> {
    let bucket = format!("{}:{user}:{company}", limit.name);
    let now = now_ms();
    let window_ms = (limit.window_secs * 1000) as i64;
    let since = now - window_ms;
    let admitted = sqlx::query(
        "INSERT INTO rate_events (bucket, at_ms) SELECT ?1, ?2 \
         WHERE (SELECT COUNT(*) FROM rate_events WHERE bucket = ?1 AND at_ms > ?3) < ?4",
    )
    .bind(&bucket)
    .bind(now)
    .bind(since)
    .bind(i64::from(limit.max))
    .execute(db)
    .await?
    .rows_affected()
        == 1;
    let r = sqlx::query("SELECT COUNT(*) AS n, MIN(at_ms) AS oldest FROM rate_events WHERE bucket = ?1 AND at_ms > ?2")
        .bind(&bucket)
        .bind(since)
        .fetch_one(db)
        .await?;
    let used: i64 = r.try_get("n")?;
    let oldest: Option<i64> = r.try_get("oldest")?;
    let reset_ms = oldest.map_or(0, |o| (o + window_ms - now).max(0));
    let reset_secs = (reset_ms as u64).div_ceil(1000).max(u64::from(used > 0));
    if !admitted {
        return Err(ApiError::RateLimited {
            limit: limit.max,
            window_secs: limit.window_secs,
            retry_after: reset_secs.max(1),
        });
    }
    // Old events are of no further use; keep the table small.
    sqlx::query("DELETE FROM rate_events WHERE bucket = ?1 AND at_ms <= ?2")
        .bind(&bucket)
        .bind(since)
        .execute(db)
        .await?;
    Ok(RateState {
        limit: limit.max,
        remaining: limit.max.saturating_sub(used as u32),
        reset_secs,
    })
}
