//! The conformance suite on SQLite, plus what only a file-backed database shows.

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use keel_store::conformance::START;
use keel_store::{
    ManualClock, NewApiKey, NewCommand, Scope, SqliteOptions, SqliteStore, Store, Synchronous,
    Target,
};
use serde_json::json;
use tempfile::TempDir;

/// A store on a new database file in its own temporary directory.
async fn fresh() -> Option<(TempDir, Arc<dyn Store>, Arc<ManualClock>)> {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let store = SqliteStore::open(
        dir.path().join("keel.db"),
        SqliteOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    Some((dir, Arc::new(store), clock))
}

keel_store::conformance_tests!(fresh);
keel_store::notification_conformance_tests!(fresh);

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let clock = Arc::new(ManualClock::new(START));
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };

    let store = SqliteStore::open(&path, options.clone(), clock.clone())
        .await
        .unwrap();
    let org = store.create_organisation("acme").await.unwrap();
    let key = store
        .create_api_key(
            org.id,
            NewApiKey {
                name: "agent".into(),
                scopes: vec![Scope::Agent],
                agent_name: Some("web-1".into()),
            },
        )
        .await
        .unwrap();
    let agent = key.key.agent_id.unwrap();
    let pending = store
        .create_command(
            org.id,
            NewCommand::new("run", Target::Queue("q".into()), json!({"n": 1})),
            None,
        )
        .await
        .unwrap()
        .command;
    let running = store
        .create_command(
            org.id,
            NewCommand::new("run", Target::Agent(agent), json!({"n": 2})),
            None,
        )
        .await
        .unwrap()
        .command;
    let claimed = store.claim(org.id, agent, &[], 1).await.unwrap();
    assert_eq!(claimed[0].command.id, running.id);
    store.close().await;
    drop(store);

    // Reopened (migrations run again and find nothing to do): everything is there and the
    // claim token still fences the running command.
    let store = SqliteStore::open(&path, SqliteOptions::default(), clock.clone())
        .await
        .unwrap();
    assert_eq!(
        store.find_org_by_name("acme").await.unwrap(),
        Some(org.clone())
    );
    let principal = store
        .authenticate(keel_store::ExposeSecret::expose_secret(&key.token))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(principal.agent_id, Some(agent));
    assert_eq!(
        store.get_command(org.id, pending.id).await.unwrap(),
        Some(pending)
    );
    let done = store
        .complete(
            org.id,
            agent,
            running.id,
            &claimed[0].claim_token,
            json!("ok"),
        )
        .await
        .unwrap();
    assert_eq!(done.attempts, 1);
}

#[tokio::test]
async fn a_directory_that_does_not_exist_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let result = SqliteStore::open(
        dir.path().join("missing").join("keel.db"),
        SqliteOptions::default(),
        clock,
    )
    .await;
    assert!(result.is_err());
}

/// A database from before operator keys: organisation keys carrying the old `operator` scope
/// lose it when the migration runs, and still load.
#[tokio::test]
async fn the_operator_scope_is_taken_out_of_organisation_keys() {
    use sqlx::ConnectOptions as _;
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old-migrations");
    std::fs::create_dir(&old).unwrap();
    for name in [
        "20250101000001_initial.sql",
        "20250301000001_queue_scale.sql",
    ] {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations/sqlite")
            .join(name);
        std::fs::copy(from, old.join(name)).unwrap();
    }
    let path = dir.path().join("keel.db");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let org = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO organisations (id, name, created_at) VALUES (?, 'acme', 0)")
        .bind(org)
        .execute(&mut conn)
        .await
        .unwrap();
    for (prefix, scopes) in [
        ("aaaaaaaa", r#"["admin","operator"]"#),
        ("bbbbbbbb", r#"["operator"]"#),
    ] {
        sqlx::query(
            "INSERT INTO api_keys (id, org_id, name, prefix, token_hash, scopes, created_at) \
             VALUES (?, ?, 'old', ?, 'x', ?, 0)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(org)
        .bind(prefix)
        .bind(scopes)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    drop(conn);

    let store = SqliteStore::open(
        &path,
        SqliteOptions::default(),
        Arc::new(ManualClock::new(START)),
    )
    .await
    .unwrap();
    let org = store.find_org_by_name("acme").await.unwrap().unwrap();
    let mut keys: Vec<_> = store
        .list_api_keys(org.id)
        .await
        .unwrap()
        .into_iter()
        .map(|key| (key.prefix, key.scopes))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        keys,
        [
            ("aaaaaaaa".to_owned(), vec![Scope::Admin]),
            ("bbbbbbbb".to_owned(), vec![])
        ]
    );
    store.close().await;
}
