//! The tenancy sweep: every route of `GET /openapi.json` (the router's own list, see
//! `openapi.rs`) is called with organisation `alpha`'s keys, one per scope, with no key and with
//! an unknown key, aimed at organisation `bravo`'s real objects. Each answer must refuse or stay
//! inside `alpha`, and reveal nothing of `bravo`: the answer about a real `bravo` object is the
//! answer about a random id that does not exist, and no `bravo` id or name is in any body.
//! `bravo`'s state, read through its own keys, is the same afterwards.
//!
//! Every route needs an entry in [`table`]: a route the document lists without one fails the
//! test, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Api, Options, Server};

/// Webhooks may reach the test receiver on loopback.
const ALLOW_LOOPBACK: &str = "[notifications]\nallowed_networks = [\"127.0.0.1\"]\n";
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Every name of organisation `bravo` contains this, so any answer that shows one is caught.
const BRAVO: &str = "bravo";
/// The `Idempotency-Key` of one of `bravo`'s commands and of its event.
const IDEMPOTENCY_KEY: &str = "order-2026-12-07";
/// The boot id `alpha`'s agent checks in with, so a check-in during the sweep changes nothing.
const ALPHA_BOOT: &str = "6f1c2a52-8d3e-4c6b-9a55-3b7f0e1d2c4a";

// ---------------------------------------------------------------------------------------------
// The table: one entry per (method, path template).

/// What a route is, for an organisation's key that is not `bravo`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Its path names one of `bravo`'s objects: refused, 401, 403 or 404.
    Aimed,
    /// It acts in the caller's own organisation (a list, a create, a claim, a queue by name):
    /// it may succeed, but the answer about `bravo`'s ids and names equals the answer about
    /// random ones, and shows nothing of `bravo`.
    Own,
    /// `/v1/admin/*`: operators only, 403 for every organisation key.
    Operator,
    /// The operator page's session: only an operator credential opens one, 401 otherwise.
    Session,
    /// Public by design (the reason is given); it still shows nothing of `bravo`.
    Public(&'static str),
}

/// One request of the sweep.
#[derive(Debug, Clone, PartialEq)]
struct Req {
    method: Method,
    path: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

fn req(method: Method, path: String, body: Option<Value>) -> Req {
    Req {
        method,
        path,
        body,
        headers: Vec::new(),
    }
}

impl Req {
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
}

/// The ids and names a request is filled with: `bravo`'s real ones, or random ones that exist
/// nowhere (each list then has one entry).
#[derive(Debug, Clone)]
struct Ids {
    org: String,
    commands: Vec<String>,
    claim_token: String,
    agents: Vec<String>,
    /// Queue names (`bravo`'s paused one and the one its agent serves).
    queues: Vec<String>,
    schedules: Vec<String>,
    deliveries: Vec<String>,
    event: String,
    event_type: String,
    label_key: String,
    /// The `Idempotency-Key` `bravo` created a command and an event with (not secret: not in
    /// the leak check, since the caller's own retries show it).
    idempotency_key: String,
    rules: Vec<String>,
    policies: Vec<String>,
    channels: Vec<String>,
    senders: Vec<String>,
    templates: Vec<String>,
    routes: Vec<String>,
    keys: Vec<String>,
}

impl Ids {
    fn random() -> Self {
        let id = || vec![uuid::Uuid::new_v4().to_string()];
        let name = || format!("rnd-{}", uuid::Uuid::new_v4().simple());
        Self {
            org: name(),
            commands: id(),
            claim_token: uuid::Uuid::new_v4().simple().to_string(),
            agents: id(),
            queues: vec![name()],
            schedules: id(),
            deliveries: id(),
            event: uuid::Uuid::new_v4().to_string(),
            event_type: name(),
            label_key: name(),
            idempotency_key: name(),
            rules: id(),
            policies: id(),
            channels: id(),
            senders: id(),
            templates: id(),
            routes: id(),
            keys: id(),
        }
    }

    /// Every value, to find the ones a request carries.
    fn values(&self) -> Vec<&str> {
        let mut values = vec![
            self.org.as_str(),
            &self.claim_token,
            &self.event,
            &self.event_type,
            &self.label_key,
            &self.idempotency_key,
        ];
        for list in [
            &self.commands,
            &self.agents,
            &self.queues,
            &self.schedules,
            &self.deliveries,
            &self.rules,
            &self.policies,
            &self.channels,
            &self.senders,
            &self.templates,
            &self.routes,
            &self.keys,
        ] {
            values.extend(list.iter().map(String::as_str));
        }
        values
    }

