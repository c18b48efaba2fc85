//! handover-server over real HTTP on a real port, each test with a fresh
//! SQLite database and demo data (zero-to-production's `spawn_app`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use handover::crypto::DataKey;
use handover_server::auth::{self, AuthConfig, JwtConfig};
use handover_server::datatypes::Registry;
use handover_server::{audit, db, demo, files, jobs, AppState, Settings, StateInner};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tempfile::TempDir;

const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "handover";

#[derive(Default)]
struct Opts {
    config: Option<String>,
    rs256: bool,
    records: Option<u64>,
    dev_no_auth: bool,
    max_export_bytes: Option<u64>,
    daily_record_quota: Option<u64>,
}

struct TestApp {
    base: String,
    client: reqwest::Client,
    state: AppState,
    dir: Arc<TempDir>,
    /// user_456 in company_123 (and company_456) with data:export.
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    bytes: Vec<u8>,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn detail_code(&self) -> &str {
        self.body["error"]["details"]["code"].as_str().unwrap_or("")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn spawn_app() -> TestApp {
    spawn_with(Opts::default(), None).await
}

async fn spawn_with(opts: Opts, dir: Option<Arc<TempDir>>) -> TestApp {
    let dir = dir.unwrap_or_else(|| Arc::new(TempDir::new().unwrap()));
    let url = format!("sqlite://{}/handover.db", dir.path().display());
    let pool = db::connect(&url).await.unwrap();
    let registry = match &opts.config {
        Some(text) => Registry::parse(text).unwrap(),
        None => Registry::load(None).unwrap(),
    };
    if !demo::has_data(&pool, &registry).await {
        demo::load(&pool, &registry, 3, opts.records.unwrap_or(60), 42)
            .await
            .unwrap();
    }
    let jwt = if opts.rs256 {
        JwtConfig::rs256(
            include_bytes!("fixtures/jwt-test-public.pem"),
            Some(ISSUER),
            Some(AUDIENCE),
        )
        .unwrap()
    } else {
        JwtConfig::hs256(JWT_SECRET.as_bytes(), Some(ISSUER), Some(AUDIENCE))
    };
    let master = DataKey::from_bytes([7; 32]);
    let source = handover_server::source::Source::open(&url, &registry).unwrap();
    let state = AppState(Arc::new(StateInner {
        db: pool.clone(),
        registry,
        source,
        cursor_key: handover_server::cursor::CursorKey::derive(&master),
        auth: AuthConfig {
            jwt: Some(jwt),
            dev_no_auth: opts.dev_no_auth,
        },
        audit: audit::AuditLog::default(),
        metrics: Default::default(),
        files: files::FileStore::new(dir.path().join("exports"), master).unwrap(),
        settings: Settings {
            max_export_bytes: opts
                .max_export_bytes
                .unwrap_or(Settings::default().max_export_bytes),
            daily_record_quota: opts
                .daily_record_quota
                .unwrap_or(Settings::default().daily_record_quota),
            ..Settings::default()
        },
        jobs: Default::default(),
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
        &pool,
        "user_456",
        &["company_123".into(), "company_456".into()],
        &["data:export".into()],
    )
    .await
    .unwrap();
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        state,
        dir,
        token,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    async fn stop(mut self) -> Arc<TempDir> {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap();
        self.state.db.close().await;
        self.dir.clone()
    }

    async fn token_for(&self, user: &str, companies: &[&str], perms: &[&str]) -> String {
        let companies: Vec<String> = companies.iter().map(|s| s.to_string()).collect();
        let perms: Vec<String> = perms.iter().map(|s| s.to_string()).collect();
        auth::create_token(&self.state.db, user, &companies, &perms)
            .await
            .unwrap()
            .1
    }

    async fn raw(
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
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
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

    async fn create(&self, body: Value) -> Reply {
        self.call(Method::POST, "/api/data/export", Some(body))
            .await
    }

    async fn create_id(&self, body: Value) -> String {
        let r = self.create(body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["data"]["request_id"].as_str().unwrap().to_string()
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.state.db)
            .await
            .unwrap()
    }
}

/// The records of a frame (a page's `data`) as JSON objects: each row's
/// values under their column names, dotted names as nested objects.
fn frame_records(frame: &Value) -> Vec<Value> {
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

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pages through every type of a client export; returns records per type.
async fn fetch_all(
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

#[tokio::test]
async fn create_answers_with_the_seeds_fields_and_envelope() {
    let app = spawn_app().await;
    let r = app
        .create(json!({
            "export_format": "json",
            "data_types": ["user_profile", "payment_history", "membership_data"],
            "date_range_start": "2024-01-01T00:00:00Z",
            "date_range_end": "2025-10-25T19:50:00Z",
            "metadata": { "purpose": "gdpr_request", "contact_email": "user@example.com" }
        }))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["success"], true);
    let d = &r.body["data"];
    assert!(d["request_id"].as_str().unwrap().starts_with("export_"));
    assert_eq!(d["status"], "pending");
    assert_eq!(d["export_format"], "json");
    assert_eq!(
        d["data_types"],
        json!(["user_profile", "payment_history", "membership_data"])
    );
    assert_eq!(
        d["date_range"],
        json!({"start": "2024-01-01T00:00:00.000Z", "end": "2025-10-25T19:50:00.000Z"})
    );
    assert_eq!(
        d["metadata"],
        json!({ "purpose": "gdpr_request", "contact_email": "user@example.com" })
    );
    let in_range: i64 = app
        .count(
            "SELECT (SELECT COUNT(*) FROM demo_users WHERE id='user_456' AND company_id='company_123') \
             + (SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123' \
                AND julianday(created_at) BETWEEN julianday('2024-01-01T00:00:00Z') AND julianday('2025-10-25T19:50:00Z')) \
             + (SELECT COUNT(*) FROM demo_memberships WHERE user_id='user_456' AND company_id='company_123' \
                AND julianday(started_at) BETWEEN julianday('2024-01-01T00:00:00Z') AND julianday('2025-10-25T19:50:00Z'))",
        )
        .await;
    assert_eq!(d["estimated_records"], in_range);
    assert!(d["estimated_size_mb"].as_f64().unwrap() > 0.0);
    let created = handover::model::parse_timestamp(d["created_at"].as_str().unwrap()).unwrap();
    let expires = handover::model::parse_timestamp(d["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, time::Duration::days(30));
    let meta = &r.body["meta"];
    assert!(meta["requestId"].as_str().unwrap().starts_with("req_"));
    assert_eq!(meta["requestId"], r.header("x-request-id"));
    assert_eq!(meta["version"], "1.0.0");
    assert!(meta["processingTimeMs"].is_u64());
    assert!(handover::model::parse_timestamp(meta["timestamp"].as_str().unwrap()).is_some());
    assert!(
        d.get("manifest").is_none(),
        "server delivery has no manifest"
    );
}

#[tokio::test]
async fn server_export_is_built_encrypted_and_downloadable() {
    let app = spawn_app().await;
    let id = app
        .create_id(
            json!({"export_format": "xlsx", "data_types": ["payment_history", "consent_data"]}),
        )
        .await;
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "EXPORT_NOT_READY"),
        "{}",
        r.body
    );
    assert_eq!(r.body["error"]["category"], "validation");
    assert_eq!(r.body["error"]["severity"], "medium");

    jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed", "{}", d.body);
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(d.body["data"]["record_count"], payments + 1);
    assert_eq!(d.body["data"]["progress"]["percentage"], 100);

    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        format!("attachment; filename=\"{id}.xlsx\"")
    );
    assert_eq!(
        r.header("content-type"),
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    assert_eq!(
        sha256_hex(&r.bytes),
        d.body["data"]["sha256"].as_str().unwrap(),
        "checksum recorded = checksum served"
    );
    assert_eq!(
        r.bytes.len() as u64,
        d.body["data"]["byte_size"].as_u64().unwrap()
    );
    use calamine::Reader;
    let mut wb: calamine::Xlsx<_> =
        calamine::open_workbook_from_rs(std::io::Cursor::new(r.bytes.clone())).unwrap();
    assert_eq!(
        wb.sheet_names(),
        ["Summary", "payment_history", "consent_data"]
    );
    assert_eq!(
        wb.worksheet_range("payment_history").unwrap().height() as i64,
        payments + 1
    );

    // At rest the files are ciphertext.
    let mut plain_found = false;
    for f in std::fs::read_dir(app.dir.path().join("exports")).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(bytes.starts_with(b"HOV1"));
        plain_found |= bytes.windows(11).any(|w| w == b"payment_123");
    }
    assert!(!plain_found, "no plaintext record in the stored files");

    // The same export as JSON and CSV.
    let j = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=json"),
            None,
        )
        .await;
    assert_eq!(j.status, 200);
    assert_eq!(j.body["export"]["request_id"], id.as_str());
    assert_eq!(
        j.body["export"]["data"]["payment_history"]
            .as_array()
            .unwrap()
            .len() as i64,
        payments
    );
    assert!(
        j.body["metadata"]["article_15"]["purposes"].is_string(),
        "Art. 15 information is stated"
    );
    let c = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=csv"),
            None,
        )
        .await;
    assert_eq!(c.status, 200);
    assert_eq!(
        c.header("content-disposition"),
        format!("attachment; filename=\"{id}.csv\"")
    );
    let text = String::from_utf8(c.bytes).unwrap();
    assert!(text.starts_with("data_type,id,user_id,"));
    assert_eq!(text.lines().count() as i64, 1 + payments + 1);
    let bad = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=pdf"),
            None,
        )
        .await;
    assert_eq!(
        (bad.status.as_u16(), bad.detail_code()),
        (422, "INVALID_FORMAT")
    );

    let events: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE resource = ? AND outcome = 'event' ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(&app.state.db)
    .await
    .unwrap();
    assert_eq!(
        events[..3],
        ["export.created", "export.started", "export.completed"]
    );
    assert!(events.iter().filter(|e| *e == "export.downloaded").count() >= 3);
}

#[tokio::test]
async fn client_export_pages_complete_and_progress() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"export_format": "csv", "data_types": ["payment_history", "membership_data"], "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201);
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let m = &r.body["data"]["manifest"];
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(m["payment_history"]["records"], payments);
    assert_eq!(
        m["payment_history"]["columns"][3],
        json!({"name": "amount_cents", "kind": "integer"})
    );
    assert_eq!(
        m["payment_history"]["records_url"],
        format!("/api/data/export/{id}/records/payment_history")
    );

    // One page in: details show real progress.
    let p = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/payment_history?limit=10"),
            None,
        )
        .await;
    assert_eq!(p.body["data"]["rows"].as_array().unwrap().len(), 10);
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "processing");
    assert_eq!(d.body["data"]["progress"]["records_processed"], 10);
    assert_eq!(
        d.body["data"]["progress"]["current_type"],
        "payment_history"
    );
    assert!(d.body["data"]["started_at"].is_string());
    // Retrying that page is not counted twice.
    app.call(
        Method::GET,
        &format!("/api/data/export/{id}/records/payment_history?limit=10"),
        None,
    )
    .await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["progress"]["records_processed"], 10);

    let early = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": 10, "byte_size": 5, "sha256": "a".repeat(64)})),
        )
        .await;
    assert_eq!(
        (early.status.as_u16(), early.detail_code()),
        (422, "EXPORT_INCOMPLETE")
    );

    let all = fetch_all(&app, &id, &["payment_history", "membership_data"], 7).await;
    let ids: Vec<&str> = all[0].1.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "stable keyset order, no duplicates");
    assert_eq!(ids.len() as i64, payments);
    assert!(
        all[1].1.iter().all(|m| m["recovery_cases"].is_array()),
        "nested arrays arrive as JSON"
    );
    let total = (all[0].1.len() + all[1].1.len()) as u64;

    let wrong = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total + 1, "byte_size": 100, "sha256": "b".repeat(64)})),
        )
        .await;
    assert_eq!(
        (wrong.status.as_u16(), wrong.detail_code()),
        (422, "RECORD_COUNT_MISMATCH")
    );
    let bad_sum = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total, "byte_size": 100, "sha256": "xyz"})),
        )
        .await;
    assert_eq!(bad_sum.detail_code(), "INVALID_CHECKSUM");
    let sha = "c".repeat(64);
    let ok = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total, "byte_size": 4242, "sha256": sha})),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["data"]["status"], "completed");
    assert_eq!(ok.body["data"]["sha256"], sha.as_str());
    assert_eq!(ok.body["data"]["progress"]["percentage"], 100);
    let after = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/payment_history"),
            None,
        )
        .await;
    assert_eq!(
        (after.status.as_u16(), after.code()),
        (409, "EXPORT_NOT_OPEN")
    );
    let dl = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(
        dl.code(),
        "EXPORT_NOT_READY",
        "the browser built it; the server keeps no copy"
    );
    let details: String = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE resource = ? AND action = 'export.completed'",
    )
    .bind(&id)
    .fetch_one(&app.state.db)
    .await
    .unwrap();
    let details: Value = serde_json::from_str(&details).unwrap();
    assert_eq!(details["sha256"], sha.as_str());
    assert_eq!(details["record_count"], total);
}

