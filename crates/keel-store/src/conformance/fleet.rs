//! Fleet operations: labels, cordons, paused queues and broadcasts.

use serde_json::json;
use uuid::Uuid;

use super::{START, agent, claim_one, create, pooled, queues, secs, targeted, tenant};
use crate::labels::Labels;
use crate::{
    AgentId, CheckIn, Claimed, CommandStatus, Idempotency, ManualClock, NewBroadcast, NewCommand,
    OrgId, Store, StoreError, Target,
};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn check_in_with(labels: Option<Labels>) -> CheckIn {
    CheckIn {
        name: None,
        version: "1".into(),
        metadata: json!({}),
        queues: Vec::new(),
        boot_id: Uuid::new_v4(),
        labels,
    }
}

fn broadcast(agents: Vec<AgentId>, max_concurrency: Option<u32>) -> NewBroadcast {
    NewBroadcast {
        command: NewCommand::new(
            "restart",
            Target::Broadcast("env=prod".into()),
            json!({"n": 1}),
        ),
        online_only: true,
        max_concurrency,
        agents,
    }
}

/// Claims what `agent` may take now (targeted only) and completes it.
async fn run_targeted(store: &dyn Store, org: OrgId, agent: AgentId) -> usize {
    let claimed = store.claim(org, agent, &[], 10).await.unwrap();
    for c in &claimed {
        store
            .complete(
                org,
                agent,
                c.command.id,
                &c.claim_token,
                json!({"ok": true}),
            )
            .await
            .unwrap();
    }
    claimed.len()
}

