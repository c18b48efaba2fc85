//! handover-server: the Data Export API (see the API reference in
//! `shared/seeds/004_…`) with auth, tenant isolation, persistent rate
//! limits, encryption at rest and a hash-chained audit log.
//!
//! [`app`] builds the router from an [`AppState`], so tests drive the real
//! thing on a real port.

pub mod auth;
pub mod cli;
pub mod config;
pub mod context;
pub mod cursor;
pub mod datatypes;
pub mod demo;
pub mod error;
pub mod exports;
pub mod files;
pub mod guard;
pub mod jobs;
pub mod jwks;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod plan;
pub mod ratelimit;
pub mod routes;
pub mod source;
pub mod startup;
pub mod store;
pub mod webhooks;

use std::ops::Deref;

use futures_util::StreamExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::services::ServeDir;

use crate::error::ApiError;

/// Test-only fault injection on record pages, stream frames and the
/// answers to stored parts of encrypted copies (`HANDOVER_FAULT_PAGES`).
#[derive(Debug, Clone)]
pub struct FaultInjection {
    /// Share of page requests (and of stream frames) that fail, 0.0–1.0.
    pub rate: f64,
    /// Instead of failing, answer the headers and then never finish the body.
    pub stall: bool,
    /// Rolls so far: every fourth one fails with an error status for sure,
    /// so that a short test run always meets some (the rest is random).
    pub rolls: Arc<std::sync::atomic::AtomicU64>,
}

/// One injected fault.
#[derive(Debug)]
pub enum Fault {
    /// An error answer: a 500, or a 429 with `Retry-After: 1`.
    Status(Response),
    /// The connection drops in the middle of the body.
    Drop,
    /// The body never finishes.
    Stall,
}

impl FaultInjection {
    /// Decides whether this request (or stream frame) fails, and how.
    pub fn roll(&self) -> Option<Fault> {
        let n = self
            .rolls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let forced = self.rate > 0.0 && n.is_multiple_of(4);
        if !forced && rand::random::<f64>() >= self.rate {
            return None;
        }
        if self.stall {
            return Some(Fault::Stall);
        }
        // A forced fault is an error answer (500 or 429, in turn).
        let kind = if forced {
            (n / 4 % 2) as u32
        } else {
            rand::random_range(0..3)
        };
        Some(match kind {
            0 => {
                Fault::Status(ApiError::Internal(anyhow::anyhow!("injected fault")).into_response())
            }
            1 => Fault::Status(
                ApiError::RateLimited {
                    limit: 1,
                    window_secs: 1,
                    retry_after: 1,
                }
                .into_response(),
            ),
            _ => Fault::Drop,
        })
    }

    /// A fault for a whole page answer, as its response.
    pub fn roll_page(&self) -> Option<Response> {
        let fault = self.roll()?;
        let prefix: &'static [u8] = b"{\"success\":true,\"data\":{\"rows\":[";
        let body = match fault {
            Fault::Status(r) => return Some(r),
            Fault::Stall => axum::body::Body::from_stream(
                futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
                    axum::body::Bytes::from_static(prefix),
                )])
                .chain(futures_util::stream::pending()),
            ),
            Fault::Drop => axum::body::Body::from_stream(futures_util::stream::iter(vec![
                Ok(axum::body::Bytes::from_static(prefix)),
                Err(std::io::Error::other("injected dropped connection")),
            ])),
        };
        let mut r = Response::new(body);
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        Some(r)
    }
}

/// Settings that are not about auth or storage.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Serve `www/` at `/` and `pkg/` at `/pkg/`.
    pub demo_dirs: Option<(PathBuf, PathBuf)>,
    /// Demo mode: a token for user_456 handed to the demo page at `/demo-config.json`.
    pub demo_token: Option<String>,
    /// Origins allowed to call the API from a browser (`*` for any).
    pub cors_origins: Vec<String>,
    /// Client exports idle this long are failed by the sweeper.
    pub stale_after: time::Duration,
    pub sweep_every: Duration,
    pub fault: Option<FaultInjection>,
    /// Largest estimated export (`FILE_TOO_LARGE` beyond).
    pub max_export_bytes: u64,
    /// Records one user may export per company in 24 hours (`QUOTA_EXCEEDED` beyond).
    pub daily_record_quota: u64,
    /// Tests only: server builds stop here, after writing their files and
    /// before completing, until the test lets them go.
    pub build_gate: Option<Arc<BuildGate>>,
    /// Tests only (`HANDOVER_TEST_HOLD_BUILDS`): server builds write their
    /// files, then hold their claim (with signs of life) instead of
    /// completing, so a test can stop the instance mid-build.
    pub hold_builds: bool,
    /// The first wait before a failed webhook is sent again (doubled each time).
    pub webhook_backoff: Duration,
    /// Failed authentications per client IP and minute before its requests
    /// are answered 429 before authentication (0: never).
    pub unauth_per_minute: u64,
    /// How long a 429 to an address over its failed-authentication limit
    /// is held back (the tarpit; zero: answered at once).
    pub tarpit: Duration,
    /// A request's headers must arrive within this (slow clients).
    pub header_timeout: Duration,
    /// A request's body must arrive within this once it is read.
    pub body_timeout: Duration,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

