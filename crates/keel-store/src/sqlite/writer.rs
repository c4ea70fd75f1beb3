//! SQLite's one writer, fed by a group-commit task.
//!
//! SQLite lets one connection write at a time, and under `synchronous = FULL` every commit costs
//! an `fsync`. One task owns the write connection. Callers hand it operations through a bounded
//! queue; it takes every operation waiting (up to [`WriterOptions::max_group`]), runs each inside
//! its own savepoint of one transaction, commits the group once, and only then answers each
//! caller with its own result. An operation that fails (or panics) is rolled back to its
//! savepoint alone: the others of its group still commit.
//!
//! Agents' lease work (claims, heartbeats, reports) is committed first: the operations taken
//! for a group are split by [`Lane`], and the lease operations commit in a transaction of their
//! own before the rest. A heartbeat then waits for at most the group in progress and its own
//! short one, not for a flood of creates queued beside it.
//!
//! What a caller sees:
//! - its result only once the group that carries it is durable;
//! - [`StoreError::Busy`] when the queue stays full for [`WriterOptions::enqueue_timeout`];
//! - nothing done at all when it gave up (dropped its future) before its turn came;
//! - [`StoreError::Unavailable`] when the store is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::error::{StoreError, StoreResult};

/// The component a panic inside the writer is counted under.
pub const WRITER_COMPONENT: &str = "store.writer";

/// Which operations of a group commit first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// An agent's claim, heartbeat or report: it takes or holds a lease, which a late commit
    /// can cost. Committed ahead of the bulk operations taken with it.
    Lease,
    /// Everything else: creates, cancels, keys, the jobs' batches.
    Bulk,
}

/// How the writer queues and groups operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Operations that may wait for the writer; beyond that, callers wait for room.
    pub queue_capacity: usize,
    /// The most operations committed together.
    pub max_group: usize,
    /// How long a caller waits for room in a full queue before [`StoreError::Busy`].
    pub enqueue_timeout: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 4096,
            max_group: 256,
            enqueue_timeout: Duration::from_secs(5),
        }
    }
}

/// How loaded the writer is, for load shedding and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritePressure {
    /// Operations waiting for the writer.
    pub queue_depth: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// How long groups take, from their first statement to their durable commit: a moving
    /// average in which each group weighs 1/8.
    pub commit_latency: Duration,
    /// How many operations the last group carried.
    pub last_group: usize,
}

/// A write to run on the writer's connection, inside a savepoint of the group's transaction.
type WriteFn<T> =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>> + Send>;

/// One queued operation, its result type erased.
trait Operation: Send {
    /// Whether the caller still waits for the answer.
    fn is_wanted(&self) -> bool;
    /// Runs the write; `true` when it succeeded (its savepoint is kept).
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// The lane the operation commits in.
    fn lane(&self) -> Lane;
    /// Whether the write changes the database in at most one statement (reads may come before
    /// or after it). SQLite undoes a failed statement by itself, so such a write needs no
    /// savepoint of its own.
    fn is_one_statement(&self) -> bool;
    /// After a one-statement write failed: the error, when it may have left the transaction
    /// in doubt (a database error, a panic) rather than a clean refusal (a constraint, a stale
    /// token, a missing row); the whole group is then rolled back.
    fn doubt(&self) -> Option<StoreError>;
    /// Answers the caller once the group's fate is known: its own result if the group
    /// committed, the commit's error otherwise.
    fn answer(self: Box<Self>, committed: Result<(), &StoreError>);
}

struct Typed<T> {
    write: Option<WriteFn<T>>,
    lane: Lane,
    one_statement: bool,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
    /// What to do with a successful result nobody received any more (a claim hands its
    /// commands back).
    orphaned: Option<Box<dyn FnOnce(T) + Send>>,
}

