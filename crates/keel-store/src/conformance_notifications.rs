//! The conformance suite's notification part: settings, triggers, and deliveries on the lease
//! engine. Run by [`notification_conformance_tests!`](crate::notification_conformance_tests).

// Test-suite code: a failed expectation is meant to panic and fail the calling test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::time::Duration as StdDuration;

use serde_json::json;
use time::Duration;

use crate::notifications::model::{
    ChannelType, Delivery, DeliveryFailure, DeliveryFilter, DeliveryOutcome, DeliveryReport,
    DeliveryStatus, EventId, NewDelivery, NewEvent, NewSetting, RecordedDelivery, SealedSecret,
    SettingKind, Severity, WorkerId,
};
use crate::notifications::{MAX_DELIVERY_REPORTS, NotificationStore};
use crate::{ClaimToken, Idempotency, ManualClock, OrgId, Store, StoreError};

/// Defines one `#[tokio::test]` per notification conformance function, like
/// [`conformance_tests!`](crate::conformance_tests).
#[macro_export]
macro_rules! notification_conformance_tests {
    ($setup:path) => {
        mod notifications {
            use super::*;
            $crate::notification_conformance_tests!(@each $setup;
                settings_crud,
                trigger_is_idempotent_and_deduplicated,
                deliveries_claimed_by_priority_and_fenced,
                failed_delivery_backs_off_and_honours_not_before,
                exhausted_delivery_is_dead_and_requeued,
                permanent_failure_is_failed,
                expired_delivery_lease_is_released,
                requeue_by_filter,
                purge_finished_deliveries,
                deliveries_are_isolated,
                postponed_delivery_spends_no_attempt,
                outcomes_are_recorded_together_each_fenced_alone,
                throttled_deliveries_fold_into_one_digest,
                concurrent_claims_never_share_a_delivery,
                concurrent_triggers_of_one_key_create_once,
                concurrent_throttled_triggers_share_one_digest
            );
        }
    };
    (@each $setup:path; $($name:ident),+) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((_guard, store, clock)) = $setup().await else {
                    return;
                };
                $crate::conformance_notifications::$name(&*store, &clock).await;
            }
        )+
    };
}

/// The delivery a recorded outcome names, as stored now.
async fn stored(n: &dyn NotificationStore, recorded: &RecordedDelivery) -> Delivery {
    let delivery = n
        .get_delivery(recorded.org_id, recorded.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (delivery.status, delivery.attempts),
        (recorded.status, recorded.attempts),
        "the recorded answer and the stored delivery agree"
    );
    delivery
}

fn secs(s: i64) -> Duration {
    Duration::seconds(s)
}

async fn org(store: &dyn Store, name: &str) -> OrgId {
    store.create_organisation(name).await.unwrap().id
}

fn event(event_type: &str, key: Option<(&str, &str)>) -> NewEvent {
    NewEvent {
        id: EventId::new(),
        event_type: event_type.to_owned(),
        payload: json!({"order": 42}),
        domain: "orders".to_owned(),
        severity: Severity::High,
        idempotency: key.map(|(key, hash)| Idempotency {
            key: key.to_owned(),
            request_hash: hash.to_owned(),
        }),
    }
}

fn delivery(recipient: &str, priority: i32, max_attempts: u32) -> NewDelivery {
    NewDelivery {
        channel_id: None,
        channel_type: ChannelType::Webhook,
        recipient: recipient.to_owned(),
        subject: "subject".to_owned(),
        body: format!("body for {recipient}"),
        priority,
        max_attempts,
        lease_duration: StdDuration::from_secs(30),
        throttle: None,
    }
}

fn failure(retryable: bool) -> DeliveryFailure {
    DeliveryFailure {
        detail: json!({"error": "HTTP 500"}),
        retryable,
        not_before: None,
    }
}

fn setting(name: &str, key: Option<&str>, secret: Option<&[u8]>) -> NewSetting {
    NewSetting {
        name: name.to_owned(),
        unique_key: key.map(str::to_owned),
        body: json!({"name": name}),
        sealed_secret: secret.map(|s| SealedSecret(s.to_vec())),
    }
}

