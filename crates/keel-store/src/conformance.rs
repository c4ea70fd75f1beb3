//! The conformance suite: behaviour every [`Store`] backend must show.
//!
//! Each function takes a store on a fresh, empty database and the [`ManualClock`] the store
//! reads (set to [`START`]), and panics on the first difference. A backend's test binary runs
//! them all with [`conformance_tests!`](crate::conformance_tests), one test per function on a
//! fresh database (see `tests/sqlite.rs`).

// Test-suite code: a failed expectation is meant to panic and fail the calling test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use serde_json::json;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::Clock;
use crate::ExposeSecret;
use crate::{
    AgentId, CheckIn, ClaimToken, Claimed, CommandFilter, CommandId, CommandStatus, DeadReason,
    Idempotency, ManualClock, NewApiKey, NewCommand, OrgId, ReleaseOutcome, Scope, Store,
    StoreError, Target,
};
use crate::{AttemptOutcome, NewCommandItem};

mod fleet;
pub use fleet::*;
pub mod postgres;
mod schedules;
pub use schedules::*;

/// The instant the suite's clock starts at.
pub const START: OffsetDateTime = datetime!(2030-01-01 00:00 UTC);

/// Defines one `#[tokio::test]` per conformance function. `$setup` is an async fn returning
/// `Some((guard, Arc<dyn Store>, Arc<ManualClock>))` on a fresh database, or `None` when the
/// backend's database is not configured (the test then passes having said it skipped); the
/// guard (a temporary directory, a schema) lives until the test ends.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::conformance_tests!(@each $setup;
            organisations,
            api_keys,
            agent_check_in,
            idempotency,
            unknown_agent,
            claim_order,
            claim_limit,
            claim_targeted_and_pooled,
            claim_not_before_run_at,
            claim_token_completes_once,
            complete_batch_fences_each_report,
            concurrent_creates_each_get_their_own_answer,
            concurrent_reports_each_get_their_own_answer,
            stale_token_changes_nothing,
            only_the_holder_reports,
            heartbeat_renews_lease,
            retryable_fail_backs_off,
            non_retryable_fail,
            status_counts_and_finished_per_minute,
            lease_expiry_requeues,
            lease_expiry_dead_and_requeue,
            release_scoped_to_one_org,
            check_in_never_renames,
            cancel,
            org_isolation,
            list_commands,
            claim_order_by_due_time,
            attempts_are_kept,
            hand_back_restores_the_claim,
            batch_create_is_all_or_nothing,
            release_in_bounded_batches,
            purge_finished_commands,
            claim_with_a_queue_named_twice,
            scheduled_commands_wait_their_turn,
            operator_keys,
            operator_and_organisation_keys_are_apart,
            agent_labels,
            cordoned_agent_claims_nothing_new,
            paused_queue_hands_out_nothing,
            broadcast_reaches_each_agent_once,
            broadcast_max_concurrency_holds_children,
            broadcast_children_completed_at_once_hand_on_their_slots,
            broadcast_ends_failed_when_a_child_fails,
            broadcast_cancel_cancels_unfinished_children,
            broadcast_idempotency_and_refusals,
            broadcast_requeue_keeps_to_max_concurrency,
            broadcast_slots_pass_only_from_released_children_and_wait_for_due_time,
            broadcast_cancel_requeue_and_retention_keep_its_children,
            schedules_create_read_pause_delete,
            schedules_are_isolated,
            schedule_fires_once_per_fire_time,
            skip_fires_nothing_for_missed_times,
            catch_up_one_fires_once_for_missed_times,
            a_refused_fire_is_recorded_with_its_reason,
            a_panicking_template_fails_its_own_fire_alone
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_claims() {
            let Some((_guard, store, clock)) = $setup().await else {
                    return;
                };
            $crate::conformance::concurrent_claims(store, &clock).await;
        }
    };
    (@each $setup:path; $($name:ident),+) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((_guard, store, clock)) = $setup().await else {
                    return;
                };
                $crate::conformance::$name(&*store, &clock).await;
            }
        )+
    };
}

/// An organisation with one agent (`agent-1`) bound to an agent key.
pub struct Tenant {
    pub org: OrgId,
    pub agent: AgentId,
}

pub async fn tenant(store: &dyn Store, name: &str) -> Tenant {
    let org = store.create_organisation(name).await.unwrap().id;
    let agent = agent(store, org, "agent-1").await;
    Tenant { org, agent }
}

pub async fn agent(store: &dyn Store, org: OrgId, name: &str) -> AgentId {
    let key = store
        .create_api_key(
            org,
            NewApiKey {
                name: format!("{name} key"),
                scopes: vec![Scope::Agent],
                agent_name: Some(name.to_owned()),
            },
        )
        .await
        .unwrap();
    key.key.agent_id.unwrap()
}

fn queues(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn pooled(queue: &str) -> NewCommand {
    NewCommand::new("run", Target::Queue(queue.to_owned()), json!({}))
}

fn targeted(agent: AgentId) -> NewCommand {
    NewCommand::new("run", Target::Agent(agent), json!({}))
}

async fn create(store: &dyn Store, org: OrgId, command: NewCommand) -> CommandId {
    let created = store.create_command(org, command, None).await.unwrap();
    assert!(created.created);
    created.command.id
}

async fn claim_one(store: &dyn Store, t: &Tenant, queue: &[&str]) -> Claimed {
    let mut claimed = store
        .claim(t.org, t.agent, &queues(queue), 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "expected one claimable command");
    claimed.pop().unwrap()
}

fn secs(s: i64) -> Duration {
    Duration::seconds(s)
}

// --- organisations, keys, agents ---

pub async fn organisations(store: &dyn Store, _clock: &ManualClock) {
    let b = store.create_organisation("beta").await.unwrap();
    let a = store.create_organisation("alpha").await.unwrap();
    assert_eq!(a.created_at, START);
    assert!(matches!(
        store.create_organisation("alpha").await,
        Err(StoreError::Conflict(_))
    ));
    let all = store.list_organisations().await.unwrap();
    assert_eq!(all, vec![a.clone(), b]);
    assert_eq!(store.find_org_by_name("alpha").await.unwrap(), Some(a));
    assert_eq!(store.find_org_by_name("gamma").await.unwrap(), None);
}

pub async fn operator_keys(store: &dyn Store, clock: &ManualClock) {
    assert!(store.list_operator_keys().await.unwrap().is_empty());
    let first = store.create_operator_key("alice").await.unwrap();
    let token = first.token.expose_secret();
    assert!(token.starts_with(&format!("keel_{}_", first.key.prefix)));
    assert!(!format!("{first:?}").contains(token));
    assert_eq!(first.key.name, "alice");
    assert_eq!(first.key.created_at, START);
    assert_eq!(first.key.revoked_at, None);
    assert_eq!(
        store.authenticate_operator(token).await.unwrap(),
        Some(first.key.clone())
    );
    clock.advance(secs(1));
    let second = store.create_operator_key("bob").await.unwrap();
    assert_ne!(second.key.prefix, first.key.prefix);

    // Wrong secret with the right prefix, unknown prefix, malformed.
    let mut wrong = token.to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    for bad in [wrong.as_str(), "keel_zzzzzzzz_nope", "", "keel_"] {
        assert_eq!(
            store.authenticate_operator(bad).await.unwrap(),
            None,
            "{bad}"
        );
    }
    assert!(matches!(
        store.create_operator_key("  ").await,
        Err(StoreError::InvalidInput(_))
    ));

    clock.advance(secs(60));
    store.revoke_operator_key(first.key.id).await.unwrap();
    store.revoke_operator_key(first.key.id).await.unwrap();
    assert_eq!(store.authenticate_operator(token).await.unwrap(), None);
    assert!(
        store
            .authenticate_operator(second.token.expose_secret())
            .await
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        store.revoke_operator_key(crate::OperatorKeyId::new()).await,
        Err(StoreError::NotFound)
    ));
    let keys = store.list_operator_keys().await.unwrap();
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(keys[0].revoked_at, Some(START + secs(61)));
    assert_eq!(keys[1].revoked_at, None);
}

