//! Who is calling: the API key in `Authorization: Bearer …`, resolved to a [`Principal`] of one
//! organisation with its scopes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use keel_store::{AgentId, OrgId, Principal, Scope};

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
            .store
            .authenticate(token)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Caller(principal))
    }
}

impl Caller {
    /// The caller's organisation: every query is scoped to it.
    pub fn org(&self) -> OrgId {
        self.0.org_id
    }

    /// 403 unless the key has `scope`; `admin` includes `commands:read` and `commands:write`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        let implied_by_admin = matches!(scope, Scope::CommandsRead | Scope::CommandsWrite);
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
