//! Several `keel serve` instances on one PostgreSQL database (a schema of its own per test):
//! elected jobs, wake-ups across instances, the database going away and coming back,
//! `keel migrate` and a newer schema refused. The server's URL is read from
//! `KEEL_TEST_POSTGRES_URL`; without it each test says that it skips (and fails when
//! `KEEL_REQUIRE_POSTGRES=1`, as in CI).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_store::conformance::postgres::{TestSchema, test_url};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::harness::{Api, Options, Server, poll_until, post_until};

/// The `[store]` table of an instance on `schema`, reached at `url`.
pub(crate) fn store_toml(url: &str, schema: &TestSchema) -> &'static str {
    Box::leak(
        format!(
            "[store]\nurl = \"{url}\"\n[store.postgres]\nschema = \"{}\"\n",
            schema.name()
        )
        .into_boxed_str(),
    )
}

/// `n` instances on one new schema (each with its own data directory and port).
async fn cluster(url: &str, n: usize) -> (TestSchema, Vec<Server>) {
    let schema = TestSchema::create(url).await;
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(
            Server::start_with(Options {
                extra_toml: store_toml(url, &schema),
                ..Options::default()
            })
            .await,
        );
    }
    (schema, servers)
}

/// The `instance` component of a server: (detail, elected).
async fn instance(server: &Server) -> (String, bool) {
    let components = server.admin_get("/v1/admin/components").await;
    let detail = components
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "instance")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let elected = detail.contains("runs the elected jobs");
    (detail, elected)
}

