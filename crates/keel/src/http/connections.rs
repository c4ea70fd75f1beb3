//! Connections: keel's accept loop and the limits every connection lives under.
//!
//! - **Header read timeout** (`http.header_read_timeout`): once the first byte of a request
//!   arrives, its head (request line and headers) must be complete within this time.
//! - **Idle timeout** (`http.idle_timeout`): a connection with no request in progress must send
//!   the first byte of its next request within this time of opening or of its previous response.
//! - **Connection cap** (`http.max_connections`, lowered to fit the open-file limit): at the
//!   cap, a new connection takes the place of the connection that has waited longest (at least
//!   100 ms) without a request in progress, which is closed; when there is none, the new one
//!   gets one of [`RESERVED_CONNECTIONS`] reserved places, which answer `/healthz` and
//!   `/readyz` and give every other route 503 with `Retry-After`, one request per connection;
//!   when those are taken too, the new connection is closed at once.
//! - **Accept errors** (such as `EMFILE` at the open-file limit) do not spin: the loop closes
//!   the longest idle connection to free a descriptor and backs off (5 ms doubling to 1 s).
//!
//! Why a hand-written accept loop on hyper rather than `axum::serve`: axum's loop has no
//! connection cap and sets no timer, so hyper enforces no header timeout. And why keel times
//! headers and idleness itself rather than with hyper's `header_read_timeout`: hyper starts
//! that timer as soon as it waits for a request head, idle time included, so it cannot tell a
//! slow request head from an idle keep-alive connection, and the two need different limits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Connections kept for health probes when every other place is taken.
pub const RESERVED_CONNECTIONS: usize = 16;

/// Open files keel keeps for itself besides connections (database, WAL, log files, the
/// listener): the connection cap leaves them free under the open-file limit.
pub const FILE_HEADROOM: u64 = 64;

/// How long a connection must have waited without a request in progress before the cap may
/// close it for a newer one: a connection just accepted has its first request on the way.
const MIN_IDLE_TO_CLOSE: Duration = Duration::from_millis(100);

/// How long a new connection at the cap waits for the place of the connection it closed.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

/// The first and the longest pause after an accept error that is not about one connection.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// The limits every connection lives under.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From the first byte of a request to the end of its head.
    pub header_read_timeout: Duration,
    /// From the opening or the previous response to the first byte of the next request.
    pub idle_timeout: Duration,
    /// Connections served at once, besides the reserved ones.
    pub max_connections: usize,
}

/// The route of a request that came on a reserved connection; the lifecycle layer answers
/// every route but `/healthz` and `/readyz` with 503 there.
#[derive(Debug, Clone, Copy)]
pub struct ReservedConnection;

/// The routes a reserved connection serves.
pub const RESERVED_ROUTES: [&str; 2] = ["/healthz", "/readyz"];

/// Raises the soft open-file limit to the hard one (as Go's runtime does) and returns the
/// soft limit in force, `None` when it is unlimited or unknown.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(error) => {
                tracing::warn!(%error, "could not raise the open-file limit to its hard limit");
            }
        }
    }
    limit.current
}

