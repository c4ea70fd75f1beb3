//! `/ui/`: the operator page (`docs/operator-page.md`). The page itself is static HTML, CSS and
//! JavaScript embedded in the binary (`crates/keel/ui/`); it reads and changes keel through the
//! operator routes of [`super::admin`], with a session cookie instead of a bearer token.
//!
//! - `POST /ui/session` exchanges an operator key (or the admin token) for a session: a random
//!   id in an `HttpOnly`, `SameSite=Strict` cookie, kept in memory here (sessions end when keel
//!   restarts), with an expiry and a CSRF token that every state-changing request made with the
//!   cookie must carry in `X-CSRF-Token`. Sign-in attempts are rate limited per client address.
//! - `GET /ui/session` tells the page whether it is signed in (and gives it the CSRF token
//!   again after a reload); `DELETE /ui/session` signs out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use cookie::Cookie;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_store::{ExposeSecret, SecretString};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::AppState;
use super::admin::Operator;
use super::error::{ApiError, ErrorBody};
use super::json::Json;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "keel_session";

/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);

/// The most sessions kept at once; past it the one closest to its expiry is ended.
const MAX_SESSIONS: usize = 10_000;

/// Sign-in attempts one client address may make: a burst of this many, then one per
/// [`SIGN_IN_PERIOD`].
const SIGN_IN_BURST: u32 = 5;
/// See [`SIGN_IN_BURST`].
const SIGN_IN_PERIOD: Duration = Duration::from_secs(12);

/// Client addresses the sign-in limiter remembers before it forgets the idle ones.
const MAX_TRACKED_ADDRESSES: usize = 4096;

/// The page, its script and its style, embedded at build time.
const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// What the page may load: its own files and nothing else; it may not be framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

/// The routes of the page and its session.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(to_page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .route(
            "/ui/session",
            get(current_session).post(sign_in).delete(sign_out),
        )
}

/// One embedded file, never cached without revalidation (a new keel serves a new page).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `/ui` is the page at `/ui/` (its files are relative to it).
#[utoipa::path(
    get,
    path = "/ui",
    tag = "operator page",
    responses((status = 308, description = "To `/ui/`"))
)]
pub(super) async fn to_page() -> Redirect {
    Redirect::permanent("/ui/")
}

/// The operator page (HTML; it signs in itself).
#[utoipa::path(
    get,
    path = "/ui/",
    tag = "operator page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String))
)]
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The page's script.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "operator page",
    responses((status = 200, description = "The script", content_type = "text/javascript", body = String))
)]
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The page's style sheet.
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "operator page",
    responses((status = 200, description = "The style sheet", content_type = "text/css", body = String))
)]
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// The credential a session was opened with; checked again on every request, so revoking an
/// operator key ends its sessions.
#[derive(Clone)]
enum Credential {
    /// The admin token (it cannot change while keel runs).
    AdminToken,
    /// An operator key: its token, to authenticate again.
    Key(SecretString),
}

/// One signed-in page.
#[derive(Clone)]
struct Session {
    credential: Credential,
    operator: Operator,
    csrf_token: String,
    expires: Instant,
    expires_at: OffsetDateTime,
}

/// The sessions of the operator page, in memory, and the sign-in limiter.
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    sign_ins: DefaultKeyedRateLimiter<IpAddr>,
    /// When the limiter last forgot addresses it no longer needs (a sweep reads them all, so
    /// it runs at most once a second, however many addresses try to sign in).
    last_sweep: Mutex<std::time::Instant>,
    ttl: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_ttl(SESSION_TTL)
    }
}

impl Sessions {
    /// Sessions that last `ttl` (keel uses [`SESSION_TTL`]).
    pub fn with_ttl(ttl: Duration) -> Self {
        let burst = NonZeroU32::new(SIGN_IN_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(SIGN_IN_PERIOD)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            sessions: Mutex::new(HashMap::new()),
            sign_ins: RateLimiter::keyed(quota),
            last_sweep: Mutex::new(std::time::Instant::now()),
            ttl,
        }
    }

    /// Counts a sign-in attempt from `client`; 429 past the limit.
    fn admit_sign_in(&self, client: IpAddr) -> Result<(), ApiError> {
        if self.sign_ins.len() > MAX_TRACKED_ADDRESSES {
            let mut last_sweep = self.last_sweep.lock();
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                *last_sweep = std::time::Instant::now();
                self.sign_ins.retain_recent();
            }
        }
        self.sign_ins.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                message: "too many sign-in attempts from this address".to_owned(),
                retry_after: wait.max(Duration::from_secs(1)),
            }
        })
    }

    /// Opens a session; returns its id.
    fn open(&self, credential: Credential, operator: Operator) -> (String, Session) {
        let id = random_token();
        let session = Session {
            credential,
            operator,
            csrf_token: random_token(),
            expires: Instant::now() + self.ttl,
            expires_at: OffsetDateTime::now_utc() + self.ttl,
        };
        let mut sessions = self.sessions.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session the request's cookie names, if any.
    fn find(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = session_cookie(headers)?;
        let mut sessions = self.sessions.lock();
        match sessions.get(&id) {
            Some(session) if session.expires > Instant::now() => Some((id, session.clone())),
            Some(_) => {
                sessions.remove(&id);
                None
            }
            None => None,
        }
    }

    fn end(&self, id: &str) {
        self.sessions.lock().remove(id);
    }
}