pub async fn agent_labels(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    let reported = labels(&[("env", "prod"), ("os", "linux")]);
    let a = store
        .check_in(t.org, t.agent, check_in_with(Some(reported.clone())))
        .await
        .unwrap();
    assert_eq!(a.reported_labels, reported);
    // A check-in without labels keeps them.
    let a = store
        .check_in(t.org, t.agent, check_in_with(None))
        .await
        .unwrap();
    assert_eq!(a.reported_labels, reported);

    // Assigned labels win over reported ones on a shared key, and survive check-ins.
    let a = store
        .set_agent_labels(
            t.org,
            t.agent,
            labels(&[("env", "staging"), ("rack", "r1")]),
        )
        .await
        .unwrap();
    assert_eq!(
        a.labels(),
        labels(&[("env", "staging"), ("os", "linux"), ("rack", "r1")])
    );
    let a = store
        .check_in(
            t.org,
            t.agent,
            check_in_with(Some(labels(&[("os", "bsd")]))),
        )
        .await
        .unwrap();
    assert_eq!(
        a.labels(),
        labels(&[("env", "staging"), ("os", "bsd"), ("rack", "r1")])
    );

    // Invalid labels change nothing.
    assert!(matches!(
        store
            .set_agent_labels(t.org, t.agent, labels(&[("bad key", "x")]))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store
            .check_in(t.org, t.agent, check_in_with(Some(labels(&[("k", "-v")]))))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    let a = store.get_agent(t.org, t.agent).await.unwrap().unwrap();
    assert_eq!(a.reported_labels, labels(&[("os", "bsd")]));

    // Another organisation's agent is not found.
    assert!(matches!(
        store
            .set_agent_labels(other.org, t.agent, labels(&[("a", "b")]))
            .await,
        Err(StoreError::NotFound)
    ));
}

pub async fn cordoned_agent_claims_nothing_new(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other_agent = agent(store, t.org, "agent-2").await;
    let running = create(store, t.org, targeted(t.agent)).await;
    let claimed = claim_one(store, &t, &[]).await;
    assert_eq!(claimed.command.id, running);

    let waiting = create(store, t.org, targeted(t.agent)).await;
    create(store, t.org, pooled("q")).await;
    let a = store
        .set_agent_cordoned(t.org, t.agent, true)
        .await
        .unwrap();
    assert_eq!(a.cordoned_at, Some(START));
    clock.advance(secs(5));
    // Cordoning twice keeps the first time.
    let a = store
        .set_agent_cordoned(t.org, t.agent, true)
        .await
        .unwrap();
    assert_eq!(a.cordoned_at, Some(START));

    // Nothing new: neither its own commands nor the pool's; the long poll has nothing to wait for.
    assert!(
        store
            .claim(t.org, t.agent, &queues(&["q"]), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .next_due_at(t.org, t.agent, &queues(&["q"]))
            .await
            .unwrap(),
        None
    );
    // What it runs finishes.
    store
        .heartbeat(t.org, t.agent, running, &claimed.claim_token, None)
        .await
        .unwrap();
    store
        .complete(t.org, t.agent, running, &claimed.claim_token, json!({}))
        .await
        .unwrap();
    // Pooled work goes to another agent.
    let pool = store
        .claim(t.org, other_agent, &queues(&["q"]), 10)
        .await
        .unwrap();
    assert_eq!(pool.len(), 1);

    // Uncordoned: its targeted command is handed out.
    let a = store
        .set_agent_cordoned(t.org, t.agent, false)
        .await
        .unwrap();
    assert_eq!(a.cordoned_at, None);
    let claimed = claim_one(store, &t, &[]).await;
    assert_eq!(claimed.command.id, waiting);
    assert_eq!(store.count_cordoned_and_paused().await.unwrap(), (0, 0));

    let outsider = tenant(store, "other").await;
    assert!(matches!(
        store.set_agent_cordoned(outsider.org, t.agent, true).await,
        Err(StoreError::NotFound)
    ));
}

pub async fn paused_queue_hands_out_nothing(store: &dyn Store, clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    for _ in 0..3 {
        create(store, t.org, pooled("deploy")).await;
    }
    create(store, t.org, pooled("build")).await;
    create(store, other.org, pooled("deploy")).await;
    let mine = create(store, t.org, targeted(t.agent)).await;

    let paused = store.pause_queue(t.org, "deploy").await.unwrap();
    assert_eq!((paused.queue.as_str(), paused.paused_at), ("deploy", START));
    clock.advance(secs(1));
    assert_eq!(
        store.pause_queue(t.org, "deploy").await.unwrap().paused_at,
        START,
        "pausing twice keeps the first time"
    );
    assert!(matches!(
        store.pause_queue(t.org, "").await,
        Err(StoreError::InvalidInput(_))
    ));
    // Creates are still accepted.
    create(store, t.org, pooled("deploy")).await;
    assert_eq!(store.count_cordoned_and_paused().await.unwrap(), (0, 1));

    // The agent's own commands and other queues still flow; the paused one gives nothing.
    let claimed = store
        .claim(t.org, t.agent, &queues(&["deploy", "build"]), 10)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|c| c.command.id).collect();
    assert_eq!(claimed.len(), 2, "{ids:?}");
    assert!(ids.contains(&mine));
    assert!(
        claimed
            .iter()
            .all(|c| c.command.target != Target::Queue("deploy".into()))
    );
    // Another organisation's queue of the same name is not paused.
    assert_eq!(
        store
            .claim(other.org, other.agent, &queues(&["deploy"]), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let listed = store.list_paused_queues(t.org).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        store
            .list_paused_queues(other.org)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!store.resume_queue(other.org, "deploy").await.unwrap());

    // Resumed: everything.
    assert!(store.resume_queue(t.org, "deploy").await.unwrap());
    assert!(!store.resume_queue(t.org, "deploy").await.unwrap());
    let claimed = store
        .claim(t.org, t.agent, &queues(&["deploy"]), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
}

pub async fn broadcast_reaches_each_agent_once(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let agents = vec![
        t.agent,
        agent(store, t.org, "agent-2").await,
        agent(store, t.org, "agent-3").await,
    ];
    let bystander = agent(store, t.org, "agent-4").await;
    let created = store
        .create_broadcast(t.org, broadcast(agents.clone(), None), None)
        .await
        .unwrap();
    assert!(created.created);
    let parent = created.command;
    assert_eq!(parent.target, Target::Broadcast("env=prod".into()));
    assert_eq!(parent.status, CommandStatus::Pending);
    let spec = parent.broadcast.clone().unwrap();
    assert_eq!(spec.agents, agents);
    assert!(spec.online_only);

    let children = store.list_children(t.org, parent.id).await.unwrap();
    assert_eq!(children.len(), 3);
    for (child, agent) in children.iter().zip(&agents) {
        assert_eq!(child.target, Target::Agent(*agent));
        assert_eq!(child.parent_id, Some(parent.id));
        assert_eq!(child.params, json!({"n": 1}));
        assert_eq!(child.command_type, "restart");
    }
    // Nobody claims the parent; the bystander gets nothing.
    assert_eq!(run_targeted(store, t.org, bystander).await, 0);
    for agent in &agents[..2] {
        assert_eq!(run_targeted(store, t.org, *agent).await, 1);
        assert_eq!(run_targeted(store, t.org, *agent).await, 0);
    }
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Pending);
    assert_eq!(run_targeted(store, t.org, agents[2]).await, 1);
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Completed);
    assert!(parent_now.finished_at.is_some());
    let children = store.list_children(t.org, parent.id).await.unwrap();
    assert!(
        children
            .iter()
            .all(|c| c.status == CommandStatus::Completed && c.result == Some(json!({"ok": true})))
    );

    // Another organisation sees neither the parent nor its children.
    let other = tenant(store, "other").await;
    assert!(
        store
            .get_command(other.org, parent.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .list_children(other.org, parent.id)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Every agent claims what it may take now (targeted only): only children with a slot are
/// handed out, some and at most `max_concurrency`.
async fn claim_children(
    store: &dyn Store,
    org: OrgId,
    agents: &[AgentId],
    max_concurrency: usize,
) -> Vec<(AgentId, Claimed)> {
    let mut running = Vec::new();
    for agent in agents {
        for c in store.claim(org, *agent, &[], 10).await.unwrap() {
            running.push((*agent, c));
        }
    }
    assert!(
        !running.is_empty() && running.len() <= max_concurrency,
        "{} children running at once",
        running.len()
    );
    running
}

pub async fn broadcast_max_concurrency_holds_children(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut agents = vec![t.agent];
    for n in 2..=5 {
        agents.push(agent(store, t.org, &format!("agent-{n}")).await);
    }
    let parent = store
        .create_broadcast(t.org, broadcast(agents.clone(), Some(2)), None)
        .await
        .unwrap()
        .command;
    assert_eq!(parent.broadcast.as_ref().unwrap().max_concurrency, Some(2));

    let mut claimed_by_turn = Vec::new();
    let mut finished = 0;
    while finished < agents.len() {
        let mut running = claim_children(store, t.org, &agents, 2).await;
        claimed_by_turn.push(running.len());
        // The first one finishes and hands its slot on.
        let (agent, c) = running.remove(0);
        store
            .complete(t.org, agent, c.command.id, &c.claim_token, json!({}))
            .await
            .unwrap();
        finished += 1;
        // The others hand their claims back, to be claimed again next turn.
        for (agent, c) in running {
            store
                .hand_back(t.org, agent, vec![(c.command.id, c.claim_token)])
                .await
                .unwrap();
        }
    }
    assert_eq!(claimed_by_turn, vec![2, 2, 2, 2, 1]);
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Completed);
}

/// Children of one broadcast completed at once (their reports may share one statement): each
/// hands its slot on, no more children run than the broadcast allows, and the last one ends
/// the parent.
pub async fn broadcast_children_completed_at_once_hand_on_their_slots(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    let t = tenant(store, "acme").await;
    let mut agents = vec![t.agent];
    for n in 2..=7 {
        agents.push(agent(store, t.org, &format!("agent-{n}")).await);
    }
    let parent = store
        .create_broadcast(t.org, broadcast(agents.clone(), Some(3)), None)
        .await
        .unwrap()
        .command;
    let mut finished = 0;
    let mut turns = Vec::new();
    while finished < agents.len() {
        let running = claim_children(store, t.org, &agents, 3).await;
        turns.push(running.len());
        let completes = running.iter().map(|(agent, c)| {
            store.complete(t.org, *agent, c.command.id, &c.claim_token, json!({}))
        });
        for answer in futures::future::join_all(completes).await {
            assert_eq!(answer.unwrap().status, CommandStatus::Completed);
        }
        finished += running.len();
    }
    assert_eq!(turns, vec![3, 3, 1]);
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Completed);
}

pub async fn broadcast_ends_failed_when_a_child_fails(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let second = agent(store, t.org, "agent-2").await;
    let parent = store
        .create_broadcast(t.org, broadcast(vec![t.agent, second], None), None)
        .await
        .unwrap()
        .command;
    assert_eq!(run_targeted(store, t.org, t.agent).await, 1);
    let c = claim_one(
        store,
        &super::Tenant {
            org: t.org,
            agent: second,
        },
        &[],
    )
    .await;
    store
        .fail(
            t.org,
            second,
            c.command.id,
            &c.claim_token,
            json!("disk full"),
            false,
        )
        .await
        .unwrap();
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Failed);

    // Requeuing the failed child reopens the broadcast; completing it completes it.
    store.requeue(t.org, c.command.id).await.unwrap();
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Pending);
    assert_eq!(parent_now.finished_at, None);
    assert_eq!(run_targeted(store, t.org, second).await, 1);
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Completed);
}