pub async fn settings_crud(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let created = n
        .create_setting(
            acme,
            SettingKind::Sender,
            setting("smtp", None, Some(b"sealed")),
        )
        .await
        .unwrap();
    assert_eq!(created.kind, SettingKind::Sender);
    assert_eq!(
        created.sealed_secret,
        Some(SealedSecret(b"sealed".to_vec()))
    );
    assert!(!format!("{created:?}").contains("sealed\""));

    // An update without a secret keeps the stored one; with one, replaces it.
    let updated = n
        .update_setting(
            acme,
            SettingKind::Sender,
            created.id,
            setting("smtp-2", None, None),
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "smtp-2");
    assert_eq!(updated.sealed_secret, created.sealed_secret);
    let replaced = n
        .update_setting(
            acme,
            SettingKind::Sender,
            created.id,
            setting("smtp-2", None, Some(b"new")),
        )
        .await
        .unwrap();
    assert_eq!(replaced.sealed_secret, Some(SealedSecret(b"new".to_vec())));

    // Unique keys are unique per kind and organisation.
    n.create_setting(
        acme,
        SettingKind::Policy,
        setting("critical", Some("critical"), None),
    )
    .await
    .unwrap();
    let taken = n
        .create_setting(
            acme,
            SettingKind::Policy,
            setting("again", Some("critical"), None),
        )
        .await;
    assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
    n.create_setting(
        acme,
        SettingKind::Template,
        setting("t", Some("critical"), None),
    )
    .await
    .unwrap();

    let listed = n.list_settings(acme, SettingKind::Sender).await.unwrap();
    assert_eq!(listed.len(), 1);
    // The wrong kind does not find it.
    assert!(
        n.get_setting(acme, SettingKind::Channel, created.id)
            .await
            .unwrap()
            .is_none()
    );
    n.delete_setting(acme, SettingKind::Sender, created.id)
        .await
        .unwrap();
    assert!(matches!(
        n.delete_setting(acme, SettingKind::Sender, created.id)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        n.create_setting(acme, SettingKind::Rule, setting(" ", None, None))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
}

pub async fn trigger_is_idempotent_and_deduplicated(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let first = n
        .trigger(
            acme,
            event("order_failed", Some(("k1", "h1"))),
            // The same recipient twice on one channel is one delivery.
            vec![
                delivery("a", 0, 3),
                delivery("b", 0, 3),
                delivery("a", 0, 3),
            ],
        )
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.deliveries.len(), 2);
    assert_eq!(first.event.severity, Severity::High);

    let again = n
        .trigger(
            acme,
            event("order_failed", Some(("k1", "h1"))),
            vec![delivery("a", 0, 3), delivery("c", 0, 3)],
        )
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.event.id, first.event.id);
    let ids = |t: &crate::notifications::model::Triggered| {
        let mut ids: Vec<_> = t.deliveries.iter().map(|d| d.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&again), ids(&first));
    let all = n
        .list_deliveries(acme, DeliveryFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2, "the retry created nothing");

    let other = n
        .trigger(acme, event("order_failed", Some(("k1", "h2"))), vec![])
        .await;
    assert!(matches!(other, Err(StoreError::IdempotencyMismatch)));

    // No route: an event with no delivery is recorded all the same.
    let none = n
        .trigger(acme, event("order_created", None), vec![])
        .await
        .unwrap();
    assert!(none.created && none.deliveries.is_empty());
}

