//! The delivery processor: a pool of supervised workers that claim deliveries through the lease
//! engine (best priority first, then the earliest due) and send them.
//!
//! An idle worker sleeps until deliveries are queued (a trigger, a direct send or a requeue
//! wakes it), until the earliest retry falls due, or at most [`IDLE_RECHECK`] (deliveries made
//! by another keel process on the same database wake nobody here). Each item is isolated: a
//! panic while it is sent is a failed attempt with the panic message, retried like any other
//! failure, so an item that always panics ends in the dead-letter list and the worker goes on.

use std::sync::Arc;
use std::time::Duration;

use keel_guard::supervisor::{Supervisor, TaskError};
use keel_store::Store;
use keel_store::notifications::model::{
    ChannelType, ClaimedDelivery, DeliveryFailure, DeliveryStatus, WorkerId,
};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::breaker::{Admission, Breakers};
use super::channels::{Channels, Outcome};

/// How long before its lease ends a send is given up: the lease is the channel's timeout and
/// 30 s, so a send has about its timeout and 15 s, and its failure is recorded while the lease
/// holds.
const SEND_MARGIN: Duration = Duration::from_secs(15);

/// The longest an idle worker sleeps without looking for work.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// How long a worker waits after the store failed before it claims again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The failpoint `deliveries.item` acts only on deliveries whose subject contains this.
pub const ITEM_FAILPOINT_MARK: &str = "failpoint:deliveries.item";

/// What a `return` action of `deliveries.item` makes of the attempt.
fn injected() -> Outcome {
    Outcome::failed("injected by failpoint deliveries.item", true)
}

/// The component name of worker `n`.
pub fn worker_name(n: usize) -> String {
    format!("delivery-worker-{n}")
}

/// What the workers share.
pub struct Processor {
    store: Arc<dyn Store>,
    channels: Channels,
    queued: Arc<Notify>,
    breakers: Arc<Breakers>,
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
        })
    }

    /// Starts `workers` supervised workers, each with its own id for this process.
    pub fn start(self: &Arc<Self>, supervisor: &Supervisor, workers: usize) {
        for n in 0..workers {
            let processor = self.clone();
            let worker = WorkerId::new();
            supervisor.spawn(worker_name(n), move |cancel| {
                let processor = processor.clone();
                async move { processor.run(worker, cancel).await }
            });
        }
    }

    /// One worker: claim one delivery, send it, record the outcome; sleep when there is none.
    async fn run(&self, worker: WorkerId, cancel: CancellationToken) -> Result<(), TaskError> {
        let store = self.store.notifications();
        while !cancel.is_cancelled() {
            // Registered before the claim: a delivery queued after the claim found nothing
            // still wakes this worker.
            let queued = self.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let claimed = match store.claim_deliveries(worker, 1).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::error!(%error, "delivery worker: claiming failed; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(STORE_RETRY) => {}
                        () = cancel.cancelled() => {}
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
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
            for item in claimed {
                self.process(worker, item).await;
            }
        }
        Ok(())
    }

    /// Sends one delivery, isolated, and records the attempt; a webhook whose endpoint's
    /// circuit is open goes back to the queue instead, its attempt unspent.
    async fn process(&self, worker: WorkerId, item: ClaimedDelivery) {
        let delivery = &item.delivery;
        let webhook = delivery.channel_type == ChannelType::Webhook;
        if webhook
            && let Admission::Wait(wait) = self.breakers.admit(delivery.org_id, &delivery.recipient)
        {
            let until = self
                .store
                .now()
                .saturating_add(time::Duration::try_from(wait).unwrap_or(time::Duration::MAX));
            if let Err(error) = self
                .store
                .notifications()
                .postpone_delivery(worker, delivery.id, &item.claim_token, until)
                .await
            {
                tracing::error!(delivery_id = %delivery.id, %error, "delivery worker: postponing failed; the lease expiry puts it back");
            }
            return;
        }
        // A send ends well inside the lease, whatever the far end does (an SMTP server that
        // accepts and never answers included): a worker is never held by one receiver.
        let lease_left = delivery
            .lease_expires_at
            .map(|expires| expires - self.store.now())
            .and_then(|left| Duration::try_from(left).ok())
            .unwrap_or(SEND_MARGIN);
        let deadline = lease_left
            .saturating_sub(SEND_MARGIN)
            .max(Duration::from_secs(1));
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
        let outcome = sent.unwrap_or_else(|panicked| Outcome::Failed {
            detail: json!({"error": format!("panicked: {}", panicked.message)}),
            retryable: true,
            retry_after: None,
        });
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
        let store = self.store.notifications();
        let recorded = match outcome {
            Outcome::Delivered(detail) => {
                store
                    .complete_delivery(worker, delivery.id, &item.claim_token, detail)
                    .await
            }
            Outcome::Failed {
                detail,
                retryable,
                retry_after,
            } => {
                let not_before = retry_after.map(|wait| {
                    self.store.now().saturating_add(
                        time::Duration::try_from(wait).unwrap_or(time::Duration::MAX),
                    )
                });
                store
                    .fail_delivery(
                        worker,
                        delivery.id,
                        &item.claim_token,
                        DeliveryFailure {
                            detail,
                            retryable,
                            not_before,
                        },
                    )
                    .await
            }
        };
        match recorded {
            Ok(after) => {
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
            }
            // The lease stays until it expires; the release job puts the delivery back.
            Err(error) => {
                tracing::error!(delivery_id = %delivery.id, %error, "delivery worker: recording the attempt failed");
            }
        }
    }
}
