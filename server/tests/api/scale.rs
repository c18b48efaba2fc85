//! Several instances on one database, and deletes racing builds. The
//! two-instance tests start two real server processes on the suite's
//! database (PostgreSQL, or one SQLite file with a shared export
//! directory), so what they share is only what production instances share.

use std::sync::Arc;
use std::time::Duration;

use handover_server::auth;
use handover_server::datatypes::Registry;
use handover_server::store::Store;
use handover_server::BuildGate;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt as _;

use crate::helpers::*;

/// One `handover-server serve` process.
struct Instance {
    child: tokio::process::Child,
    base: String,
    /// What it logged before it listened.
    startup_log: Vec<String>,
}

impl Instance {
    /// Starts one on `db`; `env` adds variables, and one with an empty
    /// value is removed instead.
    async fn start(db: &TestDb, env: &[(&str, &str)]) -> Self {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"));
        cmd.arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("HANDOVER_MASTER_KEY", MASTER_HEX)
            .env("HANDOVER_BIND", "127.0.0.1:0")
            .env("HANDOVER_DATA_DIR", db.dir.path().join("shared"))
            .env("HANDOVER_MASTER_KEY", MASTER_HEX)
            .env("HANDOVER_JWT_HS256_SECRET", JWT_SECRET)
            .env("HANDOVER_SWEEP_SECS", "1")
            .env("HANDOVER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut startup_log = Vec::new();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("handover-server listening") {
                    let addr = line.split("addr=").nth(1).unwrap();
                    return addr.split_whitespace().next().unwrap().to_string();
                }
                startup_log.push(line);
            }
            panic!(
                "the instance stopped before listening: {}",
                startup_log.join("\n")
            );
        })
        .await
        .expect("the instance starts within a minute");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            base: format!("http://{addr}"),
            startup_log,
        }
    }

    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value, Vec<u8>) {
        let mut r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("x-company-id", "company_123");
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap().to_vec();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes,
        )
    }

    /// Waits (bounded: a minute) until export `id` has `status` in the
    /// shared database, then returns its details from this instance.
    /// Polling the database keeps the API's read limit out of it.
    async fn wait_for(&self, store: &Store, token: &str, id: &str, status: &str) -> Value {
        for _ in 0..600 {
            let now: String =
                sqlx::query_scalar("SELECT status FROM export_requests WHERE id = $1")
                    .bind(id)
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            if now == status {
                let (code, body, _) = self
                    .call(token, Method::GET, &format!("/api/data/export/{id}"), None)
                    .await;
                assert_eq!(code, 200, "{body}");
                return body["data"].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("export {id} never became {status}");
    }
}

/// A database with demo data and tokens for user_456 and three more users,
/// for instances to share.
async fn shared_db() -> (Arc<TestDb>, Store, Vec<String>) {
    let db = TestDb::new().await;
    let store = Store::connect(&db.url)
        .await
        .unwrap()
        .with_master_key(&handover::crypto::DataKey::from_bytes([7; 32]));
    let registry = Registry::load_for(None, store.engine()).unwrap();
    handover_server::demo::load(&store, &db.url, &registry, 9, 40, 42)
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for user in ["user_456", "user_0003", "user_0006", "user_0009"] {
        // Generated users live in company_123 when their number is a multiple of 3.
        let (_, t) = auth::create_token(
            &store,
            user,
            &["company_123".to_string()],
            &["data:export".to_string()],
            "tests",
        )
        .await
        .unwrap();
        tokens.push(t);
    }
    (db, store, tokens)
}

async fn audit_verifies(db: &TestDb) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "audit verify: {text}");
    assert!(text.contains("intact"), "{text}");
}