/// 32 random bytes, hex-encoded.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// The session id in the request's `Cookie` header(s).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == SESSION_COOKIE)
        .map(|cookie| cookie.value().to_owned())
}

/// Whether the request reached keel over TLS, by a proxy's `X-Forwarded-Proto` (keel itself
/// serves plain HTTP): the session cookie is then `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(value: &str, max_age: Duration, secure: bool) -> Result<HeaderValue, ApiError> {
    let cookie = Cookie::build((SESSION_COOKIE, value))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ))
        .build();
    HeaderValue::from_str(&cookie.to_string())
        .map_err(|e| ApiError::Internal(format!("session cookie: {e}")))
}

/// Admits a request that carries a session cookie instead of a bearer token, for the operator
/// routes: the session must be live, its credential still valid, and a request that may change
/// state must carry the session's CSRF token. `None`: no session cookie.
pub(super) async fn operator_from_session(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
) -> Option<Result<Operator, ApiError>> {
    session_cookie(headers)?;
    let Some((id, session)) = state.ui_sessions.find(headers) else {
        return Some(Err(ApiError::Unauthorized));
    };
    if !is_safe(method) && !csrf_matches(headers, &session) {
        return Some(Err(ApiError::Forbidden(format!(
            "a request that changes state with the session cookie needs the session's CSRF token in the `{CSRF_HEADER}` header"
        ))));
    }
    Some(
        still_valid(state, &id, &session)
            .await
            .map(|()| session.operator),
    )
}

/// Checks the session's credential again: a revoked operator key ends the session.
async fn still_valid(state: &AppState, id: &str, session: &Session) -> Result<(), ApiError> {
    match &session.credential {
        Credential::AdminToken => Ok(()),
        Credential::Key(token) => {
            if state
                .store
                .authenticate_operator(token.expose_secret())
                .await?
                .is_some()
            {
                Ok(())
            } else {
                state.ui_sessions.end(id);
                Err(ApiError::Unauthorized)
            }
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn csrf_matches(headers: &HeaderMap, session: &Session) -> bool {
    headers
        .get(CSRF_HEADER)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(session.csrf_token.as_bytes())))
}

/// The client's IP address, from the connection (unspecified when the router is driven without
/// one, as in unit tests).
pub(super) struct ClientAddress(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip()),
        ))
    }
}

/// The body of `POST /ui/session`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SignIn {
    /// An operator key (or the admin token); none or a wrong one is 401.
    #[serde(default)]
    key: String,
}

/// A session as the page sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SessionView {
    /// Send it in `X-CSRF-Token` with every request that changes state.
    csrf_token: String,
    /// Who signed in, as audit records name them.
    operator: String,
    /// When the session ends.
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

impl From<&Session> for SessionView {
    fn from(session: &Session) -> Self {
        Self {
            csrf_token: session.csrf_token.clone(),
            operator: session.operator.to_string(),
            expires_at: session.expires_at,
        }
    }
}

/// Signs in with an operator key: sets the session cookie.
#[utoipa::path(
    post,
    path = "/ui/session",
    tag = "operator page",
    request_body = SignIn,
    responses(
        (status = 200, description = "Signed in; `Set-Cookie` carries the session", body = SessionView),
        (status = 400, description = "`malformed_json` or `bad_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: not an operator key", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many sign-in attempts from this address", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn sign_in(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
    Json(request): Json<SignIn>,
) -> Result<Response, ApiError> {
    state.ui_sessions.admit_sign_in(address)?;
    let key = request.key.trim();
    let admin_token = state.admin_token.expose_secret().as_bytes();
    let (credential, operator) = if !key.is_empty() && bool::from(key.as_bytes().ct_eq(admin_token))
    {
        (Credential::AdminToken, Operator::AdminToken)
    } else if let Some(found) = state.store.authenticate_operator(key).await? {
        (
            Credential::Key(SecretString::from(key.to_owned())),
            Operator::Key {
                id: found.id,
                prefix: found.prefix,
            },
        )
    } else {
        tracing::warn!(target: "keel::audit", action = "ui.sign_in_refused", client = %address, "operator page sign-in refused");
        return Err(ApiError::Unauthorized);
    };
    // A page that signs in again leaves its previous session behind: end it.
    if let Some(previous) = session_cookie(&headers) {
        state.ui_sessions.end(&previous);
    }
    let (id, session) = state.ui_sessions.open(credential, operator);
    tracing::info!(target: "keel::audit", action = "ui.sign_in", operator = %session.operator, client = %address, "operator page sign-in");
    let cookie = set_cookie(&id, SESSION_TTL, over_tls(&headers))?;
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(SessionView::from(&session)),
    )
        .into_response())
}

