//! Completion notifications, delivered the Standard Webhooks way: a JSON
//! body `{type, timestamp, data}` with the headers `webhook-id`,
//! `webhook-timestamp` and `webhook-signature` (`v1,` and the base64
//! HMAC-SHA256 of `{id}.{timestamp}.{body}` under the company's secret).
//! Failed deliveries are retried with exponential backoff; every attempt is
//! audited. Bodies hold ids, status, counts and the checksum only.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::store::webhooks::{Delivery, Endpoint};
use crate::AppState;

/// One HTTP client for every delivery (connections are reused).
fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Attempts before a delivery is given up.
pub const MAX_ATTEMPTS: i64 = 8;

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    format!("whsec_{}", STANDARD.encode(rand::random::<[u8; 32]>()))
}

/// The `webhook-signature` header value of a message.
///
/// # Errors
///
/// A secret that is not `whsec_` and base64.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> anyhow::Result<String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| anyhow::anyhow!("the webhook secret is not whsec_ and base64"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key size");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Checks an endpoint URL: https, or http to this machine (development).
///
/// # Errors
///
/// Anything else, in words naming the URL.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("{url:?} is not a URL: {e}"))?;
    let local = matches!(
        parsed.host_str(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    anyhow::ensure!(
        parsed.scheme() == "https" || (parsed.scheme() == "http" && local),
        "webhook URLs must be https (http only to localhost): {url}"
    );
    Ok(())
}

/// The wait before attempt `n + 1` after `n` failed ones: `base` doubled
/// each time, up to 6 hours.
fn backoff(base: Duration, failed: i64) -> Duration {
    let factor = 2u32.saturating_pow(u32::try_from(failed.saturating_sub(1)).unwrap_or(31));
    base.saturating_mul(factor)
        .min(Duration::from_secs(6 * 3600))
}

/// Sends every delivery that is due; returns how many were attempted.
///
/// # Errors
///
/// Database errors (a failed send is not an error: it is retried).
pub async fn deliver_due(state: &AppState) -> anyhow::Result<usize> {
    let lease = crate::store::timestamp_in(Duration::from_secs(60));
    let due = state.store.due_webhooks(&lease, 50).await?;
    let n = due.len();
    for d in due {
        // A secret that does not open (another master key) fails its own
        // deliveries, as attempts, and never the others of the batch.
        let endpoint = match state.store.webhook(&d.company_id).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(webhook = %d.id, error = %format!("{e:#}"), "webhook endpoint unreadable");
                unsendable(state, &d, "the signing secret cannot be read").await?;
                continue;
            }
        };
        attempt(state, &d, endpoint.as_ref()).await?;
    }
    Ok(n)
}

/// When a failed attempt of `d` is tried again; `None` after the last.
fn next_try(state: &AppState, d: &Delivery) -> Option<String> {
    let failed = d.attempts + 1;
    (failed < MAX_ATTEMPTS)
        .then(|| crate::store::timestamp_in(backoff(state.settings.webhook_backoff, failed)))
}

/// Records an attempt that could not be sent (retried like a refusal).
async fn unsendable(state: &AppState, d: &Delivery, why: &str) -> anyhow::Result<()> {
    state
        .store
        .webhook_attempted(d, false, None, Some(why), next_try(state, d).as_deref())
        .await
}

async fn attempt(
    state: &AppState,
    d: &Delivery,
    endpoint: Option<&Endpoint>,
) -> anyhow::Result<()> {
    let retry_at = next_try(state, d);
    let Some(endpoint) = endpoint else {
        return state
            .store
            .webhook_attempted(
                d,
                false,
                None,
                Some("the company has no webhook endpoint any more"),
                None,
            )
            .await;
    };
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let Ok(signature) = sign(&endpoint.secret, &d.id, timestamp, &d.payload) else {
        return unsendable(state, d, "the signing secret is not whsec_ and base64").await;
    };
    let sent = client()
        .post(&endpoint.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(d.payload.clone())
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {
            state
                .store
                .webhook_attempted(d, true, Some(r.status().as_u16()), None, None)
                .await
        }
        Ok(r) => {
            let status = r.status().as_u16();
            tracing::warn!(webhook = %d.id, status, "webhook refused; retried later");
            state
                .store
                .webhook_attempted(
                    d,
                    false,
                    Some(status),
                    Some("the endpoint did not answer 2xx"),
                    retry_at.as_deref(),
                )
                .await
        }
        Err(e) => {
            tracing::warn!(webhook = %d.id, error = %e, "webhook not delivered; retried later");
            let why = if e.is_timeout() {
                "timed out"
            } else {
                "could not connect"
            };
            state
                .store
                .webhook_attempted(d, false, None, Some(why), retry_at.as_deref())
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backs_off_exponentially_up_to_a_ceiling() {
        let b = Duration::from_secs(5);
        assert_eq!(backoff(b, 1), Duration::from_secs(5));
        assert_eq!(backoff(b, 2), Duration::from_secs(10));
        assert_eq!(backoff(b, 4), Duration::from_secs(40));
        assert_eq!(backoff(b, 40), Duration::from_secs(6 * 3600));
    }

    #[test]
    fn endpoints_must_be_https_or_local() {
        assert!(check_url("https://hooks.example.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://hooks.example.com/x").is_err());
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("not a url").is_err());
    }
}