/// Tests only: holds server builds just before they complete, so a test
/// can make something happen in between (a delete, a sweep).
#[derive(Debug)]
pub struct BuildGate {
    arrivals: tokio::sync::mpsc::UnboundedSender<String>,
    arrived: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
    release: tokio::sync::Semaphore,
}

impl Default for BuildGate {
    fn default() -> Self {
        let (arrivals, arrived) = tokio::sync::mpsc::unbounded_channel();
        Self {
            arrivals,
            arrived: tokio::sync::Mutex::new(arrived),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

impl BuildGate {
    /// Called by a build: announces export `id` and waits to be let go.
    pub async fn reached(&self, id: &str) {
        let _ = self.arrivals.send(id.to_string());
        if let Ok(permit) = self.release.acquire().await {
            permit.forget();
        }
    }

    /// Waits for the next build to reach the gate; returns its export id.
    pub async fn arrival(&self) -> Option<String> {
        self.arrived.lock().await.recv().await
    }

    /// Lets one waiting (or the next) build go on.
    pub fn release(&self) {
        self.release.add_permits(1);
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            demo_dirs: None,
            demo_token: None,
            cors_origins: Vec::new(),
            stale_after: time::Duration::minutes(15),
            sweep_every: Duration::from_secs(30),
            fault: None,
            max_export_bytes: 2 << 30,
            daily_record_quota: 50_000_000,
            build_gate: None,
            hold_builds: false,
            webhook_backoff: Duration::from_secs(5),
            unauth_per_minute: guard::DEFAULT_UNAUTH_PER_MINUTE,
            tarpit: Duration::from_secs(1),
            header_timeout: Duration::from_secs(10),
            body_timeout: routes::BODY_TIMEOUT,
            max_connections: 1024,
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct StateInner {
    /// handover's own database: every query of the export lifecycle,
    /// the audit log, rate limits and tokens.
    pub store: store::Store,
    pub registry: datatypes::Registry,
    /// Where the data types' records are read from.
    pub source: source::Source,
    /// Signs record-page cursors (derived from the master key).
    pub cursor_key: cursor::CursorKey,
    pub auth: auth::AuthConfig,
    pub metrics: metrics::Metrics,
    pub files: files::FileStore,
    pub settings: Settings,
    /// Wakes the export worker.
    pub jobs: tokio::sync::Notify,
    /// Unauthenticated floods: refusals counted per IP, throttling.
    pub guard: guard::Guard,
}

/// Cheaply cloneable handle to [`StateInner`].
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<StateInner>);

impl Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    let mut r = ApiError::Internal(anyhow::anyhow!("panic")).into_response();
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// CORS for browsers on other origins: the headers the module sends, and
/// the ones it must read (rate limits, request id, file name).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-company-id"),
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("upload-offset"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::CONTENT_DISPOSITION,
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("ratelimit-limit"),
                HeaderName::from_static("ratelimit-remaining"),
                HeaderName::from_static("ratelimit-reset"),
                HeaderName::from_static("idempotent-replayed"),
                HeaderName::from_static("x-export-id"),
                HeaderName::from_static("x-content-sha256"),
                HeaderName::from_static("upload-offset"),
                HeaderName::from_static("x-handover-encryption"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// HTTP compression negotiated from `Accept-Encoding` (zstd preferred, then
/// brotli, gzip, deflate) at the fastest level: record pages and streams
/// shrink several times over for little CPU. XLSX is a zip already.
fn compression(
) -> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate as _};
    use tower_http::compression::{CompressionLayer, CompressionLevel};
    CompressionLayer::new()
        .quality(CompressionLevel::Fastest)
        .compress_when(DefaultPredicate::new().and(NotForContentType::const_new(
            "application/vnd.openxmlformats",
        )))
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new()
        .merge(routes::exports::router())
        .merge(routes::copies::router())
        .merge(routes::records::router())
        .merge(routes::privacy::router())
        .merge(routes::summary::router())
        .merge(routes::audit::router())
        .merge(routes::meta::router());
    if let Some((www, pkg)) = &state.settings.demo_dirs {
        let token = state.settings.demo_token.clone();
        router = router
            .route(
                "/demo-config.json",
                axum::routing::get(move || async move {
                    axum::Json(serde_json::json!({ "token": token, "companyId": "company_123", "userId": "user_456" }))
                }),
            )
            .nest_service("/pkg", ServeDir::new(pkg))
            .fallback_service(
                ServeDir::new(www)
                    .fallback(axum::routing::any(not_found).with_state(state.clone())),
            );
    } else {
        router = router.fallback(not_found);
    }
    let cors = cors_layer(&state.settings.cors_origins);
    let router = router
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(routes::MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            context::middleware,
        ))
        .layer(compression())
        .with_state(state.clone());
    // Around the router (a layer of it would run after routing): see
    // `context::throttle`.
    let throttle = axum::middleware::from_fn_with_state(state, context::throttle);
    let router = Router::new().fallback_service(tower::Layer::layer(&throttle, router));
    // Outermost, so preflight requests are answered before routing.
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.layer(axum::middleware::map_response(context::ensure_request_id))
}