pub async fn deliveries_claimed_by_priority_and_fenced(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let (w1, w2) = (WorkerId::new(), WorkerId::new());
    n.trigger(acme, event("a", None), vec![delivery("low", 0, 3)])
        .await
        .unwrap();
    clock.advance(secs(1));
    n.trigger(acme, event("b", None), vec![delivery("high", 10, 3)])
        .await
        .unwrap();
    clock.advance(secs(1));
    n.trigger(acme, event("c", None), vec![delivery("low-later", 0, 3)])
        .await
        .unwrap();
    assert_eq!(n.next_delivery_due().await.unwrap(), Some(store.now()));

    let claimed = n.claim_deliveries(w1, 2).await.unwrap();
    let recipients: Vec<_> = claimed
        .iter()
        .map(|c| c.delivery.recipient.as_str())
        .collect();
    assert_eq!(recipients, ["high", "low"]);
    assert!(
        claimed
            .iter()
            .all(|c| c.delivery.status == DeliveryStatus::Executing)
    );
    assert_eq!(claimed[0].delivery.claimed_by, Some(w1));
    let rest = n.claim_deliveries(w2, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(n.claim_deliveries(w2, 10).await.unwrap().is_empty());

    let high = &claimed[0];
    let stale = ClaimToken("0".repeat(32));
    assert!(matches!(
        n.complete_delivery(w1, high.delivery.id, &stale, json!({}))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        n.complete_delivery(w2, high.delivery.id, &high.claim_token, json!({}))
            .await,
        Err(StoreError::StaleClaim)
    ));
    let done = n
        .complete_delivery(
            w1,
            high.delivery.id,
            &high.claim_token,
            json!({"status": 200}),
        )
        .await
        .unwrap();
    assert_eq!(done.status, DeliveryStatus::Completed);
    let done = stored(n, &done).await;
    assert!(done.finished_at.is_some());
    let attempts = n.list_delivery_attempts(acme, done.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].worker_id, w1);
    assert_eq!(attempts[0].outcome.as_deref(), Some("completed"));
    assert_eq!(attempts[0].detail, Some(json!({"status": 200})));
    // Completed once: the token is spent.
    assert!(matches!(
        n.complete_delivery(w1, high.delivery.id, &high.claim_token, json!({}))
            .await,
        Err(StoreError::StaleClaim)
    ));
}

pub async fn failed_delivery_backs_off_and_honours_not_before(
    store: &dyn Store,
    clock: &ManualClock,
) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    n.trigger(acme, event("x_failed", None), vec![delivery("r", 0, 5)])
        .await
        .unwrap();
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    let failed = n
        .fail_delivery(worker, c.delivery.id, &c.claim_token, failure(true))
        .await
        .unwrap();
    assert_eq!(failed.status, DeliveryStatus::Pending);
    let failed = stored(n, &failed).await;
    // The engine's backoff after the first attempt: 2.5 to 5 s.
    let wait = failed.run_at - store.now();
    assert!(
        wait >= Duration::milliseconds(2500) && wait <= secs(5),
        "{wait}"
    );
    assert!(n.claim_deliveries(worker, 1).await.unwrap().is_empty());
    assert_eq!(n.next_delivery_due().await.unwrap(), Some(failed.run_at));

    clock.advance(secs(5));
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    assert_eq!(c.delivery.attempts, 2);
    // A receiver's Retry-After longer than the backoff wins.
    let not_before = store.now() + secs(120);
    let failed = n
        .fail_delivery(
            worker,
            c.delivery.id,
            &c.claim_token,
            DeliveryFailure {
                not_before: Some(not_before),
                ..failure(true)
            },
        )
        .await
        .unwrap();
    let failed = stored(n, &failed).await;
    assert_eq!(failed.run_at, not_before);
    clock.advance(secs(119));
    assert!(n.claim_deliveries(worker, 1).await.unwrap().is_empty());
    clock.advance(secs(1));
    assert_eq!(n.claim_deliveries(worker, 1).await.unwrap().len(), 1);
    let attempts = n.list_delivery_attempts(acme, c.delivery.id).await.unwrap();
    let outcomes: Vec<_> = attempts.iter().map(|a| a.outcome.as_deref()).collect();
    assert_eq!(outcomes, [Some("retry"), Some("retry"), None]);
    assert_eq!(attempts[0].detail, Some(json!({"error": "HTTP 500"})));
}