pub async fn broadcast_cancel_cancels_unfinished_children(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let second = agent(store, t.org, "agent-2").await;
    let third = agent(store, t.org, "agent-3").await;
    let parent = store
        .create_broadcast(
            t.org,
            broadcast(vec![t.agent, second, third], Some(2)),
            None,
        )
        .await
        .unwrap()
        .command;
    assert_eq!(run_targeted(store, t.org, t.agent).await, 1);
    // The second is executing, the third held.
    let running = store.claim(t.org, second, &[], 1).await.unwrap();
    assert_eq!(running.len(), 1);
    let cancelled = store.cancel_command(t.org, parent.id).await.unwrap();
    assert!(cancelled.cancel_requested);
    assert_eq!(
        cancelled.status,
        CommandStatus::Pending,
        "a child still runs"
    );
    let children = store.list_children(t.org, parent.id).await.unwrap();
    let statuses: Vec<_> = children.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        vec![
            CommandStatus::Completed,
            CommandStatus::Executing,
            CommandStatus::Cancelled
        ]
    );
    assert!(children[1].cancel_requested);
    // The held child was cancelled, not released.
    assert_eq!(run_targeted(store, t.org, third).await, 0);
    // The running child stops; the parent ends cancelled.
    let c = &running[0];
    let lease = store
        .heartbeat(t.org, second, c.command.id, &c.claim_token, None)
        .await
        .unwrap();
    assert!(lease.cancel_requested);
    store
        .fail(
            t.org,
            second,
            c.command.id,
            &c.claim_token,
            json!("stopped"),
            true,
        )
        .await
        .unwrap();
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Cancelled);
    assert!(matches!(
        store.cancel_command(t.org, parent.id).await,
        Err(StoreError::InvalidState(_))
    ));
}