async fn elected_count(servers: &[&Server]) -> usize {
    let mut count = 0;
    for server in servers {
        if instance(server).await.1 {
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn one_instance_runs_the_elected_jobs_and_another_takes_over_when_it_dies() {
    let Some(url) = test_url() else { return };
    let (_schema, mut servers) = cluster(&url, 3).await;
    let all: Vec<&Server> = servers.iter().collect();
    poll_until(Duration::from_secs(10), || async {
        elected_count(&all).await == 1
    })
    .await;
    // Each instance shows its own boot id.
    let mut boots = Vec::new();
    for server in &servers {
        let (detail, _) = instance(server).await;
        assert!(detail.contains("postgres"), "{detail}");
        boots.push(detail.split(',').next().unwrap().to_owned());
    }
    boots.sort();
    boots.dedup();
    assert_eq!(boots.len(), 3, "three boot ids");

    let mut holder = None;
    for (i, server) in servers.iter().enumerate() {
        if instance(server).await.1 {
            holder = Some(i);
        }
    }
    let holder = holder.unwrap();
    servers[holder].kill9();
    let killed_at = Instant::now();
    let alive: Vec<&Server> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holder)
        .map(|(_, s)| s)
        .collect();
    poll_until(Duration::from_secs(10), || async {
        elected_count(&alive).await == 1
    })
    .await;
    eprintln!(
        "elected jobs moved to a live instance {:?} after the kill",
        killed_at.elapsed()
    );
    // The restarted instance finds the lock held and stands by.
    servers[holder].restart().await;
    let all: Vec<&Server> = servers.iter().collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(elected_count(&all).await, 1);
}

/// An organisation `acme` with an agent key (`web-1`) and a writer key, created through the
/// first server (every instance sees them).
fn tenant(server: &Server) -> (Api, Api) {
    server.create_org("acme");
    (
        server.key("acme", "agent", Some("web-1")),
        server.key("acme", "commands:write,commands:read", None),
    )
}

/// [`tenant`], over the admin HTTP API (with the admin token): no `keel admin` process, whose
/// own connection would have to come through the test's proxy.
async fn tenant_over_http(server: &Server) -> (Api, Api) {
    let admin = server.api(crate::harness::ADMIN_TOKEN);
    admin
        .post("/v1/admin/organisations", &json!({"name": "acme"}), 201)
        .await;
    let mut keys = Vec::new();
    for body in [
        json!({"name": "web-1", "scopes": ["agent"], "agent": "web-1"}),
        json!({"name": "writer", "scopes": ["commands:write", "commands:read"]}),
    ] {
        let key = admin
            .post("/v1/admin/organisations/acme/keys", &body, 201)
            .await;
        keys.push(server.api(key["token"].as_str().unwrap()));
    }
    let writer = keys.pop().unwrap();
    (keys.pop().unwrap(), writer)
}

fn on(server: &Server, api: &Api) -> Api {
    server.api(&api.token)
}

#[tokio::test]
async fn an_enqueue_on_one_instance_wakes_a_long_poll_on_another_at_once() {
    let Some(url) = test_url() else { return };
    let (_schema, servers) = cluster(&url, 2).await;
    let (a, b) = (&servers[0], &servers[1]);
    let (agent, writer) = tenant(a);
    let agent_on_b = on(b, &agent);
    agent_on_b.check_in(&["q"]).await;
    let mut latencies = Vec::new();
    for round in 0..5 {
        let poll = {
            let agent = agent_on_b.clone();
            tokio::spawn(async move {
                let claimed = agent
                    .post(
                        "/v1/commands/claim",
                        &json!({"limit": 1, "queues": ["q"], "wait_seconds": 20}),
                        200,
                    )
                    .await;
                (Instant::now(), claimed["commands"].clone())
            })
        };
        // The long poll is waiting on B before A creates the command.
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer
            .post(
                "/v1/commands",
                &json!({"type": "run", "queue": "q", "params": {"round": round}}),
                201,
            )
            .await;
        let created_at = Instant::now();
        let (claimed_at, claimed) = poll.await.unwrap();
        let claimed = claimed.as_array().unwrap().clone();
        assert_eq!(
            claimed.len(),
            1,
            "the long poll on B got the command: {claimed:?}"
        );
        latencies.push(claimed_at.saturating_duration_since(created_at));
        let token = claimed[0]["claim_token"].as_str().unwrap();
        let id = claimed[0]["id"].as_str().unwrap();
        agent_on_b
            .post(
                &format!("/v1/commands/{id}/complete"),
                &json!({"claim_token": token, "result": {}}),
                200,
            )
            .await;
    }
    latencies.sort();
    eprintln!("create on A -> claim answered on B: {latencies:?}");
    let median = latencies[latencies.len() / 2];
    assert!(
        median < Duration::from_millis(100),
        "median wake across instances {median:?}"
    );
}

/// A TCP proxy to PostgreSQL that the test can cut: while cut, every connection through it is
/// closed and new ones are refused.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accept_cut, accept_connections) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if accept_cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_connections.lock().push(task.abort_handle());
            }
        });
        Self {
            port,
            cut,
            connections,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The URL's host and port (`127.0.0.1:5432`), and the URL with them replaced by `port` on
/// the loopback.
fn through_proxy(url: &str, port: u16) -> (String, String) {
    let rest = url.split_once("://").unwrap().1;
    let (userinfo, after) = match rest.split_once('@') {
        Some((userinfo, after)) => (format!("{userinfo}@"), after),
        None => (String::new(), rest),
    };
    let (hostport, path) = after.split_once('/').unwrap_or((after, ""));
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    (
        hostport,
        format!("postgres://{userinfo}127.0.0.1:{port}/{path}"),
    )
}

// Several threads: the proxy serves `keel admin`, which the test waits for synchronously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_away_instances_are_not_ready_and_then_continue_losing_nothing() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    let proxy_port;
    let proxy = {
        let (upstream, _) = through_proxy(&url, 0);
        let proxy = Proxy::start(upstream).await;
        proxy_port = proxy.port;
        proxy
    };
    let (_, proxied) = through_proxy(&url, proxy_port);
    let server = Server::start_with(Options {
        extra_toml: store_toml(&proxied, &schema),
        ..Options::default()
    })
    .await;
    let (agent, writer) = tenant_over_http(&server).await;
    agent.check_in(&["q"]).await;
    let mut created = Vec::new();
    for n in 0..20 {
        let command = writer
            .post(
                "/v1/commands",
                &json!({"type": "run", "queue": "q", "params": {"n": n}}),
                201,
            )
            .await;
        created.push(command["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(server.get("/readyz").await.status(), 200);

    proxy.cut();
    // Not ready, naming the database; health and metrics still answer.
    poll_until(Duration::from_secs(10), || async {
        let ready = server.get("/readyz").await;
        let status = ready.status();
        let body: Value = ready.json().await.unwrap();
        status == 503
            && body["degraded"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "database")
    })
    .await;
    assert_eq!(server.get("/healthz").await.status(), 200);
    assert_eq!(server.get("/metrics").await.status(), 200);
    // A request that needs the database: 503 with Retry-After, never a 500.
    let refused = server
        .client
        .post(server.url("/v1/commands"))
        .bearer_auth(&writer.token)
        .json(&json!({"type": "run", "queue": "q", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.restore();
    poll_until(Duration::from_secs(15), || async {
        server.get("/readyz").await.status() == 200
    })
    .await;
    // Everything accepted before the outage is there, and work goes on.
    let claimed = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 100, "queues": ["q"]}),
            200,
        )
        .await["commands"]
        .clone();
    let mut claimed_ids: Vec<String> = claimed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    claimed_ids.sort();
    created.sort();
    assert_eq!(claimed_ids, created);
    writer
        .post(
            "/v1/commands",
            &json!({"type": "run", "queue": "q", "params": {"after": true}}),
            201,
        )
        .await;
}

/// Runs `keel ARGS` with `env`; returns (success, stdout + stderr).
fn keel(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test]
async fn keel_migrate_applies_the_schema_and_a_newer_one_is_refused() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("KEEL_STORE__POSTGRES__SCHEMA", schema.name())];
    let (ok, out) = keel(&["migrate", "--store-url", &url], &env, dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("migration(s) applied"), "{out}");
    let (ok, out) = keel(&["migrate", "--store-url", &url], &env, dir.path());
    assert!(ok && out.contains("(0 migration(s) applied)"), "{out}");

    // A newer keel's migration.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {}._sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'from the future', true, '\\x00', 0)",
        schema.name()
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let (ok, out) = keel(
        &["serve", "--store-url", &url, "--data-dir", "data"],
        &env,
        dir.path(),
    );
    assert!(!ok, "serve must refuse: {out}");
    assert!(out.contains("newer than this keel"), "{out}");
    let (ok, out) = keel(&["migrate", "--store-url", &url], &env, dir.path());
    assert!(!ok && out.contains("newer than this keel"), "{out}");
}

#[tokio::test]
async fn an_installation_moves_from_sqlite_to_postgres_with_its_queued_and_running_work() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    // On SQLite: queued work, a running command, and keys.
    let mut sqlite = Server::start().await;
    let (agent, writer) = tenant(&sqlite);
    agent.check_in(&["q"]).await;
    let mut queued = Vec::new();
    for n in 0..5 {
        let command = writer
            .post(
                "/v1/commands",
                &json!({"type": "run", "queue": "q", "params": {"n": n}}),
                201,
            )
            .await;
        queued.push(command["id"].as_str().unwrap().to_owned());
    }
    let running = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "queues": ["q"]}),
            200,
        )
        .await["commands"][0]
        .clone();
    queued.retain(|id| id != running["id"].as_str().unwrap());

    // 1. stop, 2. copy, 3. start on PostgreSQL.
    sqlite.signal("TERM");
    assert!(sqlite.wait_exit(Duration::from_secs(15)).await.success());
    let database = sqlite.dir.path().join("keel.db");
    let (ok, out) = keel(
        &[
            "store",
            "copy",
            "--from",
            database.to_str().unwrap(),
            "--to",
            &url,
            "--schema",
            schema.name(),
        ],
        &[],
        sqlite.dir.path(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("commands"), "{out}");
    let postgres = Server::start_with(Options {
        extra_toml: store_toml(&url, &schema),
        ..Options::default()
    })
    .await;
    let (agent, writer) = (on(&postgres, &agent), on(&postgres, &writer));
    // The running command completes with the token it was claimed with.
    agent
        .post(
            &format!("/v1/commands/{}/complete", running["id"].as_str().unwrap()),
            &json!({"claim_token": running["claim_token"], "result": {"moved": true}}),
            200,
        )
        .await;
    // The queued ones are claimed from PostgreSQL.
    let claimed = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 100, "queues": ["q"]}),
            200,
        )
        .await["commands"]
        .clone();
    let mut claimed: Vec<String> = claimed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    claimed.sort();
    queued.sort();
    assert_eq!(claimed, queued);
    let done = writer
        .get(
            &format!("/v1/commands/{}", running["id"].as_str().unwrap()),
            200,
        )
        .await;
    assert_eq!(done["status"], "completed");
    // A second copy into the same database is refused.
    let (ok, out) = keel(
        &[
            "store",
            "copy",
            "--from",
            database.to_str().unwrap(),
            "--to",
            &url,
            "--schema",
            schema.name(),
        ],
        &[],
        sqlite.dir.path(),
    );
    assert!(!ok && out.contains("fresh installation"), "{out}");
}

