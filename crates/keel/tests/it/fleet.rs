//! Fleet operations with real processes: labelled `keel agent`s and a broadcast to some of them,
//! paused queues and cordoned agents, and the refusals of each route.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{AgentProcess, script};
use crate::harness::{Api, Server, metric, poll_until};

/// The ids of the agents `GET /v1/agents?selector=…` lists.
async fn selected(api: &Api, selector: &str) -> HashSet<String> {
    let query: String = url_escape(selector);
    api.get(&format!("/v1/agents?selector={query}"), 200).await["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn audit_actions(server: &Server) -> Vec<String> {
    server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "audit")
        .filter_map(|r| r["action"].as_str().map(str::to_owned))
        .collect()
}

/// Creates `count` commands of `type` on `queue`; their ids.
async fn create_pooled(ops: &Api, command_type: &str, queue: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let body = json!({"type": command_type, "queue": queue, "params": {"n": n}});
        let created = ops.post("/v1/commands", &body, 201).await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Waits until every command of `ids` is completed.
async fn wait_completed(ops: &Api, ids: &[String]) {
    poll_until(Duration::from_secs(60), || async {
        let mut all = true;
        for id in ids {
            all &= ops.get(&format!("/v1/commands/{id}"), 200).await["status"] == "completed";
        }
        all
    })
    .await;
}

#[tokio::test]
async fn a_broadcast_to_env_prod_runs_once_on_each_of_the_four_prod_agents_two_at_a_time() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    // Each run records its command, agent, start and end (ns), sleeps a little, and answers
    // with its agent's name.
    let work = script(
        &server,
        "restart.sh",
        "cat > /dev/null\n\
         echo \"$KEEL_COMMAND_ID $AGENT_NAME start $(date +%s%N)\" >> \"$KEEL_TEST_DIR/runs.log\"\n\
         sleep 0.5\n\
         echo \"$KEEL_COMMAND_ID $AGENT_NAME end $(date +%s%N)\" >> \"$KEEL_TEST_DIR/runs.log\"\n\
         echo \"{\\\"agent\\\": \\\"$AGENT_NAME\\\"}\"",
    );
    let fleet = [
        ("web-1", "env=prod,os=linux"),
        ("web-2", "env=prod,os=linux"),
        ("db-1", "env=prod,os=bsd"),
        ("db-2", "env=prod,os=bsd,canary=yes"),
        ("dev-1", "env=dev,os=linux"),
        ("stage-1", "env=staging,os=linux"),
    ];
    let mut agents = Vec::new();
    for (name, labels) in fleet {
        let key = server.key("acme", "agent", Some(name));
        let mut args = vec!["--env-pass", "AGENT_NAME", "--name", name];
        for label in labels.split(',') {
            args.extend(["--label", label]);
        }
        agents.push(AgentProcess::start_with_env(
            &server,
            &key,
            &work,
            &args,
            &[("AGENT_NAME", name)],
        ));
    }
    // All six are online with their labels.
    poll_until(Duration::from_secs(30), || async {
        let listed = ops.get("/v1/agents", 200).await;
        let agents = listed["agents"].as_array().unwrap();
        agents.len() == 6
            && agents
                .iter()
                .all(|a| a["online"] == true && a["labels"]["env"].is_string())
    })
    .await;
    let by_name: HashMap<String, String> = ops.get("/v1/agents", 200).await["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_owned(),
                a["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ids =
        |names: &[&str]| -> HashSet<String> { names.iter().map(|n| by_name[*n].clone()).collect() };
    let prod = ids(&["web-1", "web-2", "db-1", "db-2"]);
    assert_eq!(selected(&ops, "env=prod").await, prod);
    assert_eq!(
        selected(&ops, "env=prod,os in (linux,bsd),!canary").await,
        ids(&["web-1", "web-2", "db-1"])
    );
    assert_eq!(
        selected(&ops, "env notin (prod)").await,
        ids(&["dev-1", "stage-1"])
    );

    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "restart", "selector": "env=prod", "max_concurrency": 2, "params": {"why": "rolling"}}),
            201,
        )
        .await;
    let parent = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["target"], json!({"selector": "env=prod"}));
    let reached: HashSet<String> = created["broadcast"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reached, prod);
    assert_eq!(
        created["broadcast"]["children"]["items"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    wait_completed(&ops, &[parent.to_owned()]).await;
    let done = ops.get(&format!("/v1/commands/{parent}"), 200).await;
    let children = &done["broadcast"]["children"];
    assert_eq!(children["counts"]["completed"], 4, "{done}");
    assert_eq!(children["failed_agents"], json!([]));
    let mut answered = HashSet::new();
    for child in children["items"].as_array().unwrap() {
        assert_eq!(child["status"], "completed");
        assert_eq!(child["attempts"], 1);
        let agent = child["agent_id"].as_str().unwrap();
        let name = by_name
            .iter()
            .find(|(_, id)| id.as_str() == agent)
            .unwrap()
            .0;
        assert_eq!(
            child["result"]["agent"],
            name.as_str(),
            "each child ran on its own agent"
        );
        answered.insert(agent.to_owned());
        let one = ops
            .get(
                &format!("/v1/commands/{}", child["command_id"].as_str().unwrap()),
                200,
            )
            .await;
        assert_eq!(one["parent_id"], parent.as_str());
        assert_eq!(one["params"], json!({"why": "rolling"}));
    }
    assert_eq!(answered, prod);

    // Exactly the four prod agents ran it, once each, never more than two at a time.
    let log = std::fs::read_to_string(server.dir.path().join("runs.log")).unwrap();
    let mut events: Vec<(u128, i32)> = Vec::new();
    let mut runs_per_agent: HashMap<String, usize> = HashMap::new();
    for line in log.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (agent, what, at) = (fields[1], fields[2], fields[3].parse::<u128>().unwrap());
        if what == "start" {
            *runs_per_agent.entry(agent.to_owned()).or_default() += 1;
            events.push((at, 1));
        } else {
            events.push((at, -1));
        }
    }
    let expected: HashMap<String, usize> = ["web-1", "web-2", "db-1", "db-2"]
        .iter()
        .map(|n| ((*n).to_owned(), 1))
        .collect();
    assert_eq!(runs_per_agent, expected, "{log}");
    // Ends sort before starts at the same instant.
    events.sort();
    let mut running = 0;
    let mut most = 0;
    for (_, change) in events {
        running += change;
        most = most.max(running);
    }
    assert_eq!(
        most, 2,
        "at most two children ran at once, and two did: {log}"
    );
}

