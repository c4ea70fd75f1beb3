//! The delivery processor: deliveries are claimed in batches through the lease engine (best
//! priority first, then the earliest due), sent `notifications.workers` at a time, and their
//! outcomes recorded in batches.
//!
//! Two supervised tasks share the work:
//! - the **claimer** keeps a small buffer of claimed deliveries full: it claims as many as the
//!   buffer has room for in one write, and sleeps while there is nothing to claim until a
//!   trigger, a direct send or a requeue wakes it, until the earliest retry falls due, or at
//!   most [`IDLE_RECHECK`] (deliveries made by another keel process on the same database wake
//!   nobody here);
//! - the **dispatcher** sends the buffered deliveries, at most `workers` at once, and records
//!   the outcomes of every send finished meanwhile in one write, while the next sends go on.
//!
//! A send never waits for a commit: claims run ahead of the sends and records behind them, and
//! each write carries many deliveries. Each item is isolated: a panic while it is sent is a
//! failed attempt with the panic message, retried like any other failure, so an item that
//! always panics ends in the dead-letter list and the others go on. A delivery whose lease has
//! too little time left when its turn comes is given back unsent, its attempt unspent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use keel_guard::supervisor::{Supervisor, TaskError};
use keel_store::notifications::MAX_DELIVERY_CLAIM;
use keel_store::notifications::model::{
    ChannelType, ClaimedDelivery, Delivery, DeliveryFailure, DeliveryOutcome, DeliveryReport,
    DeliveryStatus, RecordedDelivery, WorkerId,
};
use keel_store::{Store, StoreResult};
use parking_lot::Mutex;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::breaker::{Admission, Breakers};
use super::channels::{Channels, Outcome};

/// How long before its lease ends a send is given up: the lease is the channel's timeout and
/// 30 s, so a send has about its timeout and 15 s, and its failure is recorded while the lease
/// holds.
const SEND_MARGIN: Duration = Duration::from_secs(15);

/// The shortest time a send is given; a claimed delivery with less lease left than this and
/// [`SEND_MARGIN`] is given back unsent.
const MIN_SEND: Duration = Duration::from_secs(1);

/// The longest an idle claimer sleeps without looking for work.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// How long the claimer waits after the store failed before it claims again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How far ahead the claimer claims at the pace sends go: no more deliveries wait in the
/// buffer than can start within this.
const PACE_HORIZON: Duration = Duration::from_secs(5);

/// The shortest and the longest pause of a claimer whose buffer holds enough for
/// [`PACE_HORIZON`].
const PACE_MIN_WAIT: Duration = Duration::from_millis(10);
const PACE_MAX_WAIT: Duration = Duration::from_millis(250);

/// The most outcomes one record carries.
const RECORD_BATCH: usize = 512;

/// How many sends may be in flight or finished without their outcome being durable yet: no
/// new send starts beyond that. A keel killed at that moment sends those deliveries again after
/// the restart (at-least-once). Throughput is at most this many per record commit.
pub fn max_unrecorded(workers: usize) -> usize {
    (8 * workers).clamp(256, RECORD_BATCH)
}

/// The failpoint `deliveries.item` acts only on deliveries whose subject contains this.
pub const ITEM_FAILPOINT_MARK: &str = "failpoint:deliveries.item";

/// The claimer's component name.
pub const CLAIMER: &str = "delivery-claimer";

/// The dispatcher's component name.
pub const DISPATCHER: &str = "delivery-dispatcher";

/// What a `return` action of `deliveries.item` makes of the attempt.
fn injected() -> Outcome {
    Outcome::failed("injected by failpoint deliveries.item", true)
}

/// How many claimed deliveries may wait for a send slot: enough that each claim carries many
/// (a claim is a commit), whatever the number of slots. How long they wait is bounded by the
/// pace of sends ([`PACE_HORIZON`]), not by this.
const BUFFER: usize = 512;

/// A claimed delivery waiting in the buffer, with when it was claimed.
struct Buffered {
    item: ClaimedDelivery,
    claimed_at: Instant,
}

/// A finished send's outcome, to record while the lease holds.
struct Done {
    report: DeliveryReport,
    lease_expires_at: Option<OffsetDateTime>,
}

