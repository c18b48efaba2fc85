//! Bearer authentication (opaque API tokens and JWTs), permissions, and the
//! tenant scope from `X-Company-ID`.

use crate::store::tokens::TokenLimits;
use crate::store::Store;
use anyhow::Context as _;
use axum::http::HeaderMap;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::context::Ctx;
use crate::error::ApiError;
use crate::AppState;

/// Permission to create, read and download one's own exports.
pub const PERM_EXPORT: &str = "data:export";
/// Permission to read the audit log of one's company.
pub const PERM_AUDIT: &str = "audit:read";
/// Every permission the server knows.
pub const PERMISSIONS: [&str; 2] = [PERM_EXPORT, PERM_AUDIT];

/// How long a credential check waits in its address's lane at most.
const LANE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Prefix of opaque API tokens, so leaked tokens are recognisable.
pub const TOKEN_PREFIX: &str = "hov_";

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub companies: Vec<String>,
    pub permissions: Vec<String>,
}

/// An authenticated caller acting in one of their companies.
#[derive(Debug, Clone)]
pub struct Scope {
    pub user_id: String,
    pub company_id: String,
}

/// Where the keys that verify JWTs come from.
pub enum JwtKeys {
    /// One key (a shared secret, or the provider's public key).
    Static(DecodingKey),
    /// The provider's key set, by key id (`kid`), from its JWKS URL.
    Jwks(std::sync::Arc<crate::jwks::JwksCache>),
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Static(…)"),
            Self::Jwks(c) => f.debug_tuple("Jwks").field(c).finish(),
        }
    }
}

/// How JWTs are checked.
pub struct JwtConfig {
    pub keys: JwtKeys,
    pub validation: Validation,
    /// Tokens meant to live longer (exp − iat) are refused.
    pub max_lifetime_secs: Option<u64>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl JwtConfig {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            issuer,
            audience,
        )
    }

    /// RS256 with the identity provider's public key (PEM).
    ///
    /// # Errors
    ///
    /// The PEM is not an RSA public key.
    pub fn rs256(pem: &[u8], issuer: Option<&str>, audience: Option<&str>) -> anyhow::Result<Self> {
        let key = DecodingKey::from_rsa_pem(pem).context("not an RSA public key in PEM format")?;
        Ok(Self::new(key, Algorithm::RS256, issuer, audience))
    }

    /// Any asymmetric algorithm, with the keys of the JWKS behind `cache`.
    pub fn jwks(
        cache: crate::jwks::JwksCache,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Self {
        let mut c = Self::new(
            DecodingKey::from_secret(&[]),
            Algorithm::RS256,
            issuer,
            audience,
        );
        c.keys = JwtKeys::Jwks(std::sync::Arc::new(cache));
        c
    }

    /// Checks `token`'s signature and claims.
    async fn decode(&self, token: &str) -> Result<Claims, String> {
        let reject = |e: jsonwebtoken::errors::Error| format!("JWT rejected: {e}");
        match &self.keys {
            JwtKeys::Static(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation)
                .map(|d| d.claims)
                .map_err(reject),
            JwtKeys::Jwks(cache) => {
                let header = jsonwebtoken::decode_header(token).map_err(reject)?;
                let kid = header
                    .kid
                    .ok_or("JWT rejected: no key id (kid) to look up in the JWKS")?;
                let key = cache
                    .key(&kid)
                    .await
                    .ok_or_else(|| format!("JWT rejected: key id {kid:?} is not in the JWKS"))?;
                // The token's own alg only within what the key is for:
                // never a shared-secret algorithm, never another than the
                // key was published with.
                if header.alg.family() == jsonwebtoken::AlgorithmFamily::Hmac
                    || key.alg.is_some_and(|a| a != header.alg)
                {
                    return Err(format!(
                        "JWT rejected: algorithm {:?} is not the key's",
                        header.alg
                    ));
                }
                let mut validation = self.validation.clone();
                validation.algorithms = vec![header.alg];
                jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
                    .map(|d| d.claims)
                    .map_err(reject)
            }
        }
    }

    fn new(key: DecodingKey, alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        validation.validate_nbf = true;
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Self {
            keys: JwtKeys::Static(key),
            validation,
            max_lifetime_secs: None,
        }
    }
}

/// Authentication settings.
#[derive(Debug, Default)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    /// Development only: requests without a token act as `X-User-ID`
    /// (default `user_456`) with every permission. Announced loudly at start.
    pub dev_no_auth: bool,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    companies: Vec<String>,
    #[serde(default)]
    company_id: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    scope: Option<String>,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Who the request's credentials name.
