//! The shared test harness: `spawn_app()` starts the real application on
//! port 0 over a fresh database (SQLite in a temporary directory, or, when
//! `HANDOVER_TEST_POSTGRES` names a PostgreSQL server, a fresh database
//! on it), with the demo data loaded; `TestApp` calls it over real HTTP.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use handover::crypto::DataKey;
use handover_server::auth::{self, AuthConfig, JwtConfig};
use handover_server::datatypes::Registry;
use handover_server::files::FileStore;
use handover_server::store::{Engine, Store};
use handover_server::{demo, AppState, BuildGate, Settings, StateInner};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const ISSUER: &str = "https://idp.example";
pub const AUDIENCE: &str = "handover";
/// The master key every test app uses (the CLI tests pass it on).
pub const MASTER_HEX: &str = "0707070707070707070707070707070707070707070707070707070707070707";

#[derive(Default)]
pub struct Opts {
    pub config: Option<String>,
    pub rs256: bool,
    pub records: Option<u64>,
    pub dev_no_auth: bool,
    pub max_export_bytes: Option<u64>,
    pub daily_record_quota: Option<u64>,
    pub build_gate: Option<Arc<BuildGate>>,
    pub stale_after: Option<time::Duration>,
    pub jwt_max_lifetime_secs: Option<u64>,
    pub webhook_backoff: Option<std::time::Duration>,
    pub unauth_per_minute: Option<u64>,
    /// The tarpit for throttled answers (default: none, so tests run fast).
    pub tarpit: Option<std::time::Duration>,
    /// Run as in demo mode (demo tokens work).
    pub demo_mode: bool,
    /// JWTs checked against this JWKS: (URL, cache TTL, least time between fetches).
    pub jwks: Option<(String, std::time::Duration, std::time::Duration)>,
    /// Origins allowed cross-origin (HANDOVER_CORS_ORIGINS).
    pub cors_origins: Vec<String>,
}

/// Where a test's data lives: a temporary directory (export files, the
/// SQLite file) and the database URL. Outlives an app, so a test can
/// restart on the same data.
pub struct TestDb {
    pub dir: TempDir,
    pub url: String,
}

/// The engine the suite runs on.
pub fn engine() -> Engine {
    if postgres_admin().is_some() {
        Engine::Postgres
    } else {
        Engine::Sqlite
    }
}

fn postgres_admin() -> Option<String> {
    std::env::var("HANDOVER_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
}

impl TestDb {
    /// A fresh database on the suite's engine.
    pub async fn new() -> Arc<Self> {
        let dir = TempDir::new().unwrap();
        let url = match postgres_admin() {
            None => format!("sqlite://{}/handover.db", dir.path().display()),
            Some(admin) => {
                use sqlx::Connection as _;
                let name = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
                let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
                sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
                let (base, _) = admin.rsplit_once('/').unwrap();
                format!("{base}/{name}")
            }
        };
        Arc::new(Self { dir, url })
    }
}

/// The built-in data type config for the suite's engine.
pub fn default_config() -> &'static str {
    match engine() {
        Engine::Sqlite => handover_server::datatypes::DEFAULT_CONFIG,
        Engine::Postgres => handover_server::datatypes::DEFAULT_POSTGRES_CONFIG,
    }
}

/// SQL: timestamp column `col` within [a, b] on the suite's engine.
pub fn between(col: &str, a: &str, b: &str) -> String {
    match engine() {
        Engine::Sqlite => format!("julianday({col}) BETWEEN julianday('{a}') AND julianday('{b}')"),
        Engine::Postgres => format!("{col} BETWEEN '{a}'::timestamptz AND '{b}'::timestamptz"),
    }
}

/// The built-in config plus a type `broken` whose rows cannot be written
/// (its `json` column holds text that is not JSON): counting it succeeds,
/// building it fails.
pub fn broken_type_config() -> String {
    let mut parts = default_config().splitn(2, "\n[demo]\n");
    let (types, demo) = (parts.next().unwrap(), parts.next().unwrap());
    format!(
        "{types}\n[[data_type]]\nname = \"broken\"\nsort_key = \"id\"\nquery = \"SELECT id, 'not json' AS payload FROM demo_users WHERE id = :user_id AND company_id = :company_id\"\ncolumns = [{{ name = \"id\", kind = \"string\" }}, {{ name = \"payload\", kind = \"json\" }}]\n\n[demo]\n{demo}"
    )
}