/// The connection cap: the configured one, lowered so that connections, the reserved ones and
/// [`FILE_HEADROOM`] fit under `open_files` (the soft open-file limit); at least 1.
pub fn connection_cap(configured: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured.max(1);
    };
    let room = open_files
        .saturating_sub(FILE_HEADROOM)
        .saturating_sub(RESERVED_CONNECTIONS as u64);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    configured.min(room).max(1)
}

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, lets
/// requests in progress finish (idle connections are closed at once) and returns when every
/// connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let open = OpenConnections::default();
    let general = Arc::new(Semaphore::new(limits.max_connections));
    let reserved = Arc::new(Semaphore::new(RESERVED_CONNECTIONS));
    let tracker = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF.0;
                (stream, peer)
            }
            // The peer gave up before keel accepted: nothing to wait for.
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                metrics::counter!("keel_http_accept_errors_total").increment(1);
                tracing::warn!(%error, pause = ?backoff, "accepting a connection failed; pausing");
                // At the open-file limit, an idle connection gives its descriptor back.
                open.close_longest_idle();
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Some(place) = admit(&open, &general, &reserved).await else {
            metrics::counter!("keel_http_connections_closed_total", "reason" => "refused")
                .increment(1);
            drop(stream);
            continue;
        };
        let connection = Connection {
            app: app.clone(),
            peer,
            limits,
            shutdown: shutdown.clone(),
            activity: Arc::new(Activity::new()),
        };
        let registration = (!place.reserved).then(|| open.register(connection.activity.clone()));
        tracker.spawn(async move {
            metrics::gauge!("keel_http_connections_open").increment(1.0);
            let reason = connection.run(stream, place.reserved).await;
            if let Some(reason) = reason {
                metrics::counter!("keel_http_connections_closed_total", "reason" => reason)
                    .increment(1);
            }
            drop(registration);
            drop(place);
            metrics::gauge!("keel_http_connections_open").decrement(1.0);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Errors about one connection that went away before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Where a connection is served; it holds its place until it closes.
struct Place {
    _permit: OwnedSemaphorePermit,
    reserved: bool,
}

/// A general place, else the place of the longest idle connection (closed for it), else a
/// reserved place, else none.
async fn admit(
    open: &OpenConnections,
    general: &Arc<Semaphore>,
    reserved: &Arc<Semaphore>,
) -> Option<Place> {
    if let Ok(permit) = general.clone().try_acquire_owned() {
        return Some(Place {
            _permit: permit,
            reserved: false,
        });
    }
    if open.close_longest_idle()
        && let Ok(Ok(permit)) =
            tokio::time::timeout(EVICTION_WAIT, general.clone().acquire_owned()).await
    {
        return Some(Place {
            _permit: permit,
            reserved: false,
        });
    }
    reserved
        .clone()
        .try_acquire_owned()
        .ok()
        .map(|permit| Place {
            _permit: permit,
            reserved: true,
        })
}

/// The connections in general places, so the cap can close the one idle longest.
#[derive(Default)]
struct OpenConnections {
    next_id: AtomicU64,
    by_age: Arc<Mutex<BTreeMap<u64, Arc<Activity>>>>,
}

impl OpenConnections {
    fn register(&self, activity: Arc<Activity>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.by_age.lock().insert(id, activity);
        Registration {
            id,
            by_age: self.by_age.clone(),
        }
    }

    /// Asks the connection that has waited longest without a request in progress (at least
    /// [`MIN_IDLE_TO_CLOSE`]) to close; false when there is none.
    fn close_longest_idle(&self) -> bool {
        let Some(idle_before) = Instant::now().checked_sub(MIN_IDLE_TO_CLOSE) else {
            return false;
        };
        let by_age = self.by_age.lock();
        let longest_idle = by_age
            .values()
            .filter(|activity| !activity.close.is_cancelled())
            .filter_map(|activity| Some((activity.waiting_since()?, activity)))
            .filter(|(since, _)| *since <= idle_before)
            .min_by_key(|(since, _)| *since);
        match longest_idle {
            Some((_, activity)) => {
                activity.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`OpenConnections`] when it closes.
struct Registration {
    id: u64,
    by_age: Arc<Mutex<BTreeMap<u64, Arc<Activity>>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.by_age.lock().remove(&self.id);
    }
}

/// What a connection is doing, for its timeouts and for the cap.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress and no byte of the next one, since this instant.
    Idle(Instant),
    /// The first byte of a request head arrived at this instant; the head is not complete.
    Head(Instant),
    /// This many requests are being answered.
    Busy(usize),
}

/// A connection's phase, shared by its reader, its service and its watchdog.
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
    /// Cancelled to close the connection for a newer one.
    close: CancellationToken,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
            close: CancellationToken::new(),
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock() = phase;
        self.changed.notify_one();
    }

    fn bytes_read(&self) {
        let idle = matches!(*self.phase.lock(), Phase::Idle(_));
        if idle {
            self.set(Phase::Head(Instant::now()));
        }
    }

    fn request_started(&self) {
        let busy = match *self.phase.lock() {
            Phase::Busy(n) => n.saturating_add(1),
            Phase::Idle(_) | Phase::Head(_) => 1,
        };
        self.set(Phase::Busy(busy));
    }

    fn request_finished(&self) {
        let next = match *self.phase.lock() {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
        self.set(next);
    }

    /// Since when the connection has waited without a request in progress.
    fn waiting_since(&self) -> Option<Instant> {
        match *self.phase.lock() {
            Phase::Idle(since) | Phase::Head(since) => Some(since),
            Phase::Busy(_) => None,
        }
    }

    fn is_busy(&self) -> bool {
        matches!(*self.phase.lock(), Phase::Busy(_))
    }

    /// Completes with the reason when the connection has been idle, or reading one request
    /// head, for too long.
    async fn expired(&self, limits: ConnectionLimits) -> &'static str {
        loop {
            let deadline = match *self.phase.lock() {
                Phase::Idle(since) => Some((since + limits.idle_timeout, "idle_timeout")),
                Phase::Head(since) => {
                    Some((since + limits.header_read_timeout, "header_read_timeout"))
                }
                Phase::Busy(_) => None,
            };
            match deadline {
                Some((at, reason)) => tokio::select! {
                    () = self.changed.notified() => {}
                    () = tokio::time::sleep_until(at) => return reason,
                },
                None => self.changed.notified().await,
            }
        }
    }
}

/// Marks a request finished when its answer is ready, or when it is dropped unanswered.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.request_started();
        Self(activity.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// One accepted connection.
struct Connection {
    app: Router,
    /// The client's address, given to handlers as `ConnectInfo` (the sign-in limiter).
    peer: std::net::SocketAddr,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    activity: Arc<Activity>,
}

impl Connection {
    /// Serves the connection until it closes; returns why keel closed it, if keel did.
    async fn run(self, stream: TcpStream, reserved: bool) -> Option<&'static str> {
        // Latency matters more than packet count for small JSON answers.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(ReadWatcher {
            inner: stream,
            activity: self.activity.clone(),
        });
        let app = self.app;
        let peer = self.peer;
        let activity = self.activity.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let in_progress = InProgress::start(&activity);
            if reserved {
                request.extensions_mut().insert(ReservedConnection);
            }
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let answer = app.clone().oneshot(request.map(axum::body::Body::new));
            // Boxed, so the connection is `Unpin` and gives its socket back when it ends.
            Box::pin(async move {
                let response: Result<Response, Infallible> = answer.await;
                drop(in_progress);
                response
            })
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            // keel times request heads itself (see the module documentation).
            .header_read_timeout(None)
            .keep_alive(!reserved);
        let mut connection = builder.serve_connection(io, service);
        tokio::select! {
            served = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                match served {
                    Ok(()) => linger(connection.into_parts().io.into_inner().inner).await,
                    Err(error) => tracing::debug!(%error, "connection ended with an error"),
                }
                return None;
            }
            reason = self.activity.expired(self.limits) => return Some(reason),
            () = self.activity.close.cancelled() => return Some("evicted"),
            () = self.shutdown.cancelled() => {}
        }
        // Shutting down: an idle connection closes now, a busy one after its answer.
        if !self.activity.is_busy() {
            return Some("shutdown");
        }
        Pin::new(&mut connection).graceful_shutdown();
        let _ = connection.await;
        None
    }
}