pub async fn exhausted_delivery_is_dead_and_requeued(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    n.trigger(acme, event("x_down", None), vec![delivery("r", 0, 2)])
        .await
        .unwrap();
    let mut last = None;
    for _ in 0..2 {
        let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
        last = Some(
            n.fail_delivery(worker, c.delivery.id, &c.claim_token, failure(true))
                .await
                .unwrap(),
        );
        clock.advance(secs(600));
    }
    let dead = stored(n, &last.unwrap()).await;
    assert_eq!(dead.status, DeliveryStatus::Dead);
    assert_eq!(dead.dead_reason.as_deref(), Some("attempts_exhausted"));
    assert!(dead.finished_at.is_some());
    let dead_list = n
        .list_deliveries(
            acme,
            DeliveryFilter {
                status: Some(DeliveryStatus::Dead),
                ..DeliveryFilter::default()
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(dead_list.items.len(), 1);

    let requeued = n.requeue_delivery(acme, dead.id).await.unwrap();
    assert_eq!(requeued.status, DeliveryStatus::Pending);
    assert_eq!(requeued.attempts, 0);
    assert_eq!(requeued.dead_reason, None);
    assert!(matches!(
        n.requeue_delivery(acme, dead.id).await,
        Err(StoreError::InvalidState(_))
    ));
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    assert_eq!(c.delivery.id, dead.id);
    // The history keeps counting across the requeue.
    assert_eq!(
        n.list_delivery_attempts(acme, dead.id).await.unwrap().len(),
        3
    );
}

pub async fn permanent_failure_is_failed(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    n.trigger(acme, event("x", None), vec![delivery("r", 0, 5)])
        .await
        .unwrap();
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    let failed = n
        .fail_delivery(worker, c.delivery.id, &c.claim_token, failure(false))
        .await
        .unwrap();
    assert_eq!(failed.status, DeliveryStatus::Failed);
    assert_eq!(failed.attempts, 1);
    let failed = stored(n, &failed).await;
    assert_eq!(failed.error, Some(json!({"error": "HTTP 500"})));
}

pub async fn expired_delivery_lease_is_released(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    n.trigger(
        acme,
        event("x", None),
        vec![delivery("again", 0, 5), delivery("last", 0, 1)],
    )
    .await
    .unwrap();
    let claimed = n.claim_deliveries(worker, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    clock.advance(secs(29));
    assert!(n.release_expired_deliveries(100).await.unwrap().is_empty());
    clock.advance(secs(2));
    let mut released = n.release_expired_deliveries(100).await.unwrap();
    released.sort_by_key(|r| r.status.as_str());
    let statuses: Vec<_> = released.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [DeliveryStatus::Dead, DeliveryStatus::Pending]);
    // The late worker's report is refused.
    let c = &claimed[0];
    assert!(matches!(
        n.complete_delivery(worker, c.delivery.id, &c.claim_token, json!({}))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert_eq!(n.claim_deliveries(worker, 10).await.unwrap().len(), 1);
}

pub async fn requeue_by_filter(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    let mut email = delivery("ops@example.com", 0, 1);
    email.channel_type = ChannelType::Email;
    n.trigger(
        acme,
        event("x", None),
        vec![delivery("a", 0, 1), delivery("b", 0, 1), email],
    )
    .await
    .unwrap();
    for c in n.claim_deliveries(worker, 10).await.unwrap() {
        n.fail_delivery(worker, c.delivery.id, &c.claim_token, failure(true))
            .await
            .unwrap();
    }
    let by_type = DeliveryFilter {
        channel_type: Some(ChannelType::Webhook),
        ..DeliveryFilter::default()
    };
    assert_eq!(
        n.requeue_deliveries(acme, by_type.clone()).await.unwrap(),
        2
    );
    assert_eq!(n.requeue_deliveries(acme, by_type).await.unwrap(), 0);
    let pending = DeliveryFilter {
        status: Some(DeliveryStatus::Pending),
        ..DeliveryFilter::default()
    };
    assert!(matches!(
        n.requeue_deliveries(acme, pending).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert_eq!(
        n.requeue_deliveries(acme, DeliveryFilter::default())
            .await
            .unwrap(),
        1
    );
}

pub async fn purge_finished_deliveries(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    let old = n
        .trigger(
            acme,
            event("x", Some(("k", "h"))),
            vec![delivery("a", 0, 1)],
        )
        .await
        .unwrap();
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    n.complete_delivery(worker, c.delivery.id, &c.claim_token, json!({}))
        .await
        .unwrap();
    clock.advance(secs(3600));
    n.trigger(acme, event("y", None), vec![delivery("b", 0, 1)])
        .await
        .unwrap();
    let purged = n
        .purge_finished_deliveries(store.now() - secs(60), 100)
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(
        n.get_delivery(acme, old.deliveries[0].id)
            .await
            .unwrap()
            .is_none()
    );
    // The event went with its last delivery, and its idempotency key with it.
    let again = n
        .trigger(acme, event("x", Some(("k", "other"))), vec![])
        .await
        .unwrap();
    assert!(again.created);
    let left = n
        .list_deliveries(acme, DeliveryFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(left.items.len(), 1, "the pending delivery stays");
}

pub async fn deliveries_are_isolated(store: &dyn Store, _clock: &ManualClock) {
    let n: &dyn NotificationStore = store.notifications();
    let acme = org(store, "acme").await;
    let globex = org(store, "globex").await;
    let t = n
        .trigger(
            acme,
            event("x", Some(("same-key", "h"))),
            vec![delivery("a", 0, 1)],
        )
        .await
        .unwrap();
    let id = t.deliveries[0].id;
    assert!(n.get_delivery(globex, id).await.unwrap().is_none());
    assert!(
        n.list_delivery_attempts(globex, id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        n.requeue_delivery(globex, id).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        n.list_deliveries(globex, DeliveryFilter::default(), None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // The same idempotency key in another organisation is another event.
    let other = n
        .trigger(
            globex,
            event("x", Some(("same-key", "h2"))),
            vec![delivery("a", 0, 1)],
        )
        .await
        .unwrap();
    assert!(other.created);
    let setting = n
        .create_setting(acme, SettingKind::Channel, setting("c", None, None))
        .await
        .unwrap();
    assert!(
        n.get_setting(globex, SettingKind::Channel, setting.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        n.delete_setting(globex, SettingKind::Channel, setting.id)
            .await,
        Err(StoreError::NotFound)
    ));
}

pub async fn throttled_deliveries_fold_into_one_digest(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    let throttled = |recipient: &str| NewDelivery {
        throttle: Some(StdDuration::from_secs(60)),
        ..delivery(recipient, 5, 3)
    };
    let mut ids = Vec::new();
    for _ in 0..10 {
        let t = n
            .trigger(acme, event("disk_warning", None), vec![throttled("ops")])
            .await
            .unwrap();
        ids.push(t.deliveries[0].id);
        clock.advance(secs(1));
    }
    // Another recipient and another type are throttled apart.
    n.trigger(acme, event("disk_warning", None), vec![throttled("other")])
        .await
        .unwrap();
    n.trigger(acme, event("cpu_warning", None), vec![throttled("ops")])
        .await
        .unwrap();
    let lead = n.get_delivery(acme, ids[0]).await.unwrap().unwrap();
    assert_eq!(lead.status, DeliveryStatus::Pending);
    let mut digest_id = None;
    for id in &ids[1..] {
        let d = n.get_delivery(acme, *id).await.unwrap().unwrap();
        assert_eq!(d.status, DeliveryStatus::Throttled);
        assert!(d.digest_id.is_some());
        assert!(
            digest_id.is_none() || digest_id == d.digest_id,
            "one digest"
        );
        digest_id = d.digest_id;
    }
    let digest_id = digest_id.unwrap();
    let digest = n.get_delivery(acme, digest_id).await.unwrap().unwrap();
    assert_eq!(digest.digest_of, Some(lead.id));
    assert_eq!(digest.status, DeliveryStatus::Pending);
    assert_eq!(
        digest.run_at,
        lead.created_at + secs(60),
        "due when the window closes"
    );
    assert_eq!(n.list_digested(acme, digest_id).await.unwrap().len(), 9);

    // The three leads go now; the digest only when the window closes.
    let claimed = n.claim_deliveries(worker, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    for c in &claimed {
        assert!(c.delivery.digest_of.is_none());
        n.complete_delivery(worker, c.delivery.id, &c.claim_token, json!({}))
            .await
            .unwrap();
    }
    clock.advance(secs(50));
    let claimed = n.claim_deliveries(worker, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].delivery.id, digest_id);
    n.complete_delivery(worker, digest_id, &claimed[0].claim_token, json!({}))
        .await
        .unwrap();
    // Once the digest is out, the next one leads a new window.
    let next = n
        .trigger(acme, event("disk_warning", None), vec![throttled("ops")])
        .await
        .unwrap();
    assert_eq!(next.deliveries[0].status, DeliveryStatus::Pending);
    // Throttled deliveries are purged after their digest.
    for c in n.claim_deliveries(worker, 10).await.unwrap() {
        n.complete_delivery(worker, c.delivery.id, &c.claim_token, json!({}))
            .await
            .unwrap();
    }
    clock.advance(secs(3600));
    let purged = n
        .purge_finished_deliveries(store.now() - secs(60), 1000)
        .await
        .unwrap();
    let left = n
        .list_deliveries(acme, DeliveryFilter::default(), None, 100)
        .await
        .unwrap()
        .items;
    let left: Vec<_> = left
        .iter()
        .map(|d| (d.status, d.recipient.as_str(), d.digest_of.is_some()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        purged,
        3 + 1 + 9 + 1,
        "leads, digest, throttled, the new lead"
    );
}

pub async fn postponed_delivery_spends_no_attempt(store: &dyn Store, clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    n.trigger(acme, event("x", None), vec![delivery("r", 0, 3)])
        .await
        .unwrap();
    let c = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    assert_eq!(c.delivery.attempts, 1);
    let until = store.now() + secs(30);
    assert!(matches!(
        n.postpone_delivery(WorkerId::new(), c.delivery.id, &c.claim_token, until)
            .await,
        Err(StoreError::StaleClaim)
    ));
    let postponed = n
        .postpone_delivery(worker, c.delivery.id, &c.claim_token, until)
        .await
        .unwrap();
    assert_eq!(postponed.status, DeliveryStatus::Pending);
    assert_eq!(postponed.attempts, 0);
    let postponed = stored(n, &postponed).await;
    assert_eq!(postponed.run_at, until);
    assert!(
        n.list_delivery_attempts(acme, c.delivery.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(n.claim_deliveries(worker, 1).await.unwrap().is_empty());
    clock.advance(secs(30));
    let again = n.claim_deliveries(worker, 1).await.unwrap().pop().unwrap();
    assert_eq!(again.delivery.attempts, 1);
}

pub async fn outcomes_are_recorded_together_each_fenced_alone(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let worker = WorkerId::new();
    let recipients = ["a", "b", "c", "d"];
    n.trigger(
        acme,
        event("x", None),
        recipients.iter().map(|r| delivery(r, 0, 3)).collect(),
    )
    .await
    .unwrap();
    let mut claimed = n.claim_deliveries(worker, 4).await.unwrap();
    claimed.sort_by(|a, b| a.delivery.recipient.cmp(&b.delivery.recipient));
    let [a, b, c, d] = <[_; 4]>::try_from(claimed).unwrap();
    let later = store.now() + secs(60);
    let reports = vec![
        DeliveryReport {
            id: a.delivery.id,
            claim_token: a.claim_token.clone(),
            outcome: DeliveryOutcome::Delivered(json!({"status": 200})),
        },
        // A token that is not the claim's: refused alone.
        DeliveryReport {
            id: b.delivery.id,
            claim_token: ClaimToken::from("not-the-token".to_owned()),
            outcome: DeliveryOutcome::Delivered(json!({})),
        },
        DeliveryReport {
            id: c.delivery.id,
            claim_token: c.claim_token.clone(),
            outcome: DeliveryOutcome::Failed(failure(true)),
        },
        DeliveryReport {
            id: d.delivery.id,
            claim_token: d.claim_token.clone(),
            outcome: DeliveryOutcome::Postponed(later),
        },
    ];
    let answers = n.record_deliveries(worker, reports).await.unwrap();
    assert_eq!(answers.len(), 4, "one answer per report, in order");
    assert_eq!(
        answers[0].as_ref().unwrap().status,
        DeliveryStatus::Completed
    );
    assert!(matches!(answers[1], Err(StoreError::StaleClaim)));
    let retried = answers[2].as_ref().unwrap();
    assert_eq!(retried.status, DeliveryStatus::Pending);
    assert_eq!(retried.attempts, 1);
    let postponed = stored(n, answers[3].as_ref().unwrap()).await;
    assert_eq!(
        (postponed.status, postponed.attempts, postponed.run_at),
        (DeliveryStatus::Pending, 0, later)
    );
    // The refused one is unchanged: still executing under its claim, which completes it.
    let unchanged = n.get_delivery(acme, b.delivery.id).await.unwrap().unwrap();
    assert_eq!(unchanged.status, DeliveryStatus::Executing);
    n.complete_delivery(worker, b.delivery.id, &b.claim_token, json!({}))
        .await
        .unwrap();
    // Each recorded attempt is in the history.
    let attempts = n.list_delivery_attempts(acme, a.delivery.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert!(
        n.record_deliveries(worker, Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
    let too_many = (0..=MAX_DELIVERY_REPORTS)
        .map(|_| DeliveryReport {
            id: a.delivery.id,
            claim_token: a.claim_token.clone(),
            outcome: DeliveryOutcome::Delivered(json!({})),
        })
        .collect();
    assert!(matches!(
        n.record_deliveries(worker, too_many).await,
        Err(StoreError::InvalidInput(_))
    ));
}

// --- concurrency ---

/// Six workers claim and record from 300 deliveries at once: each is claimed exactly once.
pub async fn concurrent_claims_never_share_a_delivery(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    for (e, priority) in [0, 5, 10].into_iter().enumerate() {
        n.trigger(
            acme,
            event(&format!("x{e}"), None),
            (0..100)
                .map(|i| delivery(&format!("r{i}"), priority, 3))
                .collect(),
        )
        .await
        .unwrap();
    }
    let work = |worker: WorkerId| async move {
        let mut mine = Vec::new();
        loop {
            let claimed = n.claim_deliveries(worker, 7).await.unwrap();
            if claimed.is_empty() {
                return mine;
            }
            let reports = claimed
                .iter()
                .map(|c| {
                    assert_eq!(c.delivery.claimed_by, Some(worker));
                    DeliveryReport {
                        id: c.delivery.id,
                        claim_token: c.claim_token.clone(),
                        outcome: DeliveryOutcome::Delivered(json!({})),
                    }
                })
                .collect();
            for answer in n.record_deliveries(worker, reports).await.unwrap() {
                assert_eq!(answer.unwrap().status, DeliveryStatus::Completed);
            }
            mine.extend(claimed.into_iter().map(|c| c.delivery.id));
        }
    };
    let claimed: Vec<_> = futures::future::join_all((0..6).map(|_| work(WorkerId::new())))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(claimed.len(), 300, "no delivery claimed twice");
    let unique: std::collections::HashSet<_> = claimed.into_iter().collect();
    assert_eq!(unique.len(), 300);
    let completed = n
        .list_deliveries(
            acme,
            DeliveryFilter {
                status: Some(DeliveryStatus::Completed),
                ..DeliveryFilter::default()
            },
            None,
            1000,
        )
        .await
        .unwrap();
    assert_eq!(completed.items.len(), 300);
}

/// Eight triggers with one idempotency key at once: one creates the event, the others answer it.
pub async fn concurrent_triggers_of_one_key_create_once(store: &dyn Store, _clock: &ManualClock) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let answers = futures::future::join_all((0..8).map(|_| {
        n.trigger(
            acme,
            event("order_failed", Some(("k", "h"))),
            vec![delivery("a", 0, 3)],
        )
    }))
    .await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers.iter().filter(|t| t.created).count(), 1);
    assert!(answers.iter().all(|t| t.event.id == answers[0].event.id));
    assert!(answers.iter().all(|t| t.deliveries.len() == 1));
    let all = n
        .list_deliveries(acme, DeliveryFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
}

/// Ten throttled triggers of one type, channel and recipient at once: one leads, the nine
/// others fold into one digest.
pub async fn concurrent_throttled_triggers_share_one_digest(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    let n = store.notifications();
    let acme = org(store, "acme").await;
    let throttled = NewDelivery {
        throttle: Some(StdDuration::from_secs(60)),
        ..delivery("ops", 5, 3)
    };
    let answers = futures::future::join_all(
        (0..10).map(|_| n.trigger(acme, event("disk_warning", None), vec![throttled.clone()])),
    )
    .await;
    let deliveries: Vec<_> = answers
        .into_iter()
        .map(|t| t.unwrap().deliveries.pop().unwrap())
        .collect();
    let leads: Vec<_> = deliveries
        .iter()
        .filter(|d| d.status == DeliveryStatus::Pending)
        .collect();
    assert_eq!(leads.len(), 1, "one lead");
    let digests: std::collections::HashSet<_> = deliveries
        .iter()
        .filter(|d| d.status == DeliveryStatus::Throttled)
        .map(|d| d.digest_id.unwrap())
        .collect();
    assert_eq!(digests.len(), 1, "one digest");
    let digest = *digests.iter().next().unwrap();
    assert_eq!(n.list_digested(acme, digest).await.unwrap().len(), 9);
    let digest = n.get_delivery(acme, digest).await.unwrap().unwrap();
    assert_eq!(digest.digest_of, Some(leads[0].id));
}
