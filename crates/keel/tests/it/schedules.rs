//! Schedules over HTTP on the real server: create, list, read, pause, resume and delete; the
//! next 5 fire times; 422 naming the field for a bad pattern, time zone or template; 404 across
//! organisations; and a schedule every second whose commands agents claim, each fire time once
//! across a `kill -9` and restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::harness::{Api, Options, Server, metric, poll_until};

/// The scheduler every 200 ms; fire times up to 5 s old still fire.
const FAST_SCHEDULER: &str = "[commands]\nschedule_interval = \"200ms\"\nschedule_grace = \"5s\"\n";

fn nightly() -> Value {
    json!({
        "name": "nightly cleanup",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "command": {"type": "cleanup", "queue": "maintenance", "params": {"older_than": "7d"}},
        "missed": "catch_up_one",
    })
}

fn rfc3339(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().unwrap(), &Rfc3339).unwrap()
}

async fn delete(api: &Api, path: &str, expect: u16) -> Value {
    api.call(Method::DELETE, path, None, expect).await
}

#[tokio::test]
async fn schedules_are_created_listed_read_paused_resumed_and_deleted() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let reader = server.key("acme", "commands:read", None);

    let created = ops.post("/v1/schedules", &nightly(), 201).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "nightly cleanup");
    assert_eq!(created["cron"], "30 2 * * *");
    assert_eq!(created["timezone"], "Europe/Berlin");
    assert_eq!(created["missed"], "catch_up_one");
    assert_eq!(created["state"], "active");
    assert_eq!(created["last_fire_at"], Value::Null);
    assert_eq!(created["command"], nightly()["command"]);
    // The next 5 fire times: a day apart (or 23 or 25 hours across a clock change), at 02:30
    // Berlin time (03:00 on a spring-forward day), with Berlin's offset.
    let fires = created["next_fires"].as_array().unwrap();
    assert_eq!(fires.len(), 5, "{created}");
    let times: Vec<OffsetDateTime> = fires.iter().map(rfc3339).collect();
    let now = OffsetDateTime::now_utc();
    assert!(times[0] > now && times[0] - now <= time::Duration::hours(25));
    for (text, t) in fires.iter().zip(&times) {
        let text = text.as_str().unwrap();
        assert!(
            text.ends_with("+01:00") || text.ends_with("+02:00"),
            "{text}"
        );
        assert!(
            (t.hour(), t.minute()) == (2, 30) || (t.hour(), t.minute()) == (3, 0),
            "{text}"
        );
    }
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= time::Duration::hours(23) && gap <= time::Duration::hours(25));
    }

    let daily = ops
        .post(
            "/v1/schedules",
            &json!({"cron": "0 0 9 * * MON-FRI", "timezone": "America/New_York",
                    "command": {"type": "report", "queue": "reports"}}),
            201,
        )
        .await;
    assert_eq!(daily["missed"], "skip", "skip unless given");
    assert_eq!(daily["name"], Value::Null);
    assert!(
        daily["next_fires"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_str().unwrap().contains("T09:00:00-0")),
        "{daily}"
    );

    let listed = reader.get("/v1/schedules", 200).await;
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str(), daily["id"].as_str().unwrap()]);
    assert_eq!(listed["next_cursor"], Value::Null);
    let first_page = reader.get("/v1/schedules?limit=1", 200).await;
    assert_eq!(first_page["items"].as_array().unwrap().len(), 1);
    assert_eq!(first_page["next_cursor"], id.as_str());
    let second_page = reader
        .get(&format!("/v1/schedules?limit=1&cursor={id}"), 200)
        .await;
    assert_eq!(second_page["items"][0]["id"], daily["id"]);

    let path = format!("/v1/schedules/{id}");
    let one = reader.get(&path, 200).await;
    assert_eq!(one["id"], id.as_str());
    assert_eq!(one["next_fires"], created["next_fires"]);
    assert_eq!(one["recent_fires"], json!([]));

    // A read-only key may not change schedules.
    reader.post(&format!("{path}/pause"), &json!({}), 403).await;
    let paused = ops.post(&format!("{path}/pause"), &json!({}), 200).await;
    assert_eq!(paused["state"], "paused");
    assert_eq!(reader.get(&path, 200).await["state"], "paused");
    let resumed = ops.post(&format!("{path}/resume"), &json!({}), 200).await;
    assert_eq!(resumed["state"], "active");

    delete(&reader, &path, 403).await;
    delete(&ops, &path, 204).await;
    reader.get(&path, 404).await;
    delete(&ops, &path, 404).await;
    ops.post(&format!("{path}/resume"), &json!({}), 404).await;
    ops.get("/v1/schedules/not-a-uuid", 400).await;

    // Each change is an audit record naming the schedule.
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .any(|r| r["action"] == "schedule.delete")
    })
    .await;
    let actions: Vec<String> = server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "audit" && r["schedule_id"] == id.as_str())
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        vec![
            "schedule.create",
            "schedule.pause",
            "schedule.resume",
            "schedule.delete"
        ]
    );
}

