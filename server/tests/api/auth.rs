//! API tokens and JWTs from an identity provider, and development mode.

use reqwest::Method;

use crate::helpers::*;

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
    let url = app.db.url.clone();
    let out = create_token(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
            .env("DATABASE_URL", &url)
            .env("HANDOVER_MASTER_KEY", MASTER_HEX),
    )
    .await;
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
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
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
    // The scheme's name is case-insensitive.
    let r = app
        .client
        .get(format!("{}/api/data/summary", app.base))
        .header("authorization", format!("BEARER {good}"))
        .header("x-company-id", "company_123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
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
    let key =
        EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-test-private.pem")).unwrap();
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
async fn dev_no_auth_refuses_to_start_on_a_public_address() {
    let db = TestDb::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_BIND", "0.0.0.0:0")
        .env("HANDOVER_DATA_DIR", db.dir.path().join("data"))
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DEV_NO_AUTH", "1")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

/// `handover-server` with only the database and the data directory set:
/// no master key in the environment.
fn operator(db: &TestDb, data_dir: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"));
    cmd.env("DATABASE_URL", &db.url)
        .env("HANDOVER_DATA_DIR", data_dir)
        .env_remove("HANDOVER_MASTER_KEY")
        .env_remove("HANDOVER_MASTER_KEY_FILE")
        .env_remove("HANDOVER_AUDIT_HEAD_FILE")
        .env_remove("HANDOVER_LOG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    cmd
}

/// The binary serving on a free port (see [`operator`]), and its address.
async fn serve(
    db: &TestDb,
    data_dir: &std::path::Path,
    master_key: Option<&str>,
) -> (tokio::process::Child, String) {
    let (server, addr, _) = serve_logged(db, data_dir, master_key).await;
    (server, addr)
}

/// [`serve`], and what it logged before it listened.
async fn serve_logged(
    db: &TestDb,
    data_dir: &std::path::Path,
    master_key: Option<&str>,
) -> (tokio::process::Child, String, String) {
    use tokio::io::AsyncBufReadExt as _;
    let mut cmd = operator(db, data_dir);
    if let Some(k) = master_key {
        cmd.env("HANDOVER_MASTER_KEY", k);
    }
    let mut server = cmd
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let listening = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, rest)) = line.split_once("handover-server listening addr=") {
                return rest.split_whitespace().next().map(str::to_string);
            }
            log.push_str(&line);
            log.push('\n');
        }
        None
    };
    let addr = tokio::time::timeout(std::time::Duration::from_secs(60), listening)
        .await
        .expect("the server starts")
        .expect("and says where it listens");
    // The rest of its log, read so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (server, addr, log)
}

#[tokio::test]
async fn serve_warns_when_its_head_file_names_a_row_its_database_lacks() {
    // As after a restore from a backup: the head file is from later on.
    let app = spawn_app().await;
    let db = app.stop().await;
    let data = db.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("audit.head"),
        format!("999999 hmac:{}\n", "0".repeat(64)),
    )
    .unwrap();
    let (mut server, _, log) = serve_logged(&db, &data, Some(MASTER_HEX)).await;
    server.kill().await.unwrap();
    assert!(
        log.contains("records a row this database does not hold")
            && log.contains("move the head file aside"),
        "{log}"
    );
    // A head file of this database: no such warning.
    let store = handover_server::store::Store::connect(&db.url)
        .await
        .unwrap();
    let (seq, hash): (i64, String) =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_one(store.pool())
            .await
            .unwrap();
    store.close().await;
    std::fs::write(data.join("audit.head"), format!("{seq} {hash}\n")).unwrap();
    let (mut server, _, log) = serve_logged(&db, &data, Some(MASTER_HEX)).await;
    server.kill().await.unwrap();
    assert!(!log.contains("does not hold"), "{log}");
}

/// `token create` for user_456 in company_123 (see [`operator`]).
async fn create_token(cmd: &mut tokio::process::Command) -> std::process::Output {
    cmd.args([
        "token",
        "create",
        "--user",
        "user_456",
        "--company",
        "company_123",
    ])
    .output()
    .await
    .unwrap()
}

/// `token create` without a master key, where none may be made: refused,
/// naming the variable, with no token and no key file.
async fn refused_without_a_key(db: &TestDb, data_dir: &std::path::Path) {
    let refused = create_token(&mut operator(db, data_dir)).await;
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("HANDOVER_MASTER_KEY"), "{err}");
    assert!(!data_dir.join("master.key").exists());
}

#[tokio::test]
async fn another_master_key_than_the_databases_first_is_refused() {
    let db = TestDb::new().await;
    let data = db.dir.path().join("data");
    // The server's first start, with its key from the environment.
    let (mut server, _) = serve(&db, &data, Some(MASTER_HEX)).await;
    server.kill().await.unwrap();
    // An operator without that key: not a fresh install, so no new key.
    refused_without_a_key(&db, &data).await;
    // Another key: refused by the CLI and by the server.
    let other = "08".repeat(32);
    let refused = create_token(operator(&db, &data).env("HANDOVER_MASTER_KEY", &other)).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("not the master key this database was set up with"),
        "{err}"
    );
    let start = operator(&db, &data)
        .env("HANDOVER_MASTER_KEY", &other)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .output();
    // Bounded: a server that accepted the key would keep running.
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), start)
        .await
        .expect("the server refuses to start")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not the master key this database was set up with"),
        "{err}"
    );
    // The first key still works.
    let made = create_token(operator(&db, &data).env("HANDOVER_MASTER_KEY", MASTER_HEX)).await;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

