//! The audit log: every request and event recorded, and tampering detected.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::json;

use handover_server::store::audit::Verification;
use handover_server::store::{Engine, Store};
use sqlx::Row;

use crate::helpers::*;

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
        .fetch_all(app.pool())
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
    .fetch_all(app.pool())
    .await
    .unwrap();
    // hov_<id>_<secret>: the secret's own base64url may hold `_` too.
    let secret = t.splitn(3, '_').nth(2).unwrap();
    assert!(
        all.iter()
            .all(|d| !d.contains(secret) && !d.contains("hov_")),
        "no token in the audit log"
    );
    assert!(matches!(
        app.state.store.verify_audit(None).await.unwrap(),
        Verification::Intact { .. }
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

/// `audit verify` on the chain alone (a data directory without a head file).
async fn verify_cli(db: &TestDb) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_DATA_DIR", db.dir.path().join("no-head-here"))
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn tampering_with_the_audit_log_is_detected_by_verify() {
    let app = spawn_app().await;
    for _ in 0..6 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let dir = app.stop().await;
    let store = Store::connect(&dir.url).await.unwrap();
    let pool = store.pool();
    let (ok, text) = verify_cli(&dir).await;
    assert!(ok, "{text}");
    assert!(text.contains("intact"));

    // Edit a row.
    sqlx::query("UPDATE audit_log SET actor = 'someone_else' WHERE seq = 3")
        .execute(pool)
        .await
        .unwrap();
    let (ok, text) = verify_cli(&dir).await;
    assert!(!ok);
    assert!(text.contains("row 3"), "{text}");
    assert!(text.contains("altered"), "{text}");
    sqlx::query("DELETE FROM audit_log WHERE seq >= 3")
        .execute(pool)
        .await
        .unwrap();
    let (ok, text) = verify_cli(&dir).await;
    assert!(ok, "a clean prefix verifies: {text}");
    assert!(
        text.contains("warning: no audit head") && text.contains("cannot be detected"),
        "without a head file, verify says what it could not check: {text}"
    );
    store.close().await;

    // Delete a row in the middle.
    let app = spawn_with(Opts::default(), Some(dir)).await;
    for _ in 0..4 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let last: i64 = app.count("SELECT MAX(seq) FROM audit_log").await;
    sqlx::query("DELETE FROM audit_log WHERE seq = $1")
        .bind(last - 1)
        .execute(app.pool())
        .await
        .unwrap();
    match app.state.store.verify_audit(None).await.unwrap() {
        Verification::Broken { seq, reason } => {
            assert_eq!(seq, last - 1);
            assert!(reason.contains("missing"), "{reason}");
        }
        v => panic!("{v:?}"),
    }
    let (ok, text) = verify_cli(&app.db).await;
    assert!(!ok && text.contains(&format!("row {}", last - 1)), "{text}");

    // Swap two rows' contents (keeping their seq).
    sqlx::query("DELETE FROM audit_log WHERE seq >= $1")
        .bind(last - 1)
        .execute(app.pool())
        .await
        .unwrap();
    let a = last - 3;
    let b = last - 2;
    sqlx::query(
        "UPDATE audit_log SET request_id = CASE seq WHEN $1 THEN (SELECT request_id FROM audit_log WHERE seq = $2) ELSE (SELECT request_id FROM audit_log WHERE seq = $1) END, \
         prev_hash = CASE seq WHEN $1 THEN (SELECT prev_hash FROM audit_log WHERE seq = $2) ELSE (SELECT prev_hash FROM audit_log WHERE seq = $1) END, \
         hash = CASE seq WHEN $1 THEN (SELECT hash FROM audit_log WHERE seq = $2) ELSE (SELECT hash FROM audit_log WHERE seq = $1) END \
         WHERE seq IN ($1, $2)",
    )
    .bind(a)
    .bind(b)
    .execute(app.pool())
    .await
    .unwrap();
    match app.state.store.verify_audit(None).await.unwrap() {
        Verification::Broken { seq, .. } => assert_eq!(seq, a),
        v => panic!("{v:?}"),
    }
}

#[tokio::test]
async fn a_request_naming_a_foreign_company_is_logged_in_the_callers_scope() {
    let app = spawn_app().await;
    let outsider = app
        .token_for("user_789", &["company_789"], &["data:export"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some(&outsider),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "COMPANY_ACCESS_DENIED")
    );
    // company_123's log holds nothing of it; the outsider's own does.
    let in_victim: i64 = app
        .count("SELECT COUNT(*) FROM audit_log WHERE company_id = 'company_123' AND actor = 'user_789'")
        .await;
    assert_eq!(in_victim, 0);
    let details: String = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE actor = 'user_789' AND company_id = 'company_789' AND outcome = 'refused'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(
        details.contains("\"requested_company\":\"company_123\""),
        "{details}"
    );
}

/// What a flood of 60 refused requests (throttle at 20 a minute) left.
struct Flood {
    refused: u32,
    throttled: u32,
    /// Audit rows the flood and one signed-in call added.
    rows: i64,
    /// The longest `details` stored.
    stored: i64,
    /// The `auth.refused` tallies' details, once written.
    tallies: Vec<String>,
}

/// One flood on a fresh app; `None` when a new clock minute began during
/// it (the throttle counts per minute, so its counts then span two).
async fn flood_once() -> Option<Flood> {
    let app = spawn_with(
        Opts {
            unauth_per_minute: Some(20),
            ..Opts::default()
        },
        None,
    )
    .await;
    // A real user has just signed in from the same address.
    let ok = app.call(Method::GET, "/api/data/export", None).await;
    assert_eq!(ok.status, 200);
    let before = app
        .count("SELECT COUNT(*) FROM audit_log WHERE outcome != 'event'")
        .await;
    let path = format!("/api/data/export/{}", "a".repeat(30_000));
    let minute = unix_minute();
    let (mut refused, mut throttled) = (0, 0);
    for i in 0..60 {
        let token = format!("hov_bogus_{i}");
        let r = app.raw(Method::GET, &path, Some(&token), None, None).await;
        match r.status.as_u16() {
            401 => refused += 1,
            429 => {
                throttled += 1;
                assert_eq!(r.code(), "RATE_LIMIT_EXCEEDED");
                assert!(!r.header("retry-after").is_empty());
            }
            s => panic!("unexpected {s}"),
        }
        // The user is not locked out by the flood.
        if i == 40 {
            let ok = app.call(Method::GET, "/api/data/export", None).await;
            assert_eq!(ok.status, 200, "{}", ok.body);
        }
    }
    let rows = app
        .count("SELECT COUNT(*) FROM audit_log WHERE outcome != 'event'")
        .await
        - before;
    let stored = app
        .count("SELECT COALESCE(MAX(LENGTH(details)), 0) FROM audit_log")
        .await;
    // The counts reach the log, one row per address and minute.
    handover_server::context::write_tallies(&app.state, app.state.guard.take_all())
        .await
        .unwrap();
    let tallies = sqlx::query_scalar("SELECT details FROM audit_log WHERE action = 'auth.refused'")
        .fetch_all(app.pool())
        .await
        .unwrap();
    (unix_minute() == minute).then_some(Flood {
        refused,
        throttled,
        rows,
        stored,
        tallies,
    })
}

#[tokio::test]
async fn an_unauthenticated_flood_is_throttled_counted_not_logged_row_by_row() {
    // A flood that a new minute cut in two is run again: one takes far
    // less than a minute, so the second stays within one.
    let f = match flood_once().await {
        Some(f) => f,
        None => flood_once()
            .await
            .expect("two runs crossed a minute boundary"),
    };
    assert!(
        f.refused <= 20 && f.throttled >= 40,
        "{} refused, {} throttled",
        f.refused,
        f.throttled
    );
    assert!(
        f.rows <= 10 + 1,
        "{} audit rows for 60 refused requests",
        f.rows
    );
    assert!(
        f.stored < 2048,
        "the 30 KB path is not stored whole ({})",
        f.stored
    );
    assert!(!f.tallies.is_empty());
    let total: u64 = f
        .tallies
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            v["refused"].as_u64().unwrap() + v["throttled"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(total, 60);
}

#[tokio::test]
async fn re_chained_or_truncated_logs_fail_verification() {
    let app = spawn_app().await;
    for _ in 0..6 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let head_file = app.db.dir.path().join("audit.head");
    let head = handover_server::store::audit::last_head(&head_file)
        .unwrap()
        .expect("each append wrote the head");
    let last = app.count("SELECT MAX(seq) FROM audit_log").await;
    assert_eq!(head.0, last, "the head file follows the log");
    assert!(matches!(
        app.state
            .store
            .verify_audit(Some(head.clone()))
            .await
            .unwrap(),
        Verification::Intact { .. }
    ));

    // Re-chaining: rewrite row 3 and recompute every hash from there on,
    // as someone with write access to the database (but not the key) can.
    sqlx::query("UPDATE audit_log SET actor = 'someone_else' WHERE seq = 3")
        .execute(app.pool())
        .await
        .unwrap();
    let rows = sqlx::query("SELECT * FROM audit_log WHERE seq >= 3 ORDER BY seq")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let mut prev: String = sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = 2")
        .fetch_one(app.pool())
        .await
        .unwrap();
    for r in rows {
        let seq: i64 = r.get("seq");
        let canonical = json!([
            seq,
            r.get::<String, _>("at"),
            r.get::<Option<String>, _>("request_id"),
            r.get::<Option<String>, _>("actor"),
            r.get::<Option<String>, _>("company_id"),
            r.get::<String, _>("action"),
            r.get::<Option<String>, _>("resource"),
            r.get::<String, _>("outcome"),
            r.get::<Option<i64>, _>("status"),
            r.get::<Option<String>, _>("ip"),
            r.get::<Option<String>, _>("user_agent"),
            serde_json::from_str::<serde_json::Value>(&r.get::<String, _>("details")).unwrap(),
            prev
        ]);
        let forged = format!("hmac:{}", sha256_hex(canonical.to_string().as_bytes()));
        sqlx::query("UPDATE audit_log SET prev_hash = $1, hash = $2 WHERE seq = $3")
            .bind(&prev)
            .bind(&forged)
            .bind(seq)
            .execute(app.pool())
            .await
            .unwrap();
        prev = forged;
    }
    match app.state.store.verify_audit(None).await.unwrap() {
        Verification::Broken { seq, .. } => assert_eq!(seq, 3),
        v => panic!("a re-chained log verified: {v:?}"),
    }

    // Truncation: the newest rows removed. The chain that is left is
    // whole, but the head kept outside the database names a row it lacks.
    sqlx::query("DELETE FROM audit_log WHERE seq >= 3")
        .execute(app.pool())
        .await
        .unwrap();
    assert!(matches!(
        app.state.store.verify_audit(None).await.unwrap(),
        Verification::Intact { .. }
    ));
    match app.state.store.verify_audit(Some(head)).await.unwrap() {
        Verification::Broken { reason, .. } => assert!(reason.contains("removed"), "{reason}"),
        v => panic!("a truncated log verified against its head: {v:?}"),
    }
    // And from the CLI, with the head file.
    let out = verify_with_head_file(&app, &head_file).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    // And with no head file named: the one `serve` keeps in its data
    // directory by default.
    let out = verify_in_data_dir(&app.db).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    // A head file emptied beside a log with rows: the heads were removed
    // with the rows they named.
    std::fs::write(&head_file, "").unwrap();
    let out = verify_with_head_file(&app, &head_file).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("BROKEN") && stdout.contains("holds no head"),
        "{stdout}"
    );
    // Without the key, a keyed log cannot be vouched for.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &app.db.url)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HANDOVER_MASTER_KEY"));
}

#[tokio::test]
async fn rows_removed_and_numbered_again_by_the_running_server_fail_verification() {
    let app = spawn_app().await;
    for _ in 0..4 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    let last = app.count("SELECT MAX(seq) FROM audit_log").await;
    // Removed while the server runs: it goes on from the row before the
    // gap, so the chain is whole again, under the removed rows' numbers.
    sqlx::query("DELETE FROM audit_log WHERE seq > $1")
        .bind(last - 3)
        .execute(app.pool())
        .await
        .unwrap();
    // Far more commits than the newest lines of the head file hold.
    for _ in 0..40 {
        app.call(Method::GET, "/api/data/summary", None).await;
    }
    assert!(matches!(
        app.state.store.verify_audit(None).await.unwrap(),
        Verification::Intact { .. }
    ));
    let out = verify_with_head_file(&app, &app.db.dir.path().join("audit.head")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("rewritten"), "{stdout}");
}

/// The default threshold, as the README states it: an address's first 30
/// failed authentications of a minute are answered `401`, the next `429`.
#[tokio::test]
async fn by_default_an_address_is_throttled_after_30_failures_a_minute() {
    // A run that a new minute cut in two is run again (it takes far less
    // than a minute).
    for _ in 0..2 {
        let app = spawn_with(
            Opts {
                tarpit: Some(std::time::Duration::ZERO),
                ..Opts::default()
            },
            None,
        )
        .await;
        let minute = unix_minute();
        let mut statuses = Vec::new();
        for _ in 0..31 {
            let r = app
                .raw(
                    Method::GET,
                    "/api/data/export",
                    Some("hov_bogus"),
                    None,
                    None,
                )
                .await;
            statuses.push(r.status.as_u16());
        }
        if unix_minute() != minute {
            continue;
        }
        assert!(statuses[..30].iter().all(|s| *s == 401), "{statuses:?}");
        assert_eq!(statuses[30], 429, "{statuses:?}");
        return;
    }
    panic!("two runs crossed a minute boundary");
}

#[tokio::test]
async fn a_throttled_answer_keeps_cors_and_a_request_id_on_any_api_path() {
    use reqwest::Method as M;
    let origin = "https://app.example";
    let app = spawn_with(
        Opts {
            unauth_per_minute: Some(2),
            cors_origins: vec![origin.to_string()],
            ..Opts::default()
        },
        None,
    )
    .await;
    let send = |method: M, path: &str| {
        app.client
            .request(method, format!("{}{path}", app.base))
            .header("origin", origin)
            .bearer_auth("hov_bogus")
            .send()
    };
    // The throttle answers before routing: a path no route has, and a
    // method the route does not take, get the same 429. Retried once, in
    // case a minute boundary restarts the count in between.
    for attempt in 0..2 {
        let mut throttled = false;
        for _ in 0..4 {
            if send(M::GET, "/api/data/export").await.unwrap().status() == 429 {
                throttled = true;
                break;
            }
        }
        assert!(throttled, "the address is throttled past its limit");
        let mut answers = Vec::new();
        for (method, path) in [
            (M::GET, "/api/no/such/route"),
            (M::DELETE, "/api/data/summary"),
        ] {
            answers.push(send(method, path).await.unwrap());
        }
        if attempt == 0 && answers.iter().any(|r| r.status() != 429) {
            continue;
        }
        for r in &answers {
            assert_eq!(r.status(), 429, "{}", r.url());
            assert!(r.headers().contains_key("x-request-id"), "{}", r.url());
            assert!(r.headers().contains_key("retry-after"), "{}", r.url());
            assert_eq!(r.headers()["access-control-allow-origin"], origin);
        }
        return;
    }
}

#[tokio::test]
async fn a_throttled_address_waits_in_the_tarpit_for_its_answer() {
    let tarpit = std::time::Duration::from_millis(400);
    let app = spawn_with(
        Opts {
            unauth_per_minute: Some(2),
            tarpit: Some(tarpit),
            ..Opts::default()
        },
        None,
    )
    .await;
    let knock = || {
        app.raw(
            Method::GET,
            "/api/data/export",
            Some("hov_bogus"),
            None,
            None,
        )
    };
    // Bounded: the limit is 2 refusals a minute.
    let mut throttled = false;
    for _ in 0..5 {
        if knock().await.status == 429 {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "the address is throttled past its limit");
    // Bounded: a new minute starts the count again at most once (then the
    // address is throttled again within two refusals).
    for _ in 0..4 {
        let t0 = std::time::Instant::now();
        let r = knock().await;
        if r.status == 429 {
            assert!(
                t0.elapsed() >= tarpit / 2,
                "the 429 was held back ({:?})",
                t0.elapsed()
            );
            return;
        }
        assert_eq!(r.status, 401, "{}", r.body);
    }
    panic!("the address was not throttled again");
}

#[tokio::test]
async fn a_token_new_to_a_throttled_address_still_works_and_the_bad_ones_stay_refused() {
    let app = spawn_with(
        Opts {
            unauth_per_minute: Some(5),
            tarpit: Some(std::time::Duration::ZERO),
            ..Opts::default()
        },
        None,
    )
    .await;
    // A script checking its 401s with three wrong tokens, from this address,
    // until the address is throttled (bounded: the limit is 5 a minute, and
    // a new minute starts the count again at most once).
    let app = &app;
    let knock = |i: usize| async move {
        app.raw(
            Method::GET,
            "/api/data/summary",
            Some(&format!("hov_wrong_{}", i % 3)),
            Some("company_123"),
            None,
        )
        .await
        .status
    };
    let mut i = 0;
    while knock(i).await != 429 {
        i += 1;
        assert!(i < 15, "the address is never throttled");
    }
    // A token made just now, never used: checked, and it works.
    let fresh = app
        .token_for("user_456", &["company_123"], &["data:export"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/summary",
            Some(&fresh),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A wrong one is answered before it is checked again.
    let mut tries = 1;
    while knock(1).await != 429 {
        tries += 1;
        assert!(tries <= 7, "a token that failed is checked again and again");
    }
}

#[tokio::test]
async fn rows_of_concurrent_requests_share_a_commit_and_the_chain_holds() {
    let app = spawn_app().await;
    let before_rows = app.count("SELECT COUNT(*) FROM audit_log").await;
    let before_commits = commits(&app);
    let names: Vec<String> = (0..50).map(|i| format!("row_{i}")).collect();
    for r in audit_at_once(&app, "test.burst", &names).await {
        r.expect("each row committed");
    }
    // Every row is stored once it returns, each exactly once.
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT resource FROM audit_log WHERE action = 'test.burst'")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(stored.len(), 50);
    assert_eq!(stored.iter().collect::<HashSet<_>>().len(), 50);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM audit_log").await,
        before_rows + 50
    );
    // In far fewer commits than rows: each commit appends one head.
    let commits = commits(&app) - before_commits;
    assert!(commits <= 2, "{commits} commits for 50 rows");
    assert_chain_holds_to_its_head(&app).await;
}

#[tokio::test]
async fn a_row_that_cannot_be_written_fails_alone_and_the_rest_of_its_batch_is_kept() {
    let app = spawn_app().await;
    // The database refuses one row (a real constraint, as a full disk or a
    // bad value would): its batch fails, and the rows are committed again
    // one by one.
    match engine() {
        Engine::Sqlite => {
            app.exec_plain(
                "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.resource = 'poison' \
                 BEGIN SELECT RAISE(ABORT, 'a poisoned row'); END",
            )
            .await
        }
        Engine::Postgres => {
            app.exec_plain(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN \
                 IF NEW.resource = 'poison' THEN RAISE EXCEPTION 'a poisoned row'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql",
            )
            .await;
            app.exec_plain(
                "CREATE TRIGGER poison BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION poison()",
            )
            .await
        }
    }
    let before_commits = commits(&app);
    let names: Vec<String> = (0..20)
        .map(|i| {
            if i == 6 {
                "poison".to_string()
            } else {
                format!("row_{i}")
            }
        })
        .collect();
    let results = audit_at_once(&app, "test.poison", &names).await;
    for (name, r) in names.iter().zip(&results) {
        assert_eq!(r.is_err(), name == "poison", "{name}: {r:?}");
    }
    let mut stored: Vec<String> = sqlx::query_scalar(
        "SELECT resource FROM audit_log WHERE action = 'test.poison' ORDER BY seq",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    let mut expected: Vec<String> = names.iter().filter(|n| *n != "poison").cloned().collect();
    stored.sort();
    expected.sort();
    assert_eq!(
        stored, expected,
        "every other row once, the refused one not at all"
    );
    // The failed batch committed nothing; each row then had its own commit.
    assert_eq!(commits(&app) - before_commits, 19);
    assert_chain_holds_to_its_head(&app).await;
    // And the queue goes on batching afterwards.
    let before = commits(&app);
    let later: Vec<String> = (0..10).map(|i| format!("after_{i}")).collect();
    for r in audit_at_once(&app, "test.after", &later).await {
        r.expect("committed");
    }
    let after = commits(&app) - before;
    assert!(after <= 2, "{after} commits for 10 rows");
}

/// Queues an audit row per name at once and waits for each. This suite's
/// runtime has one thread, so all are queued before the writer's task
/// first runs, and meet in one batch.
async fn audit_at_once(app: &TestApp, action: &str, names: &[String]) -> Vec<anyhow::Result<()>> {
    use handover_server::store::audit::AuditEntry;
    futures_util::future::join_all(names.iter().map(|name| {
        app.state.store.audit(AuditEntry {
            action: action.into(),
            outcome: "refused".into(),
            resource: Some(name.clone()),
            ..Default::default()
        })
    }))
    .await
}

/// The chain verifies, up to the head last written outside the database.
async fn assert_chain_holds_to_its_head(app: &TestApp) {
    let head_file = app.db.dir.path().join("audit.head");
    let head = handover_server::store::audit::last_head(&head_file)
        .unwrap()
        .expect("a head was written");
    assert!(matches!(
        app.state.store.verify_audit(Some(head)).await.unwrap(),
        Verification::Intact { .. }
    ));
}

/// Commits of audit rows so far: each appends a line to the head file.
fn commits(app: &TestApp) -> usize {
    std::fs::read_to_string(app.db.dir.path().join("audit.head"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test]
async fn lifecycle_events_a_request_causes_carry_its_address_and_user_agent() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    let event = |action: &'static str| {
        let (pool, id) = (app.pool().clone(), id.clone());
        async move {
            sqlx::query_as::<_, (Option<String>, Option<String>, Option<String>)>(
                "SELECT request_id, ip, user_agent FROM audit_log WHERE action = $1 AND resource = $2",
            )
            .bind(action)
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (request_id, ip, ua) = event("export.created").await;
    assert!(request_id.is_some_and(|r| r.starts_with("req_")));
    assert_eq!(ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(ua.as_deref(), Some("handover-tests/1.0"));
    // A build the job runner does on its own has no request behind it.
    handover_server::jobs::drain(&app.state).await.unwrap();
    assert_eq!(event("export.completed").await, (None, None, None));
    // An event queued for the group commit (written by another task) is
    // stamped too.
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let (request_id, ip, ua) = event("export.downloaded").await;
    assert_eq!(request_id.as_deref(), Some(r.header("x-request-id")));
    assert_eq!(ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(ua.as_deref(), Some("handover-tests/1.0"));
}

/// The clock minute the server's throttle counts in.
fn unix_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

#[tokio::test]
async fn an_authenticated_request_with_a_huge_user_agent_and_path_stores_them_capped() {
    let app = spawn_app().await;
    let long_path = format!("/api/data/export/{}", "x".repeat(30_000));
    let r = app
        .client
        .get(format!("{}{long_path}", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .header("user-agent", "U".repeat(7_000))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "an unknown export: {}",
        r.status()
    );
    let row = sqlx::query(
        "SELECT LENGTH(COALESCE(user_agent, '')) AS ua, LENGTH(COALESCE(details, '')) + LENGTH(COALESCE(resource, '')) AS rest, actor FROM audit_log WHERE outcome != 'event' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        row.get::<Option<String>, _>("actor").as_deref(),
        Some("user_456"),
        "the row of that request"
    );
    let ua: i64 = row.get::<i32, _>("ua").into();
    let rest: i64 = row.get::<i32, _>("rest").into();
    assert!(ua > 0 && ua <= 256, "user agent stored at {ua} characters");
    assert!(rest < 2048, "path stored at {rest} characters");
}

/// `handover-server audit verify` on the app's database, against `head_file`.
async fn verify_with_head_file(app: &TestApp, head_file: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &app.db.url)
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_AUDIT_HEAD_FILE", head_file)
        .output()
        .await
        .unwrap()
}

/// Operator commands append the heads of their rows to the head file
/// `serve` keeps, so removing a `token create` row shows too. Run where no
/// server keeps a head file, they make none; a head file of another
/// database is left alone.
#[tokio::test]
async fn operator_rows_are_covered_by_the_head_file() {
    let app = spawn_app().await;
    app.call(Method::GET, "/api/data/summary", None).await;
    let db = app.stop().await;
    let cli = |data_dir: &std::path::Path| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"));
        cmd.env("DATABASE_URL", &db.url)
            .env("HANDOVER_MASTER_KEY", MASTER_HEX)
            .env("HANDOVER_DATA_DIR", data_dir)
            .env_remove("HANDOVER_AUDIT_HEAD_FILE");
        cmd
    };
    let token = |mut cmd: tokio::process::Command| async move {
        let out = cmd
            .args([
                "token",
                "create",
                "--user",
                "user_456",
                "--company",
                "company_123",
            ])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(
            !stderr.contains("writing the audit head failed"),
            "{stderr}"
        );
        stderr
    };
    let elsewhere = db.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    token(cli(&elsewhere)).await;
    assert!(
        !elsewhere.join("audit.head").exists(),
        "no head file made where no server keeps one"
    );
    // A head file of another database: not appended to.
    let foreign = db.dir.path().join("foreign.head");
    let foreign_head = format!("1 hmac:{}\n", "0".repeat(64));
    std::fs::write(&foreign, &foreign_head).unwrap();
    let mut cmd = cli(&elsewhere);
    cmd.env("HANDOVER_AUDIT_HEAD_FILE", &foreign);
    let stderr = token(cmd).await;
    assert!(
        stderr.contains("not appended") && stderr.contains("not a row of this database"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), foreign_head);
    // Nor to a file that holds something other than heads.
    std::fs::write(&foreign, "not a head\n").unwrap();
    let mut cmd = cli(&elsewhere);
    cmd.env("HANDOVER_AUDIT_HEAD_FILE", &foreign);
    let stderr = token(cmd).await;
    assert!(stderr.contains("no whole head"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "not a head\n");
    // A head file named but not there yet: the server creates it, not an
    // operator (who may be another user).
    let missing = db.dir.path().join("missing.head");
    let mut cmd = cli(&elsewhere);
    cmd.env("HANDOVER_AUDIT_HEAD_FILE", &missing);
    let stderr = token(cmd).await;
    assert!(stderr.contains("no such file yet"), "{stderr}");
    assert!(!missing.exists());

    token(cli(db.dir.path())).await;
    let store = Store::connect(&db.url).await.unwrap();
    let last: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM audit_log")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let head = handover_server::store::audit::last_head(&db.dir.path().join("audit.head"))
        .unwrap()
        .expect("a head");
    assert_eq!(head.0, last, "the token's row is the head");

    sqlx::query("DELETE FROM audit_log WHERE seq = $1")
        .bind(last)
        .execute(store.pool())
        .await
        .unwrap();
    let out = cli(db.dir.path())
        .args(["audit", "verify"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stdout.contains("removed"),
        "{stdout}"
    );
    store.close().await;
}
