//! The identity provider's signing keys from its JWKS URL (Auth0, Clerk,
//! Okta, Keycloak, … publish one), cached, and fetched again when they
//! expire or a token names a key id not seen yet, so rotation needs no
//! restart. Refetches are spaced out: tokens with made-up key ids cannot
//! make the server hammer the provider.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// One usable key of the set.
#[derive(Clone)]
pub struct Key {
    pub key: DecodingKey,
    /// The algorithm the key is published for (its `alg`), when it says.
    pub alg: Option<Algorithm>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("alg", &self.alg).finish()
    }
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, Key>,
    fetched_at: Option<Instant>,
    /// The last fetch attempt, successful or not (for spacing them out).
    tried_at: Option<Instant>,
}

/// The cached key set behind a JWKS URL.
pub struct JwksCache {
    url: String,
    client: reqwest::Client,
    /// Keys are fetched again after this.
    ttl: Duration,
    /// Never fetch more often than this.
    min_interval: Duration,
    cached: tokio::sync::RwLock<Cached>,
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.url)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Whether `url` may serve keys: https, or http to this machine (tests, a
/// local identity provider).
fn allowed_url(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// The algorithm a JWK names, if it names a signature algorithm.
fn named_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    a.to_string().parse().ok()
}

fn usable(set: JwkSet) -> HashMap<String, Key> {
    let mut keys = HashMap::new();
    for jwk in set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        // Shared secrets never come from a key set (that would let anyone
        // who reads the set sign tokens), nor encryption keys.
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
            || matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
        {
            continue;
        }
        let alg = jwk.common.key_algorithm.and_then(named_alg);
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                keys.insert(kid, Key { key, alg });
            }
            Err(e) => tracing::warn!(kid = %kid, error = %e, "JWKS key skipped"),
        }
    }
    keys
}

impl JwksCache {
    /// A cache of the key set at `url`, kept `ttl`.
    ///
    /// # Errors
    ///
    /// A URL that is neither https nor http to localhost.
    pub fn new(url: &str, ttl: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            allowed_url(url),
            "HANDOVER_JWT_JWKS_URL must be an https URL (http only to localhost), got {url:?}"
        );
        // A redirect is followed only to where the keys could have been
        // configured: one to plain http elsewhere would hand the key set,
        // and so every login, to whoever answers there.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            // `previous` holds the URLs before this one: the first request
            // and the redirects followed so far (as reqwest's own limit counts).
            if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else if allowed_url(attempt.url().as_str()) {
                attempt.follow()
            } else {
                attempt.error("a redirect to a URL that may not serve keys (https, or http only to localhost)")
            }
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(redirects)
            .build()
            .context("building the JWKS client")?;
        Ok(Self {
            url: url.to_string(),
            client,
            ttl,
            min_interval: Duration::from_secs(10),
            cached: Default::default(),
            fetching: Default::default(),
        })
    }

    /// Refetches no more often than `interval` (tests make it short).
    pub fn with_min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, Key>> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .context("fetching the JWKS")?
            .error_for_status()
            .context("fetching the JWKS")?;
        let set: JwkSet = response.json().await.context("reading the JWKS")?;
        Ok(usable(set))
    }

    /// Fetches the set again unless that was tried within the minimum
    /// interval (or is being done by another request, which this waits for).
    pub async fn refresh(&self) {
        let started = Instant::now();
        let _one_at_a_time = self.fetching.lock().await;
        {
            let c = self.cached.read().await;
            if c.tried_at
                .is_some_and(|t| t >= started || t.elapsed() < self.min_interval)
            {
                return;
            }
        }
        let result = self.fetch().await;
        let mut c = self.cached.write().await;
        c.tried_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), url = %self.url, "JWKS fetched");
                c.keys = keys;
                c.fetched_at = Some(Instant::now());
            }
            // Keep the keys there are: the provider may be down for a moment.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), url = %self.url, "JWKS fetch failed")
            }
        }
    }

    /// The key `kid`: from the cache while fresh, else fetched again.
    pub async fn key(&self, kid: &str) -> Option<Key> {
        {
            let c = self.cached.read().await;
            let fresh = c.fetched_at.is_some_and(|t| t.elapsed() < self.ttl);
            if let (true, Some(k)) = (fresh, c.keys.get(kid)) {
                return Some(k.clone());
            }
        }
        self.refresh().await;
        self.cached.read().await.keys.get(kid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_local_http_serves_keys() {
        assert!(allowed_url("https://idp.example/.well-known/jwks.json"));
        assert!(allowed_url("http://127.0.0.1:9000/jwks"));
        assert!(allowed_url("http://localhost/jwks"));
        assert!(!allowed_url("http://idp.example/jwks"));
        assert!(!allowed_url("http://localhost.evil.example/jwks"));
        assert!(!allowed_url("http://localhost@evil.example/jwks"));
        assert!(!allowed_url("ftp://idp.example/jwks"));
    }

    #[test]
    fn shared_secrets_and_keys_without_ids_are_not_used() {
        let set: JwkSet = serde_json::from_str(
            r#"{"keys": [
                {"kty": "oct", "kid": "s", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
                {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
                {"kty": "EC", "kid": "e", "alg": "ES256", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
            ]}"#,
        )
        .unwrap();
        let keys = usable(set);
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["e"]);
        assert_eq!(keys["e"].alg, Some(Algorithm::ES256));
    }
}