#[tokio::test]
async fn two_instances_share_limits_builds_files_and_one_audit_chain() {
    let (db, store, tokens) = shared_db().await;
    let a = Instance::start(&db, &[]).await;
    let b = Instance::start(&db, &[]).await;

    // 20 concurrent creates by one user, spread over both: exactly 5 pass.
    let body =
        json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"});
    let calls = (0..20).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        inst.call(
            &tokens[0],
            Method::POST,
            "/api/data/export",
            Some(body.clone()),
        )
    });
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|(s, _, _)| s)
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        15,
        "{statuses:?}"
    );

    // Server builds, created on both: each is claimed by exactly one
    // instance, and each downloads from both.
    let mut ids = Vec::new();
    for (i, t) in tokens[1..].iter().enumerate() {
        let inst = if i % 2 == 0 { &a } else { &b };
        let (status, r, _) = inst
            .call(t, Method::POST, "/api/data/export", Some(json!({"export_format": "csv", "data_types": ["user_profile", "payment_history"]})))
            .await;
        assert_eq!(status, 201, "{r}");
        ids.push((
            t.clone(),
            r["data"]["request_id"].as_str().unwrap().to_string(),
        ));
    }
    for (t, id) in &ids {
        let d = a.wait_for(&store, t, id, "completed").await;
        let sha = d["sha256"].as_str().unwrap().to_string();
        for inst in [&a, &b] {
            let (status, _, bytes) = inst
                .call(
                    t,
                    Method::GET,
                    &format!("/api/data/export/{id}/download"),
                    None,
                )
                .await;
            assert_eq!(status, 200);
            assert_eq!(
                sha256_hex(&bytes),
                sha,
                "the same file from either instance"
            );
        }
        let started: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_log WHERE resource = $1 AND action = 'export.started'",
        )
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(started, 1, "claimed once");
        let attempts: i64 =
            sqlx::query_scalar("SELECT attempts FROM export_requests WHERE id = $1")
                .bind(id)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(attempts, 1, "built once");
    }
    drop((a, b));
    audit_verifies(&db).await;
}

#[tokio::test]
async fn a_build_whose_instance_is_killed_is_finished_by_the_other() {
    let (db, store, tokens) = shared_db().await;
    // A holds every build it claims (alive, never finishing).
    let mut a = Instance::start(&db, &[("HANDOVER_TEST_HOLD_BUILDS", "1")]).await;
    let (status, r, _) = a
        .call(
            &tokens[1],
            Method::POST,
            "/api/data/export",
            Some(json!({"export_format": "xlsx", "data_types": ["payment_history"]})),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let id = r["data"]["request_id"].as_str().unwrap().to_string();
    a.wait_for(&store, &tokens[1], &id, "processing").await;
    // B runs beside it; A's build stays A's while A lives.
    let b = Instance::start(&db, &[("HANDOVER_STALE_AFTER_SECS", "2")]).await;
    a.child.kill().await.unwrap();
    a.child.wait().await.unwrap();
    let d = b.wait_for(&store, &tokens[1], &id, "completed").await;
    assert!(d["record_count"].as_u64().unwrap() > 0);
    let (status, _, bytes) = b
        .call(
            &tokens[1],
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&bytes), d["sha256"].as_str().unwrap());
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE resource = $1 AND outcome = 'event' ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        events,
        [
            "export.created",
            "export.started",
            "export.requeued",
            "export.started",
            "export.completed",
            "export.downloaded"
        ]
    );
    // Only the finished build's bytes remain once the sweeper has run.
    for _ in 0..100 {
        let files: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM export_files WHERE request_id = $1")
                .bind(&id)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(files, 2);
        if stored_count(&db, &store, &id).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stored_count(&db, &store, &id).await,
        2,
        "the killed build's bytes are collected"
    );
    drop(b);
    audit_verifies(&db).await;
}

/// How many distinct stored byte streams export `id` has (files in the
/// shared directory, or files' chunks in the database).
async fn stored_count(db: &TestDb, store: &Store, id: &str) -> usize {
    let on_disk = std::fs::read_dir(db.dir.path().join("shared/exports"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{id}."))
            })
            .count()
        })
        .unwrap_or(0);
    let in_db: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT file) FROM export_file_chunks WHERE request_id = $1",
    )
    .bind(id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    on_disk + in_db as usize
}