/// How many of the organisation's commands (or deliveries) are in `status`, read page by page.
/// How many commands and deliveries of the test's schema are completed.
async fn completed_counts(conn: &mut sqlx::PgConnection, schema: &TestSchema) -> (usize, usize) {
    let (commands, deliveries): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {0}.commands WHERE status = 'completed'), \
                (SELECT count(*) FROM {0}.deliveries WHERE status = 'completed')",
        schema.name()
    ))
    .fetch_one(conn)
    .await
    .unwrap();
    (
        usize::try_from(commands).unwrap(),
        usize::try_from(deliveries).unwrap(),
    )
}

async fn count_status(api: &Api, resource: &str, status: &str) -> usize {
    let mut count = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/{resource}?status={status}&limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = api.get(&path, 200).await;
        count += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return count,
        }
    }
}

/// A webhook receiver counting each `webhook-id`.
async fn counting_receiver() -> (Arc<Mutex<std::collections::HashMap<String, u32>>>, String) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    let counts: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(
            move |State(counts): State<Arc<Mutex<std::collections::HashMap<String, u32>>>>,
                  headers: HeaderMap| async move {
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                *counts.lock().entry(id).or_default() += 1;
                StatusCode::OK
            },
        )
        .with_state(counts.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (counts, format!("http://{address}/hook"))
}