///
/// # Errors
///
/// [`ApiError::Unauthorized`] for a missing, malformed, unknown, revoked or
/// expired token.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let header = headers.get(axum::http::header::AUTHORIZATION);
    let Some(header) = header else {
        if state.auth.dev_no_auth {
            let user = headers
                .get("x-user-id")
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .unwrap_or("user_456");
            let company = headers
                .get("x-company-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            return Ok(Principal {
                user_id: user.to_string(),
                companies: vec![company.to_string()],
                permissions: PERMISSIONS.iter().map(|p| p.to_string()).collect(),
            });
        }
        return Err(ApiError::Unauthorized("no Authorization header".into()));
    };
    let token = header
        .to_str()
        .ok()
        .and_then(|h| {
            // The scheme's name is case-insensitive (RFC 9110, 11.1).
            let (scheme, token) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("Authorization is not a Bearer token".into()))?;
    if token.starts_with(TOKEN_PREFIX) {
        // A token that cannot be one of ours costs no database lookup: a
        // flood of garbage tokens stays in memory.
        if !well_formed(token) {
            return Err(ApiError::Unauthorized("malformed API token".into()));
        }
        let grant = state
            .store
            .token_by_hash(&sha256_hex(token))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown API token".into()))?;
        if grant.revoked {
            return Err(ApiError::Unauthorized("revoked API token".into()));
        }
        if grant
            .expires_at
            .as_deref()
            .is_some_and(|at| at <= crate::store::now().as_str())
        {
            return Err(ApiError::Unauthorized("expired API token".into()));
        }
        if grant.demo && state.settings.demo_token.is_none() {
            return Err(ApiError::Unauthorized(
                "a demo token only works while the server runs in demo mode".into(),
            ));
        }
        return Ok(Principal {
            user_id: grant.user_id,
            companies: grant.companies,
            permissions: grant.permissions,
        });
    }
    let jwt = state.auth.jwt.as_ref().ok_or_else(|| {
        ApiError::Unauthorized("not an API token, and JWTs are not configured".into())
    })?;
    let c = jwt.decode(token).await.map_err(ApiError::Unauthorized)?;
    if let Some(max) = jwt.max_lifetime_secs {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let Some(iat) = c.iat else {
            return Err(ApiError::Unauthorized(
                "JWT rejected: it has no iat, and a maximum token lifetime is set".into(),
            ));
        };
        if c.exp.saturating_sub(iat) > max || c.exp.saturating_sub(now) > max {
            return Err(ApiError::Unauthorized(format!(
                "JWT rejected: it lives longer than the {max} s this server accepts"
            )));
        }
    }
    let mut companies = c.companies;
    companies.extend(c.company_id);
    let mut permissions = c.permissions;
    if let Some(scope) = c.scope {
        permissions.extend(scope.split_whitespace().map(str::to_string));
    }
    Ok(Principal {
        user_id: c.sub,
        companies,
        permissions,
    })
}

/// Authenticates, checks `permission`, and checks that `X-Company-ID` is one
/// of the caller's companies; names the actor in the audit row.
///
/// # Errors
///
/// 401 without valid credentials, 403 without the permission, 400 without
/// `X-Company-ID`, 403 for a company that is not the caller's.
pub async fn scope(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    permission: &str,
) -> Result<Scope, ApiError> {
    let principal = match ctx.lane() {
        Some(lane) => {
            let turn = tokio::time::timeout(LANE_WAIT, lane.acquire_owned()).await;
            let authorization = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            // Throttled while waiting, or waited too long: answered like
            // the throttle before authentication.
            let throttled = state.guard.throttled(
                ctx.address_key(),
                state.settings.unauth_per_minute,
                authorization,
            );
            match (turn, throttled) {
                (Ok(Ok(_turn)), None) => authenticate(state, headers).await?,
                (_, retry_after) => {
                    return Err(crate::context::throttled_error(
                        state,
                        retry_after.unwrap_or(1),
                    ))
                }
            }
        }
        None => authenticate(state, headers).await?,
    };
    let company = headers
        .get("x-company-id")
        .map(|v| v.to_str().map(str::trim));
    let company = match company {
        Some(Ok(c)) if !c.is_empty() => Some(c.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::InvalidRequest(
                "X-Company-ID is not valid text".into(),
            ))
        }
        _ => None,
    };
    // The audit row goes to the company the request acts in only when the
    // caller belongs to it: a request naming someone else's company is
    // recorded in the caller's own scope, with the name it tried.
    match company.as_deref() {
        Some(c) if !principal.companies.iter().any(|p| p == c) => {
            ctx.set_actor(
                &principal.user_id,
                principal.companies.first().map(String::as_str),
            );
            ctx.detail("requested_company", c.chars().take(128).collect::<String>());
        }
        c => ctx.set_actor(&principal.user_id, c),
    }
    if !principal.permissions.iter().any(|p| p == permission) {
        return Err(ApiError::Forbidden(
            "INSUFFICIENT_PERMISSIONS",
            format!("this token lacks the {permission} permission"),
        ));
    }
    let company = company.ok_or(ApiError::MissingCompany)?;
    if company.len() > 128 || !principal.companies.contains(&company) {
        return Err(ApiError::Forbidden(
            "COMPANY_ACCESS_DENIED",
            "this token does not grant access to that company".into(),
        ));
    }
    Ok(Scope {
        user_id: principal.user_id,
        company_id: company,
    })
}