    /// The settings of the kind a `/v1/{kind}` path names.
    fn settings(&self, kind: &str) -> &[String] {
        match kind {
            "rules" => &self.rules,
            "policies" => &self.policies,
            "channels" => &self.channels,
            "senders" => &self.senders,
            "templates" => &self.templates,
            "routes" => &self.routes,
            other => panic!("no setting kind {other}"),
        }
    }
}

/// Builds a route's requests from a set of ids and the route's path template: a fixed number
/// first (the same for every set of ids), then one per object it can name. Request `n` about
/// `bravo` is compared with request `n` about random ids (their last, past its end).
type Builder = fn(&Ids, &str) -> Vec<Req>;

struct Entry {
    kind: Kind,
    build: Builder,
}

/// Each of `list` through `make`.
fn each(list: &[String], make: impl Fn(&str) -> Req) -> Vec<Req> {
    list.iter().map(|id| make(id)).collect()
}

/// A valid body for creating or replacing a setting of `kind` (in the caller's organisation;
/// it names nothing of `bravo`).
fn setting_body(kind: &str) -> Value {
    match kind {
        "rules" => json!({"name": "alpha-rule", "pattern": "alpha*", "domain": "alpha"}),
        "policies" => json!({"severity": "critical", "priority": 1, "max_attempts": 2}),
        "channels" => {
            json!({"name": "alpha-hook", "type": "webhook", "url": "http://192.0.2.1/alpha"})
        }
        "senders" => json!({"name": "alpha-sender", "type": "webhook",
                            "secrets": {"signing_secrets": [SIGNING_SECRET]}}),
        "templates" => {
            json!({"event_type": "alpha-event", "channel_type": "webhook", "body": "alpha"})
        }
        "routes" => json!({"name": "alpha-route", "channel_types": ["webhook"]}),
        other => panic!("no setting kind {other}"),
    }
}

/// The kind a `/v1/{kind}...` path names.
fn kind_of(template: &str) -> &str {
    template
        .trim_start_matches("/v1/")
        .split('/')
        .next()
        .unwrap()
}

/// The template with `{id}` replaced by each of `list`.
fn each_id(list: &[String], method: Method, template: &str, body: Option<Value>) -> Vec<Req> {
    each(list, |id| {
        req(method.clone(), template.replace("{id}", id), body.clone())
    })
}

/// Every route the sweep knows, keyed by (method, path template).
fn table() -> BTreeMap<(&'static str, &'static str), Entry> {
    use Method as M;
    let mut t: BTreeMap<(&'static str, &'static str), Entry> = BTreeMap::new();
    let mut add = |method: &'static str, path: &'static str, kind: Kind, build: Builder| {
        let previous = t.insert((method, path), Entry { kind, build });
        assert!(previous.is_none(), "{method} {path} twice in the table");
    };
    // The route as it is, without a body: for routes that name nothing.
    let plain: Builder = |_, t| vec![req(M::GET, t.to_owned(), None)];
    let post: Builder = |_, t| vec![req(M::POST, t.to_owned(), None)];

    // Public by design.
    add(
        "GET",
        "/healthz",
        Kind::Public("liveness: a constant answer"),
        plain,
    );
    add(
        "GET",
        "/readyz",
        Kind::Public("readiness: the process's own components"),
        plain,
    );
    add(
        "GET",
        "/metrics",
        Kind::Public("no metrics.token here: process-wide series, no organisation's data"),
        plain,
    );
    add(
        "GET",
        "/openapi.json",
        Kind::Public("the API's description, the same for all"),
        plain,
    );
    add("GET", "/ui", Kind::Public("a redirect to /ui/"), plain);
    add(
        "GET",
        "/ui/",
        Kind::Public("the page's static HTML; its data needs a session"),
        plain,
    );
    add(
        "GET",
        "/ui/app.js",
        Kind::Public("the page's static script"),
        plain,
    );
    add(
        "GET",
        "/ui/app.css",
        Kind::Public("the page's static style sheet"),
        plain,
    );

    // The operator page's session: the caller's own key is offered as the sign-in key.
    add("GET", "/ui/session", Kind::Session, plain);
    add("POST", "/ui/session", Kind::Session, |_, t| {
        vec![req(M::POST, t.to_owned(), Some(json!({"key": CALLER_KEY})))]
    });
    add("DELETE", "/ui/session", Kind::Session, |_, t| {
        vec![req(M::DELETE, t.to_owned(), None)]
    });

    // Agents.
    add("GET", "/v1/agents", Kind::Own, |ids, t| {
        vec![
            req(M::GET, t.to_owned(), None),
            req(
                M::GET,
                format!("{t}?selector={}%3Dnorth", ids.label_key),
                None,
            ),
        ]
    });
    add("POST", "/v1/agents/check-in", Kind::Own, |_, t| {
        let body = json!({"version": "sweep", "queues": ["alpha-q"], "boot_id": ALPHA_BOOT});
        vec![req(M::POST, t.to_owned(), Some(body))]
    });
    add("GET", "/v1/agents/{id}", Kind::Aimed, |ids, t| {
        each_id(&ids.agents, M::GET, t, None)
    });
    add("PUT", "/v1/agents/{id}/labels", Kind::Aimed, |ids, t| {
        let body = json!({"labels": {"alpha-tier": "gold"}});
        each_id(&ids.agents, M::PUT, t, Some(body))
    });
    add("POST", "/v1/agents/{id}/cordon", Kind::Aimed, |ids, t| {
        each_id(&ids.agents, M::POST, t, None)
    });
    add("POST", "/v1/agents/{id}/uncordon", Kind::Aimed, |ids, t| {
        each_id(&ids.agents, M::POST, t, None)
    });

    // Queues are named within the caller's organisation: `bravo`'s names reach `alpha`'s
    // queues of the same name (paused, then resumed by the next route), never `bravo`'s.
    add("GET", "/v1/queues", Kind::Own, plain);
    add("POST", "/v1/queues/{queue}/pause", Kind::Own, |ids, t| {
        each(&ids.queues, |q| req(M::POST, t.replace("{queue}", q), None))
    });
    add("POST", "/v1/queues/{queue}/resume", Kind::Own, |ids, t| {
        each(&ids.queues, |q| req(M::POST, t.replace("{queue}", q), None))
    });

    // Commands.
    add("POST", "/v1/commands", Kind::Own, |ids, t| {
        // The key `bravo` used, with a command of the caller's own: a key shared across
        // organisations would answer `bravo`'s command, or a mismatch.
        let own = json!({"type": "alpha-job", "queue": "alpha-q"});
        // A broadcast to the labels of `bravo`'s agent reaches no agent of the caller's.
        let broadcast = json!({"type": "alpha-job",
                               "selector": format!("{}=north", ids.label_key)});
        let mut requests = vec![
            req(M::POST, t.to_owned(), Some(own)).header("idempotency-key", &ids.idempotency_key),
            req(M::POST, t.to_owned(), Some(broadcast)),
        ];
        requests.extend(each(&ids.agents, |agent| {
            let body = json!({"type": "alpha-job", "agent_id": agent});
            req(M::POST, t.to_owned(), Some(body))
        }));
        requests
    });
    add("GET", "/v1/commands", Kind::Own, |ids, t| {
        let (agent, queue) = (&ids.agents[0], &ids.queues[0]);
        vec![
            req(M::GET, format!("{t}?limit=500"), None),
            req(M::GET, format!("{t}?agent_id={agent}&queue={queue}"), None),
        ]
    });
    add("POST", "/v1/commands/claim", Kind::Own, |ids, t| {
        each(&ids.queues, |q| {
            let body = json!({"limit": 100, "queues": [q]});
            req(M::POST, t.to_owned(), Some(body))
        })
    });
    add("POST", "/v1/commands/release-stuck", Kind::Own, post);
    add("GET", "/v1/commands/dead", Kind::Own, |_, t| {
        vec![req(M::GET, format!("{t}?limit=500"), None)]
    });
    add("POST", "/v1/commands/batch", Kind::Own, |ids, t| {
        each(&ids.agents, |agent| {
            let body = json!({"commands": [{"type": "alpha-job", "agent_id": agent}]});
            req(M::POST, t.to_owned(), Some(body))
        })
    });
    add("POST", "/v1/commands/reports", Kind::Own, |ids, t| {
        let token = &ids.claim_token;
        each(&ids.commands, |id| {
            let body = json!({"reports": [
                {"id": id, "claim_token": token, "outcome": "completed", "result": {}},
                {"id": id, "claim_token": token, "outcome": "failed", "error": "x"},
            ]});
            req(M::POST, t.to_owned(), Some(body))
        })
    });
    add("GET", "/v1/commands/{id}", Kind::Aimed, |ids, t| {
        each_id(&ids.commands, M::GET, t, None)
    });
    add("POST", "/v1/commands/{id}/cancel", Kind::Aimed, |ids, t| {
        each_id(&ids.commands, M::POST, t, None)
    });
    add(
        "POST",
        "/v1/commands/{id}/requeue",
        Kind::Aimed,
        |ids, t| each_id(&ids.commands, M::POST, t, None),
    );
    add(
        "POST",
        "/v1/commands/{id}/heartbeat",
        Kind::Aimed,
        |ids, t| {
            let body = json!({"claim_token": ids.claim_token, "progress": {"step": 1}});
            each_id(&ids.commands, M::POST, t, Some(body))
        },
    );
    add(
        "POST",
        "/v1/commands/{id}/complete",
        Kind::Aimed,
        |ids, t| {
            let body = json!({"claim_token": ids.claim_token, "result": {}});
            each_id(&ids.commands, M::POST, t, Some(body))
        },
    );
    add("POST", "/v1/commands/{id}/fail", Kind::Aimed, |ids, t| {
        let body = json!({"claim_token": ids.claim_token, "error": "x", "retryable": false});
        each_id(&ids.commands, M::POST, t, Some(body))
    });

    // Schedules.
    add("POST", "/v1/schedules", Kind::Own, |ids, t| {
        each(&ids.agents, |agent| {
            let body = json!({"name": "alpha-schedule", "cron": "0 0 1 1 *", "timezone": "UTC",
                              "command": {"type": "alpha-job", "agent_id": agent}});
            req(M::POST, t.to_owned(), Some(body))
        })
    });
    add("GET", "/v1/schedules", Kind::Own, |_, t| {
        vec![req(M::GET, format!("{t}?limit=500"), None)]
    });
    add("GET", "/v1/schedules/{id}", Kind::Aimed, |ids, t| {
        each_id(&ids.schedules, M::GET, t, None)
    });
    add("DELETE", "/v1/schedules/{id}", Kind::Aimed, |ids, t| {
        each_id(&ids.schedules, M::DELETE, t, None)
    });
    add("GET", "/v1/schedules/{id}/fires", Kind::Aimed, |ids, t| {
        each_id(&ids.schedules, M::GET, t, None)
    });
    add("POST", "/v1/schedules/{id}/pause", Kind::Aimed, |ids, t| {
        each_id(&ids.schedules, M::POST, t, None)
    });
    add(
        "POST",
        "/v1/schedules/{id}/resume",
        Kind::Aimed,
        |ids, t| each_id(&ids.schedules, M::POST, t, None),
    );

    // Events, deliveries, previews.
    add("POST", "/v1/events", Kind::Own, |ids, t| {
        let body = json!({"event_type": ids.event_type, "payload": {"n": 1},
                          "idempotency_key": ids.idempotency_key});
        vec![req(M::POST, t.to_owned(), Some(body))]
    });
    add("POST", "/v1/deliveries", Kind::Own, |ids, t| {
        each(&ids.channels, |channel| {
            let body = json!({"channel_id": channel, "subject": "s", "body": "alpha"});
            req(M::POST, t.to_owned(), Some(body))
        })
    });
    add("GET", "/v1/deliveries", Kind::Own, |ids, t| {
        vec![
            req(M::GET, format!("{t}?limit=500"), None),
            req(M::GET, format!("{t}?event_id={}", ids.event), None),
        ]
    });
    add("GET", "/v1/deliveries/dead", Kind::Own, |_, t| {
        vec![req(M::GET, format!("{t}?limit=500"), None)]
    });
    add("GET", "/v1/deliveries/circuits", Kind::Own, plain);
    add("POST", "/v1/deliveries/requeue", Kind::Own, |ids, t| {
        vec![
            req(M::POST, t.to_owned(), Some(json!({"status": "dead"}))),
            req(M::POST, t.to_owned(), Some(json!({"event_id": ids.event}))),
        ]
    });
    add("GET", "/v1/deliveries/{id}", Kind::Aimed, |ids, t| {
        each_id(&ids.deliveries, M::GET, t, None)
    });
    add(
        "POST",
        "/v1/deliveries/{id}/requeue",
        Kind::Aimed,
        |ids, t| each_id(&ids.deliveries, M::POST, t, None),
    );
    add("POST", "/v1/templates/preview", Kind::Own, |ids, t| {
        let body = json!({"event_type": ids.event_type, "channel_type": "webhook",
                          "payload": {"n": 1}});
        vec![req(M::POST, t.to_owned(), Some(body))]
    });

    // Notification settings: the same five routes for each kind. A channel names a sender and
    // a route names channels: `bravo`'s are offered; the other bodies name nothing.
    for (list, one) in [
        ("/v1/rules", "/v1/rules/{id}"),
        ("/v1/policies", "/v1/policies/{id}"),
        ("/v1/channels", "/v1/channels/{id}"),
        ("/v1/senders", "/v1/senders/{id}"),
        ("/v1/templates", "/v1/templates/{id}"),
        ("/v1/routes", "/v1/routes/{id}"),
    ] {
        add("GET", list, Kind::Own, plain);
        add("POST", list, Kind::Own, |ids, t| {
            let kind = kind_of(t);
            if kind == "channels" {
                each(&ids.senders, |sender| {
                    let mut body = setting_body(kind);
                    body["sender_id"] = json!(sender);
                    req(M::POST, t.to_owned(), Some(body))
                })
            } else if kind == "routes" {
                each(&ids.channels, |channel| {
                    let mut body = setting_body(kind);
                    body["channel_ids"] = json!([channel]);
                    req(M::POST, t.to_owned(), Some(body))
                })
            } else {
                vec![req(M::POST, t.to_owned(), Some(setting_body(kind)))]
            }
        });
        add("GET", one, Kind::Aimed, |ids, t| {
            each_id(ids.settings(kind_of(t)), M::GET, t, None)
        });
        add("PUT", one, Kind::Aimed, |ids, t| {
            let kind = kind_of(t);
            each_id(ids.settings(kind), M::PUT, t, Some(setting_body(kind)))
        });
        add("DELETE", one, Kind::Aimed, |ids, t| {
            each_id(ids.settings(kind_of(t)), M::DELETE, t, None)
        });
    }

    // `/v1/admin/*`: operators only.
    for path in [
        "/v1/admin/components",
        "/v1/admin/panics",
        "/v1/admin/jobs",
        "/v1/admin/log-filters",
        "/v1/admin/overload",
        "/v1/admin/organisations",
        "/v1/admin/commands/summary",
        "/v1/admin/agents",
        "/v1/admin/fleet",
        "/v1/admin/dead-commands",
    ] {
        add("GET", path, Kind::Operator, plain);
    }
    add(
        "PUT",
        "/v1/admin/jobs/{name}/interval",
        Kind::Operator,
        |_, t| {
            let body = json!({"interval": "1s"});
            vec![req(M::PUT, t.replace("{name}", "telemetry"), Some(body))]
        },
    );
    add("PUT", "/v1/admin/log-filters", Kind::Operator, |_, t| {
        vec![req(M::PUT, t.to_owned(), Some(json!({"default": "debug"})))]
    });
    add("PUT", "/v1/admin/overload", Kind::Operator, |_, t| {
        vec![req(M::PUT, t.to_owned(), Some(json!({"mode": "critical"})))]
    });
    add("POST", "/v1/admin/organisations", Kind::Operator, |_, t| {
        vec![req(
            M::POST,
            t.to_owned(),
            Some(json!({"name": "alpha-made"})),
        )]
    });
    add(
        "GET",
        "/v1/admin/organisations/{org}/keys",
        Kind::Operator,
        |ids, t| vec![req(M::GET, t.replace("{org}", &ids.org), None)],
    );
    add(
        "POST",
        "/v1/admin/organisations/{org}/keys",
        Kind::Operator,
        |ids, t| {
            let body = json!({"name": "alpha-made", "scopes": ["admin"]});
            vec![req(M::POST, t.replace("{org}", &ids.org), Some(body))]
        },
    );
    add(
        "POST",
        "/v1/admin/organisations/{org}/keys/{id}/revoke",
        Kind::Operator,
        |ids, t| each_id(&ids.keys, M::POST, &t.replace("{org}", &ids.org), None),
    );
    add(
        "POST",
        "/v1/admin/dead-commands/requeue",
        Kind::Operator,
        |ids, t| {
            each(&ids.commands, |id| {
                let body = json!({"commands": [{"org": ids.org, "id": id}]});
                req(M::POST, t.to_owned(), Some(body))
            })
        },
    );
    t
}

/// Stands in a body for the caller's own key (`POST /ui/session`).
const CALLER_KEY: &str = "{caller-key}";

// ---------------------------------------------------------------------------------------------
// Callers and answers.

/// Who calls: one of `alpha`'s keys, no key, or a key that does not exist. Each caller sends
/// from its own loopback address (the operator page limits sign-ins per address).
struct Caller {
    name: &'static str,
    token: Option<String>,
    /// An organisation's real key (not none, not unknown).
    org_key: bool,
    client: reqwest::Client,
}

impl Caller {
    fn new(name: &'static str, token: Option<String>, org_key: bool, n: u8) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n)))
            .build()
            .unwrap();
        Self {
            name,
            token,
            org_key,
            client,
        }
    }

