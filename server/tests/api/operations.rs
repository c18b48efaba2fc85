//! Operator tools and background work: the sweeper, the CLI export, another app's config, the binary.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

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
    handover_server::jobs::drain(&app.state).await.unwrap();
    sqlx::query(
        "UPDATE export_requests SET last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
    )
    .bind(&open)
    .execute(app.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1")
        .bind(&done)
        .execute(app.pool())
        .await
        .unwrap();
    // Due, but not swept yet: not offered, and not served, already.
    let r = app
        .call(Method::GET, &format!("/api/data/export/{done}"), None)
        .await;
    assert!(r.body["data"]["download_url"].is_null(), "{}", r.body);
    let refused_as_expired = || async {
        let r = app
            .call(
                Method::GET,
                &format!("/api/data/export/{done}/download"),
                None,
            )
            .await;
        assert_eq!(r.code(), "EXPORT_NOT_READY");
        let message = r.body["error"]["error"].as_str().unwrap();
        assert!(message.contains("expired"), "{message}");
    };
    refused_as_expired().await;
    handover_server::jobs::sweep(&app.state).await.unwrap();
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
    refused_as_expired().await;
    let r = app
        .call(Method::GET, "/api/data/export?status=expired", None)
        .await;
    assert_eq!(r.body["data"]["total"], 1);
}

#[tokio::test]
async fn the_cli_export_is_the_same_file_and_audited() {
    let app = spawn_app().await;
    let dir = app.db.clone();
    let out = dir.dir.path().join("dpo.json");
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
        .env("DATABASE_URL", &dir.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_DIR", dir.dir.path().join("cli-data"))
        .status()
        .await
        .unwrap();
    assert!(status.success());
    // The file holds personal data: its owner's alone.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the export file is private");
    }
    assert!(
        !dir.dir.path().join("cli-data/master.key").exists(),
        "HANDOVER_MASTER_KEY is honoured: no key file is generated"
    );
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
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(sha, sha256_hex(&std::fs::read(&out).unwrap()));
    assert_eq!(app.count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.completed' AND details LIKE '%\"cli\"%'").await, 1);
    // Its lifecycle is every build's: created, started, completed.
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE resource = (SELECT id FROM export_requests WHERE delivery = 'cli') \
         AND action LIKE 'export.%' ORDER BY seq",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        actions,
        ["export.created", "export.started", "export.completed"]
    );
}