impl Done {
    /// The delivery goes back to the queue unsent, due at `at`.
    fn handed_back(item: ClaimedDelivery, at: OffsetDateTime) -> Self {
        Self {
            lease_expires_at: item.delivery.lease_expires_at,
            report: DeliveryReport {
                id: item.delivery.id,
                claim_token: item.claim_token,
                outcome: DeliveryOutcome::Postponed(at),
            },
        }
    }
}

/// How long sends take: a moving average in which each send weighs 1/4 (a receiver that was
/// slow and is fast again is soon seen as fast), in microseconds (0 before the first).
#[derive(Default)]
struct Pace {
    micros: AtomicU64,
}

impl Pace {
    fn observe(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        // Lost updates between concurrent sends only blur an average.
        let before = self.micros.load(Ordering::Relaxed);
        let after = if before == 0 {
            took
        } else {
            before - before / 4 + took / 4
        };
        self.micros.store(after, Ordering::Relaxed);
    }

    /// About how long until a send slot frees: the claimer's pause while the buffer holds
    /// enough. Short, so that an average still weighed by old slow sends costs little.
    fn slot_frees(&self, workers: usize) -> Duration {
        let average = Duration::from_micros(self.micros.load(Ordering::Relaxed));
        (average / u32::try_from(workers).unwrap_or(u32::MAX).max(1))
            .clamp(PACE_MIN_WAIT, PACE_MAX_WAIT)
    }

    /// How many deliveries `workers` send slots can start within [`PACE_HORIZON`].
    fn startable(&self, workers: usize) -> usize {
        let average = self.micros.load(Ordering::Relaxed);
        if average == 0 {
            return usize::MAX;
        }
        let horizon = u64::try_from(PACE_HORIZON.as_micros()).unwrap_or(u64::MAX);
        usize::try_from(horizon / average)
            .unwrap_or(usize::MAX)
            .saturating_mul(workers)
    }
}

/// The claimed deliveries' buffer, lent to one run of the dispatcher and given back when the
/// run ends, however it ends (a panic included).
struct Lent {
    slot: Arc<Mutex<Option<mpsc::Receiver<Buffered>>>>,
    receiver: mpsc::Receiver<Buffered>,
}

impl Lent {
    fn take(slot: &Arc<Mutex<Option<mpsc::Receiver<Buffered>>>>) -> Option<Self> {
        let receiver = slot.lock().take()?;
        Some(Self {
            slot: slot.clone(),
            receiver,
        })
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let (_, unused) = mpsc::channel(1);
        let receiver = std::mem::replace(&mut self.receiver, unused);
        *self.slot.lock() = Some(receiver);
    }
}

/// What the claimer and the dispatcher share.
pub struct Processor {
    store: Arc<dyn Store>,
    channels: Channels,
    queued: Arc<Notify>,
    breakers: Arc<Breakers>,
    /// The holder of this process's leases.
    worker: WorkerId,
    pace: Pace,
}