#[tokio::test]
async fn bad_schedules_get_422_naming_the_field_and_create_nothing() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let with = |field: &str, value: Value| {
        let mut body = nightly();
        body[field] = value;
        body
    };
    let with_command = |command: Value| with("command", command);
    let cases = [
        (with("cron", json!("61 * * * *")), "cron:"),
        (with("cron", json!("* * *")), "cron:"),
        (with("cron", json!("0 0 0 * * * 2030")), "cron:"),
        (with("cron", json!(5)), "cron:"),
        (with("cron", json!("0 0 30 2 *")), "cron:"),
        (with("timezone", json!("Mars/Olympus_Mons")), "timezone:"),
        (with("timezone", json!("")), "timezone:"),
        (with("missed", json!("sometimes")), "missed:"),
        (with("name", json!("")), "name:"),
        (
            with_command(json!({"type": "cleanup"})),
            "command: exactly one",
        ),
        (
            with_command(json!({"type": "cleanup", "queue": "no spaces"})),
            "command.queue:",
        ),
        (
            with_command(json!({"type": "clean up", "queue": "q"})),
            "command.type:",
        ),
        (
            with_command(json!({"type": "cleanup", "queue": "q", "priority": 5000})),
            "command.priority:",
        ),
        (
            with_command(json!({"type": "cleanup", "queue": "q", "params": [1]})),
            "command.params:",
        ),
        (
            with_command(json!({"type": "cleanup", "queue": "q",
                                "run_at": "2030-01-01T00:00:00Z"})),
            "command.run_at:",
        ),
        (
            with_command(json!({"type": "cleanup", "agent_id": uuid::Uuid::now_v7()})),
            "command.agent_id:",
        ),
        (
            with_command(json!({"type": "cleanup", "queue": "q", "colour": "red"})),
            "command.colour: unknown field",
        ),
        (
            with_command(json!({"type": "cleanup", "selector": "env in prod"})),
            "command.selector:",
        ),
    ];
    for (body, field) in cases {
        let answer = ops.post("/v1/schedules", &body, 422).await;
        assert_eq!(answer["error"]["code"], "validation_failed", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field}: {message} for {body}");
    }
    let mut unknown = nightly();
    unknown["every"] = json!("day");
    ops.post("/v1/schedules", &unknown, 422).await;
    let mut missing = nightly();
    missing.as_object_mut().unwrap().remove("timezone");
    let answer = ops.post("/v1/schedules", &missing, 422).await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timezone"),
        "{answer}"
    );
    // Nothing was created.
    assert_eq!(ops.get("/v1/schedules", 200).await["items"], json!([]));
}

