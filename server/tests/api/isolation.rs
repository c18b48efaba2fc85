//! Tenant isolation: two users in two companies.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

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
    handover_server::jobs::drain(&app.state).await.unwrap();
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
                (Method::GET, format!("/api/data/export/{other}/copy"), None),
                (
                    Method::PATCH,
                    format!("/api/data/export/{other}/copy"),
                    Some("{}"),
                ),
                (
                    Method::POST,
                    format!("/api/data/export/{other}/copy/complete"),
                    Some(
                        r#"{"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
                    ),
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
                    sqlx::query_as("SELECT user_id, company_id FROM demo_payments WHERE id = $1")
                        .bind(pid)
                        .fetch_one(app.pool())
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
