//! The request lifecycle layer, applied to every route (and the fallbacks):
//!
//! 1. the request id (from `X-Request-Id` or new), returned in the response header;
//! 2. the `request` span (`request_id`, `method`, `route`) around everything the request logs;
//! 3. requests refused before any handler runs: a `Content-Length` above the body limit gets
//!    413 at once; on a reserved connection (see [`super::connections`]) every route but the
//!    health probes gets 503;
//! 4. the timeout: a request not answered in time gets 408;
//! 5. panic isolation: a panicking handler gets a JSON 500 with the request id, never the panic
//!    text; the panic hook counts it under component `http` with the route as context;
//! 6. the JSON safety net: an error status produced outside keel's handlers (axum's own 405,
//!    for one) is given keel's error shape;
//! 7. the access record and the request metrics.
//!
//! One hand-written layer rather than tower-http's `CatchPanicLayer`, `TimeoutLayer` and
//! `SetRequestIdLayer`: their error responses cannot see the request id or the route, and each
//! of these steps needs both.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_guard::{Scope, isolate_async};
use tracing::Instrument;

use super::connections::{RESERVED_ROUTES, ReservedConnection};
use super::error::{ApiError, ErrorMarker};
use super::json::BodyLimit;
use super::request_id;

/// Route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// What the lifecycle layer needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// A request not answered within this time gets 408.
    pub timeout: Duration,
    /// The body limit, quoted in 413 errors.
    pub body_limit: usize,
}

/// The layer's function, for `axum::middleware::from_fn_with_state`.
pub async fn lifecycle(
    State(lifecycle): State<Lifecycle>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = request_id::from_headers(request.headers());
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    request
        .extensions_mut()
        .insert(BodyLimit(lifecycle.body_limit));

    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let handled = request_id::scope(id.clone(), async {
        let scope = Scope::new("http")
            .with_context(format!("{method} {route} request_id={id}"))
            .with_request_id(id.as_str());
        if let Some(refused) = refused_before_handling(&request, &route, lifecycle.body_limit) {
            let mut response = with_error_shape(refused.into_response(), lifecycle.body_limit);
            // The unread body leaves the connection unusable: the client must not send its next
            // request on it.
            response.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return response;
        }
        let response = match tokio::time::timeout(
            lifecycle.timeout,
            isolate_async(scope, async move {
                injected_handler_fault();
                injected_route_panic(request.uri().path());
                if let Some(delay) = injected_delay() {
                    tokio::time::sleep(delay).await;
                }
                next.run(request).await
            }),
        )
        .await
        {
            Ok(Ok(response)) => response,
            // The panic hook has logged the panic with its backtrace and counted it.
            Ok(Err(_panicked)) => ApiError::Internal(String::new()).into_response(),
            Err(_elapsed) => ApiError::Timeout.into_response(),
        };
        with_error_shape(response, lifecycle.body_limit)
    })
    .instrument(span.clone())
    .await;

    let mut response = handled;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(request_id::HEADER.clone(), value);
    }
    span.in_scope(|| record_access(&method, &route, &response, started.elapsed()));
    response
}

/// The answer to a request refused before any handler runs: a body announced larger than the
/// limit (413 at once, rather than after the client sent it or the timeout), or a route other
/// than the health probes on a reserved connection (503).
fn refused_before_handling(request: &Request, route: &str, body_limit: usize) -> Option<ApiError> {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|length| length > body_limit as u64) {
        return Some(ApiError::PayloadTooLarge { limit: body_limit });
    }
    if request.extensions().get::<ReservedConnection>().is_some()
        && !RESERVED_ROUTES.contains(&route)
    {
        return Some(ApiError::Unavailable {
            reason: "every connection is busy",
            retry_after: 1,
        });
    }
    None
}

/// Gives an error response made outside keel's handlers (a bare status, a text body) the JSON
/// error shape, and logs the detail of internal errors (a panic has none: the hook has logged
/// it already). JSON answers such as `/readyz`'s 503 pass unchanged.
fn with_error_shape(response: Response, body_limit: usize) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    match response.extensions().get::<ErrorMarker>() {
        Some(ErrorMarker {
            detail: Some(detail),
        }) if !detail.is_empty() => {
            tracing::error!(detail = %detail, "request failed");
            response
        }
        Some(_) => response,
        None if is_json(&response) => response,
        None => ApiError::from_status(status, body_limit).into_response(),
    }
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"))
}

fn record_access(method: &Method, route: &str, response: &Response, latency: Duration) {
    let status = response.status().as_u16();
    tracing::info!(
        target: "keel::access",
        method = %method,
        route = %route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request"
    );
    // Bounded labels only: the method is one of the known ones or `other`, the route a
    // template of the router or `unmatched`.
    let labels = [
        ("method", crate::telemetry::method_label(method).to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("keel_http_requests_total", &labels).increment(1);
    metrics::histogram!("keel_http_request_duration_seconds", "route" => route.to_owned())
        .record(latency.as_secs_f64());
}

/// Failpoint `http.handler`: runs inside the isolated handler path, before the handler
/// (`panic` makes the request panic as a handler would).
fn injected_handler_fault() {
    fail::fail_point!("http.handler");
}

/// Failpoint `http.route_panic`: `return(PREFIX)` makes every request whose path starts with
/// PREFIX panic where [`injected_handler_fault`] would, so one route panics while the others
/// answer (`return` alone: every path).
// A failpoint: it panics only when `KEEL_FAILPOINTS` asks it to, which is its purpose.
#[allow(clippy::panic)]
fn injected_route_panic(path: &str) {
    if route_panic_prefix().is_some_and(|prefix| path.starts_with(&prefix)) {
        panic!("injected panic (failpoint http.route_panic)");
    }
}

/// The PREFIX of `http.route_panic=return(PREFIX)`, when that point is set.
fn route_panic_prefix() -> Option<String> {
    fail::fail_point!("http.route_panic", |prefix| Some(
        prefix.unwrap_or_default()
    ));
    None
}

/// Failpoint `http.delay`: `return(MS)` makes the handler path wait MS milliseconds
/// asynchronously, as a slow handler would (a `sleep` action would block the worker thread).
fn injected_delay() -> Option<Duration> {
    fail::fail_point!("http.delay", |ms| {
        ms.and_then(|ms| ms.parse().ok()).map(Duration::from_millis)
    });
    None
}