    async fn send(&self, base: &str, request: &Req) -> Answer {
        let mut builder = self
            .client
            .request(request.method.clone(), format!("{base}{}", request.path));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        if let Some(body) = &request.body {
            let text = body
                .to_string()
                .replace(CALLER_KEY, self.token.as_deref().unwrap_or_default());
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(text);
        }
        let response = builder.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        Answer { status, text }
    }
}

struct Answer {
    status: u16,
    text: String,
}

impl Answer {
    /// What an error answer must be: `{"error": {"code", "message", "request_id"}}`.
    fn error_shape(&self) -> Result<(), String> {
        let body: Value = serde_json::from_str(&self.text)
            .map_err(|e| format!("not JSON ({e}): {}", self.text))?;
        let error = &body["error"];
        for field in ["code", "message", "request_id"] {
            if !error[field].is_string() {
                return Err(format!("no error.{field}: {}", self.text));
            }
        }
        Ok(())
    }
}

/// The values of `ids` that `request` carries, longest first.
fn carried<'a>(ids: &'a Ids, request: &Req) -> Vec<&'a str> {
    let text = format!(
        "{} {:?} {}",
        request.path,
        request.headers,
        request
            .body
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_default()
    );
    let mut values: Vec<&str> = ids
        .values()
        .into_iter()
        .filter(|value| text.contains(value))
        .collect();
    values.sort_by_key(|value| std::cmp::Reverse(value.len()));
    values.dedup();
    values
}