#[tokio::test]
async fn pages_apply_the_date_range_and_validate_their_parameters() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client",
                       "date_range_start": "2024-01-02T00:00:00Z", "date_range_end": "2024-01-03T00:00:00+00:00"}))
        .await;
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let all = fetch_all(&app, &id, &["payment_history"], 5000).await;
    assert_eq!(
        all[0].1.len() as u64,
        r.body["data"]["manifest"]["payment_history"]["records"]
            .as_u64()
            .unwrap()
    );
    for rec in &all[0].1 {
        let t = rec["created_at"].as_str().unwrap();
        assert!(
            ("2024-01-02".."2024-01-03T00:00:00.001").contains(&t),
            "{t}"
        );
    }
    for (q, code) in [
        ("limit=0", "INVALID_LIMIT"),
        ("limit=5001", "INVALID_LIMIT"),
        ("limit=x", "INVALID_LIMIT"),
        ("cursor=%%%", "INVALID_CURSOR"),
        ("cursor=bm9wZQ", "INVALID_CURSOR"),
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("/api/data/export/{id}/records/payment_history?{q}"),
                None,
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.detail_code()),
            (422, code),
            "{q}: {}",
            r.body
        );
    }
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/user_profile"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "INVALID_DATA_TYPE"),
        "only the request's types"
    );
}

