//! `Json<T>`: axum's JSON extractor with its rejections turned into keel's error shape: a body
//! that is not well-formed JSON (truncated included) is 400 `malformed_json`, well-formed JSON of
//! the wrong shape is 422 `validation_failed`. Every request body is a JSON object: serde would
//! also read a struct from an array of its fields in order (`["x"]` for `{"key": "x"}`), which no
//! route documents, so anything else is 422 too.

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};

use super::error::ApiError;

/// The body limit in force for this request, set by the lifecycle layer so a 413 can say it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON request or response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(0, |limit| limit.0);
        // The body is read first and kept: when serde meets a wrong field before the end of a
        // truncated body, axum calls it a data error, and only the bytes can tell it is not JSON.
        let (head, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(head.clone(), body), state)
            .await
            .map_err(|rejection| bytes_rejection_to_error(&rejection, limit))?;
        let req = Request::from_parts(head, Body::from(bytes.clone()));
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) if is_object(&bytes) => Ok(Json(value)),
            Ok(_) => Err(ApiError::Validation(
                "the request body must be a JSON object".to_owned(),
            )),
            Err(JsonRejection::JsonDataError(error)) => match not_json(&bytes) {
                Some(syntax) => Err(ApiError::MalformedJson(syntax)),
                None => Err(ApiError::Validation(error.body_text())),
            },
            Err(rejection) => Err(rejection_to_error(rejection, limit)),
        }
    }
}

/// Whether well-formed JSON `bytes` hold an object.
fn is_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Why `bytes` is not well-formed JSON, or `None` when it is.
fn not_json(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<IgnoredAny>(bytes)
        .err()
        .map(|error| format!("Failed to parse the request body as JSON: {error}"))
}

fn bytes_rejection_to_error(rejection: &BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::BadRequest(rejection.body_text())
    }
}

fn rejection_to_error(rejection: JsonRejection, limit: usize) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(e.body_text()),
        JsonRejection::JsonDataError(e) => ApiError::Validation(e.body_text()),
        JsonRejection::BytesRejection(e) => bytes_rejection_to_error(&e, limit),
        other => ApiError::BadRequest(other.body_text()),
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