async fn gated_app() -> (TestApp, Arc<BuildGate>) {
    let gate = Arc::new(BuildGate::default());
    let app = spawn_with(
        Opts {
            build_gate: Some(gate.clone()),
            ..Opts::default()
        },
        None,
    )
    .await;
    (app, gate)
}

#[tokio::test]
async fn a_delete_during_the_build_wins() {
    let (app, gate) = gated_app().await;
    let id = app
        .create_id(
            json!({"export_format": "xlsx", "data_types": ["payment_history", "consent_data"]}),
        )
        .await;
    let state = app.state.clone();
    let worker = tokio::spawn(async move { handover_server::jobs::drain(&state).await });
    // The build has written its files and waits to complete.
    assert_eq!(gate.arrival().await.as_deref(), Some(id.as_str()));
    assert!(!app.stored_files().await.is_empty(), "bytes were written");
    let r = app
        .call(Method::DELETE, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    gate.release();
    worker.await.unwrap().unwrap();
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "no key survives"
    );
    assert!(app.stored_files().await.is_empty(), "no bytes survive");
    let status: String = sqlx::query_scalar("SELECT status FROM export_requests WHERE id = $1")
        .bind(&id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_ne!(status, "completed", "a deleted export never completes");
    let r = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_delete_before_the_claim_and_after_completion_wins() {
    let (app, gate) = gated_app().await;
    // Before the claim: nothing is ever built.
    let early = app
        .create_id(json!({"export_format": "csv", "data_types": ["payment_history"]}))
        .await;
    assert_eq!(
        app.call(Method::DELETE, &format!("/api/data/export/{early}"), None)
            .await
            .status,
        200
    );
    handover_server::jobs::drain(&app.state).await.unwrap();
    assert!(app.stored_files().await.is_empty());
    // After completion: the files and keys go with it.
    let late = app
        .create_id(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    let state = app.state.clone();
    let worker = tokio::spawn(async move { handover_server::jobs::drain(&state).await });
    assert_eq!(gate.arrival().await.as_deref(), Some(late.as_str()));
    gate.release();
    worker.await.unwrap().unwrap();
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 2);
    assert_eq!(
        app.call(Method::DELETE, &format!("/api/data/export/{late}"), None)
            .await
            .status,
        200
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 0);
    assert!(app.stored_files().await.is_empty());
}

#[tokio::test]
async fn a_delete_racing_expiry_leaves_nothing_and_the_sweeper_collects_crash_leftovers() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["payment_history"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    app.exec(
        "UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
        &id,
    )
    .await;
    let state = app.state.clone();
    let path = format!("/api/data/export/{id}");
    let (swept, deleted) = tokio::join!(
        handover_server::jobs::sweep(&state),
        app.call(Method::DELETE, &path, None)
    );
    swept.unwrap();
    assert!(
        deleted.status == 200 || deleted.status == 404,
        "{}",
        deleted.body
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 0);
    assert!(app.stored_files().await.is_empty());

    // What a crash between writing and completing leaves: bytes without a
    // key row, of an export that is no longer being built.
    let orphan = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(
        app.call(Method::DELETE, &format!("/api/data/export/{orphan}"), None)
            .await
            .status,
        200
    );
    let name = format!("{orphan}.csv.0123456789ab.enc");
    std::fs::write(
        app.db.dir.path().join("exports").join(&name),
        b"HOV1 leftover",
    )
    .unwrap();
    app.state
        .store
        .put_chunk(&orphan, &name, 0, b"HOV1 leftover")
        .await
        .unwrap();
    assert_eq!(app.stored_files().await.len(), 2);
    handover_server::jobs::sweep(&app.state).await.unwrap();
    assert!(
        app.stored_files().await.is_empty(),
        "the sweeper removes unowned bytes"
    );
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    // A: headers trickle in and never end.
    a_held_connection_is_cut_off_before_b_is_served(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", false)
        .await;
}

#[tokio::test]
async fn a_silent_connection_is_cut_off_too() {
    // A: connects and sends nothing at all.
    a_held_connection_is_cut_off_before_b_is_served(b"", false).await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_cut_off_too() {
    // A: one whole request, answered, then the connection idles open.
    a_held_connection_is_cut_off_before_b_is_served(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        true,
    )
    .await;
}

/// With one connection allowed and a 1 s header timeout, connection A sends
/// `a_sends` and then nothing more; B's whole request must wait until the
/// server has cut A off, and is then served.
async fn a_held_connection_is_cut_off_before_b_is_served(a_sends: &[u8], a_is_answered: bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (db, store, _tokens) = shared_db().await;
    store.close().await;
    let server = Instance::start(
        &db,
        &[
            ("HANDOVER_HEADER_TIMEOUT_SECS", "1"),
            ("HANDOVER_MAX_CONNECTIONS", "1"),
        ],
    )
    .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let bound = Duration::from_secs(30);
    let mut a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    a.write_all(a_sends).await.unwrap();
    let mut abuf = vec![0u8; 4096];
    if a_is_answered {
        let n = tokio::time::timeout(bound, a.read(&mut abuf))
            .await
            .expect("A is answered")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&abuf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&abuf[..n])
        );
    }
    // B: a whole request, which must wait for a free connection.
    let mut b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    b.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut bbuf = vec![0u8; 4096];
    // A is cut off by the header timeout before B is served at all.
    let first = tokio::time::timeout(bound, async {
        tokio::select! {
            biased;
            r = a.read(&mut abuf) => ("a", r.unwrap_or(0)),
            r = b.read(&mut bbuf) => ("b", r.unwrap_or(0)),
        }
    })
    .await
    .expect("something happened within the bound");
    assert_eq!(
        first.0, "a",
        "B was served while A held the only connection"
    );
    let a_text = String::from_utf8_lossy(&abuf[..first.1]).to_string();
    assert!(
        first.1 == 0 || a_text.starts_with("HTTP/1.1 408"),
        "A was closed (or told 408): {a_text:?}"
    );
    let n = tokio::time::timeout(bound, b.read(&mut bbuf))
        .await
        .expect("B is served once A is gone")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&bbuf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&bbuf[..n])
    );
    drop(server);
}