#[tokio::test]
async fn list_pages_filters_and_validates() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for f in ["json", "csv", "xlsx"] {
        ids.push(
            app.create_id(json!({"export_format": f, "data_types": ["user_profile"]}))
                .await,
        );
    }
    jobs::drain(&app.state).await.unwrap();
    ids.push(
        app.create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await,
    );
    let r = app
        .call(Method::GET, "/api/data/export?limit=2&offset=0", None)
        .await;
    assert_eq!(r.status, 200);
    let d = &r.body["data"];
    assert_eq!(
        (
            d["total"].as_u64(),
            d["page"].as_u64(),
            d["limit"].as_u64(),
            d["hasMore"].as_bool()
        ),
        (Some(4), Some(1), Some(2), Some(true))
    );
    assert_eq!(
        d["requests"][0]["request_id"],
        ids[3].as_str(),
        "newest first"
    );
    let r = app
        .call(Method::GET, "/api/data/export?limit=2&offset=2", None)
        .await;
    assert_eq!(
        (
            r.body["data"]["page"].as_u64(),
            r.body["data"]["hasMore"].as_bool()
        ),
        (Some(2), Some(false))
    );
    let r = app
        .call(Method::GET, "/api/data/export?status=completed", None)
        .await;
    let reqs = r.body["data"]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 3);
    let item = &reqs[0];
    for field in [
        "request_id",
        "status",
        "export_format",
        "data_types",
        "created_at",
        "completed_at",
        "expires_at",
        "download_url",
        "file_size_mb",
        "record_count",
        "metadata",
    ] {
        assert!(item.get(field).is_some(), "list item has {field}");
    }
    assert_eq!(
        item["download_url"],
        format!(
            "/api/data/export/{}/download",
            item["request_id"].as_str().unwrap()
        )
    );
    assert_eq!(r.body["data"]["limit"], 50, "default limit");
    for (q, code) in [
        ("limit=0", "INVALID_LIMIT"),
        ("limit=101", "INVALID_LIMIT"),
        ("limit=ten", "INVALID_LIMIT"),
        ("offset=-1", "INVALID_OFFSET"),
        ("status=done", "INVALID_STATUS"),
    ] {
        let r = app
            .call(Method::GET, &format!("/api/data/export?{q}"), None)
            .await;
        assert_eq!((r.status.as_u16(), r.detail_code()), (422, code), "{q}");
        assert_eq!(r.code(), "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn delete_destroys_the_export_and_its_files() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["payment_history"]}))
        .await;
    jobs::drain(&app.state).await.unwrap();
    assert_eq!(
        std::fs::read_dir(app.dir.path().join("exports"))
            .unwrap()
            .count(),
        2,
        "csv + the frames for conversions"
    );
    let r = app
        .call(Method::DELETE, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["request_id"], id.as_str());
    assert_eq!(r.body["data"]["deleted"], true);
    assert!(
        handover::model::parse_timestamp(r.body["data"]["deleted_at"].as_str().unwrap()).is_some()
    );
    assert_eq!(
        std::fs::read_dir(app.dir.path().join("exports"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "data keys destroyed"
    );
    for m in [Method::GET, Method::DELETE] {
        let r = app.call(m, &format!("/api/data/export/{id}"), None).await;
        assert_eq!((r.status.as_u16(), r.code()), (404, "EXPORT_NOT_FOUND"));
    }
}

#[tokio::test]
async fn fail_marks_an_open_client_export_failed() {
    let app = spawn_app().await;
    let id = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": ""})),
        )
        .await;
    assert_eq!(r.detail_code(), "INVALID_REASON");
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": "cancelled"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["status"], "failed");
    assert_eq!(r.body["data"]["failure_reason"], "cancelled");
    let again = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (409, "EXPORT_NOT_OPEN")
    );
}

#[tokio::test]
async fn summary_counts_the_callers_records() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/api/data/summary", None).await;
    assert_eq!(r.status, 200);
    let types = r.body["data"]["data_types"].as_array().unwrap();
    let names: Vec<&str> = types
        .iter()
        .map(|t| t["data_type"].as_str().unwrap())
        .collect();
    assert_eq!(names, handover::model::STANDARD_DATA_TYPES);
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(types[1]["records"], payments);
    assert_eq!(
        types[1]["description"],
        "All payment transactions and attempts"
    );
    assert_eq!(types[0]["records"], 1);
}

#[tokio::test]
async fn health_metrics_and_openapi_match_the_server() {
    let app = spawn_app().await;
    let h = app.raw(Method::GET, "/healthz", None, None, None).await;
    assert_eq!(
        (h.status.as_u16(), h.body["status"].as_str()),
        (200, Some("ok"))
    );
    assert!(!h.header("x-request-id").is_empty());
    app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    jobs::drain(&app.state).await.unwrap();
    let m = app.raw(Method::GET, "/metrics", None, None, None).await;
    let text = String::from_utf8(m.bytes).unwrap();
    assert!(text.contains("handover_exports_created_total 1"), "{text}");
    assert!(text.contains("handover_exports_completed_total 1"));
    assert!(text.contains("handover_http_requests_total{class=\"2xx\"}"));

    let doc = app
        .raw(Method::GET, "/api/openapi.json", None, None, None)
        .await;
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc.body["paths"].as_object().unwrap();
    let mut documented = HashSet::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: HashSet<String> = [
        "POST /api/data/export",
        "GET /api/data/export",
        "GET /api/data/export/{id}",
        "DELETE /api/data/export/{id}",
        "GET /api/data/export/{id}/download",
        "POST /api/data/export/{id}/complete",
        "POST /api/data/export/{id}/fail",
        "GET /api/data/export/{id}/records/{data_type}",
        "GET /api/data/export/{id}/records/{data_type}/stream",
        "GET /api/data/summary",
        "GET /api/audit",
        "GET /healthz",
        "GET /metrics",
        "GET /api/openapi.json",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);
    // Every documented operation is really served (not the 404/405 fallbacks).
    for op in &documented {
        let (method, path) = op.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "export_0")
            .replace("{data_type}", "user_profile");
        let r = app
            .raw(method.parse().unwrap(), &path, None, None, Some("{}"))
            .await;
        assert!(
            !["NOT_FOUND", "METHOD_NOT_ALLOWED"].contains(&r.code()),
            "{op} is documented but not routed"
        );
    }
}

// ------------------------------------------------------------ errors

#[tokio::test]
async fn every_documented_error_code_is_reachable() {
    let app = spawn_app().await;
    let t = app.token.clone();
    let post = |body: &'static str| {
        app.raw(
            Method::POST,
            "/api/data/export",
            Some(&t),
            Some("company_123"),
            Some(body),
        )
    };
    for body in ["{bad json", "", "[1,2]", "\"text\""] {
        let r = post(body).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (400, "INVALID_REQUEST"),
            "{body:?}"
        );
        assert_eq!(r.body["success"], false);
        assert_eq!(r.body["error"]["category"], "validation");
        assert!(r.body["error"]["severity"].is_string());
        assert!(r.body["error"]["error"].is_string());
    }
    let cases = [
        (
            json!({"data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": "pdf", "data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": 5, "data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": "json"}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": []}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": "user_profile"}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile", "secrets"]}),
            "INVALID_DATA_TYPE",
            "data_types[1]",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile", "user_profile"]}),
            "INVALID_DATA_TYPE",
            "data_types[1]",
        ),
        (
            json!({"export_format": "json", "data_types": [3]}),
            "INVALID_DATA_TYPE",
            "data_types[0]",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_start": "yesterday"}),
            "DATE_RANGE_INVALID",
            "date_range_start",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_end": 20250101}),
            "DATE_RANGE_INVALID",
            "date_range_end",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_start": "2025-02-01T00:00:00Z", "date_range_end": "2025-01-01T00:00:00Z"}),
            "DATE_RANGE_INVALID",
            "date_range_start",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "metadata": "x"}),
            "INVALID_METADATA",
            "metadata",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "metadata": {"a": "x".repeat(5000)}}),
            "INVALID_METADATA",
            "metadata",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "pigeon"}),
            "INVALID_DELIVERY",
            "delivery",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "colour": "red"}),
            "UNKNOWN_FIELD",
            "colour",
        ),
    ];
    for (body, code, field) in cases {
        let r = app.create(body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert_eq!(r.code(), "VALIDATION_ERROR");
        assert_eq!(
            (r.detail_code(), r.body["error"]["field"].as_str().unwrap()),
            (code, field),
            "{body}"
        );
    }
    // Auth and scope.
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            None,
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (401, "UNAUTHORIZED"));
    assert!(r.header("www-authenticate").starts_with("Bearer"));
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some("hov_nope_nope"),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some("not.a.jwt"),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let auditor = app
        .token_for("user_456", &["company_123"], &["audit:read"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some(&auditor),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "INSUFFICIENT_PERMISSIONS")
    );
    let r = app
        .raw(Method::GET, "/api/data/export", Some(&t), None, None)
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "MISSING_COMPANY_ID"));
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some(&t),
            Some("company_789"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "COMPANY_ACCESS_DENIED")
    );
    // Not found, routes, methods, sizes.
    for path in [
        "/api/data/export/export_ffffffffffffffffffffffff",
        "/api/data/export/../../etc",
        "/api/data/export/%00",
        "/api/data/export/DROP%20TABLE",
    ] {
        let r = app.call(Method::GET, path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(
            ["EXPORT_NOT_FOUND", "NOT_FOUND"].contains(&r.code()),
            "{path}: {}",
            r.body
        );
    }
    let r = app.call(Method::GET, "/api/nothing/here", None).await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "NOT_FOUND"));
    let r = app.call(Method::PUT, "/api/data/export", None).await;
    assert_eq!((r.status.as_u16(), r.code()), (405, "METHOD_NOT_ALLOWED"));
    let big = format!("{{\"export_format\":\"json\",\"data_types\":[\"user_profile\"],\"metadata\":{{\"a\":\"{}\"}}}}", "x".repeat(100_000));
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&t),
            Some("company_123"),
            Some(&big),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (413, "PAYLOAD_TOO_LARGE"));
    // Rate limit.
    for _ in 0..5 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (429, "RATE_LIMIT_EXCEEDED"));
    assert_eq!(r.body["error"]["category"], "rate_limit");
}