/// Whether `token` has the shape [`mint_token`] gives tokens: the prefix,
/// 12 hex digits of id, `_`, and 43 base64url characters of secret.
fn well_formed(token: &str) -> bool {
    let Some(rest) = token.strip_prefix(TOKEN_PREFIX) else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 12 + 1 + 43
        && b[..12].iter().all(u8::is_ascii_hexdigit)
        && b[12] == b'_'
        && b[13..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
}

/// Creates an API token (audited as made `by` someone); returns
/// `(id, token)`. Only the hash is stored.
///
/// # Errors
///
/// Unknown permission names, or database errors.
pub async fn create_token(
    store: &Store,
    user: &str,
    companies: &[String],
    permissions: &[String],
    by: &str,
) -> anyhow::Result<(String, String)> {
    mint_token(
        store,
        user,
        companies,
        permissions,
        by,
        &TokenLimits::default(),
    )
    .await
}

async fn mint_token(
    store: &Store,
    user: &str,
    companies: &[String],
    permissions: &[String],
    by: &str,
    limits: &TokenLimits,
) -> anyhow::Result<(String, String)> {
    for p in permissions {
        anyhow::ensure!(
            PERMISSIONS.contains(&p.as_str()),
            "unknown permission {p:?} (known: {PERMISSIONS:?})"
        );
    }
    anyhow::ensure!(
        !user.is_empty() && !companies.is_empty(),
        "a token needs a user and at least one company"
    );
    let id = hex::encode(rand::random::<[u8; 6]>());
    let secret =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let token = format!("{TOKEN_PREFIX}{id}_{secret}");
    store
        .insert_token(
            &id,
            &sha256_hex(&token),
            user,
            companies,
            permissions,
            by,
            limits,
        )
        .await?;
    Ok((id, token))
}

/// How long a demo token works.
pub const DEMO_TOKEN_LIFETIME: time::Duration = time::Duration::hours(8);

/// The demo page's token: user_456 in the demo companies, expiring after
/// [`DEMO_TOKEN_LIFETIME`], and refused once the server runs without demo
/// mode (see [`authenticate`]).
///
/// # Errors
///
/// Database errors.
pub async fn create_demo_token(store: &Store) -> anyhow::Result<(String, String)> {
    let limits = TokenLimits {
        expires_at: Some(handover::model::format_timestamp(
            time::OffsetDateTime::now_utc() + DEMO_TOKEN_LIFETIME,
        )),
        demo: true,
    };
    mint_token(
        store,
        "user_456",
        &["company_123".to_string(), "company_456".to_string()],
        &[PERM_EXPORT.to_string(), PERM_AUDIT.to_string()],
        "demo",
        &limits,
    )
    .await
}

/// Revokes a token given its id or the token itself (audited as done
/// `by` someone); false when unknown.
///
/// # Errors
///
/// Database errors.
pub async fn revoke_token(store: &Store, id_or_token: &str, by: &str) -> anyhow::Result<bool> {
    let id = match id_or_token.strip_prefix(TOKEN_PREFIX) {
        Some(rest) => rest.split('_').next().unwrap_or_default(),
        None => id_or_token,
    };
    Ok(store.revoke_token(id, by).await?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tokens_of_our_shape_are_looked_up() {
        let good = format!("{TOKEN_PREFIX}0123456789ab_{}", "A".repeat(42) + "_");
        assert!(well_formed(&good));
        for bad in [
            "hov_not_a_token".to_string(),
            "hov_".to_string(),
            good.replace("hov_", "hoV_"),
            format!("{good}x"),
            good[..good.len() - 1].to_string(),
            good.replace("0123456789ab", "0123456789ag"),
            good.replace("ab_", "abc"),
            good.replace("AAAA", "AA=A"),
        ] {
            assert!(!well_formed(&bad), "{bad} passed");
        }
    }
}