pub async fn broadcast_idempotency_and_refusals(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let second = agent(store, t.org, "agent-2").await;
    let idem = |hash: &str| {
        Some(Idempotency {
            key: "roll-1".into(),
            request_hash: hash.into(),
        })
    };
    let first = store
        .create_broadcast(t.org, broadcast(vec![t.agent, second], None), idem("h"))
        .await
        .unwrap();
    assert!(first.created);
    let again = store
        .create_broadcast(t.org, broadcast(vec![t.agent, second], None), idem("h"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.command.id, first.command.id);
    assert_eq!(
        store
            .list_children(t.org, first.command.id)
            .await
            .unwrap()
            .len(),
        2,
        "a retry creates no children"
    );
    assert!(matches!(
        store
            .create_broadcast(t.org, broadcast(vec![t.agent], None), idem("other"))
            .await,
        Err(StoreError::IdempotencyMismatch)
    ));

    for (bad, what) in [
        (broadcast(Vec::new(), None), "no agent"),
        (broadcast(vec![t.agent, t.agent], None), "an agent twice"),
        (broadcast(vec![t.agent], Some(0)), "max_concurrency 0"),
    ] {
        assert!(
            matches!(
                store.create_broadcast(t.org, bad, None).await,
                Err(StoreError::InvalidInput(_))
            ),
            "{what}"
        );
    }
    // An agent of another organisation: nothing is created.
    let other = tenant(store, "other").await;
    let before = store.count_commands_by_status(t.org).await.unwrap();
    assert!(matches!(
        store
            .create_broadcast(t.org, broadcast(vec![t.agent, other.agent], None), None)
            .await,
        Err(StoreError::UnknownAgent)
    ));
    assert_eq!(store.count_commands_by_status(t.org).await.unwrap(), before);
    // A broadcast target is refused on the single and batch paths.
    let lone = NewCommand::new("x", Target::Broadcast("a=b".into()), json!({}));
    assert!(matches!(
        store.create_command(t.org, lone, None).await,
        Err(StoreError::InvalidInput(_))
    ));
}

pub async fn broadcast_requeue_keeps_to_max_concurrency(store: &dyn Store, _clock: &ManualClock) {
    let t = tenant(store, "acme").await;
    let mut agents = vec![t.agent];
    for n in 2..=4 {
        agents.push(agent(store, t.org, &format!("agent-{n}")).await);
    }
    let mut new = broadcast(agents.clone(), Some(2));
    new.command.max_attempts = 1;
    let parent = store
        .create_broadcast(t.org, new, None)
        .await
        .unwrap()
        .command;
    // Every child fails, two at a time.
    for _ in 0..2 {
        for agent in &agents {
            for c in store.claim(t.org, *agent, &[], 10).await.unwrap() {
                store
                    .fail(
                        t.org,
                        *agent,
                        c.command.id,
                        &c.claim_token,
                        json!("no"),
                        true,
                    )
                    .await
                    .unwrap();
            }
        }
    }
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Failed);
    // Requeuing the parent requeues every failed child and reopens it.
    let requeued = store.requeue(t.org, parent.id).await.unwrap();
    assert_eq!(requeued.status, CommandStatus::Pending);
    let children = store.list_children(t.org, parent.id).await.unwrap();
    assert!(
        children
            .iter()
            .all(|c| c.status == CommandStatus::Pending && c.attempts == 0)
    );
    // Still two at a time.
    let mut running = 0;
    for agent in &agents {
        running += store.claim(t.org, *agent, &[], 10).await.unwrap().len();
    }
    assert_eq!(running, 2);
    assert!(matches!(
        store.requeue(t.org, parent.id).await,
        Err(StoreError::InvalidState(_))
    ));
}

