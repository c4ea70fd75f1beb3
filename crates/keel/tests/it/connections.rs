//! Connections on the real process: slow request heads and idle connections are closed, the
//! open-file limit does not lock health probes out, an announced oversize body is refused at
//! once, and the HTTP parser's own answers are the documented ones.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{ADMIN_TOKEN, Api, Options, Server, metric, poll_until};

fn address(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes the connection (or resets it); returns what arrived.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a new connection and returns the whole answer, read until keel closes.
async fn raw_exchange(server: &Server, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address(server)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut stream))
        .await
        .expect("keel answers and closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Asserts that a connection closed after `waited` was closed by a timeout of `timeout`: not
/// before it (less the test's own latency) and not long after.
fn assert_closed_after(waited: Duration, timeout: Duration) {
    assert!(
        waited >= timeout - Duration::from_millis(500) && waited < timeout + Duration::from_secs(3),
        "closed after {waited:?}, the timeout is {timeout:?}"
    );
}

/// How many connections keel has closed for `reason`.
async fn closed(server: &Server, reason: &str) -> f64 {
    let metrics = server.metrics().await;
    let series = format!("keel_http_connections_closed_total{{reason=\"{reason}\"}}");
    metric(&metrics, &series).unwrap_or(0.0)
}

/// Waits until keel has counted `count` connections closed for `reason` (it counts once the
/// connection's task has ended, just after the socket closed).
async fn wait_for_closed(server: &Server, reason: &str, count: f64) {
    poll_until(Duration::from_secs(5), || async {
        closed(server, reason).await == count
    })
    .await;
}

#[tokio::test]
async fn three_hundred_slow_request_heads_are_closed_after_the_header_read_timeout() {
    let server = Server::start_with(Options {
        http: "header_read_timeout = \"2s\"\nrequest_timeout = \"30s\"",
        ..Options::default()
    })
    .await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: keel\r\nX-Slow: one byte a second\r\n\r\n";
    let started = Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..300 {
        let address = address(&server);
        sockets.push(tokio::spawn(async move {
            let stream = TcpStream::connect(address).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            // The attack: one byte of the head a second, never a complete head in time.
            let dribble = async move {
                for byte in head {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            let closed = async move {
                let mut chunk = [0_u8; 1024];
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => started.elapsed(),
                    Ok(_) => panic!("keel answered an incomplete request head"),
                }
            };
            tokio::select! {
                closed_after = closed => Some(closed_after),
                () = dribble => None,
            }
        }));
    }
    for socket in sockets {
        let closed_after = tokio::time::timeout(Duration::from_secs(10), socket)
            .await
            .expect("every slow socket is closed within 10 s")
            .unwrap()
            .expect("keel closed the socket before the head was complete");
        assert_closed_after(closed_after, Duration::from_secs(2));
    }
    wait_for_closed(&server, "header_read_timeout", 300.0).await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let server = Server::start_with(Options {
        http: "header_read_timeout = \"1s\"\nidle_timeout = \"3s\"",
        ..Options::default()
    })
    .await;

    // A keep-alive connection after its answer.
    let mut stream = TcpStream::connect(address(&server)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("{\"status\":\"ok\"}") {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "keel closed before answering");
        answer.extend_from_slice(&chunk[..n]);
    }
    let answered = Instant::now();
    // And a connection that never sends anything.
    let mut silent = TcpStream::connect(address(&server)).await.unwrap();
    let opened = Instant::now();

    let rest = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut stream))
        .await
        .expect("the idle keep-alive connection is closed");
    assert!(rest.is_empty());
    let idle_for = answered.elapsed();
    tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut silent))
        .await
        .expect("the silent connection is closed");
    let silent_for = opened.elapsed();
    // After the idle timeout (3 s), not the header read timeout (1 s).
    for waited in [idle_for, silent_for] {
        assert_closed_after(waited, Duration::from_secs(3));
    }
    wait_for_closed(&server, "idle_timeout", 2.0).await;
}

