//! JWTs verified with the identity provider's JWKS: cached, fetched again
//! when a new key id shows up (rotation) or the cache expires, and never
//! fetched in a loop for made-up key ids.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;

use crate::helpers::*;

const KEY_A: &[u8] = include_bytes!("../fixtures/jwt-test-private.pem");
const KEY_B: &[u8] = include_bytes!("../fixtures/jwt-rotated-private.pem");
const JWKS_A: &str = include_str!("../fixtures/jwks-a.json");
const JWKS_AB: &str = include_str!("../fixtures/jwks-ab.json");
const JWKS_B: &str = include_str!("../fixtures/jwks-b.json");

/// A JWKS endpoint on 127.0.0.1 serving what `set` holds, counting fetches.
struct Provider {
    url: String,
    set: Arc<Mutex<&'static str>>,
    fetches: Arc<AtomicUsize>,
}

async fn provider(initial: &'static str) -> Provider {
    provider_at("127.0.0.1:0", initial).await
}

async fn provider_at(addr: &str, initial: &'static str) -> Provider {
    let set = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (s, f) = (set.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (s, f) = (s.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let body = *s.lock().unwrap();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Provider { url, set, fetches }
}

/// An address on 127.0.0.1 that redirects (302) to `to`.
async fn redirect_to(to: &str) -> String {
    let to = to.to_string();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let to = to.clone();
            async move { (axum::http::StatusCode::FOUND, [("location", to)]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn token(kid: Option<&str>, pem: &[u8], alg: Algorithm) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    let claims = serde_json::json!({
        "sub": "user_456", "companies": ["company_123"], "permissions": ["data:export"],
        "exp": time::OffsetDateTime::now_utc().unix_timestamp() + 600,
        "iss": ISSUER, "aud": AUDIENCE,
    });
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(pem),
        _ => EncodingKey::from_rsa_pem(pem).unwrap(),
    };
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn status(app: &TestApp, token: &str) -> u16 {
    app.raw(
        Method::GET,
        "/api/data/export",
        Some(token),
        Some("company_123"),
        None,
    )
    .await
    .status
    .as_u16()
}

async fn spawn_jwks(url: &str, ttl: Duration, interval: Duration) -> TestApp {
    spawn_with(
        Opts {
            jwks: Some((url.to_string(), ttl, interval)),
            ..Opts::default()
        },
        None,
    )
    .await
}

#[tokio::test]
async fn keys_come_from_the_jwks_are_cached_and_rotate_without_a_restart() {
    let idp = provider(JWKS_A).await;
    let app = spawn_jwks(&idp.url, Duration::from_secs(3600), Duration::ZERO).await;
    let a = token(Some("key-2026-a"), KEY_A, Algorithm::RS256);
    assert_eq!(status(&app, &a).await, 200);
    assert_eq!(status(&app, &a).await, 200);
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1, "the keys are cached");

    // The provider rotates: a token signed with the new key is accepted
    // as soon as it shows up (its key id is new: the set is fetched again).
    *idp.set.lock().unwrap() = JWKS_AB;
    let b = token(Some("key-2026-b"), KEY_B, Algorithm::RS256);
    assert_eq!(status(&app, &b).await, 200);
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        status(&app, &a).await,
        200,
        "the old key still works while published"
    );

    // What is refused: no key id, a key id signed by another key, the
    // shared-secret algorithm (key confusion), an unknown key id.
    assert_eq!(
        status(&app, &token(None, KEY_A, Algorithm::RS256)).await,
        401
    );
    assert_eq!(
        status(&app, &token(Some("key-2026-a"), KEY_B, Algorithm::RS256)).await,
        401
    );
    assert_eq!(
        status(
            &app,
            &token(Some("key-2026-a"), JWKS_AB.as_bytes(), Algorithm::HS256)
        )
        .await,
        401
    );
    assert_eq!(
        status(&app, &token(Some("key-2099"), KEY_A, Algorithm::RS256)).await,
        401
    );
}

#[tokio::test]
async fn a_key_the_provider_withdrew_stops_working_when_the_cache_expires() {
    let idp = provider(JWKS_AB).await;
    // TTL zero: every token looks the keys up afresh.
    let app = spawn_jwks(&idp.url, Duration::ZERO, Duration::ZERO).await;
    let a = token(Some("key-2026-a"), KEY_A, Algorithm::RS256);
    assert_eq!(status(&app, &a).await, 200);
    *idp.set.lock().unwrap() = JWKS_B;
    assert_eq!(status(&app, &a).await, 401);
    let b = token(Some("key-2026-b"), KEY_B, Algorithm::RS256);
    assert_eq!(status(&app, &b).await, 200);
}

#[tokio::test]
async fn made_up_key_ids_do_not_make_the_server_hammer_the_provider() {
    let idp = provider(JWKS_A).await;
    let app = spawn_jwks(
        &idp.url,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .await;
    assert_eq!(
        status(&app, &token(Some("key-2026-a"), KEY_A, Algorithm::RS256)).await,
        200
    );
    for n in 0..20 {
        let forged = token(Some(&format!("made-up-{n}")), KEY_B, Algorithm::RS256);
        assert_eq!(status(&app, &forged).await, 401);
    }
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        1,
        "one fetch at most per interval, whatever the tokens say"
    );
}

#[tokio::test]
async fn the_server_refuses_a_jwks_url_over_plain_http_to_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/h.db", dir.path().display()),
        )
        .env("HANDOVER_DATA_DIR", dir.path())
        .env("HANDOVER_MASTER_KEY", MASTER_HEX)
        .env("HANDOVER_JWT_JWKS_URL", "http://idp.example/jwks.json")
        .kill_on_drop(true)
        .output();
    // Bounded: a server that accepted the setting would keep running.
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the server refused to start")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HANDOVER_JWT_JWKS_URL"), "{err}");
}