#[tokio::test]
async fn a_token_made_before_the_first_start_works_once_the_server_runs() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = TestDb::new().await;
    let data = db.dir.path().join("data");
    let made = create_token(&mut operator(&db, &data)).await;
    let stderr = String::from_utf8_lossy(&made.stderr);
    assert!(made.status.success(), "{stderr}");
    let stdout = String::from_utf8(made.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "the token and nothing else");
    let token = stdout.trim().to_string();
    let key = data.join("master.key");
    let mode = std::fs::metadata(&key)
        .expect("the master key, made as serve would")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The server's first start takes that key, and the token works.
    let (mut server, addr) = serve(&db, &data, None).await;
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/api/data/summary"))
        .bearer_auth(&token)
        .header("x-company-id", "company_123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.kill().await.unwrap();
    // One chain under one key: the CLI's row and the server's verify.
    let verified = operator(&db, &data)
        .args(["audit", "verify"])
        .output()
        .await
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout) + String::from_utf8_lossy(&verified.stderr)
    );
    // Once the log has rows, a missing key is not made anew.
    let elsewhere = db.dir.path().join("elsewhere");
    refused_without_a_key(&db, &elsewhere).await;
}

#[tokio::test]
async fn refusals_counted_this_minute_are_written_when_the_server_stops() {
    let db = TestDb::new().await;
    let (mut server, addr) = serve(&db, &db.dir.path().join("data"), None).await;
    let client = reqwest::Client::new();
    let refusals = handover_server::guard::LOGGED_PER_MINUTE + 5;
    for _ in 0..refusals {
        let r = client
            .get(format!("http://{addr}/api/data/summary"))
            .bearer_auth("hov_not_a_token")
            .header("x-company-id", "company_123")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // SIGTERM: a graceful stop.
    let pid = server.id().unwrap().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), server.wait())
        .await
        .expect("the server stops")
        .unwrap();
    assert!(stopped.success(), "{stopped:?}");
    // Every refusal is in the log: a row of its own for the first few of
    // the minute, the rest in the minute's count, written on the way out.
    // (Should a new minute begin during the loop, more have rows of their
    // own; the sum holds either way.)
    let store = handover_server::store::Store::connect(&db.url)
        .await
        .unwrap();
    let own: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE status = 401 AND request_id IS NOT NULL",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let counted: Vec<String> = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE action = 'auth.refused' AND request_id IS NULL",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let in_counts: u64 = counted
        .iter()
        .map(|d| {
            let d: serde_json::Value = serde_json::from_str(d).unwrap();
            d["refused"].as_u64().unwrap() - d["logged_one_by_one"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(own as u64 + in_counts, refusals, "{counted:?}");
}

#[tokio::test]
async fn creating_and_revoking_tokens_is_audited() {
    let app = spawn_app().await;
    let (id, token) = handover_server::auth::create_token(
        &app.state.store,
        "user_9",
        &["company_123".into()],
        &["data:export".into()],
        "ops@example.com",
    )
    .await
    .unwrap();
    assert!(
        handover_server::auth::revoke_token(&app.state.store, &token, "ops@example.com")
            .await
            .unwrap()
    );
    for action in ["token.created", "token.revoked"] {
        let details: String = sqlx::query_scalar(
            "SELECT details FROM audit_log WHERE action = $1 AND company_id = 'company_123' AND resource = $2",
        )
        .bind(action)
        .bind(format!("token_{id}"))
        .fetch_one(app.pool())
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"));
        assert!(details.contains("ops@example.com"), "{action}: {details}");
        assert!(
            !details.contains(&token),
            "the token itself is never logged"
        );
    }
}

#[tokio::test]
async fn jwts_not_yet_valid_or_meant_to_live_too_long_are_refused() {
    let app = spawn_with(
        Opts {
            jwt_max_lifetime_secs: Some(3600),
            ..Opts::default()
        },
        None,
    )
    .await;
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let base = serde_json::json!({ "sub": "user_456", "companies": ["company_123"],
        "permissions": ["data:export"], "iss": ISSUER, "aud": AUDIENCE });
    let with = |extra: serde_json::Value| {
        let mut c = base.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        token(c)
    };
    for (what, t, status) in [
        (
            "valid",
            with(serde_json::json!({"iat": now, "exp": now + 600})),
            200,
        ),
        (
            "nbf in an hour",
            with(serde_json::json!({"iat": now, "nbf": now + 3600, "exp": now + 3000})),
            401,
        ),
        (
            "a day long",
            with(serde_json::json!({"iat": now, "exp": now + 86_400})),
            401,
        ),
        ("no iat", with(serde_json::json!({"exp": now + 600})), 401),
    ] {
        let r = app
            .raw(
                Method::GET,
                "/api/data/export",
                Some(&t),
                Some("company_123"),
                None,
            )
            .await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
    }
}

#[tokio::test]
async fn demo_tokens_expire_and_die_with_demo_mode() {
    let demo = spawn_with(
        Opts {
            demo_mode: true,
            ..Opts::default()
        },
        None,
    )
    .await;
    let (id, token) = handover_server::auth::create_demo_token(&demo.state.store)
        .await
        .unwrap();
    let r = demo
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&token),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Only the demo companies' data: any other company is refused.
    let r = demo
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&token),
            Some("acme_corp"),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The same database served without demo mode: the demo token is dead.
    let db = demo.stop().await;
    let app = spawn_with(Opts::default(), Some(db)).await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&token),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "UNAUTHORIZED"),
        "the same token, the same database: only demo mode is off"
    );
    let db = app.stop().await;
    // Back in demo mode, but past its lifetime: expired.
    let demo = spawn_with(
        Opts {
            demo_mode: true,
            ..Opts::default()
        },
        Some(db),
    )
    .await;
    demo.exec(
        "UPDATE api_tokens SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
        &id,
    )
    .await;
    let r = demo
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&token),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "UNAUTHORIZED"),
        "past its lifetime"
    );
}
