//! A typed client for the agent routes of the commands API (`docs/commands.md`).

use std::sync::Arc;
use std::time::Duration;

use keel_guard::backoff::Backoff;
use keel_store::{ExposeSecret, SecretString};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// How long a request other than a claim may take before it counts as a connection failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How much longer than its `wait_seconds` a long-polling claim may take.
pub const CLAIM_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);

/// Why a request did not succeed, sorted by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// 409: the claim token is stale or the command is no longer executing (`stale_claim`).
    /// The lease was lost; nothing changed on the server.
    #[error("stale claim: {0}")]
    Stale(String),
    /// 404: no such command (or route) for this agent's organisation.
    #[error("not found: {0}")]
    NotFound(String),
    /// Any other refusal (401, 403, 413, 422, …): repeating the request will not help.
    #[error("refused with {status} {code}: {message}")]
    Fatal {
        /// The HTTP status.
        status: u16,
        /// keel's error code (`unauthorized`, `forbidden`, `validation_failed`, …).
        code: String,
        /// keel's error message.
        message: String,
    },
    /// A connection error, a timeout, 408, 429 or 5xx: worth retrying after a backoff, and not
    /// before the server's `Retry-After` when it sent one.
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// The server's `Retry-After`, in seconds (the only form keel sends).
        retry_after: Option<Duration>,
    },
}

/// The longest `Retry-After` the agent honours; a longer one (a misconfigured proxy) is cut
/// to this, so the agent keeps trying.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl ClientError {
    /// A retryable error with no `Retry-After`.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// How long to wait before retrying: the backoff's next delay, but never less than the
    /// server's `Retry-After` (up to [`MAX_RETRY_AFTER`]).
    pub fn retry_delay(&self, backoff: &mut Backoff) -> Duration {
        let delay = backoff.next_delay();
        match self {
            Self::Retryable {
                retry_after: Some(wait),
                ..
            } => delay.max((*wait).min(MAX_RETRY_AFTER)),
            _ => delay,
        }
    }
}

/// The body of `POST /v1/agents/check-in`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckIn {
    /// The agent's name; the server checks it is the key's agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The agent's version.
    pub version: String,
    /// Free-form facts about the agent (hostname, pid, concurrency).
    pub metadata: Value,
    /// The queues this agent claims pooled commands from.
    pub queues: Vec<String>,
    /// A new id on every start of the agent process.
    pub boot_id: Uuid,
    /// The agent's labels (`--label`).
    pub labels: keel_store::Labels,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Deserialize)]
pub struct HeartbeatReply {
    /// When the renewed lease ends, as the server sees it.
    #[serde(default)]
    pub lease_expires_at: Option<String>,
    /// The command should be stopped.
    #[serde(default)]
    pub cancel_requested: bool,
}

#[derive(Serialize)]
struct ClaimBody<'a> {
    limit: usize,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    queues: &'a [String],
    wait_seconds: u64,
}

#[derive(Deserialize)]
struct ClaimReply {
    commands: Vec<Value>,
}

#[derive(Serialize)]
struct HeartbeatBody<'a> {
    claim_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<&'a Value>,
}

#[derive(Serialize)]
struct CompleteBody<'a> {
    claim_token: &'a str,
    result: &'a Value,
}

#[derive(Serialize)]
struct FailBody<'a> {
    claim_token: &'a str,
    error: &'a Value,
    retryable: bool,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The agent's HTTP client; cheap to clone. `Debug` never shows the token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
    token: Arc<SecretString>,
}

impl Client {
    /// A client for the server at `server` (an `http` or `https` URL) with an `agent` API key.
    pub fn new(server: &str, token: SecretString) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(server)
            .map_err(|error| anyhow::anyhow!("--server {server:?} is not a URL: {error}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--server {server:?} must be an http or https URL");
        }
        if token.expose_secret().trim().is_empty() {
            anyhow::bail!("the token (--token-file, KEEL_AGENT_TOKEN or --token) is empty");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("keel-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: Arc::from(server.trim_end_matches('/')),
            token: Arc::new(token),
        })
    }

    /// The server's base URL, without a trailing slash.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// `POST /v1/agents/check-in`: registers this boot; answers the agent object.
    pub async fn check_in(&self, body: &CheckIn) -> Result<Value, ClientError> {
        let response = self
            .post("/v1/agents/check-in", REQUEST_TIMEOUT, body)
            .await?;
        decode(response).await
    }

    /// `POST /v1/commands/claim`: up to `limit` commands (the raw objects, `claim_token`
    /// included), waiting up to `wait_seconds` for one to become due.
    pub async fn claim(
        &self,
        limit: usize,
        queues: &[String],
        wait_seconds: u64,
    ) -> Result<Vec<Value>, ClientError> {
        let body = ClaimBody {
            limit,
            queues,
            wait_seconds,
        };
        let timeout = Duration::from_secs(wait_seconds) + CLAIM_TIMEOUT_MARGIN;
        let response = self.post("/v1/commands/claim", timeout, &body).await?;
        read_claim_answer(&read_body(response).await?)
    }

    /// `POST /v1/commands/{id}/heartbeat`: renews the lease and stores `progress`.
    pub async fn heartbeat(
        &self,
        id: Uuid,
        claim_token: &str,
        progress: Option<&Value>,
        timeout: Duration,
    ) -> Result<HeartbeatReply, ClientError> {
        let body = HeartbeatBody {
            claim_token,
            progress,
        };
        let response = self
            .post(&format!("/v1/commands/{id}/heartbeat"), timeout, &body)
            .await?;
        decode(response).await
    }

    /// `POST /v1/commands/{id}/complete` with `result`.
    pub async fn complete(
        &self,
        id: Uuid,
        claim_token: &str,
        result: &Value,
    ) -> Result<(), ClientError> {
        let body = CompleteBody {
            claim_token,
            result,
        };
        self.post(
            &format!("/v1/commands/{id}/complete"),
            REQUEST_TIMEOUT,
            &body,
        )
        .await
        .map(drop)
    }

    /// `POST /v1/commands/{id}/fail` with `error`; `retryable` lets the server try again.
    pub async fn fail(
        &self,
        id: Uuid,
        claim_token: &str,
        error: &Value,
        retryable: bool,
    ) -> Result<(), ClientError> {
        let body = FailBody {
            claim_token,
            error,
            retryable,
        };
        self.post(&format!("/v1/commands/{id}/fail"), REQUEST_TIMEOUT, &body)
            .await
            .map(drop)
    }

    /// Sends one POST; a non-2xx answer becomes the matching [`ClientError`].
    async fn post(
        &self,
        path: &str,
        timeout: Duration,
        body: &impl Serialize,
    ) -> Result<reqwest::Response, ClientError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token.expose_secret())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|error| ClientError::retryable(describe(&error)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.unwrap_or_default();
        Err(match classify(status, &bytes) {
            ClientError::Retryable { message, .. } => ClientError::Retryable {
                message,
                retry_after,
            },
            other => other,
        })
    }
}