#[tokio::test]
async fn risky_settings_are_named_in_warnings_at_start() {
    let (db, store, _tokens) = shared_db().await;
    store.close().await;
    let has = |i: &Instance, needle: &str| i.startup_log.iter().any(|l| l.contains(needle));

    // JWTs without iss/aud checks; the master key from the environment.
    let loose = Instance::start(&db, &[]).await;
    assert!(
        has(&loose, "without an issuer (iss) or audience (aud) check"),
        "{:?}",
        loose.startup_log
    );
    assert!(!has(&loose, "beside the export files"));
    drop(loose);

    // Both checks set: no JWT warning. The master key in its default file,
    // inside the data directory that also holds the export files.
    let data_dir = db.dir.path().join("shared");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("master.key"), MASTER_HEX).unwrap();
    let strict = Instance::start(
        &db,
        &[
            ("HANDOVER_JWT_ISSUER", "https://idp.example"),
            ("HANDOVER_JWT_AUDIENCE", "handover"),
            ("HANDOVER_MASTER_KEY", ""),
            ("HANDOVER_FILE_STORAGE", "dir"),
        ],
    )
    .await;
    assert!(
        !has(&strict, "check: a token your identity provider"),
        "{:?}",
        strict.startup_log
    );
    assert!(
        has(
            &strict,
            "the master key file is stored beside the export files"
        ),
        "{:?}",
        strict.startup_log
    );
    drop(strict);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (db, store, tokens) = shared_db().await;
    store.close().await;
    let server = Instance::start(&db, &[("HANDOVER_BODY_TIMEOUT_SECS", "1")]).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/data/export HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Company-ID: company_123\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"export_format\"",
        tokens[0]
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The rest of the body never comes. Well before the default 30 s, the
    // configured second has passed and the request is answered.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer))
        .await
        .expect("answered within the configured body timeout, not the default")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
    drop(server);
}