impl<T: Send + 'static> Operation for Typed<T> {
    fn is_wanted(&self) -> bool {
        !self.reply.is_closed()
    }

    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let Some(write) = self.write.take() else {
                return false;
            };
            // A panic is counted and logged once by the panic hook, under `store.writer`.
            let outcome = keel_guard::isolate_async(WRITER_COMPONENT, async move {
                fail::fail_point!("store.write", |_| Err(StoreError::injected("store.write")));
                write(conn).await
            })
            .await;
            let result = outcome.unwrap_or_else(|panicked| {
                Err(StoreError::Unavailable(format!(
                    "the write was rolled back: {panicked}"
                )))
            });
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn lane(&self) -> Lane {
        self.lane
    }

    fn is_one_statement(&self) -> bool {
        self.one_statement
    }

    fn doubt(&self) -> Option<StoreError> {
        match &self.result {
            Some(Err(
                err @ (StoreError::Database(_)
                | StoreError::Unavailable(_)
                | StoreError::Busy(_)
                | StoreError::Migrate(_)),
            )) => Some(err.duplicate()),
            _ => None,
        }
    }

    fn answer(self: Box<Self>, committed: Result<(), &StoreError>) {
        let this = *self;
        let result = match (committed, this.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable("the write did not run".to_owned())),
            (Err(err), _) => Err(err.duplicate()),
        };
        if let Err(Ok(value)) = this.reply.send(result)
            && let Some(orphaned) = this.orphaned
        {
            orphaned(value);
        }
    }
}

enum Message {
    Write(Box<dyn Operation>),
    /// Detached writes are waiting in [`Writer::detached`].
    Detached,
    Close(oneshot::Sender<()>),
}

/// Writes nobody waits for (hand-backs of abandoned claims). They are not sent through the
/// bounded queue, which may be full exactly when claimers give up: the writer takes them all
/// at the start of its next group, and before it closes.
type DetachedWrites = Arc<parking_lot::Mutex<Vec<Box<dyn Operation>>>>;

/// The handle callers use to reach the writer task.
#[derive(Clone)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Message>,
    detached: DetachedWrites,
    stats: Arc<Stats>,
    options: WriterOptions,
}

#[derive(Debug, Default)]
struct Stats {
    commit_latency_us: AtomicU64,
    last_group: AtomicU64,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("pressure", &self.pressure())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writer task on `conn` (already migrated); `connect` opens a new connection if
    /// this one breaks.
    pub(crate) fn start(
        conn: SqliteConnection,
        connect: SqliteConnectOptions,
        options: WriterOptions,
    ) -> Self {
        let (queue, inbox) = mpsc::channel(options.queue_capacity.max(1));
        let stats = Arc::new(Stats::default());
        let detached = DetachedWrites::default();
        let task = GroupCommit {
            conn: Some(conn),
            connect,
            inbox,
            detached: detached.clone(),
            max_group: options.max_group.max(1),
            stats: stats.clone(),
        };
        tokio::spawn(task.run());
        Self {
            queue,
            detached,
            stats,
            options,
        }
    }

    /// Runs `write` in the next group, inside a savepoint of its own, and answers once that
    /// group is durable.
    pub(crate) async fn write<T, F>(&self, lane: Lane, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.submit(Box::new(write), lane, false, None).await
    }

    /// Like [`Writer::write`] for a write that changes the database in at most one statement:
    /// it runs without a savepoint, and alone in its group without a transaction around it.
    pub(crate) async fn write_one<T, F>(&self, lane: Lane, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.submit(Box::new(write), lane, true, None).await
    }