#[tokio::test]
async fn labels_selectors_and_broadcast_refusals() {
    let server = Server::start().await;
    server.create_org("acme");
    server.create_org("other");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let admin = server.key("acme", "admin", None);
    let outsider = server.key("other", "admin,commands:write,commands:read", None);
    let one = server.key("acme", "agent", Some("one"));
    let two = server.key("acme", "agent", Some("two"));
    let one_id = one
        .post(
            "/v1/agents/check-in",
            &json!({"version": "1", "boot_id": uuid::Uuid::new_v4(), "labels": {"env": "prod", "os": "linux"}}),
            200,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let two_id = two.check_in(&[]).await["id"].as_str().unwrap().to_owned();

    // An admin assigns labels; they win over the reported ones and show in every view.
    let assigned = admin
        .call(
            reqwest::Method::PUT,
            &format!("/v1/agents/{two_id}/labels"),
            Some(&json!({"labels": {"env": "prod", "os": "bsd"}})),
            200,
        )
        .await;
    assert_eq!(assigned["labels"], json!({"env": "prod", "os": "bsd"}));
    assert_eq!(
        assigned["assigned_labels"],
        json!({"env": "prod", "os": "bsd"})
    );
    assert_eq!(assigned["reported_labels"], json!({}));
    let shown = ops.get(&format!("/v1/agents/{two_id}"), 200).await;
    assert_eq!(shown["labels"]["os"], "bsd");
    assert_eq!(
        selected(&ops, "os in (bsd)").await,
        HashSet::from([two_id.clone()])
    );
    assert_eq!(selected(&ops, "env=prod").await.len(), 2);
    assert_eq!(selected(&ops, "").await.len(), 2);
    // Only an admin key assigns labels.
    ops.call(
        reqwest::Method::PUT,
        &format!("/v1/agents/{two_id}/labels"),
        Some(&json!({"labels": {}})),
        403,
    )
    .await;

    // Bad input names the field and changes nothing.
    let bad_selector = ops.get("/v1/agents?selector=env%20in%20prod", 422).await;
    assert!(
        bad_selector["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("selector:"),
        "{bad_selector}"
    );
    for (body, field) in [
        (json!({"type": "t", "selector": "env in prod"}), "selector"),
        (json!({"type": "t", "selector": "  "}), "selector"),
        (
            json!({"type": "t", "selector": "env=prod", "queue": "q"}),
            "selector",
        ),
        (
            json!({"type": "t", "queue": "q", "online_only": false}),
            "online_only",
        ),
        (
            json!({"type": "t", "selector": "env=prod", "max_concurrency": 0}),
            "max_concurrency",
        ),
        (json!({"type": "t", "selector": "env=nowhere"}), "selector"),
        (
            json!({"type": "t", "selector": "env=prod", "online_only": "yes"}),
            "online_only",
        ),
    ] {
        let refused = ops.post("/v1/commands", &body, 422).await;
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    let unmatched = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "selector": "env=nowhere"}),
            422,
        )
        .await;
    assert!(
        unmatched["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`env=nowhere` matches no online agent")
    );
    let batch = ops
        .post(
            "/v1/commands/batch",
            &json!({"commands": [{"type": "t", "selector": "env=prod"}]}),
            422,
        )
        .await;
    assert!(
        batch["error"]["message"]
            .as_str()
            .unwrap()
            .contains("selector"),
        "{batch}"
    );
    for labels in [json!({"bad key": "x"}), json!({"k": "-v"}), json!(["env"])] {
        admin
            .call(
                reqwest::Method::PUT,
                &format!("/v1/agents/{one_id}/labels"),
                Some(&json!({"labels": labels})),
                422,
            )
            .await;
    }
    one.post(
        "/v1/agents/check-in",
        &json!({"version": "1", "boot_id": uuid::Uuid::new_v4(), "labels": {"": "x"}}),
        422,
    )
    .await;
    assert_eq!(
        ops.get("/v1/commands", 200).await["items"],
        json!([]),
        "nothing was created"
    );
    assert_eq!(
        ops.get(&format!("/v1/agents/{one_id}"), 200).await["labels"],
        json!({"env": "prod", "os": "linux"})
    );

    // Another organisation sees none of it: 404 on every agent route.
    outsider.get(&format!("/v1/agents/{one_id}"), 404).await;
    outsider
        .call(
            reqwest::Method::PUT,
            &format!("/v1/agents/{one_id}/labels"),
            Some(&json!({"labels": {}})),
            404,
        )
        .await;
    outsider
        .post(&format!("/v1/agents/{one_id}/cordon"), &json!({}), 404)
        .await;
    outsider
        .post(&format!("/v1/agents/{one_id}/uncordon"), &json!({}), 404)
        .await;
    assert!(selected(&outsider, "env=prod").await.is_empty());

    // A broadcast to both, cancelled before they run: every child is cancelled, and so is it.
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "selector": "env=prod"}),
            201,
        )
        .await;
    let parent = created["id"].as_str().unwrap();
    outsider.get(&format!("/v1/commands/{parent}"), 404).await;
    let cancelled = ops
        .post(&format!("/v1/commands/{parent}/cancel"), &json!({}), 200)
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["broadcast"]["children"]["counts"]["cancelled"], 2);
    assert!(
        one.post("/v1/commands/claim", &json!({"limit": 10}), 200)
            .await["commands"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    ops.post(&format!("/v1/commands/{parent}/cancel"), &json!({}), 409)
        .await;

    // Idempotent: the same key and body answer the first broadcast.
    let mut request = reqwest::Client::new()
        .post(server.url("/v1/commands"))
        .bearer_auth(&ops.token)
        .header("Idempotency-Key", "roll-7");
    request = request.json(&json!({"type": "t", "selector": "env=prod", "online_only": false}));
    let first: Value = request.send().await.unwrap().json().await.unwrap();
    let again = reqwest::Client::new()
        .post(server.url("/v1/commands"))
        .bearer_auth(&ops.token)
        .header("Idempotency-Key", "roll-7")
        .json(&json!({"type": "t", "selector": "env=prod", "online_only": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(
        again["broadcast"]["children"]["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    poll_until(Duration::from_secs(5), || async {
        audit_actions(&server).iter().any(|a| a == "agent.labels")
            && audit_actions(&server)
                .iter()
                .any(|a| a == "command.broadcast")
    })
    .await;
}

#[tokio::test]
async fn a_paused_queue_hands_out_nothing_until_it_is_resumed_then_everything() {
    let server = Server::start().await;
    server.create_org("acme");
    server.create_org("other");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let outsider = server.key("other", "commands:write,commands:read", None);
    let worker = server.key("acme", "agent", Some("worker"));
    let work = script(&server, "work.sh", "cat > /dev/null\necho '{}'");

    let paused = ops.post("/v1/queues/deploy/pause", &json!({}), 200).await;
    assert_eq!(paused["paused"], true);
    assert!(paused["paused_at"].is_string());
    ops.post("/v1/queues/bad%20name/pause", &json!({}), 422)
        .await;
    // Creates are still accepted.
    let ids = create_pooled(&ops, "deploy", "deploy", 5).await;
    let other_queue = ops
        .post(
            "/v1/commands",
            &json!({"type": "build", "queue": "build"}),
            201,
        )
        .await;
    let _agent = AgentProcess::start(&server, &worker, &work, &["--queues", "deploy,build"]);

    // The other queue flows; the paused one does not.
    let build = other_queue["id"].as_str().unwrap();
    wait_completed(&ops, &[build.to_owned()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        assert_eq!(
            ops.get(&format!("/v1/commands/{id}"), 200).await["status"],
            "pending"
        );
    }
    let queues = ops.get("/v1/queues", 200).await;
    let deploy = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "deploy")
        .unwrap()
        .clone();
    assert_eq!(deploy["paused"], true);
    assert_eq!(deploy["agents"], json!(["worker"]));
    assert_eq!(
        metric(&server.metrics().await, "keel_queues_paused"),
        Some(1.0)
    );
    // Another organisation's queue of that name is not paused, and it cannot resume this one.
    assert!(
        outsider.get("/v1/queues", 200).await["queues"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let theirs = outsider
        .post("/v1/queues/deploy/resume", &json!({}), 200)
        .await;
    assert_eq!(theirs["paused"], false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ops.get(&format!("/v1/commands/{}", ids[0]), 200).await["status"],
        "pending"
    );

    // Resumed: the waiting agent is woken and takes everything.
    let resumed = ops.post("/v1/queues/deploy/resume", &json!({}), 200).await;
    assert_eq!(resumed["paused"], false);
    wait_completed(&ops, &ids).await;
    assert_eq!(
        metric(&server.metrics().await, "keel_queues_paused"),
        Some(0.0)
    );
    poll_until(Duration::from_secs(5), || async {
        let actions = audit_actions(&server);
        actions.iter().any(|a| a == "queue.pause") && actions.iter().any(|a| a == "queue.resume")
    })
    .await;
}

#[tokio::test]
async fn a_cordoned_agent_gets_nothing_new_while_another_drains_the_queue() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let cordoned_key = server.key("acme", "agent", Some("cordoned"));
    let drainer_key = server.key("acme", "agent", Some("drainer"));
    let cordoned_id = cordoned_key.check_in(&["jobs"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let drainer_id = drainer_key.check_in(&["jobs"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let view = ops
        .post(&format!("/v1/agents/{cordoned_id}/cordon"), &json!({}), 200)
        .await;
    assert_eq!(view["cordoned"], true);
    assert!(view["cordoned_at"].is_string());
    assert_eq!(
        metric(&server.metrics().await, "keel_agents_cordoned"),
        Some(1.0)
    );
    ops.post("/v1/agents/not-an-id/cordon", &json!({}), 400)
        .await;

    let pooled = create_pooled(&ops, "job", "jobs", 10).await;
    let targeted = ops
        .post(
            "/v1/commands",
            &json!({"type": "job", "agent_id": cordoned_id}),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let work = script(&server, "work.sh", "cat > /dev/null\necho '{}'");
    let _agents = [
        AgentProcess::start(&server, &cordoned_key, &work, &["--queues", "jobs"]),
        AgentProcess::start(
            &server,
            &drainer_key,
            &work,
            &["--queues", "jobs", "--concurrency", "4"],
        ),
    ];
    wait_completed(&ops, &pooled).await;
    for id in &pooled {
        assert_eq!(
            ops.get(&format!("/v1/commands/{id}"), 200).await["claimed_by"],
            drainer_id.as_str(),
            "the cordoned agent took nothing from the pool"
        );
    }
    assert_eq!(
        ops.get(&format!("/v1/commands/{targeted}"), 200).await["status"],
        "pending"
    );
    let agents = ops.get("/v1/agents", 200).await;
    let shown = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == cordoned_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(shown["cordoned"], true);

    // Uncordoned: its waiting claim is woken and its own command runs.
    let view = ops
        .post(
            &format!("/v1/agents/{cordoned_id}/uncordon"),
            &json!({}),
            200,
        )
        .await;
    assert_eq!(view["cordoned"], false);
    wait_completed(&ops, &[targeted.to_owned()]).await;
    assert_eq!(
        metric(&server.metrics().await, "keel_agents_cordoned"),
        Some(0.0)
    );
    poll_until(Duration::from_secs(5), || async {
        let actions = audit_actions(&server);
        actions.iter().any(|a| a == "agent.cordon") && actions.iter().any(|a| a == "agent.uncordon")
    })
    .await;
}