#[tokio::test]
async fn creation_failed_when_the_operators_query_breaks() {
    let config = handover_server::datatypes::DEFAULT_CONFIG
        .replace("FROM demo_payments WHERE", "FROM no_such_table WHERE");
    let app = spawn_with(
        Opts {
            config: Some(config),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (500, "CREATION_FAILED"));
    assert_eq!(
        r.body["error"]["error"], "failed to create export",
        "internal text is not sent"
    );
    assert!(!r.body.to_string().contains("no_such_table"));
}

#[tokio::test]
async fn a_failing_server_build_is_retried_once_then_failed() {
    let config = format!(
        "{}\n[[data_type]]\nname = \"broken\"\nsort_key = \"id\"\nquery = \"SELECT id, 'not json' AS payload FROM demo_users WHERE id = :user_id AND company_id = :company_id\"\ncolumns = [{{ name = \"id\", kind = \"string\" }}, {{ name = \"payload\", kind = \"json\" }}]\n",
        handover_server::datatypes::DEFAULT_CONFIG.split("\n[demo]\n").next().unwrap()
    ) + "\n[demo]\n" + handover_server::datatypes::DEFAULT_CONFIG.split("\n[demo]\n").nth(1).unwrap();
    let app = spawn_with(
        Opts {
            config: Some(config),
            ..Opts::default()
        },
        None,
    )
    .await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile", "broken"]}))
        .await;
    jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "failed", "{}", d.body);
    let attempts: i64 = sqlx::query_scalar("SELECT attempts FROM export_requests WHERE id = ?")
        .bind(&id)
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(attempts, 2, "retried once");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "no partial file left"
    );
}

// ------------------------------------------------------------ isolation

#[tokio::test]
async fn isolation_matrix_two_users_two_companies() {
    let app = spawn_app().await;
    // user_456 in company_123 and company_456; user_0003 is in company_123; user_0001 in company_456.
    let a123 = app.token.clone();
    let b123 = app
        .token_for("user_0003", &["company_123"], &["data:export"])
        .await;
    let c456 = app
        .token_for("user_0001", &["company_456"], &["data:export"])
        .await;
    let parties = [
        (&a123, "company_123"),
        (&a123, "company_456"),
        (&b123, "company_123"),
        (&c456, "company_456"),
    ];
    let mut ids = Vec::new();
    for (tok, company) in parties {
        let body = json!({"export_format": "json", "data_types": ["user_profile", "payment_history"], "delivery": "client"}).to_string();
        let r = app
            .raw(
                Method::POST,
                "/api/data/export",
                Some(tok),
                Some(company),
                Some(&body),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["data"]["request_id"].as_str().unwrap().to_string());
    }
    let server_id = {
        let body = json!({"export_format": "json", "data_types": ["user_profile"]}).to_string();
        let r = app
            .raw(
                Method::POST,
                "/api/data/export",
                Some(&b123),
                Some("company_123"),
                Some(&body),
            )
            .await;
        r.body["data"]["request_id"].as_str().unwrap().to_string()
    };
    jobs::drain(&app.state).await.unwrap();
    for (i, (tok, company)) in parties.iter().enumerate() {
        for (j, other) in ids
            .iter()
            .enumerate()
            .chain(std::iter::once((99, &server_id)))
        {
            let own = i == j || (j == 99 && i == 2);
            for (method, path, body) in [
                (Method::GET, format!("/api/data/export/{other}"), None),
                (
                    Method::GET,
                    format!("/api/data/export/{other}/download"),
                    None,
                ),
                (
                    Method::GET,
                    format!("/api/data/export/{other}/records/user_profile"),
                    None,
                ),
                (
                    Method::POST,
                    format!("/api/data/export/{other}/complete"),
                    Some(
                        r#"{"record_count":0,"byte_size":1,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
                    ),
                ),
                (
                    Method::POST,
                    format!("/api/data/export/{other}/fail"),
                    Some(r#"{"reason":"x"}"#),
                ),
                (Method::DELETE, format!("/api/data/export/{other}"), None),
            ] {
                if own {
                    continue;
                }
                let r = app
                    .raw(method.clone(), &path, Some(tok), Some(company), body)
                    .await;
                assert_eq!(
                    (r.status.as_u16(), r.code()),
                    (404, "EXPORT_NOT_FOUND"),
                    "party {i} {method} {path}"
                );
            }
        }
        // A company outside the token: 403.
        let foreign = if *company == "company_123" && **tok != a123 {
            "company_456"
        } else {
            "company_789"
        };
        let r = app
            .raw(
                Method::GET,
                &format!("/api/data/export/{}", ids[i]),
                Some(tok),
                Some(foreign),
                None,
            )
            .await;
        assert_eq!(r.status, 403, "party {i} in {foreign}");
        // Lists show only one's own.
        let r = app
            .raw(
                Method::GET,
                "/api/data/export",
                Some(tok),
                Some(company),
                None,
            )
            .await;
        let listed: Vec<&str> = r.body["data"]["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["request_id"].as_str().unwrap())
            .collect();
        assert!(listed.contains(&ids[i].as_str()));
        assert!(
            listed
                .iter()
                .all(|x| *x == ids[i] || (i == 2 && *x == server_id)),
            "party {i} lists {listed:?}"
        );
    }
    // Pages never carry another party's records.
    let users = ["user_456", "user_456", "user_0003", "user_0001"];
    for (i, (tok, company)) in parties.iter().enumerate() {
        let mut cursor = String::new();
        for _ in 0..1000 {
            let path = format!(
                "/api/data/export/{}/records/payment_history?limit=13&cursor={cursor}",
                ids[i]
            );
            let r = app
                .raw(Method::GET, &path, Some(tok), Some(company), None)
                .await;
            for rec in &frame_records(&r.body["data"]) {
                assert_eq!(rec["user_id"], users[i]);
                let pid = rec["id"].as_str().unwrap();
                let owner: (String, String) =
                    sqlx::query_as("SELECT user_id, company_id FROM demo_payments WHERE id = ?")
                        .bind(pid)
                        .fetch_one(&app.state.db)
                        .await
                        .unwrap();
                assert_eq!(owner, (users[i].to_string(), company.to_string()));
            }
            match r.body["data"]["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
    }
}

// ------------------------------------------------------------ rate limits

#[tokio::test]
async fn rate_limits_hold_at_their_boundaries_with_headers() {
    let app = spawn_app().await;
    for i in 1..=5 {
        let r = app
            .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.header("ratelimit-limit"), "5");
        assert_eq!(r.header("ratelimit-remaining"), (5 - i).to_string());
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((3590..=3600).contains(&retry), "retry-after {retry}");
    assert_eq!(
        (
            r.header("ratelimit-limit"),
            r.header("ratelimit-remaining"),
            r.header("ratelimit-reset")
        ),
        ("5", "0", retry.to_string().as_str()),
        "a 429 carries the RateLimit-* headers too"
    );
    // Another company has its own budget; other endpoints theirs.
    let body = json!({"export_format": "json", "data_types": ["user_profile"]}).to_string();
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&app.token),
            Some("company_456"),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 201);

    for (path, method, limit) in [
        ("/api/data/export", Method::GET, 60),
        ("/api/data/export/export_0/download", Method::GET, 10),
        ("/api/data/export/export_0", Method::DELETE, 20),
    ] {
        for i in 0..limit {
            let r = app.call(method.clone(), path, None).await;
            assert_ne!(r.status, 429, "{path} request {i}");
            assert_eq!(r.header("ratelimit-limit"), limit.to_string());
        }
        let r = app.call(method.clone(), path, None).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (429, "RATE_LIMIT_EXCEEDED"),
            "{path}"
        );
        let retry: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry));
    }
}

