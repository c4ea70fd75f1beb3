//! Moving an installation from SQLite to PostgreSQL: an SQLite store with work in every state
//! is copied into a fresh PostgreSQL schema, and the PostgreSQL side holds the same rows. Needs
//! `KEEL_TEST_POSTGRES_URL` (skips without it, like the conformance suite).

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use keel_store::conformance::START;
use keel_store::conformance::postgres::{TestSchema, test_url};
use keel_store::copy::{CopyReport, sqlite_to_postgres};
use keel_store::notifications::model::{
    ChannelType, EventId, NewDelivery, NewEvent, NewSetting, SealedSecret, SettingKind, Severity,
    WorkerId,
};
use keel_store::schedule::{FireRecord, NewSchedule, ScheduleAdvance};
use keel_store::{
    CheckIn, CommandId, ExposeSecret, Idempotency, Labels, ManualClock, MissedFires, NewApiKey,
    NewBroadcast, NewCommand, OrgId, PgStore, Scope, SqliteOptions, SqliteStore, Store, StoreError,
    Target,
};
use serde_json::json;
use time::Duration;

/// Every table the copy writes, in its order.
const TABLES: [&str; 13] = [
    "organisations",
    "agents",
    "api_keys",
    "operator_keys",
    "paused_queues",
    "commands",
    "command_attempts",
    "schedules",
    "schedule_fires",
    "notification_settings",
    "notification_events",
    "deliveries",
    "delivery_attempts",
];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn idempotency(key: &str) -> Option<Idempotency> {
    Some(Idempotency {
        key: key.to_owned(),
        request_hash: format!("hash of {key}"),
    })
}

fn delivery(recipient: &str, throttle: Option<StdDuration>) -> NewDelivery {
    NewDelivery {
        channel_id: None,
        channel_type: ChannelType::Webhook,
        recipient: recipient.to_owned(),
        subject: "subject".to_owned(),
        body: format!("body for {recipient}"),
        priority: 0,
        max_attempts: 3,
        lease_duration: StdDuration::from_secs(30),
        throttle,
    }
}

fn event(event_type: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        id: EventId::new(),
        event_type: event_type.to_owned(),
        payload: json!({"disk": "/var", "free": 0.02}),
        domain: "hosts".to_owned(),
        severity: Severity::High,
        idempotency: key.and_then(idempotency),
    }
}

/// What the SQLite store was filled with, to check on the other side.
struct Filled {
    admin_token: String,
    agent_token: String,
    operator_token: String,
}