/// An operator key is no organisation key and an organisation key no operator key, whatever
/// its scopes.
pub async fn operator_and_organisation_keys_are_apart(store: &dyn Store, _clock: &ManualClock) {
    let org = store.create_organisation("acme").await.unwrap().id;
    let admin = store
        .create_api_key(
            org,
            NewApiKey {
                name: "admin".into(),
                scopes: Scope::ALL
                    .iter()
                    .copied()
                    .filter(|s| *s != Scope::Agent)
                    .collect(),
                agent_name: None,
            },
        )
        .await
        .unwrap();
    let operator = store.create_operator_key("ops").await.unwrap();
    assert_eq!(
        store
            .authenticate_operator(admin.token.expose_secret())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .authenticate(operator.token.expose_secret())
            .await
            .unwrap(),
        None
    );
    assert!(store.list_api_keys(org).await.unwrap().len() == 1);
}

pub async fn api_keys(store: &dyn Store, clock: &ManualClock) {
    for bad in ["", "  ", "ops\u{0}", "a\nb"] {
        let refused = store
            .create_api_key(
                store
                    .create_organisation(&format!("named-{}", bad.len()))
                    .await
                    .unwrap()
                    .id,
                NewApiKey {
                    name: bad.into(),
                    scopes: vec![Scope::Admin],
                    agent_name: None,
                },
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::InvalidInput(_))),
            "{bad:?}"
        );
    }
    let org = store.create_organisation("acme").await.unwrap().id;
    let other = store.create_organisation("other").await.unwrap().id;
    let admin = store
        .create_api_key(
            org,
            NewApiKey {
                name: "ops".into(),
                scopes: vec![Scope::CommandsRead, Scope::Admin, Scope::CommandsWrite],
                agent_name: None,
            },
        )
        .await
        .unwrap();
    assert!(
        admin
            .token
            .expose_secret()
            .starts_with(&format!("keel_{}_", admin.key.prefix))
    );
    assert!(!format!("{admin:?}").contains(admin.token.expose_secret()));

    let principal = store
        .authenticate(admin.token.expose_secret())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(principal.key_id, admin.key.id);
    assert_eq!(principal.org_id, org);
    assert_eq!(principal.agent_id, None);
    let scopes: HashSet<_> = principal.scopes.iter().copied().collect();
    assert_eq!(
        scopes,
        HashSet::from([Scope::Admin, Scope::CommandsWrite, Scope::CommandsRead])
    );
    assert!(principal.has_scope(Scope::Admin) && !principal.has_scope(Scope::Agent));

    // Wrong secret with the right prefix, unknown prefix, malformed.
    let mut wrong = admin.token.expose_secret().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    for bad in [
        wrong.as_str(),
        "keel_zzzzzzzz_nope",
        "",
        "Bearer x",
        "keel_",
    ] {
        assert_eq!(store.authenticate(bad).await.unwrap(), None, "{bad}");
    }

    // Agent keys bind to an agent, created once by name.
    let agent_key = store
        .create_api_key(
            org,
            NewApiKey {
                name: "web-1".into(),
                scopes: vec![Scope::Agent],
                agent_name: Some("web-1".into()),
            },
        )
        .await
        .unwrap();
    let agent_id = agent_key.key.agent_id.unwrap();
    let p = store
        .authenticate(agent_key.token.expose_secret())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.agent_id, Some(agent_id));
    assert_eq!(p.scopes, vec![Scope::Agent]);
    let second = store
        .create_api_key(
            org,
            NewApiKey {
                name: "web-1 again".into(),
                scopes: vec![Scope::Agent],
                agent_name: Some("web-1".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(second.key.agent_id, Some(agent_id));
    assert_eq!(store.list_agents(org).await.unwrap().len(), 1);

    // Input the store refuses.
    for bad in [
        NewApiKey {
            name: "none".into(),
            scopes: vec![],
            agent_name: None,
        },
        NewApiKey {
            name: "agent without name".into(),
            scopes: vec![Scope::Agent],
            agent_name: None,
        },
        NewApiKey {
            name: "name without agent scope".into(),
            scopes: vec![Scope::CommandsRead],
            agent_name: Some("x".into()),
        },
    ] {
        assert!(matches!(
            store.create_api_key(org, bad).await,
            Err(StoreError::InvalidInput(_))
        ));
    }

    // Revoked keys stop authenticating; others are unaffected.
    clock.advance(secs(60));
    store.revoke_api_key(org, admin.key.id).await.unwrap();
    assert_eq!(
        store
            .authenticate(admin.token.expose_secret())
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .authenticate(agent_key.token.expose_secret())
            .await
            .unwrap()
            .is_some()
    );
    store.revoke_api_key(org, admin.key.id).await.unwrap();
    // Another organisation cannot revoke it.
    assert!(matches!(
        store.revoke_api_key(other, agent_key.key.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        store
            .authenticate(agent_key.token.expose_secret())
            .await
            .unwrap()
            .is_some()
    );

    let keys = store.list_api_keys(org).await.unwrap();
    assert_eq!(keys.len(), 3);
    let revoked = keys.iter().find(|k| k.id == admin.key.id).unwrap();
    assert_eq!(revoked.revoked_at, Some(START + secs(60)));
    assert!(store.list_api_keys(other).await.unwrap().is_empty());
}

pub async fn agent_check_in(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    let boot = Uuid::new_v4();
    let check_in = |boot_id| CheckIn {
        name: None,
        version: "1.2.3".into(),
        metadata: json!({"os": "linux"}),
        queues: queues(&["build", "deploy"]),
        boot_id,
        labels: None,
    };
    let before = store.get_agent(t.org, t.agent).await.unwrap().unwrap();
    assert_eq!(before.last_seen_at, None);
    assert_eq!(before.boot_count, 0);

    clock.advance(secs(10));
    let a = store
        .check_in(t.org, t.agent, check_in(boot))
        .await
        .unwrap();
    assert_eq!(a.last_seen_at, Some(START + secs(10)));
    assert_eq!(a.booted_at, Some(START + secs(10)));
    assert_eq!(a.boot_count, 1);
    assert_eq!(a.version.as_deref(), Some("1.2.3"));
    assert_eq!(a.metadata, json!({"os": "linux"}));
    assert_eq!(a.queues, queues(&["build", "deploy"]));

    // Same boot: only last seen moves.
    clock.advance(secs(10));
    let a = store
        .check_in(t.org, t.agent, check_in(boot))
        .await
        .unwrap();
    assert_eq!(a.last_seen_at, Some(START + secs(20)));
    assert_eq!(a.booted_at, Some(START + secs(10)));
    assert_eq!(a.boot_count, 1);

    // A new boot id: the agent restarted.
    clock.advance(secs(10));
    let a = store
        .check_in(t.org, t.agent, check_in(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(a.boot_count, 2);
    assert_eq!(a.booted_at, Some(START + secs(30)));

    let listed = store.list_agents(t.org).await.unwrap();
    assert_eq!(listed, vec![a]);

    // Not an object; another organisation's agent.
    let mut bad = check_in(boot);
    bad.metadata = json!([1]);
    assert!(matches!(
        store.check_in(t.org, t.agent, bad).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.check_in(t.org, other.agent, check_in(boot)).await,
        Err(StoreError::UnknownAgent)
    ));
    assert_eq!(store.get_agent(t.org, other.agent).await.unwrap(), None);
    let theirs = store
        .get_agent(other.org, other.agent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.last_seen_at, None);
}

// --- create ---

pub async fn idempotency(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    let idem = |hash: &str| {
        Some(Idempotency {
            key: "k1".into(),
            request_hash: hash.into(),
        })
    };
    let first = store
        .create_command(t.org, pooled("q"), idem("h1"))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.command.idempotency_key.as_deref(), Some("k1"));

    let again = store
        .create_command(t.org, pooled("q"), idem("h1"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.command, first.command);

    assert!(matches!(
        store
            .create_command(t.org, pooled("other"), idem("h2"))
            .await,
        Err(StoreError::IdempotencyMismatch)
    ));

    // Keys are per organisation.
    let theirs = store
        .create_command(other.org, pooled("q"), idem("h2"))
        .await
        .unwrap();
    assert!(theirs.created);
    assert_ne!(theirs.command.id, first.command.id);

    let page = store
        .list_commands(t.org, CommandFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);

    // Without a key, the same body creates a new command each time.
    let a = create(store, t.org, pooled("q")).await;
    let b = create(store, t.org, pooled("q")).await;
    assert_ne!(a, b);
}

pub async fn unknown_agent(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    for agent in [AgentId::new(), other.agent] {
        assert!(matches!(
            store.create_command(t.org, targeted(agent), None).await,
            Err(StoreError::UnknownAgent)
        ));
        assert!(matches!(
            store.claim(t.org, agent, &queues(&["q"]), 1).await,
            Err(StoreError::UnknownAgent)
        ));
    }
    let mut bad = pooled("q");
    bad.max_attempts = 0;
    assert!(matches!(
        store.create_command(t.org, bad, None).await,
        Err(StoreError::InvalidInput(_))
    ));
    let page = store
        .list_commands(t.org, CommandFilter::default(), None, 100)
        .await
        .unwrap();
    assert!(page.items.is_empty());
}

// --- claim ---

pub async fn claim_order(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut expected = Vec::new();
    // Created oldest first; priorities 0, 5, 0, 5, 10.
    let mut ids = Vec::new();
    for priority in [0, 5, 0, 5, 10] {
        let mut c = pooled("q");
        c.priority = priority;
        ids.push(create(store, t.org, c).await);
        clock.advance(secs(1));
    }
    expected.extend([ids[4], ids[1], ids[3], ids[0], ids[2]]);
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q"]), 10)
        .await
        .unwrap();
    let got: Vec<_> = claimed.iter().map(|c| c.command.id).collect();
    assert_eq!(got, expected);

    // One at a time gives the same order.
    let t2 = tenant(store, "beta").await;
    let mut ids = Vec::new();
    for priority in [1, 3, 2] {
        let mut c = pooled("q");
        c.priority = priority;
        ids.push(create(store, t2.org, c).await);
        clock.advance(secs(1));
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(claim_one(store, &t2, &["q"]).await.command.id);
    }
    assert_eq!(got, vec![ids[1], ids[2], ids[0]]);
}

pub async fn claim_limit(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    for _ in 0..7 {
        create(store, t.org, pooled("q")).await;
    }
    let q = queues(&["q"]);
    let first = store.claim(t.org, t.agent, &q, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    for c in &first {
        assert_eq!(c.command.status, CommandStatus::Executing);
        assert_eq!(c.command.attempts, 1);
        assert_eq!(c.command.claimed_by, Some(t.agent));
        assert_eq!(c.lease_expires_at, START + secs(300));
        assert_eq!(c.command.lease_expires_at, Some(c.lease_expires_at));
    }
    let tokens: HashSet<_> = first.iter().map(|c| c.claim_token.clone()).collect();
    assert_eq!(tokens.len(), 3, "every claim gets its own token");

    // 0 is raised to 1; more than 100 is capped.
    assert_eq!(store.claim(t.org, t.agent, &q, 0).await.unwrap().len(), 1);
    for _ in 0..150 {
        create(store, t.org, pooled("q")).await;
    }
    clock.advance(secs(1));
    assert_eq!(
        store.claim(t.org, t.agent, &q, 1000).await.unwrap().len(),
        100
    );
    assert_eq!(
        store.claim(t.org, t.agent, &q, 100).await.unwrap().len(),
        53
    );
    assert!(
        store
            .claim(t.org, t.agent, &q, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn claim_targeted_and_pooled(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let b = agent(store, t.org, "agent-2").await;
    let for_a = create(store, t.org, targeted(t.agent)).await;
    let for_b = create(store, t.org, targeted(b)).await;
    let on_build = create(store, t.org, pooled("build")).await;
    let on_deploy = create(store, t.org, pooled("deploy")).await;

    // A serves "build" only: its own targeted command and the "build" one.
    let a_got: HashSet<_> = store
        .claim(t.org, t.agent, &queues(&["build"]), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.command.id)
        .collect();
    assert_eq!(a_got, HashSet::from([for_a, on_build]));

    // B without queues: only its targeted command.
    let b_got: Vec<_> = store
        .claim(t.org, b, &[], 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.command.id)
        .collect();
    assert_eq!(b_got, vec![for_b]);

    let deploy = store.get_command(t.org, on_deploy).await.unwrap().unwrap();
    assert_eq!(deploy.status, CommandStatus::Pending);
    let b_got: Vec<_> = store
        .claim(t.org, b, &queues(&["deploy", "build"]), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.command.id)
        .collect();
    assert_eq!(b_got, vec![on_deploy]);
}

pub async fn claim_not_before_run_at(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let q = queues(&["q"]);
    assert_eq!(store.next_due_at(t.org, t.agent, &q).await.unwrap(), None);
    let mut later = pooled("q");
    later.run_at = Some(START + secs(60));
    let later = create(store, t.org, later).await;
    let mut latest = targeted(t.agent);
    latest.run_at = Some(START + secs(120));
    let latest = create(store, t.org, latest).await;
    // Not claimable by this agent: another queue.
    let mut elsewhere = pooled("elsewhere");
    elsewhere.run_at = Some(START + secs(30));
    create(store, t.org, elsewhere).await;

    assert!(
        store
            .claim(t.org, t.agent, &q, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.next_due_at(t.org, t.agent, &q).await.unwrap(),
        Some(START + secs(60))
    );

    clock.advance(secs(59));
    assert!(
        store
            .claim(t.org, t.agent, &q, 10)
            .await
            .unwrap()
            .is_empty()
    );
    clock.advance(secs(1));
    assert_eq!(claim_one(store, &t, &["q"]).await.command.id, later);
    assert_eq!(
        store.next_due_at(t.org, t.agent, &q).await.unwrap(),
        Some(START + secs(120))
    );
    clock.advance(secs(60));
    assert_eq!(claim_one(store, &t, &["q"]).await.command.id, latest);
    assert_eq!(store.next_due_at(t.org, t.agent, &q).await.unwrap(), None);
}

// --- fencing ---

pub async fn claim_token_completes_once(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    create(store, t.org, pooled("q")).await;
    let c = claim_one(store, &t, &["q"]).await;
    clock.advance(secs(5));
    let done = store
        .complete(
            t.org,
            t.agent,
            c.command.id,
            &c.claim_token,
            json!({"ok": true}),
        )
        .await
        .unwrap();
    assert_eq!(done.status, CommandStatus::Completed);
    assert_eq!(done.result, Some(json!({"ok": true})));
    assert_eq!(done.finished_at, Some(START + secs(5)));
    assert_eq!(done.lease_expires_at, None);
    assert_eq!(done.attempts, 1);

    let after = store
        .get_command(t.org, c.command.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, done);
    clock.advance(secs(5));
    assert!(matches!(
        store
            .complete(
                t.org,
                t.agent,
                c.command.id,
                &c.claim_token,
                json!({"ok": "again"})
            )
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .fail(
                t.org,
                t.agent,
                c.command.id,
                &c.claim_token,
                json!("x"),
                true
            )
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .heartbeat(t.org, t.agent, c.command.id, &c.claim_token, None)
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert_eq!(
        store
            .get_command(t.org, c.command.id)
            .await
            .unwrap()
            .unwrap(),
        done
    );
}

/// Many single creates at once, of two organisations, some naming an agent that is not theirs:
/// each gets its own answer (its command, in its organisation, or `UnknownAgent`), however the
/// store groups their writes, and exactly the accepted ones are stored.
pub async fn concurrent_creates_each_get_their_own_answer(store: &dyn Store, _clock: &ManualClock) {
    let a = tenant(store, "acme").await;
    let b = tenant(store, "beta").await;
    let creates = (0..120).map(|n| {
        let (org, command) = match n % 4 {
            0 => (a.org, pooled("q")),
            1 => (b.org, pooled("q")),
            2 => (a.org, targeted(a.agent)),
            // Beta's command naming acme's agent.
            _ => (b.org, targeted(a.agent)),
        };
        let mut command = command;
        command.params = json!({"n": n});
        async move { (n, org, store.create_command(org, command, None).await) }
    });
    let answers = futures::future::join_all(creates).await;
    let mut accepted = 0;
    for (n, org, answer) in answers {
        if n % 4 == 3 {
            assert!(
                matches!(answer, Err(StoreError::UnknownAgent)),
                "{n}: {answer:?}"
            );
            continue;
        }
        let created = answer.unwrap();
        assert!(created.created);
        assert_eq!(created.command.org_id, org);
        assert_eq!(created.command.params, json!({"n": n}));
        let stored = store.get_command(org, created.command.id).await.unwrap();
        assert_eq!(stored.map(|c| c.params), Some(json!({"n": n})));
        accepted += 1;
    }
    assert_eq!(accepted, 90);
    let counts = |org| async move {
        store
            .count_commands_by_status(org)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    assert_eq!(counts(a.org).await, 60);
    assert_eq!(counts(b.org).await, 30);
}

/// Reports sent at once, by agents of two organisations: each is fenced alone, whichever
/// others are written with it.
pub async fn concurrent_reports_each_get_their_own_answer(store: &dyn Store, _clock: &ManualClock) {
    let a = tenant(store, "acme").await;
    let b = tenant(store, "beta").await;
    // Another agent of each organisation.
    let a2 = agent(store, a.org, "agent-2").await;
    let b2 = agent(store, b.org, "agent-2").await;
    let mut claimed = Vec::new();
    for (t, second) in [(&a, a2), (&b, b2)] {
        for _ in 0..40 {
            create(store, t.org, pooled("q")).await;
        }
        let held = store
            .claim(t.org, t.agent, &queues(&["q"]), 40)
            .await
            .unwrap();
        assert_eq!(held.len(), 40);
        claimed.extend(held.into_iter().map(|c| (t.org, t.agent, second, c)));
    }
    // Per command n: 0 its holder's report; 1 a wrong token; 2 the other organisation's agent
    // naming it; 3 its holder's report, sent twice; 4 its holder's report and, with the same
    // token, another agent's of its organisation.
    let holder_completes = |n: usize| matches!(n % 5, 0 | 3 | 4);
    let mut reports = Vec::new();
    for (n, (org, agent, second, c)) in claimed.iter().enumerate() {
        let (id, token) = (c.command.id, c.claim_token.clone());
        let (other_org, other_agent) = if *org == a.org {
            (b.org, b.agent)
        } else {
            (a.org, a.agent)
        };
        let result = json!({"n": n});
        let stale = ClaimToken::from("stale".to_owned());
        match n % 5 {
            0 => reports.push((n, true, *org, *agent, id, token, result)),
            1 => reports.push((n, false, *org, *agent, id, stale, result)),
            2 => reports.push((n, false, other_org, other_agent, id, token, result)),
            3 => {
                reports.push((n, true, *org, *agent, id, token.clone(), result.clone()));
                reports.push((n, true, *org, *agent, id, token, result));
            }
            _ => {
                reports.push((
                    n,
                    false,
                    *org,
                    *second,
                    id,
                    token.clone(),
                    json!("not mine"),
                ));
                reports.push((n, true, *org, *agent, id, token, result));
            }
        }
    }
    let answers = futures::future::join_all(reports.into_iter().map(
        |(n, holder, org, agent, id, token, result)| async move {
            (
                n,
                holder,
                store.complete(org, agent, id, &token, result).await,
            )
        },
    ))
    .await;
    let mut completions = HashMap::new();
    for (n, holder, answer) in answers {
        match answer {
            Ok(command) => {
                assert!(holder, "{n}: only the holder completes");
                assert_eq!(command.status, CommandStatus::Completed);
                assert_eq!(command.result, Some(json!({"n": n})));
                *completions.entry(n).or_insert(0) += 1;
            }
            Err(StoreError::StaleClaim) => {
                assert!(n % 5 == 1 || n % 5 == 3 || (n % 5 == 4 && !holder), "{n}");
            }
            Err(StoreError::NotFound) => assert_eq!(n % 5, 2, "{n}"),
            Err(err) => panic!("{n}: {err:?}"),
        }
    }
    for (n, (org, _, _, c)) in claimed.iter().enumerate() {
        let expected = usize::from(holder_completes(n));
        assert_eq!(
            completions.get(&n).copied().unwrap_or(0),
            expected,
            "{n}: a token completes once"
        );
        let stored = store
            .get_command(*org, c.command.id)
            .await
            .unwrap()
            .unwrap();
        if holder_completes(n) {
            assert_eq!(stored.status, CommandStatus::Completed, "{n}");
            assert_eq!(stored.result, Some(json!({"n": n})), "{n}");
        } else {
            assert_eq!(stored.status, CommandStatus::Executing, "{n}");
        }
        let attempts = store.list_attempts(*org, c.command.id).await.unwrap();
        assert_eq!(attempts.len(), 1, "{n}");
    }
}

pub async fn complete_batch_fences_each_report(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    for n in 0..3 {
        create(store, t.org, pooled("q")).await;
        let _ = n;
    }
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q"]), 3)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let other = agent(store, t.org, "agent-2").await;
    let report = |c: &Claimed, token: &str| {
        (
            c.command.id,
            ClaimToken::from(token.to_owned()),
            json!({"ok": true}),
        )
    };
    let answers = store
        .complete_batch(
            t.org,
            t.agent,
            vec![
                report(&claimed[0], claimed[0].claim_token.as_str()),
                report(&claimed[1], "not-the-token"),
                report(&claimed[2], claimed[2].claim_token.as_str()),
                report(&claimed[0], claimed[0].claim_token.as_str()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(answers.len(), 4);
    assert_eq!(
        answers[0].as_ref().unwrap().status,
        CommandStatus::Completed
    );
    assert_eq!(
        answers[0].as_ref().unwrap().result,
        Some(json!({"ok": true}))
    );
    assert!(
        matches!(answers[1], Err(StoreError::StaleClaim)),
        "{:?}",
        answers[1]
    );
    assert_eq!(
        answers[2].as_ref().unwrap().status,
        CommandStatus::Completed
    );
    assert!(
        matches!(answers[3], Err(StoreError::StaleClaim)),
        "a token completes once"
    );
    // The stale report changed nothing; another agent cannot complete what it does not hold.
    let second = store
        .get_command(t.org, claimed[1].command.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.status, CommandStatus::Executing);
    let answers = store
        .complete_batch(
            t.org,
            other,
            vec![report(&claimed[1], claimed[1].claim_token.as_str())],
        )
        .await
        .unwrap();
    assert!(matches!(answers[0], Err(StoreError::StaleClaim)));
    // One completed attempt each.
    let attempts = store
        .list_attempts(t.org, claimed[0].command.id)
        .await
        .unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, Some(AttemptOutcome::Completed));
    // Too many at once is refused whole.
    let many = (0..=crate::MAX_CLAIM_BATCH)
        .map(|_| report(&claimed[1], claimed[1].claim_token.as_str()))
        .collect();
    assert!(matches!(
        store.complete_batch(t.org, t.agent, many).await,
        Err(StoreError::InvalidInput(_))
    ));
}

pub async fn stale_token_changes_nothing(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let id = create(store, t.org, pooled("q")).await;
    let first = claim_one(store, &t, &["q"]).await;

    // A made-up token, while the real claim is current.
    let wrong = ClaimToken("0123456789abcdef0123456789abcdef".into());
    let before = store.get_command(t.org, id).await.unwrap().unwrap();
    clock.advance(secs(1));
    assert!(matches!(
        store.complete(t.org, t.agent, id, &wrong, json!(1)).await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .fail(t.org, t.agent, id, &wrong, json!(1), false)
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .heartbeat(t.org, t.agent, id, &wrong, Some(json!(50)))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert_eq!(store.get_command(t.org, id).await.unwrap().unwrap(), before);

    // The lease expires and the command is claimed again: the first token is now stale.
    clock.advance(secs(300));
    assert_eq!(
        store
            .release_expired_leases(None, 1000)
            .await
            .unwrap()
            .len(),
        1
    );
    let second = claim_one(store, &t, &["q"]).await;
    assert_ne!(second.claim_token, first.claim_token);
    assert_eq!(second.command.attempts, 2);
    let before = store.get_command(t.org, id).await.unwrap().unwrap();
    clock.advance(secs(1));
    assert!(matches!(
        store
            .complete(t.org, t.agent, id, &first.claim_token, json!(1))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .fail(t.org, t.agent, id, &first.claim_token, json!(1), true)
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store
            .heartbeat(t.org, t.agent, id, &first.claim_token, None)
            .await,
        Err(StoreError::StaleClaim)
    ));
    let after = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(after.status, CommandStatus::Executing);
    assert_eq!(after.result, None);
    assert_eq!(after.attempts, 2);

    // A missing id is NotFound, not StaleClaim.
    assert!(matches!(
        store
            .complete(
                t.org,
                t.agent,
                CommandId::new(),
                &second.claim_token,
                json!(1)
            )
            .await,
        Err(StoreError::NotFound)
    ));
    store
        .complete(t.org, t.agent, id, &second.claim_token, json!(1))
        .await
        .unwrap();
}

pub async fn heartbeat_renews_lease(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut c = pooled("q");
    c.lease_duration = StdDuration::from_secs(30);
    let id = create(store, t.org, c).await;
    let claimed = claim_one(store, &t, &["q"]).await;
    assert_eq!(claimed.lease_expires_at, START + secs(30));

    clock.advance(secs(20));
    let lease = store
        .heartbeat(
            t.org,
            t.agent,
            id,
            &claimed.claim_token,
            Some(json!({"pct": 40})),
        )
        .await
        .unwrap();
    assert_eq!(lease.expires_at, START + secs(50));
    assert!(!lease.cancel_requested);

    // Past the first expiry, but the lease was renewed: nothing is released.
    clock.advance(secs(20));
    assert!(
        store
            .release_expired_leases(None, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    // A heartbeat without progress keeps the last one.
    store
        .heartbeat(t.org, t.agent, id, &claimed.claim_token, None)
        .await
        .unwrap();
    let c = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(c.progress, Some(json!({"pct": 40})));
    assert_eq!(c.lease_expires_at, Some(START + secs(70)));
    assert_eq!(c.status, CommandStatus::Executing);

    // Exactly at the expiry instant the lease still holds; just after, it is released.
    clock.set(START + secs(70));
    assert!(
        store
            .release_expired_leases(None, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    clock.advance(Duration::milliseconds(1));
    assert_eq!(
        store
            .release_expired_leases(None, 1000)
            .await
            .unwrap()
            .len(),
        1
    );
}

// --- fail and retry ---

pub async fn retryable_fail_backs_off(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut c = pooled("q");
    c.max_attempts = 3;
    let id = create(store, t.org, c).await;
    let q = queues(&["q"]);

    // Attempt 1 fails: back to pending, not due before half of 5 s, due by 5 s.
    let claimed = claim_one(store, &t, &["q"]).await;
    let failed = store
        .fail(
            t.org,
            t.agent,
            id,
            &claimed.claim_token,
            json!({"e": 1}),
            true,
        )
        .await
        .unwrap();
    assert_eq!(failed.status, CommandStatus::Pending);
    assert_eq!(failed.error, Some(json!({"e": 1})));
    assert_eq!(failed.lease_expires_at, None);
    assert_eq!(failed.finished_at, None);
    let delay = failed.run_at - START;
    assert!(
        delay >= Duration::milliseconds(2500) && delay <= secs(5),
        "{delay}"
    );
    assert!(store.claim(t.org, t.agent, &q, 1).await.unwrap().is_empty());
    assert_eq!(
        store.next_due_at(t.org, t.agent, &q).await.unwrap(),
        Some(failed.run_at)
    );
    // The old token cannot fail it again.
    assert!(matches!(
        store
            .fail(t.org, t.agent, id, &claimed.claim_token, json!(2), true)
            .await,
        Err(StoreError::StaleClaim)
    ));

    // Attempt 2 fails: the step doubles (5..10 s).
    clock.set(failed.run_at);
    let claimed = claim_one(store, &t, &["q"]).await;
    assert_eq!(claimed.command.attempts, 2);
    let failed = store
        .fail(
            t.org,
            t.agent,
            id,
            &claimed.claim_token,
            json!({"e": 2}),
            true,
        )
        .await
        .unwrap();
    let delay = failed.run_at - clock.now();
    assert_eq!(failed.status, CommandStatus::Pending);
    assert!(delay >= secs(5) && delay <= secs(10), "{delay}");

    // Attempt 3 is the last one: failed, for good.
    clock.set(failed.run_at);
    let claimed = claim_one(store, &t, &["q"]).await;
    assert_eq!(claimed.command.attempts, 3);
    let failed = store
        .fail(
            t.org,
            t.agent,
            id,
            &claimed.claim_token,
            json!({"e": 3}),
            true,
        )
        .await
        .unwrap();
    assert_eq!(failed.status, CommandStatus::Failed);
    assert_eq!(failed.attempts, 3);
    assert_eq!(failed.error, Some(json!({"e": 3})));
    assert_eq!(failed.finished_at, Some(clock.now()));
    clock.advance(secs(3600));
    assert!(store.claim(t.org, t.agent, &q, 1).await.unwrap().is_empty());
}

pub async fn non_retryable_fail(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let id = create(store, t.org, pooled("q")).await;
    let claimed = claim_one(store, &t, &["q"]).await;
    let failed = store
        .fail(
            t.org,
            t.agent,
            id,
            &claimed.claim_token,
            json!("bad params"),
            false,
        )
        .await
        .unwrap();
    assert_eq!(failed.status, CommandStatus::Failed);
    assert_eq!(failed.attempts, 1);

    // Requeue gives it a fresh start.
    let requeued = store.requeue(t.org, id).await.unwrap();
    assert_eq!(requeued.status, CommandStatus::Pending);
    assert_eq!(requeued.attempts, 0);
    assert_eq!(requeued.finished_at, None);
    assert_eq!(claim_one(store, &t, &["q"]).await.command.attempts, 1);
}

/// Counts by status are per organisation; finished commands are counted per minute and
/// status, every organisation together, from `since` on.
pub async fn status_counts_and_finished_per_minute(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    assert_eq!(store.count_commands_by_status(t.org).await.unwrap(), vec![]);
    for _ in 0..3 {
        create(store, t.org, pooled("q")).await;
    }
    create(store, other.org, pooled("q")).await;
    let first = claim_one(store, &t, &["q"]).await;
    store
        .complete(
            t.org,
            t.agent,
            first.command.id,
            &first.claim_token,
            json!(1),
        )
        .await
        .unwrap();
    clock.advance(secs(60));
    let second = claim_one(store, &t, &["q"]).await;
    store
        .fail(
            t.org,
            t.agent,
            second.command.id,
            &second.claim_token,
            json!("no"),
            false,
        )
        .await
        .unwrap();
    let third = claim_one(store, &other, &["q"]).await;
    store
        .complete(
            other.org,
            other.agent,
            third.command.id,
            &third.claim_token,
            json!(1),
        )
        .await
        .unwrap();

    assert_eq!(
        store.count_commands_by_status(t.org).await.unwrap(),
        vec![
            (CommandStatus::Pending, 1),
            (CommandStatus::Completed, 1),
            (CommandStatus::Failed, 1),
        ]
    );
    assert_eq!(
        store.count_commands_by_status(other.org).await.unwrap(),
        vec![(CommandStatus::Completed, 1)]
    );

    let minute = |n: i64| START + secs(60 * n);
    let counts = store.finished_per_minute(START).await.unwrap();
    let counted: Vec<_> = counts
        .iter()
        .map(|c| (c.minute, c.status, c.count))
        .collect();
    assert_eq!(
        counted,
        vec![
            (minute(0), CommandStatus::Completed, 1),
            (minute(1), CommandStatus::Completed, 1),
            (minute(1), CommandStatus::Failed, 1),
        ]
    );
    // Only from `since` on.
    let later = store.finished_per_minute(minute(1)).await.unwrap();
    assert_eq!(later.len(), 2);
    assert!(
        store
            .finished_per_minute(minute(2))
            .await
            .unwrap()
            .is_empty()
    );
}

// --- lease expiry ---

pub async fn lease_expiry_requeues(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let b = agent(store, t.org, "agent-2").await;
    let mut c = targeted(t.agent);
    c.lease_duration = StdDuration::from_secs(60);
    let for_a = create(store, t.org, c).await;
    let pooled_id = create(store, t.org, pooled("q")).await;
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q"]), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);

    // Only the 60 s lease has ended.
    clock.advance(secs(61));
    let released = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].command_id, for_a);
    assert_eq!(released[0].org_id, t.org);
    assert_eq!(released[0].attempts, 1);
    assert_eq!(released[0].outcome, ReleaseOutcome::Requeued);
    let c = store.get_command(t.org, for_a).await.unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Pending);
    assert_eq!(c.attempts, 1);
    assert_eq!(c.run_at, START + secs(61));
    assert_eq!(c.target, Target::Agent(t.agent));
    assert_eq!(c.lease_expires_at, None);

    // A targeted command stays with its agent: B cannot take it, A can.
    assert!(
        store
            .claim(t.org, b, &queues(&["q"]), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = claim_one(store, &t, &[]).await;
    assert_eq!(again.command.id, for_a);
    assert_eq!(again.command.attempts, 2);

    // The pooled one returns to the pool, where another agent can take it.
    clock.advance(secs(300));
    let released = store.release_expired_leases(None, 1000).await.unwrap();
    let ids: HashSet<_> = released.iter().map(|r| r.command_id).collect();
    assert_eq!(ids, HashSet::from([for_a, pooled_id]));
    let by_b = store.claim(t.org, b, &queues(&["q"]), 10).await.unwrap();
    assert_eq!(by_b.len(), 1);
    assert_eq!(by_b[0].command.id, pooled_id);
    assert_eq!(by_b[0].command.attempts, 2);
    assert_eq!(by_b[0].command.claimed_by, Some(b));
}

pub async fn only_the_holder_reports(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = agent(store, t.org, "agent-2").await;
    let id = create(store, t.org, pooled("q")).await;
    let claimed = claim_one(store, &t, &["q"]).await;
    let token = &claimed.claim_token;
    let before = store.get_command(t.org, id).await.unwrap().unwrap();

    // Another agent of the organisation, even with the right token, is refused.
    assert!(matches!(
        store
            .heartbeat(t.org, other, id, token, Some(json!(1)))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store.complete(t.org, other, id, token, json!("x")).await,
        Err(StoreError::StaleClaim)
    ));
    assert!(matches!(
        store.fail(t.org, other, id, token, json!("x"), false).await,
        Err(StoreError::StaleClaim)
    ));
    assert_eq!(store.get_command(t.org, id).await.unwrap().unwrap(), before);
    store
        .complete(t.org, t.agent, id, token, json!("ok"))
        .await
        .unwrap();
}

pub async fn release_scoped_to_one_org(store: &dyn Store, clock: &ManualClock) {
    let a = tenant(store, "acme").await;
    let b = tenant(store, "other").await;
    let mut c = targeted(a.agent);
    c.lease_duration = StdDuration::from_secs(60);
    let ours = create(store, a.org, c).await;
    let mut c = targeted(b.agent);
    c.lease_duration = StdDuration::from_secs(60);
    let theirs = create(store, b.org, c).await;
    claim_one(store, &a, &[]).await;
    claim_one(store, &b, &[]).await;
    clock.advance(secs(61));

    // Released for one organisation: the other's expired lease is left for its own turn.
    let released = store
        .release_expired_leases(Some(a.org), 1000)
        .await
        .unwrap();
    assert_eq!(
        released.iter().map(|r| r.command_id).collect::<Vec<_>>(),
        vec![ours]
    );
    let untouched = store.get_command(b.org, theirs).await.unwrap().unwrap();
    assert_eq!(untouched.status, CommandStatus::Executing);
    let released = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(
        released.iter().map(|r| r.command_id).collect::<Vec<_>>(),
        vec![theirs]
    );
}

pub async fn check_in_never_renames(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let named = store.get_agent(t.org, t.agent).await.unwrap().unwrap().name;
    let check_in = |name: Option<&str>| CheckIn {
        name: name.map(str::to_owned),
        version: "1".into(),
        metadata: json!({}),
        queues: Vec::new(),
        boot_id: Uuid::new_v4(),
        labels: None,
    };
    let same = store
        .check_in(t.org, t.agent, check_in(Some(&named)))
        .await
        .unwrap();
    assert_eq!(same.name, named);
    assert!(matches!(
        store
            .check_in(t.org, t.agent, check_in(Some("someone-else")))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    let after = store.get_agent(t.org, t.agent).await.unwrap().unwrap();
    assert_eq!(after.name, named);
    assert_eq!(
        after.boot_id, same.boot_id,
        "a refused check-in changes nothing"
    );
}

pub async fn lease_expiry_dead_and_requeue(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut c = pooled("q");
    c.max_attempts = 2;
    c.lease_duration = StdDuration::from_secs(10);
    let id = create(store, t.org, c).await;

    claim_one(store, &t, &["q"]).await;
    clock.advance(secs(11));
    let r = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(r[0].outcome, ReleaseOutcome::Requeued);

    claim_one(store, &t, &["q"]).await;
    clock.advance(secs(11));
    let r = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].outcome, ReleaseOutcome::Dead);
    assert_eq!(r[0].attempts, 2);
    let dead = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(dead.status, CommandStatus::Dead);
    assert_eq!(dead.dead_reason, Some(DeadReason::LeaseExpired));
    assert_eq!(dead.finished_at, Some(clock.now()));
    assert!(
        store
            .claim(t.org, t.agent, &queues(&["q"]), 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .release_expired_leases(None, 1000)
            .await
            .unwrap()
            .is_empty()
    );

    let page = store.list_dead(t.org, None, 10).await.unwrap();
    assert_eq!(page.items, vec![dead]);
    assert_eq!(page.next_cursor, None);

    // Requeue: pending, due now, attempts and reason reset.
    clock.advance(secs(100));
    let requeued = store.requeue(t.org, id).await.unwrap();
    assert_eq!(requeued.status, CommandStatus::Pending);
    assert_eq!(requeued.attempts, 0);
    assert_eq!(requeued.dead_reason, None);
    assert_eq!(requeued.run_at, clock.now());
    assert!(
        store
            .list_dead(t.org, None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(matches!(
        store.requeue(t.org, id).await,
        Err(StoreError::InvalidState(_))
    ));
    let c = claim_one(store, &t, &["q"]).await;
    assert_eq!(c.command.attempts, 1);
    assert!(matches!(
        store.requeue(t.org, id).await,
        Err(StoreError::InvalidState(_))
    ));
}

// --- cancel ---

pub async fn cancel(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let pending = create(store, t.org, targeted(t.agent)).await;
    let c = store.cancel_command(t.org, pending).await.unwrap();
    assert_eq!(c.status, CommandStatus::Cancelled);
    assert_eq!(c.finished_at, Some(START));
    assert!(
        store
            .claim(t.org, t.agent, &[], 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.cancel_command(t.org, pending).await,
        Err(StoreError::InvalidState(_))
    ));

    // Executing: only a request, seen by the agent on its next heartbeat.
    let running = create(store, t.org, targeted(t.agent)).await;
    let claimed = claim_one(store, &t, &[]).await;
    let c = store.cancel_command(t.org, running).await.unwrap();
    assert_eq!(c.status, CommandStatus::Executing);
    assert!(c.cancel_requested);
    // Asking twice is harmless.
    store.cancel_command(t.org, running).await.unwrap();
    clock.advance(secs(1));
    let lease = store
        .heartbeat(t.org, t.agent, running, &claimed.claim_token, None)
        .await
        .unwrap();
    assert!(lease.cancel_requested);
    // The agent stops and reports a (retryable) failure: the command ends cancelled.
    let c = store
        .fail(
            t.org,
            t.agent,
            running,
            &claimed.claim_token,
            json!("stopped"),
            true,
        )
        .await
        .unwrap();
    assert_eq!(c.status, CommandStatus::Cancelled);
    assert_eq!(c.finished_at, Some(clock.now()));

    // Cancel requested and the lease expires: cancelled, not requeued.
    let lost = create(store, t.org, targeted(t.agent)).await;
    claim_one(store, &t, &[]).await;
    store.cancel_command(t.org, lost).await.unwrap();
    clock.advance(secs(301));
    let r = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].outcome, ReleaseOutcome::Cancelled);
    let c = store.get_command(t.org, lost).await.unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Cancelled);

    // Cancel requested, but the agent finished anyway: the result is kept.
    let finished = create(store, t.org, targeted(t.agent)).await;
    let claimed = claim_one(store, &t, &[]).await;
    store.cancel_command(t.org, finished).await.unwrap();
    let c = store
        .complete(
            t.org,
            t.agent,
            finished,
            &claimed.claim_token,
            json!("done"),
        )
        .await
        .unwrap();
    assert_eq!(c.status, CommandStatus::Completed);
    assert!(matches!(
        store.cancel_command(t.org, finished).await,
        Err(StoreError::InvalidState(_))
    ));
    assert!(matches!(
        store.cancel_command(t.org, CommandId::new()).await,
        Err(StoreError::NotFound)
    ));
}

// --- isolation ---

pub async fn org_isolation(store: &dyn Store, clock: &ManualClock) {
    let a = tenant(store, "a").await;
    let b = tenant(store, "b").await;
    // B's commands: one pooled on a queue name A also serves, one dead.
    let b_pooled = create(store, b.org, pooled("shared")).await;
    let mut short = pooled("shared");
    short.max_attempts = 1;
    short.lease_duration = StdDuration::from_secs(1);
    let b_dead = create(store, b.org, short).await;
    let mut b_claims = store
        .claim(b.org, b.agent, &queues(&["shared"]), 10)
        .await
        .unwrap();
    b_claims.sort_by_key(|c| c.command.id);
    assert_eq!(b_claims.len(), 2);
    clock.advance(secs(2));
    let released = store.release_expired_leases(None, 1000).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].org_id, b.org);
    let b_running = b_claims.iter().find(|c| c.command.id == b_pooled).unwrap();
    let b_pending = create(store, b.org, pooled("shared")).await;

    let snapshot = |id| async move { store.get_command(b.org, id).await.unwrap().unwrap() };
    let before = [
        snapshot(b_pooled).await,
        snapshot(b_dead).await,
        snapshot(b_pending).await,
    ];

    // A sees none of them, claims none of them, and touches none of them.
    for id in [b_pooled, b_dead, b_pending] {
        assert_eq!(store.get_command(a.org, id).await.unwrap(), None);
        assert!(matches!(
            store.cancel_command(a.org, id).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.requeue(a.org, id).await,
            Err(StoreError::NotFound)
        ));
    }
    assert!(
        store
            .claim(a.org, a.agent, &queues(&["shared"]), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .next_due_at(a.org, a.agent, &queues(&["shared"]))
            .await
            .unwrap(),
        None
    );
    let token = &b_running.claim_token;
    assert!(matches!(
        store
            .heartbeat(a.org, a.agent, b_pooled, token, Some(json!(1)))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .complete(a.org, a.agent, b_pooled, token, json!(1))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .fail(a.org, a.agent, b_pooled, token, json!(1), false)
            .await,
        Err(StoreError::NotFound)
    ));
    // B's agent, claiming in A's organisation, is unknown there.
    assert!(matches!(
        store.claim(a.org, b.agent, &queues(&["shared"]), 10).await,
        Err(StoreError::UnknownAgent)
    ));
    assert!(
        store
            .list_commands(a.org, CommandFilter::default(), None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        store
            .list_dead(a.org, None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    let after = [
        snapshot(b_pooled).await,
        snapshot(b_dead).await,
        snapshot(b_pending).await,
    ];
    assert_eq!(before, after);
    assert_eq!(after[1].status, CommandStatus::Dead);

    // B still owns them.
    store
        .complete(b.org, b.agent, b_pooled, token, json!("ok"))
        .await
        .unwrap();
    assert_eq!(
        store
            .claim(b.org, b.agent, &queues(&["shared"]), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

// --- listing ---

pub async fn list_commands(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut c = if i % 2 == 0 {
            pooled("build")
        } else {
            targeted(t.agent)
        };
        if i == 3 {
            c.command_type = "deploy".into();
        }
        ids.push(create(store, t.org, c).await);
    }
    let newest_first: Vec<_> = ids.iter().rev().copied().collect();

    let mut got = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_commands(t.org, CommandFilter::default(), cursor, 3)
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        got.extend(page.items.iter().map(|c| c.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(got, newest_first);

    let list = |filter: CommandFilter| async move {
        store
            .list_commands(t.org, filter, None, 100)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(CommandFilter {
            queue: Some("build".into()),
            ..CommandFilter::default()
        })
        .await,
        vec![ids[6], ids[4], ids[2], ids[0]]
    );
    assert_eq!(
        list(CommandFilter {
            agent: Some(t.agent),
            ..CommandFilter::default()
        })
        .await,
        vec![ids[5], ids[3], ids[1]]
    );
    assert_eq!(
        list(CommandFilter {
            command_type: Some("deploy".into()),
            ..CommandFilter::default()
        })
        .await,
        vec![ids[3]]
    );
    claim_one(store, &t, &[]).await;
    assert_eq!(
        list(CommandFilter {
            status: Some(CommandStatus::Executing),
            agent: Some(t.agent),
            ..CommandFilter::default()
        })
        .await,
        vec![ids[1]]
    );
    assert_eq!(
        list(CommandFilter {
            status: Some(CommandStatus::Completed),
            ..CommandFilter::default()
        })
        .await,
        Vec::<CommandId>::new()
    );
}

// --- queue core: order, attempts, hand-back, batches, retention ---

/// Within one priority, the command due first is claimed first, whatever the creation order.
pub async fn claim_order_by_due_time(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut later = pooled("q");
    later.run_at = Some(START + secs(20));
    let later = create(store, t.org, later).await;
    let mut sooner = pooled("q");
    sooner.run_at = Some(START + secs(10));
    let sooner = create(store, t.org, sooner).await;
    let mut urgent = pooled("q");
    urgent.run_at = Some(START + secs(30));
    urgent.priority = 1;
    let urgent = create(store, t.org, urgent).await;
    clock.advance(secs(60));
    let got: Vec<_> = store
        .claim(t.org, t.agent, &queues(&["q"]), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.command.id)
        .collect();
    assert_eq!(got, vec![urgent, sooner, later]);
}

/// Every attempt is kept with its agent, times, outcome and error, across requeues.
pub async fn attempts_are_kept(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = agent(store, t.org, "agent-2").await;
    let mut command = pooled("q");
    command.max_attempts = 3;
    let id = create(store, t.org, command).await;
    assert!(store.list_attempts(t.org, id).await.unwrap().is_empty());

    // 1: fails, retryable.
    let c = claim_one(store, &t, &["q"]).await;
    clock.advance(secs(1));
    store
        .fail(t.org, t.agent, id, &c.claim_token, json!({"n": 1}), true)
        .await
        .unwrap();
    // 2: its lease expires (claimed by the second agent).
    clock.advance(secs(3600));
    let c2 = store
        .claim(t.org, other, &queues(&["q"]), 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(c2.command.id, id);
    let running = store.list_attempts(t.org, id).await.unwrap();
    assert_eq!(running.len(), 2);
    assert_eq!(running[1].outcome, None);
    assert_eq!(running[1].ended_at, None);
    clock.advance(secs(301));
    store.release_expired_leases(None, 1000).await.unwrap();
    // 3: fails for good.
    let c3 = claim_one(store, &t, &["q"]).await;
    store
        .fail(t.org, t.agent, id, &c3.claim_token, json!({"n": 3}), false)
        .await
        .unwrap();
    // Requeued: its attempts start over, its history stays; 4: completes.
    store.requeue(t.org, id).await.unwrap();
    let c4 = claim_one(store, &t, &["q"]).await;
    assert_eq!(c4.command.attempts, 1);
    store
        .complete(t.org, t.agent, id, &c4.claim_token, json!("ok"))
        .await
        .unwrap();

    let attempts = store.list_attempts(t.org, id).await.unwrap();
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| (a.number, a.agent_id, a.outcome, a.error.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                1,
                t.agent,
                Some(AttemptOutcome::Retry),
                Some(json!({"n": 1}))
            ),
            (2, other, Some(AttemptOutcome::LeaseExpired), None),
            (
                3,
                t.agent,
                Some(AttemptOutcome::Failed),
                Some(json!({"n": 3}))
            ),
            (4, t.agent, Some(AttemptOutcome::Completed), None),
        ]
    );
    assert_eq!(attempts[0].claimed_at, START);
    assert_eq!(attempts[0].ended_at, Some(START + secs(1)));
    assert!(attempts.iter().all(|a| a.ended_at.is_some()));
    // Another organisation sees none of them.
    let b = tenant(store, "beta").await;
    assert!(store.list_attempts(b.org, id).await.unwrap().is_empty());
}

/// A claim handed back is as if it never happened: pending, attempts and history unchanged;
/// a stale token or another agent hands back nothing.
pub async fn hand_back_restores_the_claim(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = agent(store, t.org, "agent-2").await;
    let id = create(store, t.org, pooled("q")).await;
    let c = claim_one(store, &t, &["q"]).await;
    assert_eq!(
        store
            .hand_back(t.org, other, vec![(id, c.claim_token.clone())])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .hand_back(t.org, t.agent, vec![(id, ClaimToken("stale".into()))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .hand_back(t.org, t.agent, vec![(id, c.claim_token.clone())])
            .await
            .unwrap(),
        1
    );
    let command = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(command.status, CommandStatus::Pending);
    assert_eq!(command.attempts, 0);
    assert!(store.list_attempts(t.org, id).await.unwrap().is_empty());
    // The old token is dead; the command is claimable again at once.
    assert!(matches!(
        store
            .complete(t.org, t.agent, id, &c.claim_token, json!(null))
            .await,
        Err(StoreError::StaleClaim)
    ));
    assert_eq!(claim_one(store, &t, &["q"]).await.command.attempts, 1);

    // A cancel asked while it was claimed holds: handed back, it ends cancelled.
    let doomed = create(store, t.org, pooled("q2")).await;
    let c = claim_one(store, &t, &["q2"]).await;
    store.cancel_command(t.org, doomed).await.unwrap();
    assert_eq!(
        store
            .hand_back(t.org, t.agent, vec![(doomed, c.claim_token)])
            .await
            .unwrap(),
        0
    );
    let command = store.get_command(t.org, doomed).await.unwrap().unwrap();
    assert_eq!(command.status, CommandStatus::Cancelled);
    let attempts = store.list_attempts(t.org, doomed).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, Some(AttemptOutcome::Cancelled));
}

/// Commands not yet due, at a higher priority, neither hide the due ones nor are claimed early;
/// once due, they go first.
pub async fn scheduled_commands_wait_their_turn(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut later = Vec::new();
    for _ in 0..50 {
        let mut c = pooled("q");
        c.priority = 5;
        c.run_at = Some(START + secs(60));
        later.push(create(store, t.org, c).await);
    }
    let due = create(store, t.org, pooled("q")).await;
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q"]), 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.command.id).collect::<Vec<_>>(),
        vec![due]
    );
    assert_eq!(
        store
            .next_due_at(t.org, t.agent, &queues(&["q"]))
            .await
            .unwrap(),
        Some(START + secs(60))
    );
    clock.advance(secs(60));
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q"]), 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 50);
    assert!(claimed.iter().all(|c| c.command.priority == 5));
    // A retry waits out its backoff the same way.
    let first = &claimed[0];
    store
        .fail(
            t.org,
            t.agent,
            first.command.id,
            &first.claim_token,
            json!("x"),
            true,
        )
        .await
        .unwrap();
    assert!(
        store
            .claim(t.org, t.agent, &queues(&["q"]), 1)
            .await
            .unwrap()
            .is_empty()
    );
    clock.advance(secs(10));
    assert_eq!(
        claim_one(store, &t, &["q"]).await.command.id,
        first.command.id
    );
}

/// Naming a queue twice claims as much as naming it once.
pub async fn claim_with_a_queue_named_twice(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    for _ in 0..3 {
        create(store, t.org, pooled("q")).await;
    }
    let claimed = store
        .claim(t.org, t.agent, &queues(&["q", "q"]), 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert_ne!(claimed[0].command.id, claimed[1].command.id);
}

/// A batch is created whole, in order, or not at all.
pub async fn batch_create_is_all_or_nothing(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let item = |command: NewCommand, key: Option<&str>| NewCommandItem {
        command,
        idempotency: key.map(|key| Idempotency {
            key: key.to_owned(),
            request_hash: "h".to_owned(),
        }),
    };
    let created = store
        .create_commands(
            t.org,
            vec![
                item(pooled("a"), Some("k1")),
                item(targeted(t.agent), None),
                item(pooled("b"), None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(created.len(), 3);
    assert!(created.iter().all(|c| c.created));
    assert_eq!(created[0].command.target, Target::Queue("a".into()));
    assert_eq!(created[2].command.target, Target::Queue("b".into()));

    // A bad item (an agent of no organisation) stops the whole batch: nothing is created.
    let before = store
        .list_commands(t.org, CommandFilter::default(), None, 100)
        .await
        .unwrap()
        .items
        .len();
    let err = store
        .create_commands(
            t.org,
            vec![
                item(pooled("c"), Some("k2")),
                item(targeted(AgentId::new()), None),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownAgent), "{err:?}");
    let after = store
        .list_commands(t.org, CommandFilter::default(), None, 100)
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(before, after);
    // The key of the refused batch is free; the key of the accepted one replays.
    let again = store
        .create_commands(
            t.org,
            vec![item(pooled("c"), Some("k2")), item(pooled("a"), Some("k1"))],
        )
        .await
        .unwrap();
    assert!(again[0].created);
    assert!(!again[1].created);
    assert_eq!(again[1].command.id, created[0].command.id);
}

/// Release hands back at most `limit` leases per call, earliest expiry first.
pub async fn release_in_bounded_batches(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut c = pooled("q");
        c.lease_duration = StdDuration::from_secs(10 + n);
        ids.push(create(store, t.org, c).await);
    }
    store
        .claim(t.org, t.agent, &queues(&["q"]), 10)
        .await
        .unwrap();
    clock.advance(secs(60));
    let first = store.release_expired_leases(None, 2).await.unwrap();
    let mut first_ids: Vec<_> = first.iter().map(|r| r.command_id).collect();
    first_ids.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(first_ids, expected);
    assert_eq!(
        store.release_expired_leases(None, 2).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.release_expired_leases(None, 2).await.unwrap().len(),
        1
    );
    assert!(
        store
            .release_expired_leases(None, 2)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Retention deletes finished commands older than the cut-off, oldest first, in batches, with
/// their attempts and idempotency keys; pending and executing ones stay.
pub async fn purge_finished_commands(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let keyed = store
        .create_command(
            t.org,
            pooled("q"),
            Some(Idempotency {
                key: "once".into(),
                request_hash: "h".into(),
            }),
        )
        .await
        .unwrap()
        .command
        .id;
    let c = claim_one(store, &t, &["q"]).await;
    store
        .complete(t.org, t.agent, keyed, &c.claim_token, json!(1))
        .await
        .unwrap();
    let cancelled = create(store, t.org, pooled("q")).await;
    store.cancel_command(t.org, cancelled).await.unwrap();
    clock.advance(secs(100));
    let recent = create(store, t.org, pooled("q")).await;
    store.cancel_command(t.org, recent).await.unwrap();
    let pending = create(store, t.org, pooled("other")).await;
    let running = create(store, t.org, pooled("q")).await;
    claim_one(store, &t, &["q"]).await;

    let cut = START + secs(50);
    assert_eq!(store.purge_finished(cut, 1).await.unwrap(), 1);
    assert_eq!(store.purge_finished(cut, 1).await.unwrap(), 1);
    assert_eq!(store.purge_finished(cut, 1).await.unwrap(), 0);
    for gone in [keyed, cancelled] {
        assert_eq!(store.get_command(t.org, gone).await.unwrap(), None);
        assert!(store.list_attempts(t.org, gone).await.unwrap().is_empty());
    }
    for kept in [recent, pending, running] {
        assert!(store.get_command(t.org, kept).await.unwrap().is_some());
    }
    // The idempotency key went with its command: the same key creates a new one.
    let again = store
        .create_command(
            t.org,
            pooled("q"),
            Some(Idempotency {
                key: "once".into(),
                request_hash: "h".into(),
            }),
        )
        .await
        .unwrap();
    assert!(again.created);
    assert_ne!(again.command.id, keyed);
}

// --- concurrency ---

/// Four tasks claim from 200 pooled commands at once: each command is claimed exactly once.
pub async fn concurrent_claims(store: Arc<dyn Store>, _clock: &ManualClock) {
    let t = tenant(&*store, "acme").await;
    let mut agents = vec![t.agent];
    for i in 2..=4 {
        agents.push(agent(&*store, t.org, &format!("agent-{i}")).await);
    }
    let mut created = HashSet::new();
    for _ in 0..200 {
        created.insert(create(&*store, t.org, pooled("q")).await);
    }
    let tasks: Vec<_> = agents
        .into_iter()
        .map(|agent| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store
                        .claim(t.org, agent, &["q".to_owned()], 7)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    for c in batch {
                        assert_eq!(c.command.claimed_by, Some(agent));
                        store
                            .complete(t.org, agent, c.command.id, &c.claim_token, json!(null))
                            .await
                            .unwrap();
                        mine.push(c.command.id);
                    }
                }
                mine
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(claimed.len(), 200, "no command claimed twice");
    let unique: HashSet<_> = claimed.into_iter().collect();
    assert_eq!(unique, created);
    let done = store
        .list_commands(
            t.org,
            CommandFilter {
                status: Some(CommandStatus::Completed),
                ..CommandFilter::default()
            },
            None,
            500,
        )
        .await
        .unwrap();
    assert_eq!(done.items.len(), 200);
    assert!(done.items.iter().all(|c| c.attempts == 1));
}