#[tokio::test]
async fn another_organisations_schedules_are_404_on_every_route() {
    let server = Server::start().await;
    server.create_org("alpha");
    server.create_org("beta");
    let alpha = server.key("alpha", "admin,commands:write,commands:read", None);
    let beta = server.key("beta", "admin,commands:write,commands:read", None);
    let schedule = beta.post("/v1/schedules", &nightly(), 201).await;
    let id = schedule["id"].as_str().unwrap();
    let path = format!("/v1/schedules/{id}");

    for answer in [
        alpha.get(&path, 404).await,
        alpha.get(&format!("{path}/fires"), 404).await,
        alpha.post(&format!("{path}/pause"), &json!({}), 404).await,
        alpha.post(&format!("{path}/resume"), &json!({}), 404).await,
        delete(&alpha, &path, 404).await,
    ] {
        assert_eq!(answer["error"]["code"], "not_found", "{answer}");
    }
    assert_eq!(alpha.get("/v1/schedules", 200).await["items"], json!([]));
    // A template may not name another organisation's agent either.
    let beta_agent = server.key("beta", "agent", Some("worker"));
    let agent_id = beta_agent.check_in(&[]).await["id"].clone();
    let mut body = nightly();
    body["command"] = json!({"type": "cleanup", "agent_id": agent_id});
    alpha.post("/v1/schedules", &body, 422).await;
    beta.post("/v1/schedules", &body, 201).await;
    // Beta's schedule is untouched.
    let after = beta.get(&path, 200).await;
    assert_eq!(after["state"], "active");
}

/// Claims and completes what the agent is given until `until`; returns the claimed ids.
async fn claim_until(agent: &Api, until: Instant) -> Vec<String> {
    let mut claimed = Vec::new();
    while Instant::now() < until {
        let answer = agent
            .post(
                "/v1/commands/claim",
                &json!({"limit": 100, "queues": ["ticks"], "wait_seconds": 1}),
                200,
            )
            .await;
        for command in answer["commands"].as_array().unwrap() {
            let id = command["id"].as_str().unwrap().to_owned();
            agent
                .post(
                    &format!("/v1/commands/{id}/complete"),
                    &json!({"claim_token": command["claim_token"], "result": {"ok": true}}),
                    200,
                )
                .await;
            claimed.push(id);
        }
    }
    claimed
}

