//! Every statement on the notification tables has an index that serves it: with sequential
//! scans priced out, the generic plan of each (as a prepared statement runs it) reads no
//! notification table whole.

use sqlx::{Connection, PgConnection};

use super::lease::{
    ATTEMPTS_SO_FAR, CLAIM, DELIVERED, EXISTING, FAILED, NEXT_DUE, POSTPONED, PURGE_EVENTS,
    PURGE_FINISHED, PURGE_THROTTLED, RELEASE, REQUEUE_ONE, requeue_query,
};
use super::{ATTEMPTS, DIGESTED, EVENT_DELIVERIES, LOCK_THROTTLES, TRIGGER, list_query};
use crate::PgStore;
use crate::conformance::postgres::{TestSchema, test_url};
use crate::model::OrgId;
use crate::notifications::model::{
    ChannelType, DeliveryFilter, DeliveryId, DeliveryStatus, EventId,
};

/// The generic plan of `sql`, one line per node.
async fn plan(conn: &mut PgConnection, sql: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::raw_sql(&format!("PREPARE shape AS {sql}"))
        .execute(&mut *conn)
        .await?;
    let params: i32 = sqlx::query_scalar(
        "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = 'shape'",
    )
    .fetch_one(&mut *conn)
    .await?;
    let nulls = vec!["NULL"; usize::try_from(params).unwrap_or_default()].join(", ");
    let execute = if params == 0 {
        "EXPLAIN EXECUTE shape".to_owned()
    } else {
        format!("EXPLAIN EXECUTE shape({nulls})")
    };
    let lines = sqlx::query_scalar(&execute)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await?;
    sqlx::raw_sql("DEALLOCATE shape")
        .execute(&mut *conn)
        .await?;
    Ok(lines)
}

/// What is wrong with the plan of `what`, if anything.
async fn check(conn: &mut PgConnection, what: &str, sql: &str) -> Option<String> {
    let lines = match plan(conn, sql).await {
        Ok(lines) => lines,
        Err(err) => return Some(format!("{what}: {err}")),
    };
    for line in &lines {
        for table in ["deliveries", "notification_events", "delivery_attempts"] {
            if line.contains(&format!("Seq Scan on {table} ")) {
                return Some(format!(
                    "{what}: reads {table} whole: {line}\n{}",
                    lines.join("\n")
                ));
            }
        }
    }
    None
}

#[tokio::test]
async fn every_notification_statement_is_served_by_an_index() {
    let Some(url) = test_url() else {
        return;
    };
    let schema = TestSchema::create(&url).await;
    let store = PgStore::connect(&schema.options(), None).await.unwrap();
    store.migrate().await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::raw_sql("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        .execute(conn.as_mut())
        .await
        .unwrap();
    let mut shapes: Vec<(String, String)> = [
        ("trigger", TRIGGER.to_owned()),
        ("claim", CLAIM.clone()),
        ("delivered", DELIVERED.clone()),
        ("failed", FAILED.clone()),
        ("postponed", POSTPONED.clone()),
        ("release", RELEASE.to_owned()),
        ("requeue", REQUEUE_ONE.clone()),
        ("next due", NEXT_DUE.to_owned()),
        ("purge finished", PURGE_FINISHED.to_owned()),
        ("purge throttled", PURGE_THROTTLED.to_owned()),
        ("purge events", PURGE_EVENTS.to_owned()),
        ("an event's deliveries", EVENT_DELIVERIES.clone()),
        ("digested", DIGESTED.clone()),
        ("attempts", ATTEMPTS.to_owned()),
        ("attempts so far", ATTEMPTS_SO_FAR.to_owned()),
        ("refused reports", EXISTING.to_owned()),
        ("throttle locks", LOCK_THROTTLES.to_owned()),
    ]
    .into_iter()
    .map(|(what, sql)| (what.to_owned(), sql))
    .collect();
    let org = OrgId::new();
    for status in [false, true] {
        for event in [false, true] {
            for channel in [false, true] {
                let filter = DeliveryFilter {
                    status: status.then_some(DeliveryStatus::Dead),
                    event_id: event.then(EventId::new),
                    channel_type: channel.then_some(ChannelType::Webhook),
                };
                for cursor in [None, Some(DeliveryId::new())] {
                    let sql = list_query(org, &filter, cursor, 10).into_sql();
                    shapes.push((format!("list {filter:?} {cursor:?}"), sql));
                }
                let sql = requeue_query(org, &filter).into_sql();
                shapes.push((format!("requeue {filter:?}"), sql));
            }
        }
    }
    // Planned inside a transaction that is rolled back, and judged after it.
    let mut tx = conn.begin().await.unwrap();
    let mut problems = Vec::new();
    for (what, sql) in &shapes {
        problems.extend(check(&mut tx, what, sql).await);
    }
    tx.rollback().await.unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