#[tokio::test]
async fn the_create_window_rolls_over_the_hour() {
    let app = spawn_app().await;
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    // Four creates 59 minutes ago and one 61 minutes ago: one more fits.
    for age_min in [59, 59, 59, 59, 61] {
        sqlx::query("INSERT INTO rate_events (bucket, at_ms) VALUES ('data_export:user_456:company_123', ?)")
            .bind(now - age_min * 60_000)
            .execute(&app.state.db)
            .await
            .unwrap();
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(
        r.status, 201,
        "the 61-minute-old create is outside the window"
    );
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!(
        (55..=61).contains(&retry),
        "the oldest in the window falls out in about a minute, got {retry}"
    );
}

#[tokio::test]
async fn rate_limits_survive_a_restart() {
    let app = spawn_app().await;
    for _ in 0..5 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let token = app.token.clone();
    let dir = app.stop().await;
    let app = spawn_with(Opts::default(), Some(dir)).await;
    let body = json!({"export_format": "json", "data_types": ["user_profile"]}).to_string();
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&token),
            Some("company_123"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (429, "RATE_LIMIT_EXCEEDED"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn twenty_concurrent_creates_admit_exactly_five() {
    let app = Arc::new(spawn_app().await);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.create(json!({"export_format": "json", "data_types": ["user_profile"]}))
                .await
                .status
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM export_requests").await, 5);
}

// ------------------------------------------------------------ audit

#[tokio::test]
async fn every_request_is_audited_and_the_chain_verifies() {
    let app = spawn_app().await;
    let before = app
        .count("SELECT COUNT(*) FROM audit_log WHERE outcome != 'event'")
        .await;
    let t = app.token.clone();
    let mut n = 0;
    let mut statuses = HashSet::new();
    for (tok, company, method, path, body) in [
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::POST,
            "/api/data/export",
            Some(r#"{"export_format":"json","data_types":["user_profile"]}"#),
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::GET,
            "/api/data/export",
            None,
        ),
        (
            None,
            Some("company_123"),
            Method::GET,
            "/api/data/export",
            None,
        ),
        (
            Some("hov_x_y"),
            Some("company_123"),
            Method::GET,
            "/api/data/export",
            None,
        ),
        (
            Some(t.as_str()),
            Some("company_999"),
            Method::GET,
            "/api/data/export",
            None,
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::GET,
            "/api/data/export/export_00",
            None,
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::POST,
            "/api/data/export",
            Some(r#"{"export_format":"doc","data_types":["user_profile"]}"#),
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::POST,
            "/api/data/export",
            Some("{oops"),
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::GET,
            "/api/data/summary",
            None,
        ),
        (
            Some(t.as_str()),
            Some("company_123"),
            Method::GET,
            "/api/nope",
            None,
        ),
    ] {
        let r = app.raw(method, path, tok, company, body).await;
        statuses.insert(r.status.as_u16());
        n += 1;
    }
    for _ in 0..5 {
        let r = app
            .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
        statuses.insert(r.status.as_u16());
        n += 1;
    }
    for s in [200, 201, 400, 401, 403, 404, 422, 429] {
        assert!(statuses.contains(&s), "exercised {s}");
    }
    let after = app
        .count("SELECT COUNT(*) FROM audit_log WHERE outcome != 'event'")
        .await;
    assert_eq!(after - before, n, "one row per request, allowed or refused");
    let rows = sqlx::query("SELECT * FROM audit_log WHERE outcome != 'event' ORDER BY seq")
        .fetch_all(&app.state.db)
        .await
        .unwrap();
    let tail = &rows[rows.len() - n as usize..];
    let refused401 = tail
        .iter()
        .find(|r| r.get::<Option<i64>, _>("status") == Some(401))
        .unwrap();
    assert_eq!(refused401.get::<String, _>("outcome"), "refused");
    assert_eq!(
        refused401.get::<Option<String>, _>("ip").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        refused401.get::<Option<String>, _>("user_agent").as_deref(),
        Some("handover-tests/1.0")
    );
    let create = tail
        .iter()
        .find(|r| r.get::<Option<i64>, _>("status") == Some(201))
        .unwrap();
    assert_eq!(
        create.get::<Option<String>, _>("actor").as_deref(),
        Some("user_456")
    );
    assert_eq!(
        create.get::<Option<String>, _>("company_id").as_deref(),
        Some("company_123")
    );
    assert_eq!(create.get::<String, _>("action"), "export.create");
    assert!(create
        .get::<Option<String>, _>("resource")
        .unwrap()
        .starts_with("export_"));
    assert!(create
        .get::<Option<String>, _>("request_id")
        .unwrap()
        .starts_with("req_"));
    let all: Vec<String> = sqlx::query_scalar(
        "SELECT details || coalesce(actor,'') || coalesce(user_agent,'') FROM audit_log",
    )
    .fetch_all(&app.state.db)
    .await
    .unwrap();
    let secret = t.split('_').next_back().unwrap();
    assert!(
        all.iter()
            .all(|d| !d.contains(secret) && !d.contains("hov_")),
        "no token in the audit log"
    );
    assert!(matches!(
        audit::verify(&app.state.db).await.unwrap(),
        audit::Verification::Intact { .. }
    ));

    // GET /api/audit: audit:read, own company only.
    let auditor = app
        .token_for("dpo_1", &["company_123"], &["audit:read"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/audit?action=export.create&limit=3",
            Some(&auditor),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let entries = r.body["data"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries
        .iter()
        .all(|e| e["action"] == "export.create" && e["company_id"] == "company_123"));
    assert!(r.body["data"]["total"].as_u64().unwrap() >= 6);
    let r = app
        .raw(
            Method::GET,
            "/api/audit",
            Some(&t),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "data:export alone cannot read the audit log");
    let other = app
        .token_for("dpo_2", &["company_789"], &["audit:read"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/audit?limit=500",
            Some(&other),
            Some("company_789"),
            None,
        )
        .await;
    assert!(r.body["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["company_id"] == "company_789"));
}

async fn verify_cli(dir: &std::path::Path) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/handover.db", dir.display()),
        )
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test]
async fn tampering_with_the_audit_log_is_detected_by_verify() {
    let app = spawn_app().await;
    for _ in 0..6 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let dir = app.stop().await;
    let pool = db::connect(&format!("sqlite://{}/handover.db", dir.path().display()))
        .await
        .unwrap();
    let (ok, text) = verify_cli(dir.path()).await;
    assert!(ok, "{text}");
    assert!(text.contains("intact"));

    // Edit a row.
    sqlx::query("UPDATE audit_log SET actor = 'someone_else' WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (ok, text) = verify_cli(dir.path()).await;
    assert!(!ok);
    assert!(text.contains("row 3"), "{text}");
    assert!(text.contains("altered"), "{text}");
    sqlx::query("DELETE FROM audit_log WHERE seq >= 3")
        .execute(&pool)
        .await
        .unwrap();
    assert!(verify_cli(dir.path()).await.0, "a clean prefix verifies");
    pool.close().await;

    // Delete a row in the middle.
    let app = spawn_with(Opts::default(), Some(dir)).await;
    for _ in 0..4 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let last: i64 = app.count("SELECT MAX(seq) FROM audit_log").await;
    sqlx::query("DELETE FROM audit_log WHERE seq = ?")
        .bind(last - 1)
        .execute(&app.state.db)
        .await
        .unwrap();
    match audit::verify(&app.state.db).await.unwrap() {
        audit::Verification::Broken { seq, reason } => {
            assert_eq!(seq, last - 1);
            assert!(reason.contains("missing"), "{reason}");
        }
        v => panic!("{v:?}"),
    }
    let (ok, text) = verify_cli(app.dir.path()).await;
    assert!(!ok && text.contains(&format!("row {}", last - 1)), "{text}");

    // Swap two rows' contents (keeping their seq).
    sqlx::query("DELETE FROM audit_log WHERE seq >= ?")
        .bind(last - 1)
        .execute(&app.state.db)
        .await
        .unwrap();
    let a = last - 3;
    let b = last - 2;
    sqlx::query(
        "UPDATE audit_log SET request_id = CASE seq WHEN ?1 THEN (SELECT request_id FROM audit_log WHERE seq = ?2) ELSE (SELECT request_id FROM audit_log WHERE seq = ?1) END, \
         prev_hash = CASE seq WHEN ?1 THEN (SELECT prev_hash FROM audit_log WHERE seq = ?2) ELSE (SELECT prev_hash FROM audit_log WHERE seq = ?1) END, \
         hash = CASE seq WHEN ?1 THEN (SELECT hash FROM audit_log WHERE seq = ?2) ELSE (SELECT hash FROM audit_log WHERE seq = ?1) END \
         WHERE seq IN (?1, ?2)",
    )
    .bind(a)
    .bind(b)
    .execute(&app.state.db)
    .await
    .unwrap();
    match audit::verify(&app.state.db).await.unwrap() {
        audit::Verification::Broken { seq, .. } => assert_eq!(seq, a),
        v => panic!("{v:?}"),
    }
}

// ------------------------------------------------------------ tokens

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    companies: Vec<&'a str>,
    permissions: Vec<&'a str>,
    exp: i64,
    iss: &'a str,
    aud: &'a str,
}

fn jwt(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    exp_in: i64,
    iss: &str,
    aud: &str,
) -> String {
    let claims = Claims {
        sub: "user_456",
        companies: vec!["company_123"],
        permissions: vec!["data:export"],
        exp: time::OffsetDateTime::now_utc().unix_timestamp() + exp_in,
        iss,
        aud,
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).unwrap()
}

#[tokio::test]
async fn api_tokens_from_the_cli_work_until_revoked() {
    let app = spawn_app().await;
    let url = format!("sqlite://{}/handover.db", app.dir.path().display());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args([
            "token",
            "create",
            "--user",
            "user_456",
            "--company",
            "company_123",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "prints the token and nothing else"
    );
    let token = stdout.trim();
    assert!(
        token.starts_with("hov_") && token.len() >= 4 + 12 + 1 + 43,
        "≥128 random bits: {token}"
    );
    let stored: i64 = app
        .count(&format!(
            "SELECT COUNT(*) FROM api_tokens WHERE token_hash = '{}'",
            sha256_hex(token.as_bytes())
        ))
        .await;
    assert_eq!(stored, 1, "only the SHA-256 is stored");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM api_tokens WHERE token_hash LIKE '%{}%'",
            &token[20..40]
        ))
        .await,
        0
    );
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(token),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let id = token.trim_start_matches("hov_").split('_').next().unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["token", "revoke", id])
        .env("DATABASE_URL", &url)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(token),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn hs256_jwts_are_checked_for_signature_expiry_issuer_and_audience() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let app = spawn_app().await;
    let key = EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let good = jwt(Algorithm::HS256, &key, 300, ISSUER, AUDIENCE);
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&good),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["user_id"], "user_456");
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&good),
            Some("company_456"),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "company not in the claims");
    for (name, bad) in [
        (
            "expired",
            jwt(Algorithm::HS256, &key, -3600, ISSUER, AUDIENCE),
        ),
        (
            "issuer",
            jwt(
                Algorithm::HS256,
                &key,
                300,
                "https://evil.example",
                AUDIENCE,
            ),
        ),
        (
            "audience",
            jwt(Algorithm::HS256, &key, 300, ISSUER, "someone-else"),
        ),
        (
            "signature",
            jwt(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-another-secret-0000"),
                300,
                ISSUER,
                AUDIENCE,
            ),
        ),
    ] {
        let r = app
            .raw(
                Method::GET,
                "/api/data/summary",
                Some(&bad),
                Some("company_123"),
                None,
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (401, "UNAUTHORIZED"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn rs256_jwts_from_the_identity_provider_are_accepted() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let app = spawn_with(
        Opts {
            rs256: true,
            ..Opts::default()
        },
        None,
    )
    .await;
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-test-private.pem")).unwrap();
    let good = jwt(Algorithm::RS256, &key, 300, ISSUER, AUDIENCE);
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&good),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let expired = jwt(Algorithm::RS256, &key, -3600, ISSUER, AUDIENCE);
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&expired),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let hs = jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        300,
        ISSUER,
        AUDIENCE,
    );
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&hs),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401, "algorithm confusion is refused");
}