#[tokio::test]
async fn a_schedule_every_second_fires_once_per_fire_time_across_a_kill_9_restart() {
    let mut server = Server::start_with(Options {
        extra_toml: FAST_SCHEDULER,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("ticker"));
    agent.check_in(&["ticks"]).await;
    let schedule = ops
        .post(
            "/v1/schedules",
            &json!({"cron": "* * * * * *", "timezone": "UTC",
                    "command": {"type": "tick", "queue": "ticks"}}),
            201,
        )
        .await;
    let id = schedule["id"].as_str().unwrap().to_owned();

    let mut claimed = claim_until(&agent, Instant::now() + Duration::from_secs(3)).await;
    assert!(claimed.len() >= 2, "{claimed:?}");
    server.kill9();
    server.restart().await;
    claimed.extend(claim_until(&agent, Instant::now() + Duration::from_secs(3)).await);
    ops.post(&format!("/v1/schedules/{id}/pause"), &json!({}), 200)
        .await;
    // What was created before the pause is claimed too.
    claimed.extend(claim_until(&agent, Instant::now() + Duration::from_secs(2)).await);

    let commands = ops.get("/v1/commands?queue=ticks&limit=500", 200).await["items"]
        .as_array()
        .unwrap()
        .clone();
    // Paused, it creates nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = ops.get("/v1/commands?queue=ticks&limit=500", 200).await;
    assert_eq!(later["items"].as_array().unwrap().len(), commands.len());

    // One command per fire time: each is due at its fire time, and no fire time repeats.
    let mut by_fire_time: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for command in &commands {
        by_fire_time
            .entry(command["run_at"].as_str().unwrap().to_owned())
            .or_default()
            .push(command["id"].as_str().unwrap().to_owned());
        assert_eq!(command["status"], "completed", "{command}");
        assert_eq!(rfc3339(&command["run_at"]).nanosecond(), 0);
    }
    assert!(
        by_fire_time.values().all(|ids| ids.len() == 1),
        "a fire time created two commands: {by_fire_time:?}"
    );
    assert!(by_fire_time.len() >= 4, "{by_fire_time:?}");
    // The agent claimed each of them, once.
    let unique: BTreeSet<&String> = claimed.iter().collect();
    assert_eq!(unique.len(), claimed.len(), "a command was claimed twice");
    let created: BTreeSet<String> = commands
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        created
    );

    // The schedule's view links its latest fire times to the commands they created.
    let view = ops.get(&format!("/v1/schedules/{id}"), 200).await;
    let recent = view["recent_fires"].as_array().unwrap();
    assert!(!recent.is_empty());
    for fire in recent {
        let ids = fire["command_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 1, "{fire}");
        let command = ops
            .get(&format!("/v1/commands/{}", ids[0].as_str().unwrap()), 200)
            .await;
        assert_eq!(rfc3339(&command["run_at"]), rfc3339(&fire["fire_at"]));
    }
    assert_eq!(
        rfc3339(&view["last_fire_at"]),
        rfc3339(&recent[0]["fire_at"])
    );
    // Every fire, page by page: one command each, the one due at that fire time.
    let mut fire_pages: Vec<Value> = Vec::new();
    let mut page_path = format!("/v1/schedules/{id}/fires?limit=3");
    loop {
        let page = ops.get(&page_path, 200).await;
        fire_pages.extend(page["items"].as_array().unwrap().iter().cloned());
        let Some(before) = page["next_before"].as_str() else {
            break;
        };
        let before = rfc3339(&json!(before)).format(&Rfc3339).unwrap();
        page_path = format!(
            "/v1/schedules/{id}/fires?limit=3&before={}",
            before.replace('+', "%2B")
        );
    }
    let fired: BTreeMap<String, String> = fire_pages
        .iter()
        .map(|fire| {
            let ids = fire["command_ids"].as_array().unwrap();
            assert_eq!(ids.len(), 1, "{fire}");
            let fire_at = rfc3339(&fire["fire_at"]).format(&Rfc3339).unwrap();
            (ids[0].as_str().unwrap().to_owned(), fire_at)
        })
        .collect();
    assert_eq!(fired.len(), fire_pages.len(), "a command in two fires");
    let run_at: BTreeMap<String, String> = commands
        .iter()
        .map(|c| {
            let at = rfc3339(&c["run_at"]).format(&Rfc3339).unwrap();
            (c["id"].as_str().unwrap().to_owned(), at)
        })
        .collect();
    assert_eq!(fired, run_at);
    ops.get(&format!("/v1/schedules/{id}/fires?before=yesterday"), 422)
        .await;

    // Each fire is an audit record naming its command, once. (The records the first process
    // still held in its log queue when it was killed are lost with it.)
    let audited: Vec<String> = server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "audit" && r["action"] == "schedule.fire")
        .map(|r| r["command_ids"].as_str().unwrap().to_owned())
        .collect();
    let distinct: BTreeSet<String> = audited.iter().cloned().collect();
    assert_eq!(distinct.len(), audited.len(), "{audited:?}");
    assert!(
        !distinct.is_empty() && distinct.is_subset(&created),
        "{audited:?}"
    );
}