pub async fn broadcast_slots_pass_only_from_released_children_and_wait_for_due_time(
    store: &dyn Store,
    clock: &ManualClock,
) {
    let t = tenant(store, "acme").await;
    let mut agents = vec![t.agent];
    for n in 2..=4 {
        agents.push(agent(store, t.org, &format!("agent-{n}")).await);
    }
    // Due in an hour, one at a time.
    let mut new = broadcast(agents.clone(), Some(1));
    new.command.run_at = Some(START + secs(3600));
    let parent = store
        .create_broadcast(t.org, new, None)
        .await
        .unwrap()
        .command;
    let children = store.list_children(t.org, parent.id).await.unwrap();
    // A held child cancelled on its own hands on no slot.
    store.cancel_command(t.org, children[1].id).await.unwrap();
    // The released first child is cancelled: its slot goes to the third, which still waits for
    // its due time.
    store.cancel_command(t.org, children[0].id).await.unwrap();
    for agent in &agents {
        assert_eq!(
            run_targeted(store, t.org, *agent).await,
            0,
            "nothing is due yet"
        );
    }
    clock.advance(secs(3600));
    assert_eq!(run_targeted(store, t.org, agents[1]).await, 0, "cancelled");
    assert_eq!(run_targeted(store, t.org, agents[3]).await, 0, "still held");
    assert_eq!(
        run_targeted(store, t.org, agents[2]).await,
        1,
        "due, with the slot"
    );
    assert_eq!(
        run_targeted(store, t.org, agents[3]).await,
        1,
        "the slot passed on"
    );
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(
        parent_now.status,
        CommandStatus::Failed,
        "two children were cancelled"
    );
}

pub async fn broadcast_cancel_requeue_and_retention_keep_its_children(
    store: &dyn Store,
    clock: &ManualClock,
) {
    let t = tenant(store, "acme").await;
    let second = agent(store, t.org, "agent-2").await;
    let third = agent(store, t.org, "agent-3").await;
    let mut new = broadcast(vec![t.agent, second, third], None);
    new.command.max_attempts = 1;
    let parent = store
        .create_broadcast(t.org, new, None)
        .await
        .unwrap()
        .command;
    // The first fails; a week and a day pass; retention keeps it while the broadcast runs.
    let c = claim_one(store, &t, &[]).await;
    store
        .fail(
            t.org,
            t.agent,
            c.command.id,
            &c.claim_token,
            json!("no"),
            false,
        )
        .await
        .unwrap();
    clock.advance(secs(8 * 86_400));
    assert_eq!(
        store
            .purge_finished(START + secs(86_400), 100)
            .await
            .unwrap(),
        0
    );
    // Cancelled while the second runs: no requeue until the cancel is through.
    let running = store.claim(t.org, second, &[], 1).await.unwrap();
    store.cancel_command(t.org, parent.id).await.unwrap();
    for id in [parent.id, c.command.id] {
        assert!(matches!(
            store.requeue(t.org, id).await,
            Err(StoreError::InvalidState(_))
        ));
    }
    let r = &running[0];
    store
        .complete(t.org, second, r.command.id, &r.claim_token, json!({}))
        .await
        .unwrap();
    let parent_now = store.get_command(t.org, parent.id).await.unwrap().unwrap();
    assert_eq!(parent_now.status, CommandStatus::Cancelled);
    // Finished, the broadcast and its children go together with retention.
    clock.advance(secs(8 * 86_400));
    assert_eq!(
        store
            .purge_finished(START + secs(15 * 86_400), 100)
            .await
            .unwrap(),
        4
    );
}
