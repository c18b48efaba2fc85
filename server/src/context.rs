//! Per-request context: request id, timing, client facts, and what the
//! handler learned for the audit row (actor, company, action, resource,
//! rate-limit state). One middleware creates it, adds `X-Request-Id` and the
//! `RateLimit-*` headers, logs internal errors, counts metrics and writes
//! the audit row for every `/api/` request, allowed or refused.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Instrument as _;

use crate::error::{ApiError, ErrorCode, InternalErrorText};
use crate::ratelimit::RateState;
use crate::store::audit::AuditEntry;
use crate::AppState;

/// API version reported in every envelope.
pub const API_VERSION: &str = "1.0.0";

#[derive(Debug, Default)]
struct Learned {
    actor: Option<String>,
    company: Option<String>,
    action: Option<&'static str>,
    resource: Option<String>,
    details: serde_json::Map<String, Value>,
    rate: Option<RateState>,
}

#[derive(Debug)]
struct Inner {
    request_id: String,
    started: Instant,
    ip: Option<String>,
    /// What the flood throttle counts the client under (see
    /// [`crate::guard::address_key`]).
    address_key: String,
    user_agent: Option<String>,
    learned: Mutex<Learned>,
    /// The lane this request's credential check waits in (see
    /// [`crate::guard::Guard::lane`]).
    lane: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

/// The context of one request (cheap to clone).
#[derive(Debug, Clone)]
pub struct Ctx(Arc<Inner>);

impl Ctx {
    /// The request id (`req_…`), also in `X-Request-Id` and `meta.requestId`.
    pub fn request_id(&self) -> &str {
        &self.0.request_id
    }

    /// The client's address, as the server sees it.
    pub fn ip(&self) -> Option<&str> {
        self.0.ip.as_deref()
    }

    /// The key the flood throttle counts this client under: its address,
    /// or its IPv6 /64 network.
    pub fn address_key(&self) -> &str {
        &self.0.address_key
    }

    /// The lane the credential check waits in, when its address has failed
    /// authentication this minute.
    pub fn lane(&self) -> Option<Arc<tokio::sync::Semaphore>> {
        self.0.lane.get().cloned()
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.0.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names who is acting, for the audit row.
    pub fn set_actor(&self, user: &str, company: Option<&str>) {
        let mut l = self.learned();
        l.actor = Some(user.to_string());
        l.company = company.map(str::to_string);
    }

    /// Names what is being done to what, for the audit row.
    pub fn set_action(&self, action: &'static str, resource: Option<&str>) {
        let mut l = self.learned();
        l.action = Some(action);
        l.resource = resource.map(str::to_string);
    }

    /// Adds a detail to the audit row.
    pub fn detail(&self, key: &str, value: impl Into<Value>) {
        self.learned().details.insert(key.to_string(), value.into());
    }

    /// Records the rate-limit state, sent back as `RateLimit-*` headers.
    pub fn set_rate(&self, rate: RateState) {
        self.learned().rate = Some(rate);
    }

    /// The success envelope around `data`.
    pub fn ok<T: Serialize>(&self, data: T) -> Json<Value> {
        Json(json!({
            "success": true,
            "data": data,
            "meta": {
                "requestId": self.request_id(),
                "timestamp": handover::model::format_timestamp(time::OffsetDateTime::now_utc()),
                "version": API_VERSION,
                "processingTimeMs": self.0.started.elapsed().as_millis() as u64,
            }
        }))
    }
}

impl Ctx {
    /// The success envelope around `data`, already JSON text (a frame of
    /// records: written once, never re-parsed).
    pub fn ok_raw(&self, data: Vec<u8>) -> Response {
        let meta = json!({
            "requestId": self.request_id(),
            "timestamp": handover::model::format_timestamp(time::OffsetDateTime::now_utc()),
            "version": API_VERSION,
            "processingTimeMs": self.0.started.elapsed().as_millis() as u64,
        });
        let mut body = Vec::with_capacity(data.len() + 200);
        body.extend_from_slice(b"{\"success\":true,\"data\":");
        body.extend_from_slice(&data);
        body.extend_from_slice(b",\"meta\":");
        body.extend_from_slice(meta.to_string().as_bytes());
        body.push(b'}');
        let mut r = Response::new(axum::body::Body::from(body));
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Ctx>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("request context middleware missing"))
        })
    }
}

/// What is kept of a request's user-agent and path in the audit log: enough
/// to recognise a client, never a row a flood can inflate.
const MAX_STORED_UA: usize = 256;
const MAX_STORED_PATH: usize = 256;

fn capped(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(max).collect();
        c.push('…');
        c
    }
}