// ------------------------------------------------------------ lifecycle

#[tokio::test]
async fn the_sweeper_fails_abandoned_and_expires_old_exports() {
    let app = spawn_app().await;
    let open = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let done = app
        .create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    jobs::drain(&app.state).await.unwrap();
    sqlx::query(
        "UPDATE export_requests SET last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = ?",
    )
    .bind(&open)
    .execute(&app.state.db)
    .await
    .unwrap();
    sqlx::query("UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = ?")
        .bind(&done)
        .execute(&app.state.db)
        .await
        .unwrap();
    jobs::sweep(&app.state).await.unwrap();
    let r = app
        .call(Method::GET, &format!("/api/data/export/{open}"), None)
        .await;
    assert_eq!(r.body["data"]["status"], "failed");
    assert!(r.body["data"]["failure_reason"]
        .as_str()
        .unwrap()
        .contains("abandoned"));
    let r = app
        .call(Method::GET, &format!("/api/data/export/{done}"), None)
        .await;
    assert_eq!(r.body["data"]["status"], "expired");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "expired files and keys are destroyed"
    );
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{done}/download"),
            None,
        )
        .await;
    assert_eq!(r.code(), "EXPORT_NOT_READY");
    let r = app
        .call(Method::GET, "/api/data/export?status=expired", None)
        .await;
    assert_eq!(r.body["data"]["total"], 1);
}