/// The current session, for a page that was reloaded; 401 without one.
#[utoipa::path(
    get,
    path = "/ui/session",
    tag = "operator page",
    responses(
        (status = 200, description = "Signed in", body = SessionView),
        (status = 401, description = "`unauthorized`: no live session", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn current_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SessionView>, ApiError> {
    let (id, session) = state
        .ui_sessions
        .find(&headers)
        .ok_or(ApiError::Unauthorized)?;
    still_valid(&state, &id, &session).await?;
    Ok(Json(SessionView::from(&session)))
}

/// Signs out: ends the session and clears the cookie. Needs the CSRF token.
#[utoipa::path(
    delete,
    path = "/ui/session",
    tag = "operator page",
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "`unauthorized`: no live session", body = ErrorBody),
        (status = 403, description = "`forbidden`: no or a wrong `X-CSRF-Token`", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, session) = state
        .ui_sessions
        .find(&headers)
        .ok_or(ApiError::Unauthorized)?;
    if !csrf_matches(&headers, &session) {
        return Err(ApiError::Forbidden(format!(
            "signing out needs the session's CSRF token in the `{CSRF_HEADER}` header"
        )));
    }
    state.ui_sessions.end(&id);
    tracing::info!(target: "keel::audit", action = "ui.sign_out", operator = %session.operator, "operator page sign-out");
    let cookie = set_cookie("", Duration::ZERO, over_tls(&headers))?;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_http_only_strict_and_expires() {
        let cookie = set_cookie("abc", SESSION_TTL, false).unwrap();
        let cookie = cookie.to_str().unwrap();
        assert!(cookie.starts_with("keel_session=abc"), "{cookie}");
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        assert!(cookie.contains("SameSite=Strict"), "{cookie}");
        assert!(cookie.contains("Path=/"), "{cookie}");
        assert!(cookie.contains("Max-Age=43200"), "{cookie}");
        assert!(!cookie.contains("Secure"), "{cookie}");
        let secure = set_cookie("abc", SESSION_TTL, true).unwrap();
        assert!(secure.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn the_session_id_is_read_among_other_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; keel_session=xyz; b=2"),
        );
        assert_eq!(session_cookie(&headers).as_deref(), Some("xyz"));
        headers.insert(header::COOKIE, HeaderValue::from_static("garbage;;="));
        assert_eq!(session_cookie(&headers), None);
    }

    fn with_cookie(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}")).unwrap(),
        );
        headers
    }

    #[test]
    fn a_session_is_found_until_it_expires_or_ends() {
        let sessions = Sessions::default();
        let (id, session) = sessions.open(Credential::AdminToken, Operator::AdminToken);
        assert_eq!(id.len(), 64);
        assert_ne!(id, session.csrf_token);
        let (found, _) = sessions.find(&with_cookie(&id)).unwrap();
        assert_eq!(found, id);
        assert!(sessions.find(&with_cookie("other")).is_none());
        sessions.end(&id);
        assert!(sessions.find(&with_cookie(&id)).is_none());

        let expired = Sessions::with_ttl(Duration::ZERO);
        let (id, _) = expired.open(Credential::AdminToken, Operator::AdminToken);
        assert!(expired.find(&with_cookie(&id)).is_none());
        assert!(
            expired.sessions.lock().is_empty(),
            "an expired session is dropped"
        );
    }

    #[test]
    fn a_change_needs_the_sessions_csrf_token() {
        let sessions = Sessions::default();
        let (_, session) = sessions.open(Credential::AdminToken, Operator::AdminToken);
        let mut headers = HeaderMap::new();
        assert!(!csrf_matches(&headers, &session));
        headers.insert(CSRF_HEADER, HeaderValue::from_static("wrong"));
        assert!(!csrf_matches(&headers, &session));
        headers.insert(
            CSRF_HEADER,
            HeaderValue::from_str(&session.csrf_token).unwrap(),
        );
        assert!(csrf_matches(&headers, &session));
        assert!(is_safe(&Method::GET) && !is_safe(&Method::POST) && !is_safe(&Method::DELETE));
    }

    #[test]
    fn sign_in_attempts_are_limited_per_address() {
        let sessions = Sessions::default();
        let one = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let two = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        for _ in 0..SIGN_IN_BURST {
            assert!(sessions.admit_sign_in(one).is_ok());
        }
        assert!(matches!(
            sessions.admit_sign_in(one),
            Err(ApiError::RateLimited { .. })
        ));
        assert!(sessions.admit_sign_in(two).is_ok());
    }
}