/// Gives a response that the request middleware never saw (a CORS
/// preflight, answered outside it) a request id of its own: every response
/// carries one.
pub async fn ensure_request_id(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key("x-request-id") {
        if let Ok(v) = HeaderValue::from_str(&new_request_id()) {
            headers.insert(HeaderName::from_static("x-request-id"), v);
        }
    }
    response
}

fn new_request_id() -> String {
    format!("req_{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// Writes the counts of refused unauthenticated requests per address and
/// minute (see [`crate::guard`]) to the audit log, one row each.
///
/// # Errors
///
/// Database errors; the counts not written go back to the guard, for the
/// next sweep.
pub async fn write_tallies(
    state: &AppState,
    tallies: Vec<crate::guard::Tally>,
) -> anyhow::Result<()> {
    let mut tallies = tallies.into_iter();
    while let Some(t) = tallies.next() {
        if let Err(e) = write_tally(state, &t).await {
            state.guard.requeue(std::iter::once(t).chain(tallies));
            return Err(e);
        }
    }
    Ok(())
}

/// One address's (or the shared) count of a minute, as an audit row.
async fn write_tally(state: &AppState, t: &crate::guard::Tally) -> anyhow::Result<()> {
    let minute = time::OffsetDateTime::from_unix_timestamp(t.minute * 60)
        .map(handover::model::format_timestamp)
        .unwrap_or_default();
    let shared = t.ip == crate::guard::OTHER_ADDRESSES;
    let mut details = json!({ "minute": minute, "refused": t.refused, "throttled": t.throttled,
        "logged_one_by_one": crate::guard::LOGGED_PER_MINUTE.min(t.refused), "sample_path": t.sample_path });
    if shared {
        // Addresses past the cap counted together; the row names none.
        details["shared_by_addresses_past"] = json!(crate::guard::MAX_TALLIES);
    }
    state
        .store
        .audit(AuditEntry {
            request_id: None,
            actor: None,
            company_id: None,
            action: "auth.refused".to_string(),
            resource: None,
            outcome: "refused".to_string(),
            status: Some(401),
            ip: (!shared).then(|| t.ip.clone()),
            user_agent: None,
            details,
        })
        .await?;
    Ok(())
}

/// Holds back a throttled answer for about the tarpit time (jittered: half
/// to one and a half times, so that flooders throttled together do not come
/// back together); when the tarpit is full, answers at once and closes the
/// connection instead.
async fn tarpit(state: &AppState, response: &mut Response) {
    if state.settings.tarpit.is_zero() {
        return;
    }
    match state.guard.tarpit() {
        Some(_slot) => {
            tokio::time::sleep(state.settings.tarpit.mul_f64(0.5 + rand::random::<f64>())).await
        }
        None => {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
    }
}

/// The `429` of an address over its limit of failed authentications.
pub(crate) fn throttled_error(state: &AppState, retry_after: u64) -> ApiError {
    ApiError::RateLimited {
        limit: u32::try_from(state.settings.unauth_per_minute).unwrap_or(u32::MAX),
        window_secs: 60,
        retry_after,
    }
}

/// Answers an address flooding the API with failed authentications with
/// `429`, before authentication and without an audit row of its own. It
/// wraps the router, so that it runs before routing: a flood's requests
/// then cost no route matching and no decoding of their (long) paths, only
/// this check, a count and the tarpit's timer.
pub async fn throttle(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = req.uri().path();
    if !path.starts_with("/api/") {
        return next.run(req).await;
    }
    let ip_key = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| crate::guard::address_key(addr.ip()))
        .unwrap_or_default();
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(retry_after) =
        state
            .guard
            .throttled(&ip_key, state.settings.unauth_per_minute, authorization)
    else {
        return next.run(req).await;
    };
    let _ = state
        .guard
        .refused(&ip_key, &capped(path, MAX_STORED_PATH), true, None);
    state.metrics.observe_request(429, started.elapsed());
    let mut r = throttled_error(&state, retry_after).into_response();
    if let Ok(v) = HeaderValue::from_str(&new_request_id()) {
        r.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    tarpit(&state, &mut r).await;
    r
}

/// The request middleware (see the module docs).
pub async fn middleware(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let ip = peer.map(|ip| ip.to_string());
    let user_agent = req
        .headers()
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(MAX_STORED_UA).collect());
    let ctx = Ctx(Arc::new(Inner {
        request_id: new_request_id(),
        started: Instant::now(),
        ip,
        address_key: peer.map(crate::guard::address_key).unwrap_or_default(),
        user_agent,
        learned: Mutex::new(Learned::default()),
        lane: std::sync::OnceLock::new(),
    }));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // What the audit log and the log lines keep of it: a flood's 30 KB
    // paths must not fill either.
    let stored_path = capped(&path, MAX_STORED_PATH);
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ip_key = ctx.address_key();
    req.extensions_mut().insert(ctx.clone());
    req.extensions_mut()
        .insert(crate::routes::BodyTimeout(state.settings.body_timeout));

    // Every log line of the handler carries the request id.
    let span = tracing::info_span!("request", request_id = %ctx.request_id(), %method, path = %stored_path);
    if path.starts_with("/api/") {
        if let Some(lane) = state.guard.lane(
            ip_key,
            state.settings.unauth_per_minute,
            authorization.as_deref(),
        ) {
            let _ = ctx.0.lane.set(lane);
        }
    }
    let origin = crate::store::audit::RequestOrigin {
        request_id: ctx.request_id().to_string(),
        ip: ctx.0.ip.clone(),
        user_agent: ctx.0.user_agent.clone(),
    };
    let mut response = crate::store::audit::REQUEST_ORIGIN
        .scope(origin, next.run(req).instrument(span))
        .await;
    // Whatever answered (a static file service, a layer), errors leave in
    // the envelope: a bare 405 or 404 becomes the API's own.
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        if response.status() == axum::http::StatusCode::METHOD_NOT_ALLOWED {
            response = ApiError::MethodNotAllowed.into_response();
        } else if response.status() == axum::http::StatusCode::NOT_FOUND
            && path.starts_with("/api/")
        {
            response = ApiError::RouteNotFound.into_response();
        }
    }

    let status = response.status();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    if let Some(InternalErrorText(text)) = response.extensions().get::<InternalErrorText>() {
        if status.is_server_error() {
            tracing::error!(request_id = %ctx.request_id(), %method, path = %stored_path, error = %text, "request failed");
        } else {
            tracing::info!(request_id = %ctx.request_id(), %method, path = %stored_path, reason = %text, "request refused");
        }
    }
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(ctx.request_id()) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    if path.starts_with("/api/") {
        // Answers of the API may carry personal data: no cache keeps them,
        // no browser guesses their type.
        headers
            .entry(axum::http::header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        headers.insert(
            axum::http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    let learned = std::mem::take(&mut *ctx.learned());
    // A 429 that states its own limit (the daily quota, refused after the
    // request was admitted by its rate limit) keeps it.
    let states_its_limit = headers.contains_key("ratelimit-limit");
    if let Some(rate) = learned.rate.as_ref().filter(|_| !states_its_limit) {
        crate::error::rate_limit_headers(
            headers,
            u64::from(rate.limit),
            u64::from(rate.remaining),
            rate.reset_secs,
        );
    }
    let elapsed = ctx.0.started.elapsed();
    state.metrics.observe_request(status.as_u16(), elapsed);
    tracing::info!(
        request_id = %ctx.request_id(), %method, path = %stored_path, status = status.as_u16(),
        ms = elapsed.as_millis() as u64, "request"
    );

    if path.starts_with("/api/") {
        if learned.actor.is_some() {
            if let Some(a) = &authorization {
                state.guard.authenticated(a);
            }
        } else if status == axum::http::StatusCode::UNAUTHORIZED
            || status == axum::http::StatusCode::TOO_MANY_REQUESTS
        {
            // Failed authentications: the first few of each minute get a row
            // of their own, the rest are counted per address and minute. A
            // 429 without an actor is the throttle answering in the lane:
            // counted, never a row of its own.
            let throttled = status == axum::http::StatusCode::TOO_MANY_REQUESTS;
            let own_row =
                state
                    .guard
                    .refused(ip_key, &stored_path, throttled, authorization.as_deref());
            if !own_row {
                return response;
            }
        }
        let outcome = if status.is_success() {
            "allowed"
        } else if status.is_server_error() {
            "error"
        } else {
            "refused"
        };
        let mut details = learned.details;
        details.insert("method".into(), json!(method.as_str()));
        details.insert("path".into(), json!(stored_path.as_str()));
        if let Some(code) = code {
            details.insert("code".into(), json!(code));
        }
        let entry = AuditEntry {
            request_id: Some(ctx.request_id().to_string()),
            actor: learned.actor,
            company_id: learned.company,
            action: learned.action.unwrap_or("api.request").to_string(),
            resource: learned.resource,
            outcome: outcome.to_string(),
            status: Some(status.as_u16()),
            ip: ctx.0.ip.clone(),
            user_agent: ctx.0.user_agent.clone(),
            details: Value::Object(details),
        };
        if let Err(e) = state.store.audit(entry).await {
            // An API request that cannot be audited must not succeed silently.
            tracing::error!(request_id = %ctx.request_id(), error = %format!("{e:#}"), "audit write failed");
            let mut r = ApiError::Internal(anyhow::anyhow!("audit write failed")).into_response();
            if let Ok(v) = HeaderValue::from_str(ctx.request_id()) {
                r.headers_mut()
                    .insert(HeaderName::from_static("x-request-id"), v);
            }
            return r;
        }
    }
    response
}
