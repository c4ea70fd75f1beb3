//! Single creates, grouped. Concurrent `create_command` calls without an idempotency key are
//! inserted together: one statement (one transaction, one commit) per organisation for all
//! the creates that arrived while earlier groups were being written. A caller is answered once
//! its group committed, so an answer still means the command is stored.
//!
//! Each create on its own costs a round trip, a statement, a transaction and a commit; under
//! load most of a create's time is that overhead, not its row. An idle store writes a lone
//! create at once, without waiting: groups only grow while a group is being written. One group
//! at a time made the largest groups and the most creates per second (8 clients over HTTP:
//! 5,474/s, against 4,666/s with two at a time and 3,691/s without grouping; see
//! docs/benchmarks.md).
//!
//! A group whose statement is refused (an unknown target agent, a missing organisation) wrote
//! nothing; its creates are then written one by one, so each caller gets its own answer. A
//! group whose connection failed may have been committed: its callers get `Unavailable` (503),
//! as a lone create would, and nothing is written twice.
//! Creates with an idempotency key go straight to the database (a replay reads what holds the
//! key in the same transaction as its insert).

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::commands::{NewRow, insert_rows};
use crate::common::corrupt;
use crate::error::{StoreError, StoreResult};
use crate::model::{Created, OrgId};

/// Creates waiting to be grouped, at most; a caller beyond it waits for room.
const QUEUE: usize = 4096;

/// Creates in one group at most (one statement per organisation of it).
const MAX_GROUP: usize = 256;

/// Groups being written at once (the organisations of one group are written side by side).
const IN_FLIGHT: usize = 1;

/// The scope a panic while writing a group is counted under.
const COMPONENT: &str = "store.create_groups";

/// The sending side; the task that writes the groups ends when it is dropped.
#[derive(Debug)]
pub(super) struct CreateGroups {
    sender: mpsc::Sender<Pending>,
}

struct Pending {
    org: OrgId,
    row: NewRow,
    reply: oneshot::Sender<StoreResult<Created>>,
}

impl CreateGroups {
    /// Starts the task that writes the groups on `pool` (on the current Tokio runtime).
    pub(super) fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(write_groups(pool, receiver));
        Self { sender }
    }

    /// Creates `row` in `org` with the next group: its own answer once the group committed.
    pub(super) async fn create(&self, org: OrgId, row: NewRow) -> StoreResult<Created> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Pending { org, row, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".to_owned()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable(
                "the create was not answered; it may or may not be stored".to_owned(),
            )
        })?
    }
}

/// Takes the creates waiting, up to [`MAX_GROUP`], whenever one of the [`IN_FLIGHT`] slots is
/// free, and writes them as a group.
async fn write_groups(pool: PgPool, mut receiver: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        // While every slot is busy, the creates arriving meanwhile wait in the queue: they
        // make the next group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(pending) => group.push(pending),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            // A panic here is counted and logged by the panic hook; the group's callers are
            // answered `Unavailable` (their reply senders are dropped with it).
            let _ = keel_guard::isolate_async(COMPONENT, write_group(&pool, group)).await;
            drop(slot);
        });
    }
}

/// Writes one group: a statement per organisation, at once.
async fn write_group(pool: &PgPool, group: Vec<Pending>) {
    let mut by_org: HashMap<OrgId, Vec<Pending>> = HashMap::new();
    for pending in group {
        // A caller that gave up before its group started is not written.
        if !pending.reply.is_closed() {
            by_org.entry(pending.org).or_default().push(pending);
        }
    }
    futures::future::join_all(
        by_org
            .into_iter()
            .map(|(org, creates)| write_org(pool, org, creates)),
    )
    .await;
}

/// Writes the creates of one organisation in one statement. When the database refused it
/// (nothing was written), each one alone; when its fate is unknown (the connection failed), each
/// caller is told so, and nothing is written again.
async fn write_org(pool: &PgPool, org: OrgId, creates: Vec<Pending>) {
    if creates.len() > 1 {
        let rows = creates.iter().map(|c| c.row.clone()).collect();
        match insert_group(pool, org, rows).await {
            Ok(created) => {
                // One answer per row, in order (a caller left without one is told it is
                // unknown whether its create was stored).
                for (pending, created) in creates.into_iter().zip(created) {
                    let _ = pending.reply.send(Ok(created));
                }
                return;
            }
            Err(err) if !is_refusal(&err) => {
                for pending in creates {
                    let _ = pending.reply.send(Err(err.duplicate()));
                }
                return;
            }
            // Refused: written one by one below, each with its own answer.
            Err(_) => {}
        }
    }
    for pending in creates {
        let answer = insert(pool, org, vec![pending.row])
            .await
            .and_then(|created| {
                created
                    .into_iter()
                    .next()
                    .ok_or_else(|| corrupt("no command created"))
            });
        let _ = pending.reply.send(answer);
    }
}

/// Whether the database answered the statement with an error of its own, so that it wrote
/// nothing (an autocommitted statement that fails is rolled back). A lost connection
/// (`Unavailable`, or an error that is not the database's) leaves it unknown; no connection in
/// time (`Busy`) means it never ran, but another try now would wait as long.
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

/// The statement of a group of two or more. Failpoint `store.create_group`: `return` fails it
/// as a lost connection would (unknown whether it was written), `return(refused)` as a
/// refusal of the database (nothing written); either way without writing.
async fn insert_group(pool: &PgPool, org: OrgId, rows: Vec<NewRow>) -> StoreResult<Vec<Created>> {
    fail::fail_point!("store.create_group", |how| Err(match how.as_deref() {
        Some("refused") => StoreError::Conflict("injected at store.create_group".to_owned()),
        _ => StoreError::Unavailable("injected at store.create_group".to_owned()),
    }));
    insert(pool, org, rows).await
}

async fn insert(pool: &PgPool, org: OrgId, rows: Vec<NewRow>) -> StoreResult<Vec<Created>> {
    let mut conn = pool.acquire().await?;
    insert_rows(&mut conn, org, rows).await
}
