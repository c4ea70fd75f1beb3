//! A PostgreSQL database for tests: each test gets a schema of its own, dropped when it ends.
//!
//! The server's URL is read from [`URL_VAR`]. Without it a test says that it skips and passes,
//! unless [`REQUIRE_VAR`] is `1` (CI), when it fails.

use std::sync::Arc;

use crate::{ManualClock, PgOptions, PgStore, Store};

use super::START;

/// The environment variable holding the test server's URL
/// (`postgres://postgres@127.0.0.1:5432/test`).
pub const URL_VAR: &str = "KEEL_TEST_POSTGRES_URL";

/// Set to `1` to make a test fail, not skip, when [`URL_VAR`] is not set.
pub const REQUIRE_VAR: &str = "KEEL_REQUIRE_POSTGRES";

/// The test server's URL; `None` (after saying so on stderr) when it is not configured.
/// Panics when it is required.
pub fn test_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") => {
            panic!("{URL_VAR} is not set, and {REQUIRE_VAR}=1 requires the PostgreSQL tests")
        }
        _ => {
            eprintln!("skipping: {URL_VAR} is not set (a PostgreSQL URL runs this test)");
            None
        }
    }
}

/// A schema of its own on the test server, dropped (with everything in it) when this drops.
#[derive(Debug)]
pub struct TestSchema {
    url: String,
    name: String,
}

impl TestSchema {
    /// Creates a new, empty schema on the server at `url`.
    pub async fn create(url: &str) -> Self {
        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
            .await
            .unwrap_or_else(|err| panic!("connecting to {URL_VAR}: {err}"));
        sqlx::Executor::execute(&mut conn, format!("CREATE SCHEMA {name}").as_str())
            .await
            .unwrap();
        Self {
            url: url.to_owned(),
            name,
        }
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Store options on this schema.
    pub fn options(&self) -> PgOptions {
        PgOptions {
            schema: Some(self.name.clone()),
            ..PgOptions::new(self.url.clone())
        }
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Its own thread and runtime: a drop cannot await, and may run inside a runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .ok()?;
                // A test that panicked inside a transaction may leave its connection holding
                // locks until its runtime ends, after this drop: give up rather than wait.
                sqlx::Executor::execute(
                    &mut conn,
                    format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {name} CASCADE")
                        .as_str(),
                )
                .await
                .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop the test schema {}", self.name);
        }
    }
}

/// A migrated store on a new schema, its clock a [`ManualClock`] at [`START`]; `None` when
/// PostgreSQL is not configured (see [`test_url`]).
pub async fn fresh_store() -> Option<(TestSchema, Arc<dyn Store>, Arc<ManualClock>)> {
    let url = test_url()?;
    let schema = TestSchema::create(&url).await;
    let clock = Arc::new(ManualClock::new(START));
    let store = PgStore::connect(&schema.options(), Some(clock.clone()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Some((schema, Arc::new(store), clock))
}