/// Overload answers, retried after their `Retry-After`.
const RETRIED: &[u16] = &[429, 503];

const CLUSTER_COMMANDS: usize = 10_000;
const CLUSTER_DELIVERIES: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_four_agents_ten_thousand_of_each_and_a_kill_9_lose_nothing() {
    use crate::agents::{AgentProcess, script};
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    let toml: &'static str = Box::leak(
        format!(
            "{}{}\n[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 4\n\
             secret_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
             release_interval = \"500ms\"\n\n[commands]\nrelease_stuck_interval = \"500ms\"\n",
            store_toml(&url, &schema),
            // Capacity, not quotas, is under test here.
            "[overload.rate_limits]\nwork_per_second = 1000000\nwork_burst = 1000000\n\
             agent_per_second = 1000000\nagent_burst = 1000000\n",
        )
        .into_boxed_str(),
    );
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            Server::start_with(Options {
                extra_toml: toml,
                ..Options::default()
            })
            .await,
        );
    }
    let (counts, hook) = counting_receiver().await;
    servers[0].create_org("acme");
    let writer = servers[0].key("acme", "commands:write,commands:read", None);
    let notifier = servers[0].key("acme", "notifications:write,notifications:read", None);
    let sender = notifier
        .post(
            "/v1/senders",
            &json!({"name": "s", "type": "webhook",
                    "secrets": {"signing_secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}}),
            201,
        )
        .await;
    let channel = notifier
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": hook, "sender_id": sender["id"],
                    "timeout_seconds": 2}),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Four agents, spread over the instances; each run appends its command id to one file.
    let runs = servers[0].dir.path().join("runs");
    let program = script(
        &servers[0],
        "record.sh",
        &format!(
            "cat >/dev/null\necho \"$KEEL_COMMAND_ID\" >> {}",
            runs.display()
        ),
    );
    let mut agents = Vec::new();
    for n in 0..4 {
        let key = servers[0].key("acme", "agent", Some(&format!("agent-{n}")));
        let server = &servers[n % 3];
        agents.push(AgentProcess::start(
            server,
            &server.api(&key.token),
            &program,
            &["--queues", "work", "--concurrency", "8"],
        ));
    }

    // 10,000 commands in batches and 10,000 deliveries one by one, over every instance.
    let started = Instant::now();
    let creating = {
        let writers: Vec<Api> = servers.iter().map(|s| on(s, &writer)).collect();
        tokio::spawn(async move {
            for batch in 0..CLUSTER_COMMANDS / 500 {
                let items: Vec<Value> = (0..500)
                    .map(|n| {
                        json!({"type": "run", "queue": "work", "lease_seconds": 10,
                                    "params": {"n": batch * 500 + n}})
                    })
                    .collect();
                let body = json!({"commands": items});
                let key = format!("batch-{batch}");
                post_until(
                    &writers,
                    batch,
                    "/v1/commands/batch",
                    &key,
                    &body,
                    201,
                    RETRIED,
                )
                .await;
            }
        })
    };
    let queueing = {
        let notifiers: Vec<Api> = servers.iter().map(|s| on(s, &notifier)).collect();
        let channel = channel.clone();
        tokio::spawn(async move {
            for chunk in 0..CLUSTER_DELIVERIES / 100 {
                let batch = (0..100).map(|n| {
                    let (notifiers, channel) = (&notifiers, &channel);
                    async move {
                        let key = format!("delivery-{}", chunk * 100 + n);
                        let body = json!({"channel_id": channel, "idempotency_key": key,
                                          "body": format!("{{\"n\": {}}}", chunk * 100 + n)});
                        post_until(
                            notifiers,
                            chunk + n,
                            "/v1/deliveries",
                            &key,
                            &body,
                            202,
                            RETRIED,
                        )
                        .await;
                    }
                });
                futures::future::join_all(batch).await;
            }
        })
    };
    // Mid-run (creates and sends going on, 2,000 commands run): the elected instance is killed.
    // The deadlines are generous: a shared machine running the other tests beside this one is
    // several times slower than this one alone (about 70 s in all).
    poll_until(Duration::from_secs(300), || async {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
            >= 2_000
    })
    .await;
    let all: Vec<&Server> = servers.iter().collect();
    poll_until(Duration::from_secs(10), || async {
        elected_count(&all).await == 1
    })
    .await;
    let mut holder = 0;
    for (i, server) in servers.iter().enumerate() {
        if instance(server).await.1 {
            holder = i;
        }
    }
    let done_before = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count();
    servers[holder].kill9();
    let alive: Vec<&Server> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holder)
        .map(|(_, s)| s)
        .collect();
    poll_until(Duration::from_secs(15), || async {
        elected_count(&alive).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers[holder].restart().await;
    creating.await.unwrap();
    queueing.await.unwrap();
    eprintln!(
        "10,000 commands and 10,000 deliveries accepted in {:?}",
        started.elapsed()
    );

    // Everything reaches a terminal state: watched in the database (paging through 20,000
    // items over HTTP at every look would load the instances under test), then read once
    // through the API.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let waiting = Instant::now();
    loop {
        let (commands, deliveries) = completed_counts(&mut conn, &schema).await;
        if commands == CLUSTER_COMMANDS && deliveries == CLUSTER_DELIVERIES {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(600),
            "not everything completed within 600 s: {commands} commands and {deliveries} \
             deliveries of {CLUSTER_COMMANDS} each"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    let live = servers[(holder + 1) % 3].api(&writer.token);
    let live_notifier = servers[(holder + 1) % 3].api(&notifier.token);
    assert_eq!(
        count_status(&live, "commands", "completed").await,
        CLUSTER_COMMANDS
    );
    assert_eq!(
        count_status(&live_notifier, "deliveries", "completed").await,
        CLUSTER_DELIVERIES
    );

    // No claim completed twice: one completed attempt per command, in the database itself.
    let completed_twice: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT command_id FROM {}.command_attempts \
         WHERE outcome = 'completed' GROUP BY command_id HAVING count(*) > 1) AS twice",
        schema.name()
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(completed_twice, 0, "a command completed under two claims");
    let held: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM {0}.commands WHERE status = 'executing') \
              + (SELECT count(*) FROM {0}.deliveries WHERE status = 'executing')",
        schema.name()
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(held, 0, "no lease is left held");

    // At-least-once: runs and sends beyond one per item are counted and reported.
    let runs = std::fs::read_to_string(&runs).unwrap();
    let mut ran: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for id in runs.lines() {
        *ran.entry(id).or_default() += 1;
    }
    assert_eq!(ran.len(), CLUSTER_COMMANDS, "every command ran");
    let command_duplicates: u32 = ran.values().map(|n| n - 1).sum();
    let counts = counts.lock().clone();
    assert_eq!(
        counts.len(),
        CLUSTER_DELIVERIES,
        "every delivery reached the receiver"
    );
    let delivery_duplicates: u32 = counts.values().map(|n| n - 1).sum();
    println!(
        "3 instances, 4 agents: {CLUSTER_COMMANDS} commands and {CLUSTER_DELIVERIES} deliveries \
         in {elapsed:?}; instance {holder} (elected) killed after {done_before} runs; \
         duplicates: {command_duplicates} command runs, {delivery_duplicates} deliveries"
    );
    drop(agents);
}
