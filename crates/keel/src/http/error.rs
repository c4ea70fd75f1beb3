//! The one error type of the HTTP API and its one JSON shape:
//! `{"error":{"code":"…","message":"…","request_id":"…"}}`.

use axum::Json;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::request_id;

/// Every way a request can fail, each with its status and stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not well-formed JSON (400 `malformed_json`).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// Something else about the request is unreadable (400 `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// No or wrong credentials (401 `unauthorized`).
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// Credentials lack the scope (403 `forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// No such route or object, or one the caller may not see (404 `not_found`).
    #[error("not found")]
    NotFound,
    /// The route exists but not with this method (405 `method_not_allowed`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request was not answered in time (408 `timeout`).
    #[error("request timed out")]
    Timeout,
    /// The request conflicts with the current state (409 `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The claim token is not the current one, or the command is no longer executing
    /// (409 `stale_claim`); nothing changed.
    #[error("the claim token is not current or the command is no longer executing")]
    StaleClaim,
    /// The idempotency key was used before with another request (409 `idempotency_mismatch`).
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// The object is not in a state that allows this (409 `invalid_state`).
    #[error("{0}")]
    InvalidState(String),
    /// The body is larger than the limit (413 `payload_too_large`).
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// One field of the body is larger than its own limit (413 `payload_too_large`).
    #[error("`{field}` is larger than {limit} bytes")]
    FieldTooLarge {
        /// The field.
        field: &'static str,
        /// Its limit, in bytes.
        limit: usize,
    },
    /// The body is not `application/json` (415 `unsupported_media_type`).
    #[error("expected a body with content type application/json")]
    UnsupportedMediaType,
    /// The body is JSON but not a valid request (422 `validation_failed`).
    #[error("{0}")]
    Validation(String),
    /// keel cannot serve this request now; the client may retry after `retry_after` seconds
    /// (503 `unavailable`, with `Retry-After`).
    #[error("{reason}; retry after {retry_after} s")]
    Unavailable {
        /// Why.
        reason: &'static str,
        /// Seconds, as in the `Retry-After` header.
        retry_after: u32,
    },
    /// Over an organisation's rate limit or a cap on waiting claims (429 `rate_limited`); the
    /// answer carries `Retry-After`.
    #[error("{message}")]
    RateLimited {
        /// What limit, for the client.
        message: String,
        /// When to try again (sent in whole seconds, rounded up).
        retry_after: Duration,
    },
    /// keel is shedding load or the database is busy (503 `overloaded`); the answer carries
    /// `Retry-After`.
    #[error("{message}")]
    Overloaded {
        /// Why, for the client.
        message: String,
        /// When to try again (sent in whole seconds, rounded up).
        retry_after: Duration,
    },
    /// Something failed inside keel (500 `internal`); the detail goes to the logs only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict(_)
            | Self::StaleClaim
            | Self::IdempotencyMismatch
            | Self::InvalidState(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } | Self::FieldTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout => "timeout",
            Self::Conflict(_) => "conflict",
            Self::StaleClaim => "stale_claim",
            Self::IdempotencyMismatch => "idempotency_mismatch",
            Self::InvalidState(_) => "invalid_state",
            Self::PayloadTooLarge { .. } | Self::FieldTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Validation(_) => "validation_failed",
            Self::Unavailable { .. } => "unavailable",
            Self::RateLimited { .. } => "rate_limited",
            Self::Overloaded { .. } => "overloaded",
            Self::Internal(_) => "internal",
        }
    }

    /// The error for a bare status produced outside keel's handlers (for example by axum's
    /// router or a tower layer), so that it too gets the JSON shape.
    pub fn from_status(status: StatusCode, body_limit: usize) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::BadRequest("bad request".to_owned()),
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::FORBIDDEN => Self::Forbidden("forbidden".to_owned()),
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::REQUEST_TIMEOUT => Self::Timeout,
            StatusCode::CONFLICT => Self::Conflict("conflict".to_owned()),
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge { limit: body_limit },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => Self::Validation("invalid request".to_owned()),
            StatusCode::TOO_MANY_REQUESTS => Self::RateLimited {
                message: "too many requests".to_owned(),
                retry_after: Duration::from_secs(1),
            },
            StatusCode::SERVICE_UNAVAILABLE => Self::Overloaded {
                message: "keel is overloaded; retry later".to_owned(),
                retry_after: Duration::from_secs(1),
            },
            _ => Self::Internal(format!("status {status} without a body")),
        }
    }
}

impl From<keel_store::StoreError> for ApiError {
    fn from(error: keel_store::StoreError) -> Self {
        use keel_store::StoreError;
        match error {
            StoreError::NotFound => Self::NotFound,
            StoreError::Conflict(what) => Self::Conflict(what),
            StoreError::IdempotencyMismatch => Self::IdempotencyMismatch,
            StoreError::StaleClaim => Self::StaleClaim,
            StoreError::InvalidState(what) => Self::InvalidState(what),
            StoreError::UnknownAgent => {
                Self::Validation("agent_id: no such agent in this organisation".to_owned())
            }
            StoreError::InvalidInput(what) => Self::Validation(what),
            StoreError::Busy(what) => {
                metrics::counter!("keel_overload_rejected_total", "reason" => "store_busy")
                    .increment(1);
                Self::Overloaded {
                    message: format!("the store is busy ({what}); retry later"),
                    retry_after: Duration::from_secs(1),
                }
            }
            StoreError::Unavailable(what) => {
                tracing::warn!(error = %what, "the store cannot serve the request now");
                metrics::counter!("keel_overload_rejected_total", "reason" => "store_unavailable")
                    .increment(1);
                Self::Unavailable {
                    reason: "the database cannot be reached",
                    retry_after: 2,
                }
            }
            error @ (StoreError::Database(_) | StoreError::Migrate(_)) => {
                Self::Internal(error_chain(&error))
            }
        }
    }
}