#[tokio::test]
async fn keys_are_fetched_through_a_redirect_only_to_where_they_could_be_configured() {
    let a = token(Some("key-2026-a"), KEY_A, Algorithm::RS256);
    // To another local address the server may fetch from: followed.
    let idp = provider(JWKS_A).await;
    let app = spawn_jwks(
        &redirect_to(&idp.url).await,
        Duration::from_secs(3600),
        Duration::ZERO,
    )
    .await;
    assert_eq!(status(&app, &a).await, 200);
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1);
    // To plain http on a host that is not this machine's name for itself
    // (127.0.0.2 is reachable here, but not an address keys may come from
    // over http): not followed, so no key and no login.
    let elsewhere = provider_at("127.0.0.2:0", JWKS_A).await;
    let app = spawn_jwks(
        &redirect_to(&elsewhere.url).await,
        Duration::from_secs(3600),
        Duration::ZERO,
    )
    .await;
    assert_eq!(status(&app, &a).await, 401);
    assert_eq!(
        elsewhere.fetches.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[tokio::test]
async fn five_redirects_are_followed_and_a_sixth_is_not() {
    let a = token(Some("key-2026-a"), KEY_A, Algorithm::RS256);
    let idp = provider(JWKS_A).await;
    // A chain of `n` redirects ending at the provider.
    let chain = |n: usize| {
        let idp = idp.url.clone();
        async move {
            let mut url = idp;
            for _ in 0..n {
                url = redirect_to(&url).await;
            }
            url
        }
    };
    let app = spawn_jwks(&chain(5).await, Duration::from_secs(3600), Duration::ZERO).await;
    assert_eq!(status(&app, &a).await, 200, "five redirects are followed");
    let app = spawn_jwks(&chain(6).await, Duration::from_secs(3600), Duration::ZERO).await;
    assert_eq!(status(&app, &a).await, 401, "the sixth is not");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1);
}