/// Reads a 2xx body as `T`; a body that cannot be read or decoded is retryable (a cut
/// connection or a proxy's page), and logged by the caller.
async fn decode<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    parse(&read_body(response).await?)
}

/// A 2xx answer's body; one that cannot be read (a cut connection) is retryable.
async fn read_body(response: reqwest::Response) -> Result<bytes::Bytes, ClientError> {
    response
        .bytes()
        .await
        .map_err(|error| ClientError::retryable(describe(&error)))
}

/// Reads a 2xx body's bytes as `T`; bytes that do not decode are retryable.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|error| {
        ClientError::retryable(format!("unreadable answer from the server: {error}"))
    })
}

/// The commands of a claim answer's body (`{"commands": [...]}`), as raw objects; a body that
/// is not such an answer is retryable, like any unreadable 2xx answer.
pub fn read_claim_answer(bytes: &[u8]) -> Result<Vec<Value>, ClientError> {
    parse::<ClaimReply>(bytes).map(|reply| reply.commands)
}

/// Sorts a non-2xx answer: 404 not found, 409 stale, 408/429/5xx retryable, the rest fatal.
pub fn classify(status: StatusCode, body: &[u8]) -> ClientError {
    let (code, message) = match serde_json::from_slice::<ErrorReply>(body) {
        Ok(reply) => (reply.error.code, reply.error.message),
        Err(_) => (
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_"),
            String::from_utf8_lossy(body.get(..200).unwrap_or(body)).into_owned(),
        ),
    };
    let detail = || format!("{} {code}: {message}", status.as_u16());
    match status {
        StatusCode::NOT_FOUND => ClientError::NotFound(detail()),
        StatusCode::CONFLICT => ClientError::Stale(detail()),
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            ClientError::retryable(detail())
        }
        status if status.is_server_error() => ClientError::retryable(detail()),
        status => ClientError::Fatal {
            status: status.as_u16(),
            code,
            message,
        },
    }
}

/// `Retry-After` in whole seconds; an HTTP date or anything else is ignored (the backoff
/// applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// A reqwest error with its causes (connection refused, timed out, …).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_sorted_by_what_to_do() {
        let body = br#"{"error":{"code":"stale_claim","message":"stale","request_id":"x"}}"#;
        assert!(matches!(
            classify(StatusCode::CONFLICT, body),
            ClientError::Stale(_)
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, b""),
            ClientError::NotFound(_)
        ));
        for status in [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert!(matches!(
                classify(status, b"<html>"),
                ClientError::Retryable { .. }
            ));
        }
        let body = br#"{"error":{"code":"unauthorized","message":"bad token"}}"#;
        match classify(StatusCode::UNAUTHORIZED, body) {
            ClientError::Fatal {
                status,
                code,
                message,
            } => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (401, "unauthorized", "bad token")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, b"not json"),
            ClientError::Fatal { status: 422, .. }
        ));
    }

    #[test]
    fn a_bad_server_url_or_empty_token_is_refused() {
        assert!(Client::new("not a url", "t".into()).is_err());
        assert!(Client::new("ftp://example.com", "t".into()).is_err());
        assert!(Client::new("http://127.0.0.1:1", " ".into()).is_err());
        let client = Client::new("http://127.0.0.1:1/", "t".into()).unwrap();
        assert_eq!(client.server(), "http://127.0.0.1:1");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = "keel_abcdefgh_averysecretagenttokenvalue";
        let client = Client::new("http://127.0.0.1:1/", token.into()).unwrap();
        for shown in [format!("{client:?}"), format!("{client:#?}")] {
            assert!(!shown.contains("averysecret"), "{shown}");
        }
    }
}