#[tokio::test]
async fn the_cli_export_is_the_same_file_and_audited() {
    let app = spawn_app().await;
    let dir = app.dir.clone();
    let out = dir.path().join("dpo.json");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args([
            "export",
            "--user",
            "user_456",
            "--company",
            "company_123",
            "--format",
            "json",
            "--data-types",
            "user_profile,payment_history",
            "--out",
        ])
        .arg(&out)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/handover.db", dir.path().display()),
        )
        .env("HANDOVER_DATA_DIR", dir.path().join("cli-data"))
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(
        v["export"]["data"]["payment_history"]
            .as_array()
            .unwrap()
            .len() as i64,
        payments
    );
    assert_eq!(v["metadata"]["total_records"], payments + 1);
    let sha: String =
        sqlx::query_scalar("SELECT sha256 FROM export_requests WHERE delivery = 'cli'")
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert_eq!(sha, sha256_hex(&std::fs::read(&out).unwrap()));
    assert_eq!(app.count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.completed' AND details LIKE '%\"cli\"%'").await, 1);
}

// ------------------------------------------------------------ second config

#[tokio::test]
async fn the_focus_timer_app_config_exports_its_own_types() {
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/pomodoro.toml"))
            .unwrap();
    let app = spawn_with(
        Opts {
            config: Some(config),
            ..Opts::default()
        },
        None,
    )
    .await;
    let s = app.call(Method::GET, "/api/data/summary", None).await;
    let counts: Vec<(String, u64)> = s.body["data"]["data_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["data_type"].as_str().unwrap().to_string(),
                t["records"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("user", 1),
            ("sessions", 127),
            ("projects", 2),
            ("settings", 1),
            ("coach_insights", 2),
            ("coach_chat_history", 2)
        ]
        .map(|(a, b)| (a.to_string(), b))
    );
    let types = [
        "user",
        "sessions",
        "projects",
        "settings",
        "coach_insights",
        "coach_chat_history",
    ];
    let r = app
        .create(json!({"export_format": "csv", "data_types": types, "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let all = fetch_all(&app, &id, &types, 50).await;
    assert_eq!(all[1].1.len(), 127);
    assert!(all[1].1.iter().all(|s| s["note"] != "not yours"));
    assert_eq!(
        all[1].1[0]["completed"], true,
        "booleans from SQLite integers"
    );
    assert_eq!(
        all[3].1[0]["appearance"],
        json!({"theme": "dark", "language": "en"})
    );
    // Server-built CSV flattens the nested settings.
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["settings", "sessions"]}))
        .await;
    jobs::drain(&app.state).await.unwrap();
    let c = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    let text = String::from_utf8(c.bytes).unwrap();
    assert!(text.starts_with("data_type,user_id,focus_minutes,break_minutes,sound,appearance.theme,appearance.language,id,"), "{}", &text[..200]);
    assert!(text.contains("\r\nsettings,user_456,25,5,true,dark,en,"));
    assert_eq!(text.lines().count(), 1 + 1 + 127);
}

#[tokio::test]
async fn file_too_large_and_quota_exceeded_are_reachable() {
    let app = spawn_with(
        Opts {
            max_export_bytes: Some(4096),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 201, "a small export fits");
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code(), r.detail_code()),
        (422, "VALIDATION_ERROR", "FILE_TOO_LARGE"),
        "{}",
        r.body
    );
    assert!(r.body["error"]["error"]
        .as_str()
        .unwrap()
        .contains("reduce the date range"));

    let app = spawn_with(
        Opts {
            daily_record_quota: Some(100),
            ..Opts::default()
        },
        None,
    )
    .await;
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert!(payments > 50 && payments < 100);
    app.create_id(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (429, "QUOTA_EXCEEDED"),
        "{}",
        r.body
    );
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!(
        (86_000..=86_400).contains(&retry),
        "space frees up in a day: {retry}"
    );
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 201, "what still fits the quota is allowed");
}

