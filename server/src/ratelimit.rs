//! The API reference's rate limits. Their state lives in the database
//! ([`Store::admit`]), so they hold across restarts and across server
//! instances, exactly, under concurrency.

use crate::error::ApiError;
use crate::store::exports::AdmitLimit;
use crate::store::limits::Admission;
use crate::store::Store;

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
/// Parts of encrypted copies: 1 GB in 16 MiB parts is 64.
pub const UPLOAD: Limit = Limit {
    name: "data_export_upload",
    max: 600,
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

/// The limit of `user` in `company`, as the store admits under it.
pub fn admit_limit(limit: Limit, user: &str, company: &str) -> AdmitLimit {
    AdmitLimit {
        bucket: format!("{}:{user}:{company}", limit.name),
        max: limit.max,
        window_ms: (limit.window_secs * 1000) as i64,
    }
}

/// Admits one request of `user` in `company` under `limit`, or refuses it.
///
/// # Errors
///
/// [`ApiError::RateLimited`] with the seconds until the oldest request in
/// the window falls out; database errors as [`ApiError::Internal`].
pub async fn admit(
    store: &Store,
    limit: Limit,
    user: &str,
    company: &str,
) -> Result<RateState, ApiError> {
    let l = admit_limit(limit, user, company);
    let a = store.admit(&l.bucket, l.max, l.window_ms).await?;
    decide(limit, a)
}

/// The `429 RATE_LIMIT_EXCEEDED` of a refused admission, with the seconds
/// until the oldest request in the window falls out.
pub fn refusal(limit: Limit, a: Admission) -> ApiError {
    ApiError::RateLimited {
        limit: limit.max,
        window_secs: limit.window_secs,
        retry_after: a.reset_ms.div_ceil(1000).max(1),
    }
}

/// What an admission means for the client: the `RateLimit-*` state, or the
/// refusal.
///
/// # Errors
///
/// [`ApiError::RateLimited`] when it was refused.
pub fn decide(limit: Limit, a: Admission) -> Result<RateState, ApiError> {
    if !a.admitted {
        return Err(refusal(limit, a));
    }
    let reset_secs = a.reset_ms.div_ceil(1000).max(u64::from(a.used > 0));
    Ok(RateState {
        limit: limit.max,
        remaining: limit.max.saturating_sub(a.used),
        reset_secs,
    })
}
