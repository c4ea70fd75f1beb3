//! The request id: taken from `X-Request-Id` when the client sends a sane one, generated
//! otherwise; returned in the response header, in error bodies and in every log record of the
//! request (through the `request` span).

use axum::http::{HeaderMap, HeaderName};

/// The header that carries the request id both ways.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied request id kept; a longer or odd one is replaced.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled by this task, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `future` with `id` as the current request id.
pub async fn scope<F: std::future::Future>(id: String, future: F) -> F::Output {
    CURRENT.scope(id, future).await
}

/// The client's id when it is printable ASCII of a sane length, else a new UUID v7.
pub fn from_headers(headers: &HeaderMap) -> String {
    headers
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_LEN)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept_and_an_odd_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&HEADER, "abc-123".parse().unwrap());
        assert_eq!(from_headers(&headers), "abc-123");
        headers.insert(&HEADER, "has space".parse().unwrap());
        assert_ne!(from_headers(&headers), "has space");
        headers.insert(&HEADER, "x".repeat(200).parse().unwrap());
        assert_eq!(from_headers(&headers).len(), 36);
        assert_eq!(from_headers(&HeaderMap::new()).len(), 36);
    }
}