#[tokio::test]
async fn development_mode_without_tokens_exists_only_when_switched_on() {
    let app = spawn_app().await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            None,
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let dev = spawn_with(
        Opts {
            dev_no_auth: true,
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = dev
        .raw(
            Method::GET,
            "/api/data/summary",
            None,
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["user_id"], "user_456");
    let r = dev
        .raw(
            Method::GET,
            "/api/data/summary",
            Some("hov_bad_token"),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401, "a token that is sent is still checked");
}

#[tokio::test]
async fn an_interrupted_server_build_is_requeued_once_then_failed() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    // As if a server died mid-build: processing, attempt 1, long idle.
    sqlx::query("UPDATE export_requests SET status = 'processing', attempts = 1, last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = ?")
        .bind(&id)
        .execute(&app.state.db)
        .await
        .unwrap();
    jobs::sweep(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "pending", "queued again");
    jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed");

    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    sqlx::query("UPDATE export_requests SET status = 'processing', attempts = 2, last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = ?")
        .bind(&id)
        .execute(&app.state.db)
        .await
        .unwrap();
    jobs::sweep(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "failed");
}

#[tokio::test]
async fn the_binary_serves_demo_mode_from_the_environment() {
    use tokio::io::AsyncBufReadExt;
    let dir = TempDir::new().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .arg("serve")
        .env("HANDOVER_DEMO", "1")
        .env("HANDOVER_BIND", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/demo.db", dir.path().display()),
        )
        .env("HANDOVER_DATA_DIR", dir.path().join("data"))
        .env(
            "HANDOVER_WWW_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../www"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut token = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(u) = line.trim().strip_prefix("handover demo: ") {
                url = Some(u.trim_end_matches('/').to_string());
            }
            if let Some((_, t)) = line.split_once("): ") {
                token = Some(t.trim().to_string());
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the demo server announces itself");
    let (url, token) = (url.expect("URL printed"), token.expect("token printed"));
    let client = reqwest::Client::new();
    let page = client.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.text().await.unwrap().contains("Data export"),
        "www/ is served at /"
    );
    let summary: Value = client
        .get(format!("{url}/api/data/summary"))
        .bearer_auth(&token)
        .header("x-company-id", "company_123")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        summary["data"]["total_records"].as_u64().unwrap() > 100,
        "demo data loaded into the empty database"
    );
    child.kill().await.unwrap();
}

// ------------------------------------------------------------ the record wire

/// The lines of a stream answer.
async fn stream_lines(app: &TestApp, path: &str) -> (Reply, Vec<Value>) {
    let r = app.call(Method::GET, path, None).await;
    let lines = r
        .bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    (r, lines)
}

/// A CSV file built from frames, the way the browser builds it.
fn csv_of(manifest: &handover::model::Manifest, frames: &[Value]) -> Vec<u8> {
    use handover::format::{Cell, ExportFormat, ExportWriter, FormatOptions};
    use handover::wire::{decode_frame, WireCell};
    let info = handover::model::ExportInfo::new("export_x", time::OffsetDateTime::UNIX_EPOCH);
    let mut w = ExportWriter::new(
        ExportFormat::Csv,
        manifest,
        &info,
        &FormatOptions::default(),
    )
    .unwrap();
    let mut out = w.begin().unwrap();
    for f in frames {
        let t = w.type_index(f["data_type"].as_str().unwrap()).unwrap();
        let columns = &manifest.types[t].columns;
        let bytes = serde_json::to_vec(f).unwrap();
        let frame = decode_frame(&bytes, columns).unwrap();
        for row in frame.rows() {
            let cells: Vec<Cell<'_>> = row.iter().map(WireCell::as_cell).collect();
            w.write_row(t, &cells).unwrap();
        }
        out.extend(w.take_output());
    }
    out.extend(w.finish().unwrap());
    out
}

#[tokio::test]
async fn streams_carry_every_record_and_resume_byte_identically() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"export_format": "csv", "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let manifest: handover::model::Manifest =
        serde_json::from_value(r.body["data"]["manifest"].clone()).unwrap();
    let total = manifest.types["payment_history"].records;
    assert!(total > 20, "enough records for several frames: {total}");
    let base = format!("/api/data/export/{id}/records/payment_history/stream");

    let (whole, frames) = stream_lines(&app, &format!("{base}?limit=7")).await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.bytes)
    );
    assert_eq!(whole.header("content-type"), "application/x-ndjson");
    assert_eq!(frames.len() as u64, total.div_ceil(7));
    let mut offset = 0;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["data_type"], "payment_history");
        assert_eq!(f["offset"], offset, "frames are contiguous");
        assert_eq!(
            f["columns"].is_array(),
            i == 0,
            "columns in the first frame only"
        );
        offset += f["rows"].as_array().unwrap().len() as u64;
        assert_eq!(f["next_cursor"].is_null(), i + 1 == frames.len());
    }
    assert_eq!(offset, total);
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["progress"]["records_processed"], total);

    // The connection drops after the first frame; the client resumes from
    // that frame's cursor and gets exactly the rows that followed.
    let resp = app
        .client
        .get(format!("{}{base}?limit=7", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .send()
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunks = resp.bytes_stream();
    use futures_util::StreamExt as _;
    // Bounded: the first line of a few hundred bytes.
    for _ in 0..10_000 {
        match chunks.next().await {
            Some(c) => got.extend_from_slice(&c.unwrap()),
            None => break,
        }
        if got.contains(&b'\n') {
            break;
        }
    }
    drop(chunks);
    let first_line = got.split(|&b| b == b'\n').next().unwrap();
    let first: Value = serde_json::from_slice(first_line).unwrap();
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let cursor = cursor.as_str();
    let (resumed, rest) = stream_lines(
        &app,
        &format!("{base}?limit=7&cursor={}", urlencode(cursor)),
    )
    .await;
    assert_eq!(resumed.status, 200);
    assert_eq!(rest[0]["offset"], 7);
    let mut cut = vec![first];
    cut.extend(rest);
    assert_eq!(
        csv_of(&manifest, &cut),
        csv_of(&manifest, &frames),
        "a resumed stream gives the same file"
    );

    // Cursors are the server's own: altered, padded, or another type's are refused.
    let mut forged = cursor.to_string();
    forged.insert(2, 'x');
    for bad in [
        forged,
        format!(" {cursor}"),
        format!("{cursor}="),
        "eyJhIjoxfQ".to_string(),
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("{base}?cursor={}", urlencode(&bad)),
                None,
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.detail_code()),
            (422, "INVALID_CURSOR"),
            "{bad:?}"
        );
    }
    let other = app
        .create(json!({"export_format": "csv", "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    let other = other.body["data"]["request_id"].as_str().unwrap();
    let r = app
        .call(
            Method::GET,
            &format!(
                "/api/data/export/{other}/records/payment_history?cursor={}",
                urlencode(cursor)
            ),
            None,
        )
        .await;
    assert_eq!(
        r.detail_code(),
        "INVALID_CURSOR",
        "a cursor belongs to one export"
    );
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn compressed_and_uncompressed_pages_carry_the_same_records() {
    use std::io::Read as _;
    let app = spawn_app().await;
    let id = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client"}))
        .await
        .body["data"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut decoded = Vec::new();
    for enc in ["identity", "gzip", "br", "zstd", "gzip;q=0.5, zstd"] {
        let r = app
            .client
            .get(format!(
                "{}/api/data/export/{id}/records/payment_history?limit=50",
                app.base
            ))
            .bearer_auth(&app.token)
            .header("x-company-id", "company_123")
            .header("accept-encoding", enc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ce = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let wire = r.bytes().await.unwrap().to_vec();
        let mut plain = Vec::new();
        match ce.as_deref() {
            None => plain = wire.clone(),
            Some("gzip") => {
                flate2::read::GzDecoder::new(&wire[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some("br") => {
                brotli::Decompressor::new(&wire[..], 4096)
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some("zstd") => {
                zstd::stream::read::Decoder::new(&wire[..])
                    .unwrap()
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some(other) => panic!("unexpected encoding {other}"),
        }
        let expected = match enc {
            "identity" => None,
            "gzip;q=0.5, zstd" => Some("zstd"),
            e => Some(e),
        };
        assert_eq!(ce.as_deref(), expected, "negotiated from {enc:?}");
        if expected.is_some() {
            assert!(
                wire.len() * 2 < plain.len(),
                "{enc}: {} → {}",
                plain.len(),
                wire.len()
            );
        }
        let v: Value = serde_json::from_slice(&plain).unwrap();
        decoded.push(v["data"].clone());
    }
    assert!(decoded[0]["rows"].as_array().unwrap().len() > 10);
    for d in &decoded[1..] {
        assert_eq!(d, &decoded[0]);
    }
}

#[tokio::test]
async fn server_builds_run_once_with_monotonic_progress() {
    let app = spawn_with(
        Opts {
            records: Some(4000),
            ..Opts::default()
        },
        None,
    )
    .await;
    for format in ["csv", "xlsx"] {
        let id = app
            .create_id(json!({"export_format": format, "data_types": ["payment_history", "recovery_cases"]}))
            .await;
        let state = app.state.clone();
        let worker = tokio::spawn(async move { jobs::drain(&state).await });
        let mut seen = Vec::new();
        // Bounded: until the build reports completion. The stored progress is
        // read directly (the details endpoint is rate-limited to 60/min).
        for _ in 0..1_000_000 {
            let (served, status): (i64, String) =
                sqlx::query_as("SELECT records_served, status FROM export_requests WHERE id = ?")
                    .bind(&id)
                    .fetch_one(&app.state.db)
                    .await
                    .unwrap();
            seen.push(served as u64);
            if status == "completed" {
                break;
            }
            tokio::task::yield_now().await;
        }
        worker.await.unwrap().unwrap();
        let d = app
            .call(Method::GET, &format!("/api/data/export/{id}"), None)
            .await;
        let p = &d.body["data"]["progress"];
        assert_eq!(p["percentage"], 100);
        assert_eq!(p["records_processed"], p["total_records"]);
        assert_eq!(
            seen.last(),
            p["total_records"].as_u64().as_ref(),
            "{format}"
        );
        assert!(
            seen.len() > 2,
            "{format}: the build was observed while it ran: {seen:?}"
        );
        for w in seen.windows(2) {
            assert!(w[1] >= w[0], "{format}: progress went back: {seen:?}");
        }
        let started = app
            .count(&format!(
                "SELECT COUNT(*) FROM audit_log WHERE resource = '{id}' AND action = 'export.started'"
            ))
            .await;
        assert_eq!(started, 1, "{format}: built once");
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT format FROM export_files WHERE request_id = ? ORDER BY format",
        )
        .bind(&id)
        .fetch_all(&app.state.db)
        .await
        .unwrap();
        let mut expected = vec![format.to_string(), "frames".to_string()];
        expected.sort();
        assert_eq!(kinds, expected, "the file once, and its frames");
    }
}