#[tokio::test]
async fn a_panicking_scheduler_tick_is_counted_and_the_next_tick_fires() {
    let server = Server::start_with(Options {
        extra_toml: FAST_SCHEDULER,
        failpoints: Some("commands.scheduler=1*panic(scheduler tick)"),
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    ops.post(
        "/v1/schedules",
        &json!({"cron": "* * * * * *", "timezone": "Europe/Berlin",
                "command": {"type": "tick", "queue": "ticks"}}),
        201,
    )
    .await;
    poll_until(Duration::from_secs(10), || async {
        let page = ops.get("/v1/commands?queue=ticks", 200).await;
        !page["items"].as_array().unwrap().is_empty()
    })
    .await;
    // The fire is counted right after its command is stored: a scrape may fall in between.
    poll_until(Duration::from_secs(10), || async {
        let text = server.metrics().await;
        metric(&text, r#"keel_schedule_fires_total{outcome="created"}"#).unwrap_or(0.0) >= 1.0
    })
    .await;
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, r#"keel_job_tick_failures_total{job="scheduler"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_fire_wakes_the_agent_waiting_in_a_long_poll() {
    let server = Server::start_with(Options {
        extra_toml: FAST_SCHEDULER,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("waiter"));
    let agent_id = agent.check_in(&[]).await["id"].clone();
    // Targeted at the agent, every 3 seconds.
    ops.post(
        "/v1/schedules",
        &json!({"cron": "*/3 * * * * *", "timezone": "UTC",
                "command": {"type": "tick", "agent_id": agent_id}}),
        201,
    )
    .await;
    let started = Instant::now();
    let answer = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "wait_seconds": 20}),
            200,
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(answer["commands"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["commands"][0]["target"]["agent_id"], agent_id);
    // Woken by the fire (at most 3 s away, plus a scheduler tick), not by the end of the wait.
    assert!(waited < Duration::from_secs(6), "{waited:?}");
}

#[tokio::test]
async fn a_broadcast_schedule_resolves_its_selector_at_each_fire() {
    let server = Server::start_with(Options {
        extra_toml: FAST_SCHEDULER,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let check_in = |key: Api, env: &'static str| async move {
        key.post(
            "/v1/agents/check-in",
            &json!({"version": "1", "boot_id": uuid::Uuid::new_v4(), "labels": {"env": env}}),
            200,
        )
        .await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let web = check_in(server.key("acme", "agent", Some("web")), "prod").await;
    let db = check_in(server.key("acme", "agent", Some("db")), "prod").await;
    check_in(server.key("acme", "agent", Some("dev")), "dev").await;

    let schedule = ops
        .post(
            "/v1/schedules",
            &json!({"cron": "* * * * * *", "timezone": "UTC",
                    "command": {"type": "rotate-logs", "selector": "env=prod", "max_concurrency": 1}}),
            201,
        )
        .await;
    let id = schedule["id"].as_str().unwrap();
    poll_until(Duration::from_secs(20), || async {
        ops.get(&format!("/v1/schedules/{id}/fires"), 200).await["items"]
            .as_array()
            .unwrap()
            .len()
            >= 2
    })
    .await;
    ops.post(&format!("/v1/schedules/{id}/pause"), &json!({}), 200)
        .await;
    let fires = ops.get(&format!("/v1/schedules/{id}/fires"), 200).await;
    let prod: BTreeSet<&str> = [web.as_str(), db.as_str()].into();
    for fire in fires["items"].as_array().unwrap() {
        assert_eq!(fire["error"], Value::Null, "{fire}");
        let ids = fire["command_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 1, "one broadcast per fire: {fire}");
        let parent = ops
            .get(&format!("/v1/commands/{}", ids[0].as_str().unwrap()), 200)
            .await;
        assert_eq!(parent["target"], json!({"selector": "env=prod"}));
        assert_eq!(parent["run_at"], fire["fire_at"]);
        let reached: BTreeSet<&str> = parent["broadcast"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(reached, prod, "{parent}");
        assert_eq!(parent["broadcast"]["max_concurrency"], 1);
        assert_eq!(
            parent["broadcast"]["children"]["items"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    // A selector that matches nothing at a fire is recorded on that fire, with no command.
    let lonely = ops
        .post(
            "/v1/schedules",
            &json!({"cron": "* * * * * *", "timezone": "UTC",
                    "command": {"type": "t", "selector": "env=nowhere"}}),
            201,
        )
        .await;
    let lonely = lonely["id"].as_str().unwrap();
    poll_until(Duration::from_secs(20), || async {
        !ops.get(&format!("/v1/schedules/{lonely}/fires"), 200).await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let fire = ops.get(&format!("/v1/schedules/{lonely}/fires"), 200).await["items"][0].clone();
    assert_eq!(fire["command_ids"], json!([]));
    assert!(
        fire["error"]
            .as_str()
            .unwrap()
            .contains("command.selector: `env=nowhere` matches no agent"),
        "{fire}"
    );
}