impl From<crate::commands::release::ReleaseNowError> for ApiError {
    fn from(error: crate::commands::release::ReleaseNowError) -> Self {
        use crate::commands::release::ReleaseNowError;
        use keel_guard::periodic::RunNowError;
        match error {
            ReleaseNowError::Store(error) => error.into(),
            // The panic hook has logged the panic with its backtrace.
            ReleaseNowError::Job(RunNowError::Panicked(_)) => Self::Internal(String::new()),
            ReleaseNowError::Job(RunNowError::Stopped(_)) => Self::Unavailable {
                reason: "keel is shutting down",
                retry_after: 1,
            },
        }
    }
}

/// An error and its sources, for the log (and a delivery attempt's error).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The JSON body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// `code`, `message` and the request id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    /// Human-readable message; never panic text or internal details.
    pub message: String,
    /// The request id, as in the `X-Request-Id` header and the logs.
    pub request_id: Option<String>,
}

/// Every `code` an error can carry, for the OpenAPI document ([`ApiError::code`] answers one
/// of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not well-formed JSON.
    MalformedJson,
    /// 400: something else about the request is unreadable.
    BadRequest,
    /// 401: no or wrong credentials.
    Unauthorized,
    /// 403: the credentials lack the scope.
    Forbidden,
    /// 404: no such route or object.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 408: the request was not answered in time.
    Timeout,
    /// 409: the request conflicts with the current state.
    Conflict,
    /// 409: the claim token is not current.
    StaleClaim,
    /// 409: the idempotency key was used with another request.
    IdempotencyMismatch,
    /// 409: the object is not in a state that allows this.
    InvalidState,
    /// 413: the body, or one field of it, is too large.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: the body is JSON but not a valid request.
    ValidationFailed,
    /// 429: over a rate limit or a cap on waiting claims.
    RateLimited,
    /// 503: keel cannot serve this request now.
    Unavailable,
    /// 503: keel is shedding load or the database is busy.
    Overloaded,
    /// 500: something failed inside keel.
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = match &self {
            Self::Internal(detail) => Some(detail.clone()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                request_id: request_id::current(),
            },
        };
        let retry_after = match &self {
            Self::RateLimited { retry_after, .. } | Self::Overloaded { retry_after, .. } => {
                Some(super::rate_limit::retry_after_seconds(*retry_after))
            }
            _ => None,
        };
        let mut response = (self.status(), Json(body)).into_response();
        let retry_after = match &self {
            Self::Unavailable { retry_after, .. } => Some(u64::from(*retry_after)),
            _ => retry_after,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // The lifecycle layer logs internal errors with their detail; it reads this marker.
        response.extensions_mut().insert(ErrorMarker { detail });
        response
    }
}

/// Marks a response as already carrying keel's JSON error shape; holds the detail of an
/// internal error for the log.
#[derive(Debug, Clone)]
pub struct ErrorMarker {
    /// What went wrong inside keel, for the log only.
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::StoreError;
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    #[tokio::test]
    async fn a_busy_database_answers_503_with_retry_after_and_other_errors_stay_500() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("busy.db"))
            .create_if_missing(true)
            .busy_timeout(Duration::ZERO);
        let mut holder = SqliteConnection::connect_with(&options).await.unwrap();
        let mut other = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut holder)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();

        let error = ApiError::from(StoreError::from(busy));
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.code(), "overloaded");
        let response = error.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        let pool = ApiError::from(StoreError::from(sqlx::Error::PoolTimedOut));
        assert_eq!(pool.status(), StatusCode::SERVICE_UNAVAILABLE);
        let other = ApiError::from(StoreError::Database(sqlx::Error::Protocol("x".into())));
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn every_error_code_is_in_the_documented_list() {
        let documented: Vec<String> = serde_json::to_value(utoipa::openapi::schema::Schema::from(
            <ErrorCode as utoipa::PartialSchema>::schema(),
        ))
        .ok()
        .and_then(|schema| schema.get("enum").cloned())
        .and_then(|values| serde_json::from_value(values).ok())
        .unwrap_or_default();
        let errors = [
            ApiError::MalformedJson(String::new()),
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::NotFound,
            ApiError::MethodNotAllowed,
            ApiError::Timeout,
            ApiError::Conflict(String::new()),
            ApiError::StaleClaim,
            ApiError::IdempotencyMismatch,
            ApiError::InvalidState(String::new()),
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::UnsupportedMediaType,
            ApiError::Validation(String::new()),
            ApiError::Unavailable {
                reason: "x",
                retry_after: 1,
            },
            ApiError::RateLimited {
                message: String::new(),
                retry_after: Duration::from_secs(1),
            },
            ApiError::Overloaded {
                message: String::new(),
                retry_after: Duration::from_secs(1),
            },
            ApiError::Internal(String::new()),
        ];
        for error in &errors {
            assert!(
                documented.iter().any(|code| code == error.code()),
                "{} is missing from ErrorCode: {documented:?}",
                error.code()
            );
        }
        assert_eq!(documented.len(), errors.len());
    }

    #[test]
    fn a_bare_429_or_503_keeps_its_status_and_gets_retry_after() {
        for status in [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            let response = ApiError::from_status(status, 1).into_response();
            assert_eq!(response.status(), status);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
    }
}
