//! Wake-ups between instances: PostgreSQL's `LISTEN`/`NOTIFY` on the channel [`CHANNEL`].
//!
//! [`PgNotify::publish`] only queues the wake (it never blocks a request); the supervised task
//! `wake-bus` sends what is queued, a batch per statement, and hands the wakes other instances
//! sent to the process's [`Wakeups`]. A payload is `<boot id>|<kind>|…`: an instance ignores its
//! own (it woke its waiters directly). Queue names cannot hold `|`. When the listening connection
//! drops, wakes may have been missed meanwhile: every waiter of the process is woken once it
//! is back, and looks again.

use std::sync::Arc;

use keel_guard::supervisor::{Supervisor, TaskError};
use keel_store::{AgentId, OrgId};
use parking_lot::Mutex;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::commands::wakeups::{Interest, Wake, WakeBus, Wakeups};

/// The notification channel.
pub const CHANNEL: &str = "keel_wake";

/// Wakes queued for sending at most; more are dropped (counted), each only delaying a claim
/// until its next look.
const QUEUE: usize = 10_000;

/// Wakes sent in one statement at most.
const BATCH: usize = 256;

/// Publishes wakes with `NOTIFY`.
#[derive(Debug)]
pub struct PgNotify {
    /// The queue of the `wake-bus` task's current run (each run makes its own, so a run that
    /// failed takes nothing down with it).
    sender: Arc<Mutex<mpsc::Sender<Wake>>>,
}

impl WakeBus for PgNotify {
    fn publish(&self, wake: Wake) {
        if self.sender.lock().try_send(wake).is_err() {
            metrics::counter!("keel_wakes_dropped_total").increment(1);
        }
    }
}

impl PgNotify {
    /// Starts the supervised task `wake-bus` on `pool`'s database and returns `wakeups`
    /// publishing on it.
    pub fn start(
        supervisor: &Supervisor,
        pool: PgPool,
        boot_id: Uuid,
        wakeups: Wakeups,
    ) -> Wakeups {
        let sender = Arc::new(Mutex::new(mpsc::channel(1).0));
        let current = sender.clone();
        let local = wakeups.clone();
        supervisor.spawn("wake-bus", move |cancel| {
            let (pool, local) = (pool.clone(), local.clone());
            let (next, mut receiver) = mpsc::channel(QUEUE);
            *current.lock() = next;
            async move {
                tokio::select! {
                    () = cancel.cancelled() => Ok(()),
                    result = relay(&pool, boot_id, &mut receiver, &local) => result,
                }
            }
        });
        metrics::counter!("keel_wakes_dropped_total").absolute(0);
        wakeups.with_bus(Arc::new(PgNotify { sender }))
    }
}

/// Sends the queued wakes and applies the received ones, until a connection fails.
async fn relay(
    pool: &PgPool,
    boot_id: Uuid,
    outgoing: &mut mpsc::Receiver<Wake>,
    local: &Wakeups,
) -> Result<(), TaskError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    // Wakes sent while this task was down (or before it listened) are lost: look again.
    local.wake_all_local();
    loop {
        tokio::select! {
            wake = outgoing.recv() => {
                let Some(wake) = wake else { return Ok(()) };
                let mut batch = vec![encode(boot_id, &wake)];
                while batch.len() < BATCH {
                    match outgoing.try_recv() {
                        Ok(wake) => batch.push(encode(boot_id, &wake)),
                        Err(_) => break,
                    }
                }
                batch.sort_unstable();
                batch.dedup();
                sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
                    .bind(CHANNEL)
                    .bind(&batch)
                    .execute(pool)
                    .await?;
            }
            received = listener.try_recv() => {
                match received? {
                    Some(notification) => {
                        if let Some(wake) = decode(boot_id, notification.payload()) {
                            local.apply(wake);
                        }
                    }
                    // The connection dropped and is back: wakes may have been missed.
                    None => local.wake_all_local(),
                }
            }
        }
    }
}

/// `<boot id>|a|<org>|<agent>`, `<boot id>|q|<org>|<queue>`, `<boot id>|o|<org>`,
/// `<boot id>|d`.
fn encode(boot_id: Uuid, wake: &Wake) -> String {
    match wake {
        Wake::Interest(org, Interest::Agent(agent)) => format!("{boot_id}|a|{}|{}", org.0, agent.0),
        Wake::Interest(org, Interest::Queue(queue)) => format!("{boot_id}|q|{}|{queue}", org.0),
        Wake::Org(org) => format!("{boot_id}|o|{}", org.0),
        Wake::Deliveries => format!("{boot_id}|d"),
    }
}

/// The wake in a payload another instance sent; `None` for this instance's own and for one
/// that cannot be read.
fn decode(boot_id: Uuid, payload: &str) -> Option<Wake> {
    let mut parts = payload.splitn(4, '|');
    let from: Uuid = parts.next()?.parse().ok()?;
    if from == boot_id {
        return None;
    }
    let kind = parts.next()?;
    if kind == "d" {
        return Some(Wake::Deliveries);
    }
    let org = OrgId(parts.next()?.parse().ok()?);
    match (kind, parts.next()) {
        ("o", None) => Some(Wake::Org(org)),
        ("a", Some(agent)) => Some(Wake::Interest(
            org,
            Interest::Agent(AgentId(agent.parse().ok()?)),
        )),
        ("q", Some(queue)) => Some(Wake::Interest(org, Interest::Queue(queue.to_owned()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_and_an_instance_ignores_its_own() {
        let (me, other) = (Uuid::new_v4(), Uuid::new_v4());
        let org = OrgId(Uuid::now_v7());
        for wake in [
            Wake::Interest(org, Interest::Agent(AgentId(Uuid::now_v7()))),
            Wake::Interest(org, Interest::Queue("builds.eu-1:x".to_owned())),
            Wake::Org(org),
            Wake::Deliveries,
        ] {
            let payload = encode(other, &wake);
            assert_eq!(decode(me, &payload), Some(wake));
            assert_eq!(decode(other, &payload), None);
        }
        assert_eq!(decode(me, "garbage"), None);
        assert_eq!(decode(me, &format!("{other}|q|not-a-uuid|q")), None);
    }
}
