//! Grouped writes: concurrent calls of one kind are written together, one statement (one
//! transaction, one commit) for all the calls that arrived while the previous group was being
//! written. A caller is answered once its group committed, so an answer still means the write
//! is stored.
//!
//! Alone, each call costs a round trip, a statement, a transaction and a commit; under load
//! most of its time is that overhead, not its rows. An idle store writes a lone call at once,
//! without waiting: groups only grow while a group is being written. One group at a time made
//! the largest groups and the most writes per second (8 clients creating over HTTP, groups of
//! up to 256: 5,474/s, against 4,666/s with two at a time and 3,691/s without grouping; see
//! docs/benchmarks.md).
//!
//! A group whose statement the database refused wrote nothing; its calls are then written one
//! by one, so each caller gets its own answer. A group whose connection failed may have been
//! committed: its callers get `Unavailable` (503), as a lone call would, and nothing is written
//! twice.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{StoreError, StoreResult};

/// Calls waiting to be grouped, at most; a caller beyond it waits for room.
const QUEUE: usize = 4096;

/// Rows in one group at most (a call may write several).
const MAX_ROWS: usize = 512;

/// Groups being written at once (the statements of one group are written side by side).
const IN_FLIGHT: usize = 1;

/// One kind of grouped write.
pub(super) trait GroupedWrite: Send + Sync + 'static {
    /// What a caller asks to write.
    type Call: Send + 'static;
    /// Its answer.
    type Answer: Send + 'static;
    /// Calls of one key share a statement; a group writes one statement per key, side by side.
    type Key: Eq + Hash + Send;
    /// The scope a panic while writing a group is counted under.
    const SCOPE: &'static str;

    fn key(call: &Self::Call) -> Self::Key;

    /// The rows `call` writes, counted against the group's [`MAX_ROWS`].
    fn rows(call: &Self::Call) -> usize;

    /// One statement for two or more calls of one key: an answer per call, in order.
    fn write_group(
        pool: &PgPool,
        calls: &[Self::Call],
    ) -> impl Future<Output = StoreResult<Vec<Self::Answer>>> + Send;

    /// One call alone.
    fn write_one(
        pool: &PgPool,
        call: Self::Call,
    ) -> impl Future<Output = StoreResult<Self::Answer>> + Send;
}

/// The sending side; the task that writes the groups ends when it is dropped.
pub(super) struct Groups<W: GroupedWrite> {
    sender: mpsc::Sender<Pending<W>>,
}

impl<W: GroupedWrite> std::fmt::Debug for Groups<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").field("scope", &W::SCOPE).finish()
    }
}

struct Pending<W: GroupedWrite> {
    call: W::Call,
    reply: oneshot::Sender<StoreResult<W::Answer>>,
}

impl<W: GroupedWrite> Groups<W> {
    /// Starts the task that writes the groups on `pool` (on the current Tokio runtime).
    pub(super) fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(write_groups::<W>(pool, receiver));
        Self { sender }
    }

    /// Writes `call` with the next group: its own answer once the group committed.
    pub(super) async fn write(&self, call: W::Call) -> StoreResult<W::Answer> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Pending { call, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".to_owned()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable(
                "the write was not answered; it may or may not be stored".to_owned(),
            )
        })?
    }
}

/// Takes the calls waiting, up to [`MAX_ROWS`], whenever one of the [`IN_FLIGHT`] slots is
/// free, and writes them as a group.
async fn write_groups<W: GroupedWrite>(pool: PgPool, mut receiver: mpsc::Receiver<Pending<W>>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        // While every slot is busy, the calls arriving meanwhile wait in the queue: they make
        // the next group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut rows = W::rows(&first.call);
        let mut group = vec![first];
        while rows < MAX_ROWS {
            match receiver.try_recv() {
                Ok(pending) => {
                    rows += W::rows(&pending.call);
                    group.push(pending);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            // A panic here is counted and logged by the panic hook; the group's callers are
            // answered `Unavailable` (their reply senders are dropped with it).
            let _ = keel_guard::isolate_async(W::SCOPE, write_group::<W>(&pool, group)).await;
            drop(slot);
        });
    }
}

/// Writes one group: a statement per key, at once.
async fn write_group<W: GroupedWrite>(pool: &PgPool, group: Vec<Pending<W>>) {
    let mut by_key: HashMap<W::Key, Vec<Pending<W>>> = HashMap::new();
    for pending in group {
        // A caller that gave up before its group started is not written.
        if !pending.reply.is_closed() {
            by_key
                .entry(W::key(&pending.call))
                .or_default()
                .push(pending);
        }
    }
    futures::future::join_all(
        by_key
            .into_values()
            .map(|calls| write_key::<W>(pool, calls)),
    )
    .await;
}

/// Writes the calls of one key in one statement. When the database refused it (nothing was
/// written), each one alone; when its fate is unknown (the connection failed), each caller is
/// told so, and nothing is written again.
async fn write_key<W: GroupedWrite>(pool: &PgPool, pendings: Vec<Pending<W>>) {
    let (calls, replies): (Vec<W::Call>, Vec<_>) =
        pendings.into_iter().map(|p| (p.call, p.reply)).unzip();
    if calls.len() > 1 {
        match W::write_group(pool, &calls).await {
            Ok(answers) => {
                // One answer per call, in order (a caller left without one is told it is
                // unknown whether its write was stored).
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
                return;
            }
            Err(err) if !is_refusal(&err) => {
                for reply in replies {
                    let _ = reply.send(Err(err.duplicate()));
                }
                return;
            }
            // Refused: written one by one below, each with its own answer.
            Err(_) => {}
        }
    }
    for (call, reply) in calls.into_iter().zip(replies) {
        let _ = reply.send(W::write_one(pool, call).await);
    }
}

/// Whether the database answered the statement with an error of its own, so that it wrote
/// nothing (an autocommitted statement that fails is rolled back). A lost connection
/// (`Unavailable`, or an error that is not the database's) leaves it unknown. `Busy` (no
/// connection in time, or the statement rolled back for a lock conflict) wrote nothing either,
/// but is answered to every caller as it is, a 503 with `Retry-After`: one by one now would
/// wait for the same connections or locks.
fn is_refusal(err: &StoreError) -> bool {
    match err {
        StoreError::Database(sqlx::Error::Database(_)) => true,
        StoreError::Database(_) | StoreError::Unavailable(_) | StoreError::Busy(_) => false,
        StoreError::Migrate(_) => false,
        StoreError::NotFound
        | StoreError::Conflict(_)
        | StoreError::IdempotencyMismatch
        | StoreError::StaleClaim
        | StoreError::InvalidState(_)
        | StoreError::UnknownAgent
        | StoreError::InvalidInput(_) => true,
    }
}