/// How long, at most, a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// The most bytes a closing connection reads and drops.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// Closes a connection the way a client can read its last answer: the answer is sent and the
/// sending side shut, then what the client still sends (the rest of a body refused with 413
/// before it was read) is read and dropped, for up to [`LINGER`] and [`LINGER_BYTES`]. Closing
/// a socket with unread bytes would reset it, and the client would lose the answer.
async fn linger(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = vec![0_u8; 64 * 1024];
    let mut drained = 0;
    let deadline = Instant::now() + LINGER;
    while drained < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// The socket, telling the connection's [`Activity`] when request bytes arrive.
struct ReadWatcher {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for ReadWatcher {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for ReadWatcher {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_under_the_open_file_limit() {
        assert_eq!(connection_cap(4096, None), 4096);
        assert_eq!(connection_cap(4096, Some(1024)), 1024 - 64 - 16);
        assert_eq!(connection_cap(100, Some(1024)), 100);
        assert_eq!(connection_cap(4096, Some(10)), 1);
        assert_eq!(connection_cap(0, None), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_idle_timeout_and_a_slow_head_after_the_header_timeout()
     {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_connections: 1,
        };
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(activity.expired(limits).await, "idle_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let activity = Arc::new(Activity::new());
        activity.bytes_read();
        let started = Instant::now();
        assert_eq!(activity.expired(limits).await, "header_read_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        // A request in progress never expires; once answered, the idle clock starts.
        let in_progress = InProgress::start(&activity);
        let waiting = tokio::time::timeout(Duration::from_secs(60), activity.expired(limits));
        assert!(waiting.await.is_err());
        drop(in_progress);
        let started = Instant::now();
        assert_eq!(activity.expired(limits).await, "idle_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_closes_the_longest_idle_connection_never_a_busy_or_a_new_one() {
        let open = OpenConnections::default();
        let busy = Arc::new(Activity::new());
        let _busy_request = InProgress::start(&busy);
        let _r1 = open.register(busy.clone());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Older than `idle_longer`, but its request ends later.
        let idle_shorter = Arc::new(Activity::new());
        let request = InProgress::start(&idle_shorter);
        let _r2 = open.register(idle_shorter.clone());
        tokio::time::advance(Duration::from_secs(1)).await;
        let idle_longer = Arc::new(Activity::new());
        let _r3 = open.register(idle_longer.clone());
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(request);
        tokio::time::advance(Duration::from_secs(1)).await;
        let just_accepted = Arc::new(Activity::new());
        let _r4 = open.register(just_accepted.clone());

        assert!(open.close_longest_idle());
        assert!(idle_longer.close.is_cancelled());
        assert!(!idle_shorter.close.is_cancelled());
        assert!(open.close_longest_idle());
        assert!(idle_shorter.close.is_cancelled());
        assert!(
            !open.close_longest_idle(),
            "busy and just-accepted ones stay"
        );
        assert!(!busy.close.is_cancelled());
        assert!(!just_accepted.close.is_cancelled());
    }
}