/// An answer as compared across ids: what the request carried is `<sent>`, ids and times
/// are masked, `request_id` is left out.
fn normalise(answer: &Answer, sent: &[&str]) -> (u16, Value) {
    let mut text = answer.text.clone();
    for value in sent {
        text = text.replace(value, "<sent>");
    }
    fn mask(value: Value) -> Value {
        match value {
            Value::String(s) if uuid::Uuid::parse_str(&s).is_ok() => json!("<uuid>"),
            Value::String(s)
                if time::OffsetDateTime::parse(
                    &s,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok() =>
            {
                json!("<time>")
            }
            Value::Array(items) => Value::Array(items.into_iter().map(mask).collect()),
            Value::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .filter(|(k, _)| k != "request_id")
                    .map(|(k, v)| (k, mask(v)))
                    .collect(),
            ),
            other => other,
        }
    }
    let text = mask_uuids(&text);
    let body = serde_json::from_str(&text).map_or(Value::String(text), mask);
    (answer.status, body)
}

/// `text` with every UUID in it (a rendered body may hold one inside a string) as `<uuid>`.
fn mask_uuids(text: &str) -> String {
    const LEN: usize = 36;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let candidate = rest.get(..LEN).filter(|c| {
            c.bytes()
                .enumerate()
                .all(|(i, b)| matches!(i, 8 | 13 | 18 | 23) == (b == b'-'))
                && uuid::Uuid::parse_str(c).is_ok()
        });
        if candidate.is_some() {
            out.push_str("<uuid>");
            rest = rest.get(LEN..).unwrap_or_default();
        } else {
            let mut chars = rest.chars();
            out.extend(chars.next());
            rest = chars.as_str();
        }
    }
    out
}

