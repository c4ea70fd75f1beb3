//! Who is calling: the API key in `Authorization: Bearer …`, resolved to a [`Principal`] of one
//! organisation with its scopes.

use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use keel_store::{AgentId, OrgId, Principal, Scope, Store, StoreResult};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// The bearer token of a request, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The authenticated caller. No key, or an unknown or revoked one: 401.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The overload layer has looked the key up already when it rate-limited the request.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let token = bearer_token(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let principal = state
            .keys
            .authenticate(state.store.as_ref(), token)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Caller(principal))
    }
}

/// API keys verified in the last [`KeyCache::TTL`], so that a busy client's requests (a flood
/// answered 429 included) do not each read its key from the store.
///
/// Only keys found valid are kept, by the SHA-256 of the token (never the token). A key
/// revoked through keel's API is forgotten at once; one revoked by another process on the same
/// database (`keel admin revoke-key`) stops working within [`KeyCache::TTL`].
pub struct KeyCache {
    verified: quick_cache::sync::Cache<[u8; 32], (Instant, Principal)>,
}

impl KeyCache {
    /// How long a verified key is trusted without reading the store again.
    pub const TTL: Duration = Duration::from_secs(1);
    /// The most keys remembered; beyond that the least used are dropped.
    const CAPACITY: usize = 10_000;

    /// An empty cache.
    pub fn new() -> Self {
        Self {
            verified: quick_cache::sync::Cache::new(Self::CAPACITY),
        }
    }

    /// The key's principal, from the cache while it is fresh, otherwise from the store.
    pub async fn authenticate(
        &self,
        store: &dyn Store,
        token: &str,
    ) -> StoreResult<Option<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((verified_at, principal)) = self.verified.get(&digest)
            && verified_at.elapsed() < Self::TTL
        {
            return Ok(Some(principal));
        }
        let found = store.authenticate(token).await?;
        match &found {
            Some(principal) => self
                .verified
                .insert(digest, (Instant::now(), principal.clone())),
            None => {
                self.verified.remove(&digest);
            }
        }
        Ok(found)
    }

    /// Forgets every key (after a revocation).
    pub fn forget_all(&self) {
        self.verified.clear();
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl Caller {
    /// The caller's organisation: every query is scoped to it.
    pub fn org(&self) -> OrgId {
        self.0.org_id
    }

    /// 403 unless the key has `scope`; `admin` includes `commands:read`, `commands:write`,
    /// `notifications:read` and `notifications:write`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        let implied_by_admin = matches!(
            scope,
            Scope::CommandsRead
                | Scope::CommandsWrite
                | Scope::NotificationsRead
                | Scope::NotificationsWrite
        );
        if self.0.has_scope(scope) || (implied_by_admin && self.0.has_scope(Scope::Admin)) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this key lacks the `{}` scope",
                scope.as_str()
            )))
        }
    }

    /// The agent the key is bound to; 403 unless it has the `agent` scope.
    pub fn agent(&self) -> Result<AgentId, ApiError> {
        self.require(Scope::Agent)?;
        self.0
            .agent_id
            .ok_or_else(|| ApiError::Forbidden("this key is not bound to an agent".to_owned()))
    }
}