#[tokio::test]
async fn with_1024_open_files_and_1100_idle_connections_healthz_answers_within_a_second() {
    let server = Server::start_with(Options {
        open_file_limit: Some(1024),
        ..Options::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(address(&server)).await.unwrap());
    }

    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for route in ["/healthz", "/readyz"] {
        let started = Instant::now();
        let response = probe.get(server.url(route)).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 200, "{route}");
        assert!(took < Duration::from_secs(1), "{route} took {took:?}");
    }
    // The cap made room by closing the oldest idle connections, not by failing to accept.
    let evicted = closed(&server, "evicted").await;
    assert!(evicted >= 150.0, "evicted {evicted}");
    assert_eq!(
        metric(&server.metrics().await, "keel_http_accept_errors_total"),
        Some(0.0)
    );
    drop(idle);
}

#[tokio::test]
async fn an_announced_10_mib_body_gets_413_at_once() {
    let server = Server::start().await;
    let started = Instant::now();
    let answer = raw_exchange(
        &server,
        format!(
            "PUT /v1/admin/log-filters HTTP/1.1\r\nHost: keel\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            10 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1048576")
    );
}

#[tokio::test]
async fn request_heads_the_parser_refuses_get_the_documented_bare_status() {
    let server = Server::start().await;
    let control_byte = b"GET /healthz HTTP/1.1\r\nHost: keel\r\nX-Bad: a\x01b\r\n\r\n".to_vec();
    let mut many_headers = b"GET /healthz HTTP/1.1\r\nHost: keel\r\n".to_vec();
    for i in 0..300 {
        many_headers.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many_headers.extend_from_slice(b"\r\n");
    let mut huge_header = b"GET /healthz HTTP/1.1\r\nHost: keel\r\nX-Big: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge_header.extend_from_slice(b"\r\n\r\n");

    for (request, status) in [
        (control_byte, "400 Bad Request"),
        (many_headers, "431 Request Header Fields Too Large"),
        (huge_header, "431 Request Header Fields Too Large"),
    ] {
        let answer = raw_exchange(&server, &request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.contains("content-length: 0\r\n"), "{answer}");
    }
    // keel is unharmed.
    assert_eq!(server.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn when_every_place_is_busy_health_probes_use_a_reserved_one() {
    let server = Server::start_with(Options {
        http: "max_connections = 2",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("waiter"));
    // Every request on a new connection, so each one needs a place of its own.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let agent = Api {
        client: fresh.clone(),
        ..agent
    };
    agent.check_in(&["q1"]).await;
    // Two long-polls hold both places. A claim that finds them taken (by a connection keel
    // has not yet seen close) gets 503 and retries, as `Retry-After` says a client should.
    let mut waits = Vec::new();
    for _ in 0..2 {
        let agent = agent.clone();
        waits.push(tokio::spawn(async move {
            loop {
                let response = agent
                    .client
                    .post(format!("{}/v1/commands/claim", agent.base))
                    .bearer_auth(&agent.token)
                    .json(&json!({"limit": 1, "wait_seconds": 6}))
                    .send()
                    .await
                    .unwrap();
                if response.status() != 503 {
                    assert_eq!(response.status(), 200);
                    return response.json::<Value>().await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let status_of = |route: &'static str| {
        let fresh = fresh.clone();
        let url = server.url(route);
        async move { fresh.get(url).send().await.unwrap().status() }
    };
    poll_until(Duration::from_secs(5), || async {
        status_of("/v1/agents").await == 503
    })
    .await;
    let response = fresh.get(server.url("/v1/agents")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["connection"], "close");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    for route in ["/healthz", "/readyz"] {
        assert_eq!(status_of(route).await, 200, "{route}");
    }
    for wait in waits {
        assert_eq!(wait.await.unwrap()["commands"], json!([]));
    }
    // The places are free again.
    poll_until(Duration::from_secs(5), || async {
        status_of("/v1/agents").await == 401
    })
    .await;
}