/// `bravo`'s ids and names in `answer` that the request did not carry itself.
fn leaked(answer: &Answer, sent: &[&str], bravo: &[String]) -> Vec<String> {
    let mut text = answer.text.clone();
    for value in sent {
        text = text.replace(value, "");
    }
    let mut found: Vec<String> = bravo
        .iter()
        .filter(|id| text.contains(id.as_str()))
        .cloned()
        .collect();
    if found.is_empty() && text.to_lowercase().contains(BRAVO) {
        let at = text.to_lowercase().find(BRAVO).unwrap_or_default();
        let around = text
            .get(at.saturating_sub(40)..(at + 45).min(text.len()))
            .unwrap_or(BRAVO);
        found.push(format!("a `{BRAVO}` name: …{around}…"));
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Organisation `bravo`: real objects of every kind the routes name.

/// `bravo`'s objects and the keys that read them.
struct Bravo {
    ids: Ids,
    /// Every id, name, key prefix and token of `bravo`, for the leak check.
    identifiers: Vec<String>,
    ops: Api,
}

/// A webhook receiver for `bravo`'s channels: `/bravo-ok` answers 200, anything else 500.
async fn receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        if uri.path() == "/bravo-ok" {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn id_of(value: &Value) -> String {
    value["id"].as_str().unwrap().to_owned()
}

/// Claims one command as `agent`; returns its id and claim token.
async fn claim_one(agent: &Api) -> (String, String) {
    let claimed = agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;
    let command = &claimed["commands"][0];
    (
        id_of(command),
        command["claim_token"].as_str().unwrap().to_owned(),
    )
}

async fn setup_bravo(server: &Server, operator: &Api) -> Bravo {
    server.create_org("bravo-org");
    let ops = server.key("bravo-org", "admin", None);
    let worker = server.key("bravo-org", "agent", Some("bravo-worker"));
    let spare = server.key("bravo-org", "agent", Some("bravo-spare"));
    let mut tokens = vec![ops.token.clone(), worker.token.clone(), spare.token.clone()];
    for scope in [
        "commands:write",
        "commands:read",
        "notifications:write",
        "notifications:read",
    ] {
        tokens.push(server.key("bravo-org", scope, None).token);
    }
    for (agent, queues, labels) in [
        (
            &worker,
            json!(["bravo-q-work"]),
            json!({"bravo-zone": "north"}),
        ),
        (&spare, json!([]), json!({})),
    ] {
        let body = json!({"version": "bravo-1", "queues": queues, "labels": labels,
                          "boot_id": uuid::Uuid::new_v4()});
        agent.post("/v1/agents/check-in", &body, 200).await;
    }
    let agents = ops.get("/v1/agents", 200).await;
    let agent_id = |name: &str| {
        let found = agents["agents"].as_array().unwrap().iter();
        id_of(found.clone().find(|a| a["name"] == name).unwrap())
    };
    let (worker_id, spare_id) = (agent_id("bravo-worker"), agent_id("bravo-spare"));
    let labels = json!({"labels": {"bravo-tier": "gold"}});
    ops.call(
        Method::PUT,
        &format!("/v1/agents/{worker_id}/labels"),
        Some(&labels),
        200,
    )
    .await;
    ops.post(&format!("/v1/agents/{spare_id}/cordon"), &json!({}), 200)
        .await;

    // Commands in every state: executing (held for a day), completed, dead, failed, pending,
    // cancelled, for the cordoned agent, in a paused queue, and a broadcast with its child.
    let work = json!({"type": "bravo-job", "queue": "bravo-q-work", "lease_seconds": 86400,
                      "params": {"bravo": true}});
    let mut commands = Vec::new();
    ops.post("/v1/commands", &work, 201).await;
    let (executing, claim_token) = claim_one(&worker).await;
    commands.push(executing);
    ops.post("/v1/commands", &work, 201).await;
    let (done, token) = claim_one(&worker).await;
    let result = json!({"claim_token": token, "result": {"bravo": "done"}});
    worker
        .post(&format!("/v1/commands/{done}/complete"), &result, 200)
        .await;
    commands.push(done);
    // Dead: its only lease expires, and a release-stuck run dead-letters it.
    let mut dying = work.clone();
    dying["max_attempts"] = json!(1);
    dying["lease_seconds"] = json!(2);
    ops.post("/v1/commands", &dying, 201).await;
    let (dead, _) = claim_one(&worker).await;
    let started = Instant::now();
    while ops.get(&format!("/v1/commands/{dead}"), 200).await["status"] != "dead" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{dead} is not dead"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ops.post("/v1/commands/release-stuck", &json!({}), 200)
            .await;
    }
    commands.push(dead);
    ops.post("/v1/commands", &work, 201).await;
    let (failed, token) = claim_one(&worker).await;
    let failure = json!({"claim_token": token, "error": "bravo-bad", "retryable": false});
    worker
        .post(&format!("/v1/commands/{failed}/fail"), &failure, 200)
        .await;
    commands.push(failed);
    let idle = json!({"type": "bravo-job", "queue": "bravo-q-idle"});
    commands.push(id_of(&ops.post("/v1/commands", &idle, 201).await));
    let keyed = ops
        .client
        .post(server.url("/v1/commands"))
        .bearer_auth(&ops.token)
        .header("idempotency-key", IDEMPOTENCY_KEY)
        .json(&idle)
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 201);
    commands.push(id_of(&keyed.json().await.unwrap()));
    let cancelled = id_of(&ops.post("/v1/commands", &idle, 201).await);
    ops.post(&format!("/v1/commands/{cancelled}/cancel"), &json!({}), 200)
        .await;
    commands.push(cancelled);
    let for_spare = json!({"type": "bravo-job", "agent_id": spare_id});
    commands.push(id_of(&ops.post("/v1/commands", &for_spare, 201).await));
    ops.post("/v1/queues/bravo-q-paused/pause", &json!({}), 200)
        .await;
    let paused = json!({"type": "bravo-job", "queue": "bravo-q-paused"});
    commands.push(id_of(&ops.post("/v1/commands", &paused, 201).await));
    let broadcast = json!({"type": "bravo-job", "selector": "bravo-zone=north"});
    let parent = id_of(&ops.post("/v1/commands", &broadcast, 201).await);
    let shown = ops.get(&format!("/v1/commands/{parent}"), 200).await;
    let children = shown["broadcast"]["children"]["items"].as_array().unwrap();
    assert_eq!(children.len(), 1, "{shown}");
    commands.push(children[0]["command_id"].as_str().unwrap().to_owned());
    commands.push(parent);

    // Schedules: one active, one paused (fire times a year apart).
    let schedule = json!({"name": "bravo-schedule", "cron": "0 0 1 1 *", "timezone": "UTC",
                          "command": {"type": "bravo-job", "queue": "bravo-q-idle"}});
    let active = id_of(&ops.post("/v1/schedules", &schedule, 201).await);
    let held = id_of(&ops.post("/v1/schedules", &schedule, 201).await);
    ops.post(&format!("/v1/schedules/{held}/pause"), &json!({}), 200)
        .await;

    // Notification settings, an event and a direct message: one delivery completed, one dead.
    let base = receiver().await;
    let setting = |path: &'static str, body: Value| {
        let ops = ops.clone();
        async move { id_of(&ops.post(path, &body, 201).await) }
    };
    let rule = setting(
        "/v1/rules",
        json!({"name": "bravo-rule", "domain": "bravo-domain", "severity": "low"}),
    )
    .await;
    let policy = setting(
        "/v1/policies",
        json!({"severity": "low", "priority": 0, "max_attempts": 1}),
    )
    .await;
    let sender = setting(
        "/v1/senders",
        json!({"name": "bravo-sender", "type": "webhook",
               "secrets": {"signing_secrets": [SIGNING_SECRET]}}),
    )
    .await;
    let good = setting(
        "/v1/channels",
        json!({"name": "bravo-good", "type": "webhook", "url": format!("{base}/bravo-ok"),
               "sender_id": sender}),
    )
    .await;
    let down = setting(
        "/v1/channels",
        json!({"name": "bravo-down", "type": "webhook", "url": format!("{base}/bravo-down")}),
    )
    .await;
    let template = setting(
        "/v1/templates",
        json!({"event_type": "bravo-event", "channel_type": "webhook", "subject": "bravo",
               "body": "{\"bravo\": \"{{ event_type }}\"}"}),
    )
    .await;
    let route = setting("/v1/routes", json!({"name": "bravo-route"})).await;
    let event = json!({"event_type": "bravo-event", "idempotency_key": IDEMPOTENCY_KEY});
    let event = ops.post("/v1/events", &event, 202).await;
    let mut deliveries: Vec<String> = event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deliveries.len(), 2, "{event}");
    let direct = json!({"channel_id": good, "subject": "bravo", "body": "bravo-direct"});
    let sent = ops.post("/v1/deliveries", &direct, 202).await;
    deliveries.push(sent["deliveries"][0].as_str().unwrap().to_owned());
    let started = Instant::now();
    for id in &deliveries {
        loop {
            let delivery = ops.get(&format!("/v1/deliveries/{id}"), 200).await;
            let status = delivery["status"].as_str().unwrap().to_owned();
            if ["completed", "dead", "failed"].contains(&status.as_str()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "not delivered in time: {delivery}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let dead = ops.get("/v1/deliveries/dead", 200).await;
    assert_eq!(dead["items"].as_array().unwrap().len(), 1, "{dead}");

    let keys = operator
        .get("/v1/admin/organisations/bravo-org/keys", 200)
        .await;
    let keys = keys.as_array().unwrap();
    let orgs = operator.get("/v1/admin/organisations", 200).await;
    let org_id = id_of(
        orgs.as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "bravo-org")
            .unwrap(),
    );

    let ids = Ids {
        org: "bravo-org".to_owned(),
        commands,
        claim_token,
        agents: vec![worker_id, spare_id],
        queues: vec!["bravo-q-paused".to_owned(), "bravo-q-work".to_owned()],
        schedules: vec![active, held],
        deliveries,
        event: event["event_id"].as_str().unwrap().to_owned(),
        event_type: "bravo-event".to_owned(),
        label_key: "bravo-zone".to_owned(),
        idempotency_key: IDEMPOTENCY_KEY.to_owned(),
        rules: vec![rule],
        policies: vec![policy],
        channels: vec![good, down],
        senders: vec![sender],
        templates: vec![template],
        routes: vec![route],
        keys: keys.iter().map(id_of).collect(),
    };
    let mut identifiers: Vec<String> = ids
        .values()
        .into_iter()
        .filter(|value| *value != IDEMPOTENCY_KEY)
        .map(str::to_owned)
        .collect();
    identifiers.push(org_id);
    identifiers.extend(tokens);
    for key in keys {
        identifiers.push(format!("keel_{}_", key["prefix"].as_str().unwrap()));
    }
    identifiers.push(base);
    Bravo {
        ids,
        identifiers,
        ops,
    }
}

/// `bravo`'s state as its own keys read it: every list, and every object on its own. What
/// the clock alone changes (`online`, a key's last use) is left out.
async fn bravo_state(bravo: &Bravo, operator: &Api) -> BTreeMap<String, Value> {
    let ids = &bravo.ids;
    let mut paths: Vec<String> = [
        "/v1/commands?limit=500",
        "/v1/commands/dead?limit=500",
        "/v1/agents",
        "/v1/queues",
        "/v1/schedules?limit=500",
        "/v1/deliveries?limit=500",
        "/v1/deliveries/dead?limit=500",
        "/v1/rules",
        "/v1/policies",
        "/v1/channels",
        "/v1/senders",
        "/v1/templates",
        "/v1/routes",
    ]
    .map(str::to_owned)
    .to_vec();
    paths.extend(ids.commands.iter().map(|id| format!("/v1/commands/{id}")));
    paths.extend(ids.agents.iter().map(|id| format!("/v1/agents/{id}")));
    for id in &ids.schedules {
        paths.push(format!("/v1/schedules/{id}"));
        paths.push(format!("/v1/schedules/{id}/fires"));
    }
    paths.extend(
        ids.deliveries
            .iter()
            .map(|id| format!("/v1/deliveries/{id}")),
    );
    for kind in [
        "rules",
        "policies",
        "channels",
        "senders",
        "templates",
        "routes",
    ] {
        paths.extend(
            ids.settings(kind)
                .iter()
                .map(|id| format!("/v1/{kind}/{id}")),
        );
    }
    fn without_clock(value: Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.into_iter().map(without_clock).collect()),
            Value::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .filter(|(k, _)| k != "online" && k != "last_used_at")
                    .map(|(k, v)| (k, without_clock(v)))
                    .collect(),
            ),
            other => other,
        }
    }
    let mut state = BTreeMap::new();
    for path in paths {
        let value = bravo.ops.get(&path, 200).await;
        state.insert(path, without_clock(value));
    }
    let keys = "/v1/admin/organisations/bravo-org/keys";
    state.insert(
        keys.to_owned(),
        without_clock(operator.get(keys, 200).await),
    );
    state
}