impl Processor {
    /// A processor sending through `channels`, woken by `queued`.
    pub fn new(
        store: Arc<dyn Store>,
        channels: Channels,
        queued: Arc<Notify>,
        breakers: Arc<Breakers>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            channels,
            queued,
            breakers,
            worker: WorkerId::new(),
            pace: Pace::default(),
        })
    }

    /// Starts the claimer and the dispatcher, which sends up to `workers` deliveries at once.
    pub fn start(self: &Arc<Self>, supervisor: &Supervisor, workers: usize) {
        let workers = workers.max(1);
        let (claimed_tx, claimed_rx) = mpsc::channel(BUFFER);
        // A restarted dispatcher takes over the buffer: what was claimed is not lost.
        let claimed_rx = Arc::new(Mutex::new(Some(claimed_rx)));
        let processor = self.clone();
        supervisor.spawn(CLAIMER, move |cancel| {
            let processor = processor.clone();
            let claimed = claimed_tx.clone();
            async move { processor.claim_ahead(claimed, workers, cancel).await }
        });
        let processor = self.clone();
        supervisor.spawn(DISPATCHER, move |cancel| {
            let processor = processor.clone();
            let claimed = claimed_rx.clone();
            async move {
                let mut lent = Lent::take(&claimed).ok_or("the delivery buffer is held")?;
                processor
                    .dispatch(&mut lent.receiver, workers, cancel)
                    .await
            }
        });
    }

    /// The claimer: claims as many deliveries as the buffer has room for (at least half of
    /// it) and as can start within [`PACE_HORIZON`] at the pace sends go, and sleeps while
    /// there are none.
    async fn claim_ahead(
        &self,
        buffer: mpsc::Sender<Buffered>,
        workers: usize,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        let store = self.store.notifications();
        let chunk = (buffer.max_capacity() / 2).max(1);
        while !cancel.is_cancelled() {
            let room = tokio::select! {
                room = buffer.reserve_many(chunk) => room,
                () = cancel.cancelled() => break,
            };
            // The dispatcher closed the buffer: keel is stopping.
            let Ok(room) = room else { break };
            let buffered = buffer
                .max_capacity()
                .saturating_sub(buffer.capacity())
                .saturating_sub(chunk);
            // Room for more may have opened since; slow sends want fewer waiting.
            let wanted = (chunk + buffer.capacity())
                .min(MAX_DELIVERY_CLAIM as usize)
                .min(self.pace.startable(workers).saturating_sub(buffered));
            if wanted == 0 {
                drop(room);
                tokio::select! {
                    () = tokio::time::sleep(self.pace.slot_frees(workers)) => {}
                    () = cancel.cancelled() => {}
                }
                continue;
            }
            // Registered before the claim: a delivery queued after the claim found nothing
            // still wakes the claimer.
            let queued = self.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let claimed = match store
                .claim_deliveries(self.worker, u32::try_from(wanted).unwrap_or(1))
                .await
            {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::error!(%error, "delivery claimer: claiming failed; trying again");
                    drop(room);
                    tokio::select! {
                        () = tokio::time::sleep(STORE_RETRY) => {}
                        () = cancel.cancelled() => {}
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(room);
                let sleep = match store.next_delivery_due().await {
                    Ok(Some(due)) => {
                        Duration::try_from(due - self.store.now()).unwrap_or(Duration::ZERO)
                    }
                    _ => IDLE_RECHECK,
                };
                tokio::select! {
                    () = &mut queued => {}
                    () = tokio::time::sleep(sleep.min(IDLE_RECHECK)) => {}
                    () = cancel.cancelled() => {}
                }
                continue;
            }
            let claimed_at = Instant::now();
            let mut room = room;
            for item in claimed {
                let item = Buffered { item, claimed_at };
                match room.next() {
                    Some(permit) => permit.send(item),
                    // Beyond the reserved room: wait for a place (the claim asked for no more
                    // than the room there was, so this is rare).
                    None => {
                        if buffer.send(item).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The dispatcher: sends the claimed deliveries, at most `workers` at once, and records
    /// the outcomes in batches while the next sends go on. When keel stops it takes no more
    /// deliveries, gives the buffered ones back, lets the sends in flight finish and records
    /// them (for as long as the shutdown grace lets it).
    async fn dispatch(
        self: &Arc<Self>,
        buffer: &mut mpsc::Receiver<Buffered>,
        workers: usize,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        let mut sends: JoinSet<Done> = JoinSet::new();
        let mut outcomes: Vec<Done> = Vec::new();
        let mut recording: Option<BoxFuture<'static, Vec<Done>>> = None;
        let mut being_recorded = 0;
        let mut stopping = false;
        let mut drained = false;
        let unrecorded_cap = max_unrecorded(workers);
        loop {
            if recording.is_none() && !outcomes.is_empty() {
                let batch: Vec<Done> = outcomes.drain(..outcomes.len().min(RECORD_BATCH)).collect();
                being_recorded = batch.len();
                let processor = self.clone();
                recording = Some(Box::pin(async move { processor.record(batch).await }));
            }
            if drained && sends.is_empty() && recording.is_none() {
                return Ok(());
            }
            let room = sends.len() < workers
                && sends.len() + outcomes.len() + being_recorded < unrecorded_cap;
            tokio::select! {
                Some(sent) = sends.join_next(), if !sends.is_empty() => {
                    match sent {
                        Ok(done) => outcomes.push(done),
                        // Sends are isolated; a task that failed anyway leaves its lease to
                        // expire, and the release job puts the delivery back.
                        Err(error) => {
                            tracing::error!(%error, "delivery dispatcher: a send task failed");
                        }
                    }
                }
                again = async {
                    match recording.as_mut() {
                        Some(recording) => recording.await,
                        None => Vec::new(),
                    }
                }, if recording.is_some() => {
                    recording = None;
                    being_recorded = 0;
                    // Not recorded (the store refused the write): tried again while their
                    // leases hold, ahead of the newer outcomes.
                    let now = self.store.now();
                    let again: Vec<Done> = again
                        .into_iter()
                        .filter(|done| done.lease_expires_at.is_some_and(|at| at > now))
                        .collect();
                    outcomes.splice(0..0, again);
                }
                item = buffer.recv(), if !drained && (stopping || room) => {
                    let Some(Buffered { item, claimed_at }) = item else {
                        drained = true;
                        continue;
                    };
                    if stopping {
                        // What waits in the buffer goes back to the queue now, not when its
                        // lease expires.
                        outcomes.push(Done::handed_back(item, self.store.now()));
                        continue;
                    }
                    let processor = self.clone();
                    sends.spawn(async move { processor.send(item, claimed_at).await });
                }
                () = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    // No more claims reach the buffer; a claim in progress still delivers its
                    // deliveries, which go back with the rest.
                    buffer.close();
                }
            }
        }
    }

    /// Sends one delivery, isolated, and says what to record. A delivery that waited in the
    /// buffer so long that its send could not have the channel's whole timeout, or whose
    /// webhook endpoint's circuit is open, goes back to the queue instead, its attempt unspent.
    async fn send(&self, item: ClaimedDelivery, claimed_at: Instant) -> Done {
        let lease_expires_at = item.delivery.lease_expires_at;
        let ClaimedDelivery {
            delivery,
            claim_token,
        } = item;
        let done = |outcome| Done {
            report: DeliveryReport {
                id: delivery.id,
                claim_token: claim_token.clone(),
                outcome,
            },
            lease_expires_at,
        };
        // The lease is the channel's timeout and 30 s: a delivery sent within SEND_MARGIN of
        // its claim still has its whole timeout and SEND_MARGIN to record the outcome.
        if claimed_at.elapsed() > SEND_MARGIN {
            return done(DeliveryOutcome::Postponed(self.store.now()));
        }
        // A send ends well inside the lease, whatever the far end does (an SMTP server that
        // accepts and never answers included): no send slot is held by one receiver.
        let lease_left = lease_expires_at
            .map(|expires| expires - self.store.now())
            .and_then(|left| Duration::try_from(left).ok())
            .unwrap_or(Duration::ZERO);
        let Some(deadline) = lease_left
            .checked_sub(SEND_MARGIN)
            .filter(|deadline| *deadline >= MIN_SEND)
        else {
            return done(DeliveryOutcome::Postponed(self.store.now()));
        };
        let webhook = delivery.channel_type == ChannelType::Webhook;
        if webhook
            && let Admission::Wait(wait) =
                self.breakers
                    .admit(delivery.org_id, &delivery.recipient, deadline)
        {
            let until = self
                .store
                .now()
                .saturating_add(time::Duration::try_from(wait).unwrap_or(time::Duration::MAX));
            return done(DeliveryOutcome::Postponed(until));
        }
        let started = Instant::now();
        let outcome = self.send_isolated(&delivery, deadline).await;
        self.pace.observe(started.elapsed());
        if webhook {
            let endpoint_failed = matches!(
                outcome,
                Outcome::Failed {
                    retryable: true,
                    ..
                }
            );
            self.breakers
                .record(delivery.org_id, &delivery.recipient, endpoint_failed);
        }
        done(match outcome {
            Outcome::Delivered(detail) => DeliveryOutcome::Delivered(detail),
            Outcome::Failed {
                mut detail,
                retryable,
                retry_after,
            } => DeliveryOutcome::Failed(DeliveryFailure {
                // The attempt's record says how long the receiver asked to wait.
                detail: {
                    if let (Some(wait), Some(object)) = (retry_after, detail.as_object_mut()) {
                        object.insert("retry_after_s".to_owned(), json!(wait.as_secs()));
                    }
                    detail
                },
                retryable,
                not_before: retry_after.map(|wait| {
                    self.store.now().saturating_add(
                        time::Duration::try_from(wait).unwrap_or(time::Duration::MAX),
                    )
                }),
            }),
        })
    }

    /// The send itself, within `deadline`; a panic is a failed attempt with its message.
    async fn send_isolated(&self, delivery: &Delivery, deadline: Duration) -> Outcome {
        let sent = keel_guard::isolate_async("deliveries", async {
            // Only deliveries whose subject names the failpoint, so that a test can poison one
            // item and watch the others go through.
            let marked = delivery.subject.contains(ITEM_FAILPOINT_MARK);
            fail::fail_point!("deliveries.item", marked, |_| injected());
            match tokio::time::timeout(deadline, self.channels.send(delivery)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed {
                    detail: json!({
                        "error": format!("the send did not finish within {} s", deadline.as_secs()),
                    }),
                    retryable: true,
                    retry_after: None,
                },
            }
        })
        .await;
        sent.unwrap_or_else(|panicked| Outcome::Failed {
            detail: json!({"error": format!("panicked: {}", panicked.message)}),
            retryable: true,
            retry_after: None,
        })
    }

    /// Records a batch of outcomes in one write, then counts and audits what they came to.
    /// Returns the batch when the store refused the write, after a pause, to be tried again.
    async fn record(&self, batch: Vec<Done>) -> Vec<Done> {
        let reports: Vec<DeliveryReport> = batch.iter().map(|done| done.report.clone()).collect();
        let answers = match self
            .store
            .notifications()
            .record_deliveries(self.worker, reports)
            .await
        {
            Ok(answers) => answers,
            Err(error) => {
                tracing::warn!(%error, outcomes = batch.len(), "delivery dispatcher: recording outcomes failed; trying again while their leases hold");
                tokio::time::sleep(STORE_RETRY).await;
                return batch;
            }
        };
        let mut back_to_pending = false;
        for (done, answer) in batch.iter().zip(answers) {
            back_to_pending |= account(&done.report, answer) == Some(DeliveryStatus::Pending);
        }
        // The claimer may sleep past the retry it does not know of: it looks again.
        if back_to_pending {
            self.queued.notify_one();
        }
        Vec::new()
    }
}

/// Counts one recorded outcome, and audits a delivery whose attempts ran out; the delivery's
/// status now, when it was recorded.
fn account(
    report: &DeliveryReport,
    answer: StoreResult<RecordedDelivery>,
) -> Option<DeliveryStatus> {
    let after = match answer {
        Ok(after) => after,
        Err(error) => {
            tracing::error!(delivery_id = %report.id, %error, "delivery dispatcher: recording the outcome failed");
            return None;
        }
    };
    if matches!(report.outcome, DeliveryOutcome::Postponed(_)) {
        return Some(after.status);
    }
    metrics::counter!("keel_delivery_attempts_total", "channel" => after.channel_type.as_str(), "status" => after.status.as_str())
        .increment(1);
    if after.status == DeliveryStatus::Dead {
        tracing::warn!(
            target: "keel::audit",
            action = "delivery.exhausted",
            delivery_id = %after.id,
            org_id = %after.org_id,
            event_id = %after.event_id,
            channel = after.channel_type.as_str(),
            attempts = after.attempts,
            "delivery dead: its attempts ran out"
        );
    }
    Some(after.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_ahead_follow_the_pace_of_sends() {
        let pace = Pace::default();
        // Before any send: only the buffer's room limits a claim.
        assert_eq!(pace.startable(8), usize::MAX);
        pace.observe(Duration::from_secs(1));
        // 1 s sends: 5 per slot within the horizon.
        assert_eq!(pace.startable(8), 40);
        // A receiver that was slow and is fast again is soon seen as fast.
        for _ in 0..20 {
            pace.observe(Duration::from_millis(1));
        }
        assert!(pace.startable(1) >= 1000, "{}", pace.startable(1));
    }

    #[test]
    fn the_unrecorded_outcomes_are_bounded() {
        assert_eq!(max_unrecorded(1), 256);
        assert_eq!(max_unrecorded(48), 384);
        assert_eq!(max_unrecorded(256), RECORD_BATCH);
    }
}
