//! `Query<T>`: axum's query-string extractor with its rejections turned into keel's error shape:
//! an unknown parameter or a value of the wrong type is 422 `validation_failed`, naming it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;

/// A request's query string, read into `T`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| ApiError::Validation(rejection.body_text()))
    }
}