/// The built-in pomodoro config for the suite's engine.
pub fn pomodoro_config() -> String {
    let file = match engine() {
        Engine::Sqlite => "pomodoro.toml",
        Engine::Postgres => "pomodoro.postgres.toml",
    };
    std::fs::read_to_string(format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub db: Arc<TestDb>,
    /// user_456 in company_123 (and company_456) with data:export.
    pub token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn detail_code(&self) -> &str {
        self.body["error"]["details"]["code"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Opts::default(), None).await
}

pub async fn spawn_with(opts: Opts, db: Option<Arc<TestDb>>) -> TestApp {
    let db = match db {
        Some(db) => db,
        None => TestDb::new().await,
    };
    let store = Store::connect(&db.url)
        .await
        .unwrap()
        .with_master_key(&DataKey::from_bytes([7; 32]))
        .with_head_file(db.dir.path().join("audit.head"));
    let registry = match &opts.config {
        Some(text) => Registry::parse(text).unwrap(),
        None => Registry::load_for(None, store.engine()).unwrap(),
    };
    if !demo::has_data(&store, &registry).await {
        demo::load(
            &store,
            &db.url,
            &registry,
            3,
            opts.records.unwrap_or(60),
            42,
        )
        .await
        .unwrap();
    }
    let mut jwt = if let Some((url, ttl, interval)) = &opts.jwks {
        JwtConfig::jwks(
            handover_server::jwks::JwksCache::new(url, *ttl)
                .unwrap()
                .with_min_interval(*interval),
            Some(ISSUER),
            Some(AUDIENCE),
        )
    } else if opts.rs256 {
        JwtConfig::rs256(
            include_bytes!("../fixtures/jwt-test-public.pem"),
            Some(ISSUER),
            Some(AUDIENCE),
        )
        .unwrap()
    } else {
        JwtConfig::hs256(JWT_SECRET.as_bytes(), Some(ISSUER), Some(AUDIENCE))
    };
    jwt.max_lifetime_secs = opts.jwt_max_lifetime_secs;
    let master = DataKey::from_bytes([7; 32]);
    let source = handover_server::source::Source::open(&db.url, &registry).unwrap();
    let storage = handover_server::config::file_storage(None, store.engine()).unwrap();
    let files = FileStore::new(
        db.dir.path().join("exports"),
        master.clone(),
        storage,
        store.clone(),
    )
    .unwrap();
    let defaults = Settings::default();
    let state = AppState(Arc::new(StateInner {
        store: store.clone(),
        registry,
        source,
        cursor_key: handover_server::cursor::CursorKey::derive(&master),
        auth: AuthConfig {
            jwt: Some(jwt),
            dev_no_auth: opts.dev_no_auth,
        },
        metrics: Default::default(),
        files,
        settings: Settings {
            max_export_bytes: opts.max_export_bytes.unwrap_or(defaults.max_export_bytes),
            daily_record_quota: opts
                .daily_record_quota
                .unwrap_or(defaults.daily_record_quota),
            build_gate: opts.build_gate.clone(),
            stale_after: opts.stale_after.unwrap_or(defaults.stale_after),
            webhook_backoff: opts.webhook_backoff.unwrap_or(defaults.webhook_backoff),
            unauth_per_minute: opts.unauth_per_minute.unwrap_or(defaults.unauth_per_minute),
            tarpit: opts.tarpit.unwrap_or_default(),
            demo_token: opts.demo_mode.then(|| "demo".to_string()),
            cors_origins: opts.cors_origins.clone(),
            ..Settings::default()
        },
        jobs: Default::default(),
        guard: Default::default(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app =
        handover_server::app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let (_, token) = auth::create_token(
        &store,
        "user_456",
        &["company_123".into(), "company_456".into()],
        &["data:export".into()],
        "tests",
    )
    .await
    .unwrap();
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        state,
        db,
        token,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub async fn stop(mut self) -> Arc<TestDb> {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap();
        self.state.store.close().await;
        self.db.clone()
    }

    /// The raw database (for what a test arranges or checks behind the API).
    pub fn pool(&self) -> &sqlx::AnyPool {
        self.state.store.pool()
    }

    pub async fn token_for(&self, user: &str, companies: &[&str], perms: &[&str]) -> String {
        let companies: Vec<String> = companies.iter().map(|s| s.to_string()).collect();
        let perms: Vec<String> = perms.iter().map(|s| s.to_string()).collect();
        auth::create_token(&self.state.store, user, &companies, &perms, "tests")
            .await
            .unwrap()
            .1
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        company: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        let mut r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("user-agent", "handover-tests/1.0");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(c) = company {
            r = r.header("x-company-id", c);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap().to_vec();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            bytes,
        }
    }

    /// As user_456 in company_123.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let b = body.map(|v| v.to_string());
        self.raw(
            method,
            path,
            Some(&self.token),
            Some("company_123"),
            b.as_deref(),
        )
        .await
    }

    pub async fn create(&self, body: Value) -> Reply {
        self.call(Method::POST, "/api/data/export", Some(body))
            .await
    }

    pub async fn create_id(&self, body: Value) -> String {
        let r = self.create(body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["data"]["request_id"].as_str().unwrap().to_string()
    }

    /// A count query (placeholders `$1`…, which both engines take).
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    /// The stored (encrypted) bytes of every export file: files in the
    /// export directory, or chunks in the database.
    pub async fn stored_files(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.db.dir.path().join("exports")) {
            for f in dir {
                out.push(std::fs::read(f.unwrap().path()).unwrap());
            }
        }
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT file, data FROM export_file_chunks ORDER BY request_id, file, seq",
        )
        .fetch_all(self.pool())
        .await
        .unwrap();
        let mut current: Option<String> = None;
        for (file, data) in rows {
            if current.as_deref() == Some(&file) {
                out.last_mut().unwrap().extend(data);
            } else {
                current = Some(file);
                out.push(data);
            }
        }
        out
    }

    /// A statement without parameters (e.g. DDL).
    pub async fn exec_plain(&self, sql: &str) {
        sqlx::query(sql).execute(self.pool()).await.unwrap();
    }

    /// Runs a statement with one text parameter.
    pub async fn exec(&self, sql: &str, param: &str) {
        sqlx::query(sql)
            .bind(param)
            .execute(self.pool())
            .await
            .unwrap();
    }
}

pub fn frame_records(frame: &Value) -> Vec<Value> {
    let names: Vec<&str> = frame["columns"]
        .as_array()
        .expect("a page lists its columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    frame["rows"]
        .as_array()
        .expect("a frame has rows")
        .iter()
        .map(|row| {
            let row = row.as_array().unwrap();
            assert_eq!(row.len(), names.len(), "one value per column");
            let mut rec = serde_json::Map::new();
            for (name, v) in names.iter().zip(row) {
                match name.split_once('.') {
                    None => {
                        rec.insert(name.to_string(), v.clone());
                    }
                    Some((top, sub)) => {
                        rec.entry(top.to_string())
                            .or_insert_with(|| json!({}))
                            .as_object_mut()
                            .unwrap()
                            .insert(sub.to_string(), v.clone());
                    }
                }
            }
            Value::Object(rec)
        })
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pages through every type of a client export; returns records per type.
pub async fn fetch_all(
    app: &TestApp,
    id: &str,
    types: &[&str],
    limit: u32,
) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for t in types {
        let mut cursor = String::new();
        let mut records = Vec::new();
        for _ in 0..10_000 {
            let r = app
                .call(
                    Method::GET,
                    &format!("/api/data/export/{id}/records/{t}?limit={limit}&cursor={cursor}"),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            records.extend(frame_records(&r.body["data"]));
            match r.body["data"]["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
        out.push((t.to_string(), records));
    }
    out
}

// ------------------------------------------------------------ success paths

/// `s` as a query parameter value (cursors carry `+`, `/` and `=`).
pub fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `handover-server audit verify` on `db`, with the master key, against
/// the head file the server keeps in its data directory (`db`'s).
pub async fn verify_in_data_dir(db: &TestDb) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_DIR", db.dir.path())
        .env_remove("HANDOVER_AUDIT_HEAD_FILE")
        .output()
        .await
        .unwrap()
}