// ---------------------------------------------------------------------------------------------
// The sweep.

/// What the sweep counted.
#[derive(Default)]
struct Tally {
    routes: usize,
    calls: usize,
    refused: usize,
    /// Answers of routes that act in the caller's own organisation and succeeded there.
    own_successes: usize,
    /// Answers of public routes.
    public: usize,
    leaks: usize,
    failures: Vec<String>,
    /// Answers by caller and status.
    statuses: BTreeMap<&'static str, BTreeMap<u16, usize>>,
}

/// The routes `GET /openapi.json` lists, as (METHOD, path template).
async fn documented_routes(server: &Server) -> BTreeSet<(String, String)> {
    let document: Value = server.get("/openapi.json").await.json().await.unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

/// Checks one answer against what its route's kind allows the caller.
fn judge(kind: Kind, caller: &Caller, answer: &Answer) -> Result<(), String> {
    let status = answer.status;
    let refusal = |allowed: &[u16]| {
        if allowed.contains(&status) {
            answer.error_shape()
        } else {
            Err(format!(
                "{status}, expected one of {allowed:?}: {}",
                answer.text
            ))
        }
    };
    match kind {
        Kind::Public(_) => {
            if matches!(status, 200 | 308) {
                Ok(())
            } else {
                Err(format!("{status} from a public route: {}", answer.text))
            }
        }
        Kind::Session => refusal(&[401]),
        Kind::Operator if caller.org_key => refusal(&[403]),
        Kind::Aimed if caller.org_key => refusal(&[403, 404]),
        Kind::Own if caller.org_key => {
            if status >= 500 {
                Err(format!("{status}: {}", answer.text))
            } else if status >= 400 {
                answer.error_shape()
            } else {
                Ok(())
            }
        }
        Kind::Operator | Kind::Aimed | Kind::Own => refusal(&[401]),
    }
}

impl Tally {
    fn count(&mut self, kind: Kind, caller: &Caller, answer: &Answer) {
        self.calls += 1;
        *self
            .statuses
            .entry(caller.name)
            .or_default()
            .entry(answer.status)
            .or_default() += 1;
        if matches!(kind, Kind::Public(_)) {
            self.public += 1;
        } else if (400..500).contains(&answer.status) {
            self.refused += 1;
        } else if answer.status < 300 {
            self.own_successes += 1;
        }
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 200 {
            self.failures.push(what);
        }
    }

    fn leak(&mut self, what: String) {
        self.leaks += 1;
        self.fail(format!("LEAK {what}"));
    }
}

#[tokio::test]
async fn every_route_refuses_another_organisations_keys_and_reveals_nothing() {
    sweep("SQLite", ALLOW_LOOPBACK).await;
}

#[tokio::test]
async fn every_route_refuses_another_organisations_keys_and_reveals_nothing_on_postgres() {
    let Some(url) = keel_store::conformance::postgres::test_url() else {
        return;
    };
    let schema = keel_store::conformance::postgres::TestSchema::create(&url).await;
    let toml = format!(
        "{ALLOW_LOOPBACK}{}",
        crate::postgres::store_toml(&url, &schema)
    );
    sweep("PostgreSQL", Box::leak(toml.into_boxed_str())).await;
}

/// The sweep on a server started with `extra_toml`.
async fn sweep(backend: &str, extra_toml: &'static str) {
    let server = Server::start_with(Options {
        extra_toml,
        ..Options::default()
    })
    .await;
    let operator = server.operator();
    let bravo = setup_bravo(&server, &operator).await;

    server.create_org("alpha-org");
    let alpha_agent = server.key("alpha-org", "agent", Some("alpha-worker"));
    let check_in = json!({"version": "sweep", "queues": ["alpha-q"], "boot_id": ALPHA_BOOT});
    alpha_agent
        .post("/v1/agents/check-in", &check_in, 200)
        .await;
    let mut callers = Vec::new();
    for (n, scope) in [
        "admin",
        "commands:write",
        "commands:read",
        "notifications:write",
        "notifications:read",
    ]
    .into_iter()
    .enumerate()
    {
        let key = server.key("alpha-org", scope, None);
        callers.push(Caller::new(scope, Some(key.token), true, n as u8));
    }
    callers.push(Caller::new(
        "agent",
        Some(alpha_agent.token.clone()),
        true,
        5,
    ));
    callers.push(Caller::new("no key", None, false, 6));
    let unknown = "keel_zzzzzzzz_notarealtokennotarealtoken".to_owned();
    callers.push(Caller::new("unknown key", Some(unknown), false, 7));

    let before = bravo_state(&bravo, &operator).await;

    // The document is the route list; each route needs an entry.
    let table = table();
    let documented = documented_routes(&server).await;
    let mut tally = Tally::default();
    for (method, path) in &documented {
        if !table.contains_key(&(method.as_str(), path.as_str())) {
            tally.fail(format!(
                "{method} {path}: this route is not in the tenancy sweep: add it to `table()` \
                 in crates/keel/tests/it/tenancy.rs (how to call it aimed at another \
                 organisation's objects, or why it is public)"
            ));
        }
    }
    for (method, path) in table.keys() {
        if !documented.contains(&((*method).to_owned(), (*path).to_owned())) {
            tally.fail(format!(
                "{method} {path}: in the tenancy sweep but not in /openapi.json: remove it"
            ));
        }
    }
    // Path by path (a queue is paused before it is resumed), then by method.
    let mut routes: Vec<(&(&str, &str), &Entry)> = table
        .iter()
        .filter(|((m, p), _)| documented.contains(&((*m).to_owned(), (*p).to_owned())))
        .collect();
    routes.sort_by_key(|((method, path), _)| (*path, *method));
    tally.routes = routes.len();

    let random = Ids::random();
    let sweep_started = Instant::now();
    for caller in &callers {
        for ((method, template), entry) in &routes {
            let aimed = (entry.build)(&bravo.ids, template);
            let control = (entry.build)(&random, template);
            assert!(
                !control.is_empty() && control.len() <= aimed.len(),
                "{method} {template}: its builder gives {} requests for bravo, {} for random ids",
                aimed.len(),
                control.len()
            );
            for (n, request) in aimed.iter().enumerate() {
                let what = format!("{method} {} as {}", request.path, caller.name);
                assert_eq!(&request.method.as_str(), method, "{what}");
                let sent = carried(&bravo.ids, request);
                let answer = caller.send(&server.base, request).await;
                tally.count(entry.kind, caller, &answer);
                if let Err(why) = judge(entry.kind, caller, &answer) {
                    tally.fail(format!("{what}: {why}"));
                }
                let found = leaked(&answer, &sent, &bravo.identifiers);
                if !found.is_empty() {
                    tally.leak(format!("{what}: shows {found:?}: {}", answer.text));
                }
                let twin = &control[n.min(control.len() - 1)];
                if twin == request {
                    continue;
                }
                // The same request about ids that exist nowhere must answer the same.
                let twin_sent = carried(&random, twin);
                let twin_answer = caller.send(&server.base, twin).await;
                tally.count(entry.kind, caller, &twin_answer);
                let found = leaked(&twin_answer, &twin_sent, &bravo.identifiers);
                if !found.is_empty() {
                    tally.leak(format!(
                        "{method} {} as {}: shows {found:?}: {}",
                        twin.path, caller.name, twin_answer.text
                    ));
                }
                let (real, fake) = (
                    normalise(&answer, &sent),
                    normalise(&twin_answer, &twin_sent),
                );
                if real != fake {
                    tally.leak(format!(
                        "{what}: bravo's real ids answer {real:?}, ids that exist nowhere \
                         answer {fake:?}"
                    ));
                }
            }
        }
    }
    let sweep_time = sweep_started.elapsed();

    // `bravo` is as it was.
    let after = bravo_state(&bravo, &operator).await;
    for (path, value) in &before {
        if after.get(path) != Some(value) {
            tally.fail(format!(
                "bravo's {path} changed during the sweep:\nbefore {value}\nafter  {:?}",
                after.get(path)
            ));
        }
    }

    println!(
        "tenancy sweep on {backend} ({sweep_time:.1?}, {} callers):",
        callers.len()
    );
    println!("| routes swept | calls made | refused | own-org answers | public | leaks |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {} | {} | {} |",
        tally.routes, tally.calls, tally.refused, tally.own_successes, tally.public, tally.leaks
    );
    println!("| caller | answers by status |");
    println!("| --- | --- |");
    for (caller, statuses) in &tally.statuses {
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!("| {caller} | {} |", statuses.join(", "));
    }
    for (method, path) in table.keys() {
        if let Kind::Public(reason) = table[&(*method, *path)].kind {
            println!("public: {method} {path}: {reason}");
        }
    }
    assert!(
        tally.failures.is_empty(),
        "{} problems ({} leaks):\n{}",
        tally.failures.len(),
        tally.leaks,
        tally.failures.join("\n")
    );
    assert_eq!(tally.leaks, 0);
    assert!(tally.routes > 80, "too few routes swept: {}", tally.routes);
}