/// Fills `store` with rows in every table and work in every state.
async fn fill(store: &SqliteStore, clock: &ManualClock) -> Filled {
    let org = store.create_organisation("acme").await.unwrap().id;
    store.create_organisation("empty").await.unwrap();
    let admin = store
        .create_api_key(
            org,
            NewApiKey {
                name: "admin".to_owned(),
                scopes: vec![Scope::Admin],
                agent_name: None,
            },
        )
        .await
        .unwrap();
    let agent_key = store
        .create_api_key(
            org,
            NewApiKey {
                name: "agent-1 key".to_owned(),
                scopes: vec![Scope::Agent],
                agent_name: Some("agent-1".to_owned()),
            },
        )
        .await
        .unwrap();
    let agent = agent_key.key.agent_id.unwrap();
    let other = store
        .create_api_key(
            org,
            NewApiKey {
                name: "agent-2 key".to_owned(),
                scopes: vec![Scope::Agent],
                agent_name: Some("agent-2".to_owned()),
            },
        )
        .await
        .unwrap();
    let other_agent = other.key.agent_id.unwrap();
    store.revoke_api_key(org, other.key.id).await.unwrap();
    let operator = store.create_operator_key("ops").await.unwrap();

    store
        .check_in(
            org,
            agent,
            CheckIn {
                name: Some("agent-1".to_owned()),
                version: "1.2.3".to_owned(),
                metadata: json!({"os": "linux"}),
                queues: vec!["q".to_owned()],
                boot_id: uuid::Uuid::new_v4(),
                labels: Some(labels(&[("env", "prod")])),
            },
        )
        .await
        .unwrap();
    store
        .set_agent_labels(org, other_agent, labels(&[("env", "prod"), ("rack", "r2")]))
        .await
        .unwrap();
    store
        .set_agent_cordoned(org, other_agent, true)
        .await
        .unwrap();
    store.pause_queue(org, "paused").await.unwrap();

    // Pending: due now (with an idempotency key), due later, in a paused queue.
    store
        .create_command(
            org,
            NewCommand::new("run", Target::Queue("q".to_owned()), json!({"n": 1})),
            idempotency("due"),
        )
        .await
        .unwrap();
    store
        .create_command(
            org,
            NewCommand {
                run_at: Some(START + Duration::hours(1)),
                ..NewCommand::new("run", Target::Queue("q".to_owned()), json!({"n": 2}))
            },
            None,
        )
        .await
        .unwrap();
    store
        .create_command(
            org,
            NewCommand::new("run", Target::Queue("paused".to_owned()), json!({})),
            None,
        )
        .await
        .unwrap();
    // Completed, with its attempt; then one executing, with its claim token and lease.
    for n in 0..2 {
        store
            .create_command(
                org,
                NewCommand {
                    priority: 10,
                    ..NewCommand::new("upgrade", Target::Agent(agent), json!({"n": n}))
                },
                None,
            )
            .await
            .unwrap();
        let claimed = store
            .claim(org, agent, &[], 1)
            .await
            .unwrap()
            .pop()
            .unwrap();
        if n == 0 {
            clock.advance(Duration::seconds(1));
            store
                .complete(
                    org,
                    agent,
                    claimed.command.id,
                    &claimed.claim_token,
                    json!({"ok": true}),
                )
                .await
                .unwrap();
        }
    }
    // A broadcast to both agents, one at a time: one child due, the other held.
    store
        .create_broadcast(
            org,
            NewBroadcast {
                command: NewCommand::new(
                    "restart",
                    Target::Broadcast("env=prod".to_owned()),
                    json!({}),
                ),
                online_only: false,
                max_concurrency: Some(1),
                agents: vec![agent, other_agent],
            },
            idempotency("broadcast"),
        )
        .await
        .unwrap();

    // A schedule, and a fire of it that recorded why it made no command.
    let schedule = store
        .create_schedule(
            org,
            NewSchedule {
                name: Some("hourly".to_owned()),
                cron: "0 * * * *".to_owned(),
                timezone: "Europe/Paris".to_owned(),
                command: json!({"type": "tick", "queue": "q"}),
                missed: MissedFires::CatchUpOne,
            },
        )
        .await
        .unwrap();
    let due = schedule.next_fire_at.unwrap();
    store
        .advance_schedule(ScheduleAdvance {
            org,
            schedule: schedule.id,
            due,
            next: Some(due + Duration::hours(1)),
            fire: Some(FireRecord {
                fire_at: due,
                items: Vec::new(),
                broadcast: None,
                error: Some("no agent".to_owned()),
            }),
        })
        .await
        .unwrap();

    // Notifications: a channel with a sealed secret, events with deliveries, a throttle that
    // folded a second delivery into a digest, one delivery completed and one executing.
    let n = store.notifications();
    n.create_setting(
        org,
        SettingKind::Channel,
        NewSetting {
            name: "ops webhook".to_owned(),
            unique_key: Some("ops".to_owned()),
            body: json!({"url": "https://example.com/hook"}),
            sealed_secret: Some(SealedSecret(vec![0, 1, 2, 255])),
        },
    )
    .await
    .unwrap();
    let throttle = Some(StdDuration::from_secs(60));
    n.trigger(
        org,
        event("disk_warning", Some("e1")),
        vec![delivery("ops", throttle), delivery("oncall", None)],
    )
    .await
    .unwrap();
    clock.advance(Duration::seconds(1));
    n.trigger(
        org,
        event("disk_warning", None),
        vec![delivery("ops", throttle)],
    )
    .await
    .unwrap();
    let worker = WorkerId::new();
    let claimed = n.claim_deliveries(worker, 2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    n.complete_delivery(
        worker,
        claimed[0].delivery.id,
        &claimed[0].claim_token,
        json!({"status": 200}),
    )
    .await
    .unwrap();

    Filled {
        admin_token: admin.token.expose_secret().to_owned(),
        agent_token: agent_key.token.expose_secret().to_owned(),
        operator_token: operator.token.expose_secret().to_owned(),
    }
}

async fn sqlite_count(store: &SqliteStore, sql: &str) -> Vec<(String, i64)> {
    sqlx::query_as(sql).fetch_all(store.pool()).await.unwrap()
}

async fn pg_count(store: &PgStore, sql: &str) -> Vec<(String, i64)> {
    sqlx::query_as(sql).fetch_all(store.pool()).await.unwrap()
}

#[tokio::test]
async fn sqlite_installation_moves_to_postgres() {
    let Some(url) = test_url() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let sqlite = SqliteStore::open(
        dir.path().join("keel.db"),
        SqliteOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    let filled = fill(&sqlite, &clock).await;

    let schema = TestSchema::create(&url).await;
    let pg = PgStore::connect(&schema.options(), Some(clock.clone()))
        .await
        .unwrap();
    // Not migrated yet: refused, with what to do.
    match sqlite_to_postgres(&sqlite, &pg).await {
        Err(StoreError::InvalidInput(why)) => assert!(why.contains("migrate"), "{why}"),
        other => panic!("{other:?}"),
    }
    pg.migrate().await.unwrap();
    let report: CopyReport = sqlite_to_postgres(&sqlite, &pg).await.unwrap();
    let names: Vec<&str> = report.tables.iter().map(|t| t.table).collect();
    assert_eq!(names, TABLES);

    // Every table: the report's count, the SQLite rows and the PostgreSQL rows agree, and no
    // table was left empty by the fill. PostgreSQL keeps a running attempt on its command's
    // row, not in `command_attempts`.
    for table in TABLES {
        let sql = format!("SELECT '{table}', COUNT(*) FROM {table}");
        let from = sqlite_count(&sqlite, &sql).await;
        let rows = u64::try_from(from[0].1).unwrap();
        assert!(rows > 0, "{table} is empty");
        assert_eq!(report.rows(table), Some(rows), "{table}");
        let kept = if table == "command_attempts" {
            format!("{sql} WHERE ended_at IS NOT NULL")
        } else {
            sql.clone()
        };
        assert_eq!(
            sqlite_count(&sqlite, &kept).await,
            pg_count(&pg, &kept).await,
            "{table}"
        );
    }
    assert_eq!(
        report.rows("commands"),
        Some(3 + 2 + 3),
        "3 pending, 2 claimed, a broadcast parent and its 2 children"
    );
    assert_eq!(
        report.rows("deliveries"),
        Some(4),
        "2 leads, 1 direct, 1 digest"
    );

    // Work in every state, as it was: status, due or held, attempts.
    for (table, states) in [
        (
            "commands",
            "status || '/' || scheduled || '/' || attempts || '/' || cancel_requested",
        ),
        (
            "deliveries",
            "status || '/' || scheduled || '/' || attempts || '/' || \
             (digest_of IS NOT NULL) || '/' || (digest_id IS NOT NULL)",
        ),
    ] {
        let sql = format!("SELECT {states}, COUNT(*) FROM {table} GROUP BY 1 ORDER BY 1");
        let from = sqlite_count(&sqlite, &sql).await;
        let to = pg_count(&pg, &sql).await;
        // SQLite writes booleans as 0/1, PostgreSQL as true/false.
        let to: Vec<_> = to
            .into_iter()
            .map(|(s, n)| (s.replace("true", "1").replace("false", "0"), n))
            .collect();
        assert_eq!(from, to, "{table}");
    }

    // Every command's attempts, the running ones included, read the same through the store.
    let ids: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as("SELECT org_id, id FROM commands")
        .fetch_all(pg.pool())
        .await
        .unwrap();
    let mut running = 0;
    for (org, id) in ids {
        let (org, id) = (OrgId(org), CommandId(id));
        let attempts = pg.list_attempts(org, id).await.unwrap();
        running += attempts.iter().filter(|a| a.ended_at.is_none()).count();
        assert_eq!(attempts, sqlite.list_attempts(org, id).await.unwrap());
    }
    assert_eq!(running, 1, "the claimed command's attempt runs on");

    // Executing work keeps its fence and lease; idempotency keys stay.
    let sqlite_leases: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT id, claim_token, lease_expires_at FROM commands \
         WHERE status = 'executing' ORDER BY id",
    )
    .fetch_all(sqlite.pool())
    .await
    .unwrap();
    let pg_leases: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT id, claim_token, (extract(epoch FROM lease_expires_at) * 1000000)::int8 \
         FROM commands WHERE status = 'executing' ORDER BY id",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(sqlite_leases.len(), 1, "the claimed command");
    assert_eq!(sqlite_leases, pg_leases);
    let keys = "SELECT idempotency_key, COUNT(*) FROM commands \
                WHERE idempotency_key IS NOT NULL GROUP BY 1 ORDER BY 1";
    assert_eq!(sqlite_count(&sqlite, keys).await, pg_count(&pg, keys).await);
    let secret: Vec<u8> = sqlx::query_scalar("SELECT sealed_secret FROM notification_settings")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(secret, [0, 1, 2, 255]);

    // Through the store: the same organisations, keys, agents and paused queues, and the old
    // tokens authenticate (revoked keys stay revoked).
    assert_eq!(
        pg.list_organisations().await.unwrap(),
        sqlite.list_organisations().await.unwrap()
    );
    let org = pg.find_org_by_name("acme").await.unwrap().unwrap().id;
    assert_eq!(
        pg.list_api_keys(org).await.unwrap(),
        sqlite.list_api_keys(org).await.unwrap()
    );
    assert_eq!(
        pg.list_agents(org).await.unwrap(),
        sqlite.list_agents(org).await.unwrap()
    );
    assert_eq!(
        pg.list_paused_queues(org).await.unwrap(),
        sqlite.list_paused_queues(org).await.unwrap()
    );
    assert_eq!(pg.count_cordoned_and_paused().await.unwrap(), (1, 1));
    assert_eq!(
        pg.list_operator_keys().await.unwrap(),
        sqlite.list_operator_keys().await.unwrap()
    );
    for token in [&filled.admin_token, &filled.agent_token] {
        assert_eq!(
            pg.authenticate(token).await.unwrap(),
            sqlite.authenticate(token).await.unwrap()
        );
        assert!(pg.authenticate(token).await.unwrap().is_some());
    }
    assert_eq!(
        pg.authenticate_operator(&filled.operator_token)
            .await
            .unwrap(),
        sqlite
            .authenticate_operator(&filled.operator_token)
            .await
            .unwrap()
    );
    assert!(
        pg.authenticate_operator(&filled.operator_token)
            .await
            .unwrap()
            .is_some()
    );

    // A second copy into the now occupied database is refused, and changes nothing.
    match sqlite_to_postgres(&sqlite, &pg).await {
        Err(StoreError::InvalidInput(why)) => assert!(why.contains("fresh"), "{why}"),
        other => panic!("{other:?}"),
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM commands")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(
        u64::try_from(total).unwrap(),
        report.rows("commands").unwrap()
    );

    pg.close().await;
    sqlite.close().await;
}
