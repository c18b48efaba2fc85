//! API tokens: only their SHA-256 is stored; revocable. Creating and
//! revoking one are audited (in each company the token grants), in the
//! same transaction.

use serde_json::json;
use sqlx::Row as _;

use super::audit::AuditEntry;
use super::{now, Store};

/// A stored token's grants.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub id: String,
    pub user_id: String,
    pub companies: Vec<String>,
    pub permissions: Vec<String>,
    pub revoked: bool,
    /// After this (the API's timestamp format), the token no longer works.
    pub expires_at: Option<String>,
    /// Minted by demo mode: works only while the server runs in it.
    pub demo: bool,
}

/// How a new token is limited.
#[derive(Debug, Clone, Default)]
pub struct TokenLimits {
    pub expires_at: Option<String>,
    pub demo: bool,
}

impl Store {
    /// Stores a new token by its hash, with a `token.created` event naming
    /// `by` (who made it: an operator, or the demo).
    ///
    /// # Errors
    ///
    /// Database errors.
    #[allow(clippy::too_many_arguments)] // the token's columns, one each
    pub async fn insert_token(
        &self,
        id: &str,
        hash: &str,
        user: &str,
        companies: &[String],
        permissions: &[String],
        by: &str,
        limits: &TokenLimits,
    ) -> anyhow::Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, token_hash, user_id, companies, permissions, created_at, expires_at, demo) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(hash)
        .bind(user)
        .bind(serde_json::to_string(companies)?)
        .bind(serde_json::to_string(permissions)?)
        .bind(now())
        .bind(&limits.expires_at)
        .bind(i64::from(limits.demo))
        .execute(&mut *tx.tx)
        .await?;
        for company in companies {
            let details = json!({ "token_id": id, "user_id": user, "permissions": permissions, "by": by,
                "expires_at": limits.expires_at, "demo": limits.demo });
            self.append_audit(
                &mut tx,
                AuditEntry::event(
                    "token.created",
                    user,
                    company,
                    &format!("token_{id}"),
                    details,
                ),
            )
            .await?;
        }
        tx.commit().await
    }

    /// The token whose hash is `hash`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn token_by_hash(&self, hash: &str) -> anyhow::Result<Option<TokenGrant>> {
        let row = sqlx::query("SELECT id, user_id, companies, permissions, revoked_at, expires_at, demo FROM api_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(TokenGrant {
            id: r.try_get("id")?,
            user_id: r.try_get("user_id")?,
            companies: serde_json::from_str(&r.try_get::<String, _>("companies")?)?,
            permissions: serde_json::from_str(&r.try_get::<String, _>("permissions")?)?,
            revoked: r.try_get::<Option<String>, _>("revoked_at")?.is_some(),
            expires_at: r.try_get("expires_at")?,
            demo: r.try_get::<i64, _>("demo")? != 0,
        }))
    }

    /// Revokes the token `id` (with `token.revoked`, naming `by`); returns
    /// its owner, or `None` when there is no such active token.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn revoke_token(&self, id: &str, by: &str) -> anyhow::Result<Option<String>> {
        let mut tx = self.write().await?;
        let row: Option<(String, String)> = sqlx::query_as(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING user_id, companies",
        )
        .bind(now())
        .bind(id)
        .fetch_optional(&mut *tx.tx)
        .await?;
        let Some((user, companies)) = row else {
            return Ok(None);
        };
        for company in serde_json::from_str::<Vec<String>>(&companies)? {
            let details = json!({ "token_id": id, "user_id": user, "by": by });
            self.append_audit(
                &mut tx,
                AuditEntry::event(
                    "token.revoked",
                    &user,
                    &company,
                    &format!("token_{id}"),
                    details,
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(user))
    }
}
