//! SIGTERM under load: in-flight work finishes, the logs are flushed, exit status 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::{Server, poll_until};

#[tokio::test]
async fn sigterm_under_load_exits_0_within_the_deadline_with_the_last_records_written() {
    let mut server = Server::start().await;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..8 {
        let client = server.client.clone();
        let url = server.url("/healthz");
        let answered = answered.clone();
        load.push(tokio::spawn(async move {
            // Bounded: at most 2,000 requests per worker, stopping at the first refusal.
            for _ in 0..2_000 {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
        }));
    }
    poll_until(Duration::from_secs(10), || async {
        answered.load(Ordering::SeqCst) >= 200
    })
    .await;

    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    for worker in load {
        worker.await.unwrap();
    }

    let records = server.log_records();
    let access = records
        .iter()
        .filter(|r| r["stream"] == "access" && r["route"] == "/healthz" && r["status"] == 200)
        .count();
    assert!(
        access >= answered.load(Ordering::SeqCst),
        "every answered request has its access record: {access} < {}",
        answered.load(Ordering::SeqCst)
    );
    let last = records.last().unwrap();
    assert_eq!(last["message"], "keel stopped", "{last}");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut server = Server::start_with(crate::harness::Options {
        failpoints: Some("http.delay=return(20000)"),
        http: "request_timeout = \"60s\"",
        ..crate::harness::Options::default()
    })
    .await;
    // A request that will not finish keeps the graceful shutdown waiting (grace is 5 s).
    let client = server.client.clone();
    let url = server.url("/healthz");
    let slow = tokio::spawn(async move { client.get(&url).send().await });
    // The request is in flight once it has had time to reach the server; nothing observable
    // marks its arrival before it is answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("TERM");
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .any(|r| r["message"] == "shutting down")
    })
    .await;
    assert!(
        server.still_running(),
        "the in-flight request holds the shutdown"
    );
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(2)).await;
    assert_eq!(status.code(), Some(130));
    slow.abort();
}