#[tokio::test]
async fn the_focus_timer_app_config_exports_its_own_types() {
    let config = pomodoro_config();
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
    handover_server::jobs::drain(&app.state).await.unwrap();
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
async fn the_binary_serves_demo_mode_from_the_environment() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .arg("serve")
        .env("HANDOVER_DEMO", "1")
        .env("HANDOVER_BIND", "127.0.0.1:0")
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_DIR", db.dir.path().join("data"))
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

#[tokio::test]
async fn a_fresh_database_without_demo_data_gives_a_user_an_empty_export() {
    // No demo data loaded: the built-in config's tables are created empty
    // when the server (here, the CLI's export) opens the database.
    let db = TestDb::new().await;
    let out = db.dir.path().join("alice.json");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args([
            "export",
            "--user",
            "alice",
            "--company",
            "acme",
            "--format",
            "json",
            "--out",
        ])
        .arg(&out)
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_DIR", db.dir.path().join("data"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // An operator who forgot their own config hears of it.
    assert!(
        stderr.contains("HANDOVER_DATA_TYPES is not set"),
        "{stderr}"
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["metadata"]["total_records"], 0, "{v}");
    assert_eq!(v["export"]["data"]["user_profile"], json!([]));
}

#[tokio::test]
async fn a_cli_export_that_fails_mid_build_leaves_no_file_and_is_recorded_failed() {
    // A type whose rows cannot be written (its `json` column is not JSON):
    // counting it succeeds, so the output file is created before the build
    // breaks.
    let config = broken_type_config();
    let app = spawn_app().await;
    let dir = app.db.clone();
    let config_file = dir.dir.path().join("types.toml");
    std::fs::write(&config_file, config).unwrap();
    let out = dir.dir.path().join("dpo-broken.csv");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args([
            "export",
            "--user",
            "user_456",
            "--company",
            "company_123",
            "--format",
            "csv",
            "--data-types",
            "user_profile,broken",
            "--out",
        ])
        .arg(&out)
        .env("DATABASE_URL", &dir.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_TYPES", &config_file)
        .env("HANDOVER_DATA_DIR", dir.dir.path().join("cli-data"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        !out.exists(),
        "no half-written file of personal data is left behind"
    );
    assert_cli_export_failed_on_record(&app, &stderr).await;
}

/// The CLI export is recorded `failed` (not left pending for ever), with
/// one `export.failed` row.
async fn assert_cli_export_failed_on_record(app: &TestApp, stderr: &str) {
    let status: String =
        sqlx::query_scalar("SELECT status FROM export_requests WHERE delivery = 'cli'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(status, "failed", "the failure is on record: {stderr}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.failed'")
            .await,
        1
    );
}

/// Makes the database refuse `export_requests` changes that `when` selects
/// (an SQL condition on `NEW`), as a full disk or a lost connection would.
async fn refuse_export_requests(app: &TestApp, event: &str, when: &str) {
    let sql = match engine() {
        handover_server::store::Engine::Sqlite => format!(
            "CREATE TRIGGER refuse BEFORE {event} ON export_requests WHEN {when} \
             BEGIN SELECT RAISE(FAIL, 'refused by the test'); END"
        ),
        handover_server::store::Engine::Postgres => {
            sqlx::query(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            )
            .execute(app.pool())
            .await
            .unwrap();
            format!(
                "CREATE TRIGGER refuse BEFORE {event} ON export_requests FOR EACH ROW \
                 WHEN ({when}) EXECUTE FUNCTION refuse()"
            )
        }
    };
    sqlx::query(&sql).execute(app.pool()).await.unwrap();
}

/// The privacy officer's export of user_456's profile to `out`.
async fn cli_export(app: &TestApp, out: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["export", "--user", "user_456", "--company", "company_123"])
        .args(["--format", "csv", "--data-types", "user_profile", "--out"])
        .arg(out)
        .env("DATABASE_URL", &app.db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        // The server's data directory, with its head file.
        .env("HANDOVER_DATA_DIR", app.db.dir.path())
        .env_remove("HANDOVER_AUDIT_HEAD_FILE")
        .output()
        .await
        .unwrap()
}

/// The log verifies against the server's head file, whose newest head is
/// the log's last row: what the failed export did commit is covered, and
/// nothing it rolled back is named.
async fn assert_log_verifies_to_its_last_row(app: &TestApp) {
    let last: i64 = app.count("SELECT MAX(seq) FROM audit_log").await;
    let head = handover_server::store::audit::last_head(&app.db.dir.path().join("audit.head"))
        .unwrap()
        .expect("a head");
    assert_eq!(head.0, last);
    let out = verify_in_data_dir(&app.db).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn a_cli_export_whose_request_cannot_be_created_leaves_no_file() {
    let app = spawn_app().await;
    refuse_export_requests(&app, "INSERT", "NEW.delivery = 'cli'").await;
    let out = app.db.dir.path().join("dpo.csv");
    let run = cli_export(&app, &out).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(stderr.contains("refused by the test"), "{stderr}");
    assert!(!out.exists(), "the empty output file is removed");
    assert_log_verifies_to_its_last_row(&app).await;
}

#[tokio::test]
async fn a_cli_export_that_cannot_start_is_recorded_failed_and_leaves_no_file() {
    let app = spawn_app().await;
    refuse_export_requests(&app, "UPDATE", "NEW.status = 'processing'").await;
    let out = app.db.dir.path().join("dpo.csv");
    let run = cli_export(&app, &out).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(!out.exists(), "the empty output file is removed");
    assert_cli_export_failed_on_record(&app, &stderr).await;
    assert_log_verifies_to_its_last_row(&app).await;
}

#[tokio::test]
async fn a_cli_export_without_the_servers_master_key_makes_no_new_one() {
    let app = spawn_app().await;
    let data_dir = app.db.dir.path().join("no-key-here");
    let out = app.db.dir.path().join("dpo.csv");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["export", "--user", "user_456", "--company", "company_123"])
        .args(["--format", "csv", "--out"])
        .arg(&out)
        .env("DATABASE_URL", &app.db.url)
        .env("HANDOVER_DATA_DIR", &data_dir)
        .env_remove("HANDOVER_MASTER_KEY")
        .env_remove("HANDOVER_MASTER_KEY_FILE")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("no master key") && stderr.contains("HANDOVER_MASTER_KEY"),
        "{stderr}"
    );
    assert!(!data_dir.join("master.key").exists(), "no stray key");
    assert!(!out.exists());
}

#[tokio::test]
async fn a_deleted_exports_wrapped_key_leaves_no_trace_in_the_sqlite_file() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    let wrapped: Vec<u8> =
        sqlx::query_scalar("SELECT wrapped_key FROM export_files WHERE request_id = $1")
            .bind(&id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(
        wrapped.len() >= 32,
        "a wrapped key of {} bytes",
        wrapped.len()
    );
    let deleted = app
        .call(Method::DELETE, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "the key row is gone"
    );
    if engine() == handover_server::store::Engine::Sqlite {
        // With secure_delete, SQLite zeroes the freed cells; without it the
        // key stays readable in free pages of the file. The server's next
        // checkpoint (it runs one every second) empties the write-ahead
        // log, whose older page images still hold the key.
        app.state.store.checkpoint().await.unwrap();
        let path = app.db.url.trim_start_matches("sqlite://").to_string();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
        assert!(
            !bytes
                .windows(wrapped.len())
                .any(|w| w == wrapped.as_slice()),
            "the deleted wrapped key is still in {path}"
        );
    }
}

#[tokio::test]
async fn a_restarted_server_empties_the_sqlite_write_ahead_log_at_its_first_checkpoint() {
    // Wrapped keys deleted before a restart may still sit in older page
    // images of the log, and the flag that asks for a truncating checkpoint
    // lived in the process that stopped. (SQLite whatever the suite's
    // engine: PostgreSQL has no such log.)
    use handover_server::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.db");
    let url = format!("sqlite://{}", path.display());
    let wal = || {
        std::fs::metadata(format!("{}-wal", path.display()))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let before = Store::connect(&url).await.unwrap();
    before.checkpoint().await.unwrap();
    sqlx::query("CREATE TABLE t (x BLOB)")
        .execute(before.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (randomblob(100000))")
        .execute(before.pool())
        .await
        .unwrap();
    before.checkpoint().await.unwrap();
    assert!(wal() > 0, "an ordinary checkpoint leaves the log's pages");

    // The restart, while the old process's connections still hold the log open.
    let after = Store::connect(&url).await.unwrap();
    after.checkpoint().await.unwrap();
    assert_eq!(
        wal(),
        0,
        "the first checkpoint after a start empties the log"
    );
    after.close().await;
    before.close().await;
}