    /// Like [`Writer::write_one`] in the lease lane (a claim); when the caller has gone by the
    /// time the write committed, its successful result is handed to `orphaned` instead.
    pub(crate) async fn write_or_else<T, F>(
        &self,
        write: F,
        orphaned: Box<dyn FnOnce(T) + Send>,
    ) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.submit(Box::new(write), Lane::Lease, true, Some(orphaned))
            .await
    }

    async fn submit<T: Send + 'static>(
        &self,
        write: WriteFn<T>,
        lane: Lane,
        one_statement: bool,
        orphaned: Option<Box<dyn FnOnce(T) + Send>>,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        let operation = Typed {
            write: Some(write),
            lane,
            one_statement,
            result: None,
            reply,
            orphaned,
        };
        self.queue
            .send_timeout(
                Message::Write(Box::new(operation)),
                self.options.enqueue_timeout,
            )
            .await
            .map_err(|err| match err {
                mpsc::error::SendTimeoutError::Timeout(_) => StoreError::Busy(format!(
                    "the write queue stayed full ({} waiting) for {:?}",
                    self.options.queue_capacity, self.options.enqueue_timeout
                )),
                mpsc::error::SendTimeoutError::Closed(_) => closed(),
            })?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Runs `write` in the next group without waiting for its answer (for work nobody waits
    /// on, such as handing back a claim whose caller left). It never waits for room and is
    /// never dropped: it is kept aside and taken at the start of the next group.
    pub(crate) fn write_detached<F>(&self, write: F)
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<()>>
            + Send
            + 'static,
    {
        let (reply, _answer) = oneshot::channel::<StoreResult<()>>();
        let operation = Detached {
            inner: Typed {
                write: Some(Box::new(write)),
                lane: Lane::Lease,
                one_statement: false,
                result: None,
                reply,
                orphaned: None,
            },
        };
        self.detached.lock().push(Box::new(operation));
        // Wakes an idle writer; a busy one (full queue) takes the write with its next group.
        let _ = self.queue.try_send(Message::Detached);
    }

    /// The queue depth and the last group's commit latency.
    pub(crate) fn pressure(&self) -> WritePressure {
        WritePressure {
            queue_depth: self.queue.max_capacity() - self.queue.capacity(),
            queue_capacity: self.queue.max_capacity(),
            commit_latency: Duration::from_micros(
                self.stats.commit_latency_us.load(Ordering::Relaxed),
            ),
            last_group: usize::try_from(self.stats.last_group.load(Ordering::Relaxed))
                .unwrap_or(usize::MAX),
        }
    }

    /// Commits what is queued, closes the connection and stops the task.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// A write whose caller does not wait: always wanted.
struct Detached {
    inner: Typed<()>,
}

impl Operation for Detached {
    fn is_wanted(&self) -> bool {
        true
    }

    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        self.inner.run(conn)
    }

    fn lane(&self) -> Lane {
        self.inner.lane()
    }

    fn is_one_statement(&self) -> bool {
        self.inner.is_one_statement()
    }

    fn doubt(&self) -> Option<StoreError> {
        self.inner.doubt()
    }

    fn answer(self: Box<Self>, committed: Result<(), &StoreError>) {
        if let (Ok(()), Some(Err(err))) = (committed, &self.inner.result) {
            tracing::warn!(error = %err, "store: a detached write failed");
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".to_owned())
}

/// The writer task's state.
struct GroupCommit {
    conn: Option<SqliteConnection>,
    connect: SqliteConnectOptions,
    inbox: mpsc::Receiver<Message>,
    detached: DetachedWrites,
    max_group: usize,
    stats: Arc<Stats>,
}

impl GroupCommit {
    async fn run(mut self) {
        let mut group: Vec<Box<dyn Operation>> = Vec::with_capacity(self.max_group);
        loop {
            let Some(first) = self.inbox.recv().await else {
                break;
            };
            let mut closing = None;
            group.append(&mut self.detached.lock());
            match first {
                Message::Write(op) => group.push(op),
                Message::Detached => {}
                Message::Close(done) => closing = Some(done),
            }
            while closing.is_none() && group.len() < self.max_group {
                match self.inbox.try_recv() {
                    Ok(Message::Write(op)) => group.push(op),
                    Ok(Message::Detached) => {}
                    Ok(Message::Close(done)) => closing = Some(done),
                    Err(_) => break,
                }
            }
            if closing.is_some() {
                // Hand-backs queued by the last groups still go in before the file closes.
                group.append(&mut self.detached.lock());
            }
            group.retain(|op| op.is_wanted());
            let (lease, bulk): (Vec<_>, Vec<_>) = std::mem::take(&mut group)
                .into_iter()
                .partition(|op| op.lane() == Lane::Lease);
            for batch in [lease, bulk] {
                if batch.is_empty() {
                    continue;
                }
                // A panic here would be a bug of this file; catching it keeps the writer (and so
                // the whole store) alive, and the group's callers get an error.
                let committed =
                    keel_guard::isolate_async(WRITER_COMPONENT, self.commit_group(batch)).await;
                if committed.is_err() {
                    tracing::error!("store writer: a group commit panicked; reconnecting");
                    self.conn = None;
                }
            }
            if let Some(done) = closing {
                if let Some(conn) = self.conn.take() {
                    let _ = conn.close().await;
                }
                let _ = done.send(());
                break;
            }
        }
    }

    /// Runs one group in one transaction and answers its callers.
    async fn commit_group(&mut self, mut group: Vec<Box<dyn Operation>>) {
        let started = Instant::now();
        let outcome = self.run_group(&mut group).await;
        // A moving average (each group weighs 1/8), so one slow fsync does not read as
        // pressure, and a run of them does.
        let sample = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let average = self.stats.commit_latency_us.load(Ordering::Relaxed);
        let updated = average - average / 8 + sample / 8;
        self.stats
            .commit_latency_us
            .store(updated, Ordering::Relaxed);
        self.stats
            .last_group
            .store(group.len() as u64, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                for op in group {
                    op.answer(Ok(()));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, ops = group.len(), "store writer: group not committed");
                for op in group {
                    op.answer(Err(&err));
                }
            }
        }
    }

    async fn run_group(&mut self, group: &mut [Box<dyn Operation>]) -> StoreResult<()> {
        if self.conn.is_none() {
            self.conn = Some(self.connect.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(closed());
        };
        let result = run_in_transaction(conn, group).await;
        if result.is_err() {
            // Leave no transaction open behind; if even that fails, the connection is replaced.
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                self.conn = None;
            }
        }
        result
    }
}

async fn run_in_transaction(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn Operation>],
) -> StoreResult<()> {
    if let [op] = group
        && op.is_one_statement()
    {
        // One statement alone: SQLite commits it by itself (autocommit), durably, or undoes it.
        fail::fail_point!("store.commit", |_| Err(StoreError::injected(
            "store.commit"
        )));
        op.run(conn).await;
        return Ok(());
    }
    // IMMEDIATE takes the write lock now (waiting up to the busy timeout for another process,
    // such as `keel admin`), so no statement of the group can fail to upgrade later.
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    for op in group.iter_mut() {
        if op.is_one_statement() {
            if !op.run(conn).await
                && let Some(doubt) = op.doubt()
            {
                return Err(doubt);
            }
            continue;
        }
        sqlx::query("SAVEPOINT op").execute(&mut *conn).await?;
        if op.run(conn).await {
            sqlx::query("RELEASE op").execute(&mut *conn).await?;
        } else {
            sqlx::query("ROLLBACK TO op").execute(&mut *conn).await?;
            sqlx::query("RELEASE op").execute(&mut *conn).await?;
        }
    }
    fail::fail_point!("store.commit", |_| Err(StoreError::injected(
        "store.commit"
    )));
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: a failed expectation is meant to fail the test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Appends `name` to the `log` table: its rowid is its place in the commit order.
    fn append(
        name: &'static str,
    ) -> impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<()>> + Send + 'static
    {
        move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log (name) VALUES (?)")
                    .bind(name)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_writes_taken_with_bulk_ones_commit_first() {
        let dir = tempfile::tempdir().unwrap();
        let connect = SqliteConnectOptions::new()
            .filename(dir.path().join("lanes.db"))
            .create_if_missing(true);
        let mut conn = connect.connect().await.unwrap();
        sqlx::query("CREATE TABLE log (seq INTEGER PRIMARY KEY, name TEXT NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        let writer = Writer::start(conn, connect, WriterOptions::default());

        // The first write holds the writer until the others are queued behind it.
        let (release, held) = oneshot::channel::<()>();
        let (running, started) = oneshot::channel::<()>();
        let blocker = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .write_one(Lane::Bulk, move |_conn| {
                        Box::pin(async move {
                            let _ = running.send(());
                            let _ = held.await;
                            Ok(())
                        })
                    })
                    .await
            })
        };
        started.await.unwrap();
        let mut queued = Vec::new();
        for (lane, name) in [
            (Lane::Bulk, "create-1"),
            (Lane::Bulk, "create-2"),
            (Lane::Lease, "heartbeat"),
            (Lane::Bulk, "create-3"),
        ] {
            let submitter = writer.clone();
            queued.push(tokio::spawn(async move {
                submitter.write_one(lane, append(name)).await
            }));
            // Queued in this order.
            while writer.pressure().queue_depth < queued.len() {
                tokio::task::yield_now().await;
            }
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for write in queued {
            write.await.unwrap().unwrap();
        }
        writer.close().await;

        let conn = &mut connect_again(dir.path()).await;
        let order: Vec<String> = sqlx::query_scalar("SELECT name FROM log ORDER BY seq")
            .fetch_all(conn)
            .await
            .unwrap();
        assert_eq!(order, ["heartbeat", "create-1", "create-2", "create-3"]);
    }

    async fn connect_again(dir: &std::path::Path) -> SqliteConnection {
        SqliteConnectOptions::new()
            .filename(dir.join("lanes.db"))
            .connect()
            .await
            .unwrap()
    }
}
