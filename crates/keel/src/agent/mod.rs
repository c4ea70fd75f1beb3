//! `keel agent`: a ready agent that claims commands and runs a program for each.
//!
//! - [`client`]: the typed HTTP client for the agent routes of `docs/commands.md`.
//! - [`runner`]: one command: the program, its progress, heartbeats and the report.
//! - [`process`]: the program's process group, and stopping it.
//! - [`report`]: fitting results, errors and progress to the server's limits.
//!
//! This module checks in, runs the claim loop and shuts down on SIGTERM/SIGINT. The program
//! contract and the retry and shutdown behaviour are described in `docs/agent.md`.

pub mod client;
pub mod process;
pub mod report;
pub mod runner;

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args};
use keel_guard::backoff::Backoff;
use keel_store::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::LevelFilter;
use uuid::Uuid;

use parking_lot::Mutex;
use std::sync::Arc;

use self::client::{CheckIn, Client, ClientError};
use self::report::ReportLimits;
use self::runner::{ClaimedCommand, Controls, Outcome, Program, RunnerConfig};

/// How often the agent checks in again, so the server sees it online.
pub const CHECK_IN_INTERVAL: Duration = Duration::from_secs(30);

/// After the shutdown grace, how long killed commands have to be handed back (and finished
/// ones to be reported) before the agent exits anyway.
pub const HAND_BACK_WINDOW: Duration = Duration::from_secs(15);

/// The least time between two claims that found nothing.
pub const IDLE_PAUSE: Duration = Duration::from_secs(1);

/// The most commands one claim may ask for (`docs/commands.md`).
const CLAIM_LIMIT_MAX: usize = keel_store::MAX_CLAIM_BATCH as usize;

/// `keel agent` flags. `Debug` never shows the token (a [`SecretString`]).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("credential").required(true).args(["token", "token_file"])))]
pub struct AgentArgs {
    /// The keel server's base URL.
    #[arg(long, env = "KEEL_AGENT_SERVER")]
    pub server: String,
    /// An API key with the `agent` scope. Prefer KEEL_AGENT_TOKEN or --token-file: on the
    /// command line it is visible to every local user (ps, /proc/*/cmdline).
    #[arg(long, env = "KEEL_AGENT_TOKEN", hide_env_values = true, value_parser = secret)]
    pub token: Option<SecretString>,
    /// A file holding the API key (surrounding whitespace ignored), instead of --token.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The program run once per command: the command arrives as JSON on its stdin; its stdout
    /// becomes the result (its end only, when larger than the server's result limit).
    #[arg(long)]
    pub exec: PathBuf,
    /// Queues to claim pooled commands from, comma-separated (targeted commands always come).
    #[arg(long, env = "KEEL_AGENT_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// How many commands run at once.
    #[arg(long, env = "KEEL_AGENT_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub concurrency: u32,
    /// The agent's name, sent on check-in (the server checks it is the key's agent).
    #[arg(long, env = "KEEL_AGENT_NAME")]
    pub name: Option<String>,
    /// Labels sent on check-in, `key=value`, comma-separated or repeated (at most 64; keys 1–63
    /// and values 0–63 characters of a-z A-Z 0-9 _ . - /, beginning and ending with a letter or
    /// digit). Broadcasts pick agents by them (`"selector": "env=prod"`).
    #[arg(long = "label", env = "KEEL_AGENT_LABELS", value_name = "KEY=VALUE",
          value_delimiter = ',', value_parser = label)]
    pub labels: Vec<(String, String)>,
    /// How long one claim waits on the server for a command to become due (0–60).
    #[arg(long, env = "KEEL_AGENT_WAIT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=60))]
    pub wait_seconds: u64,
    /// On SIGTERM/SIGINT, how long running programs may take to finish (e.g. `30s`, `2m`).
    #[arg(long, env = "KEEL_AGENT_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// When a program is stopped (cancel, lost lease, end of the shutdown grace), how long its
    /// process group has between SIGTERM and SIGKILL (e.g. `5s`, `500ms`).
    #[arg(long, env = "KEEL_AGENT_KILL_GRACE", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub kill_grace: Duration,
    /// A variable of the agent's environment to pass on to the program (repeatable). The
    /// program's environment is otherwise cleared: it gets only PATH, HOME, LANG and the
    /// KEEL_COMMAND_* variables.
    #[arg(long = "env-pass", value_name = "NAME", value_parser = env_name)]
    pub env_pass: Vec<String>,
    /// The least severe log level written to stderr (error, warn, info, debug, trace).
    #[arg(long, env = "KEEL_AGENT_LOG_LEVEL", default_value = "info")]
    pub log_level: LevelFilter,
}

/// Runs the agent until SIGTERM/SIGINT; fails at once when the server refuses the key.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Another subscriber (a test's) may already be installed; then it is used.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(args.log_level)
        .try_init();

    let queues = queues(&args.queues)?;
    let token = token(&args)?;
    let client = Client::new(&args.server, token)?;
    let signals = Signals::install()?;
    let boot_id = Uuid::new_v4();
    let check_in = CheckIn {
        name: args.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        metadata: metadata(args.concurrency).await,
        queues: queues.clone(),
        boot_id,
        labels: labels(&args.labels)?,
    };

    let Some(agent) = first_check_in(&client, &check_in, &signals.stop).await? else {
        tracing::info!("stopped before the first check-in");
        return Ok(());
    };
    let limits = Arc::new(Mutex::new(ReportLimits::from_check_in(&agent)));
    let agent_id = agent.get("id").and_then(Value::as_str).unwrap_or("?");
    tracing::info!(
        server = client.server(),
        agent_id,
        %boot_id,
        ?queues,
        concurrency = args.concurrency,
        program = %args.exec.display(),
        limits = ?*limits.lock(),
        "checked in; claiming commands"
    );
    let check_ins = tokio::spawn(keep_checking_in(
        client.clone(),
        check_in,
        Arc::clone(&limits),
    ));

    let agent = Agent {
        client,
        queues,
        concurrency: usize::try_from(args.concurrency).unwrap_or(1),
        wait_seconds: args.wait_seconds,
        shutdown_grace: args.shutdown_grace,
        runner: RunnerConfig {
            kill_grace: args.kill_grace,
            env_pass: args.env_pass,
            limits,
            ..RunnerConfig::new(Program {
                path: args.exec,
                args: Vec::new(),
            })
        },
        idle_pause: IDLE_PAUSE,
    };
    let result = tokio::select! {
        result = agent.run(&signals.stop) => result,
        () = signals.now.cancelled() => Err(anyhow::anyhow!(
            "second signal: exited at once; running programs were killed and their commands \
             are left to the server's lease expiry"
        )),
    };
    check_ins.abort();
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// Parses `--token` into a secret at once, so no `String` copy of it lingers in the arguments.
fn secret(token: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(token))
}

/// The agent's token: `--token-file`'s contents, or `--token` / `KEEL_AGENT_TOKEN`. A token
/// given on the command line gets a warning: every local user can read it there.
fn token(args: &AgentArgs) -> anyhow::Result<SecretString> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .map(SecretString::from)
            .map_err(|error| anyhow::anyhow!("reading --token-file {}: {error}", path.display()))?;
        return Ok(SecretString::from(text.expose_secret().trim()));
    }
    let Some(token) = &args.token else {
        anyhow::bail!("no token: give --token-file PATH or set KEEL_AGENT_TOKEN");
    };
    // clap prefers the flag to the variable: a value other than the variable's came from the
    // command line.
    let from_env = std::env::var("KEEL_AGENT_TOKEN")
        .is_ok_and(|value| value.as_str() == token.expose_secret());
    if !from_env {
        tracing::warn!(
            "--token on the command line is visible to every local user (ps, /proc/*/cmdline); \
             use --token-file PATH or KEEL_AGENT_TOKEN"
        );
    }
    Ok(token.clone())
}

/// The agent's settings once checked.
struct Agent {
    client: Client,
    queues: Vec<String>,
    concurrency: usize,
    wait_seconds: u64,
    shutdown_grace: Duration,
    runner: RunnerConfig,
    /// The least time between two claims that found nothing.
    idle_pause: Duration,
}

impl Agent {
    /// Claims and runs commands until `stop`, then drains: the grace, the kill and hand-back,
    /// the hand-back window. A refused claim (401, 403, …) drains too, then fails.
    async fn run(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        let controls = Controls::default();
        let mut running: JoinSet<(Uuid, Outcome)> = JoinSet::new();
        let mut backoff = server_backoff();
        let mut refused = None;
        loop {
            while let Some(done) = running.try_join_next() {
                log_done(done);
            }
            if stop.is_cancelled() {
                break;
            }
            let free = self.concurrency.saturating_sub(running.len());
            if free == 0 {
                tokio::select! {
                    Some(done) = running.join_next() => log_done(done),
                    () = stop.cancelled() => {}
                }
                continue;
            }
            let claimed_at = Instant::now();
            let claim =
                self.client
                    .claim(free.min(CLAIM_LIMIT_MAX), &self.queues, self.wait_seconds);
            // A claim cut short by a signal may lose commands the server just handed out;
            // they come back when their lease expires.
            let answer = tokio::select! {
                answer = claim => answer,
                () = stop.cancelled() => break,
            };
            match answer {
                Ok(commands) => {
                    backoff.reset();
                    if commands.is_empty() {
                        // Without a long poll (`--wait-seconds 0`), empty answers would
                        // come back to back: claim at most once per `idle_pause`.
                        tokio::select! {
                            () = tokio::time::sleep_until(claimed_at + self.idle_pause) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                    // The server granted the leases when it answered, which for a long poll
                    // can be many seconds after the claim was sent: the local view of each
                    // lease starts now. (The server's fencing is what counts; this only bounds
                    // how long a report is retried.)
                    let leased_at = Instant::now();
                    for object in commands {
                        self.start(object, leased_at, &controls, &mut running);
                    }
                }
                Err(error @ ClientError::Retryable { .. }) => {
                    let delay = error.retry_delay(&mut backoff);
                    tracing::warn!(%error, retry_in = ?delay, "claim failed");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "the server refused the claim; stopping");
                    refused = Some(anyhow::anyhow!("the server refused the claim: {error}"));
                    break;
                }
            }
        }
        self.drain(running, &controls).await;
        refused.map_or(Ok(()), Err)
    }

    /// Starts a runner for one claimed command (or hands it back when over capacity).
    fn start(
        &self,
        object: Value,
        leased_at: Instant,
        controls: &Controls,
        running: &mut JoinSet<(Uuid, Outcome)>,
    ) {
        let command = match ClaimedCommand::from_json(object) {
            Ok(command) => command,
            Err(error) => {
                tracing::error!(%error, "the server sent an unreadable command; it is left to lease expiry");
                return;
            }
        };
        let client = self.client.clone();
        let controls = controls.clone();
        let id = command.id;
        if running.len() >= self.concurrency {
            tracing::warn!(command_id = %id, "the server sent more commands than asked for; handing this one back");
            running.spawn(async move {
                let outcome = runner::hand_back(
                    &client,
                    &command,
                    json!({"agent_over_capacity": true}),
                    leased_at,
                    &controls,
                )
                .await;
                (id, outcome)
            });
            return;
        }
        let config = self.runner.clone();
        running.spawn(async move {
            let outcome = runner::run(&client, &config, command, leased_at, &controls).await;
            (id, outcome)
        });
    }

    /// Waits for running commands: up to the grace, then kills and hands back the rest,
    /// then waits up to [`HAND_BACK_WINDOW`] for reports before giving them up.
    async fn drain(&self, mut running: JoinSet<(Uuid, Outcome)>, controls: &Controls) {
        if running.is_empty() {
            return;
        }
        tracing::info!(
            running = running.len(),
            grace = ?self.shutdown_grace,
            "no more claims; waiting for running commands (a second signal exits at once)"
        );
        let grace_end = Instant::now() + self.shutdown_grace;
        let mut hand_back_end = None;
        loop {
            let next_step = hand_back_end.unwrap_or(grace_end);
            tokio::select! {
                done = running.join_next() => match done {
                    Some(done) => log_done(done),
                    None => return,
                },
                () = tokio::time::sleep_until(next_step), if !controls.abandon.is_cancelled() => {
                    if hand_back_end.is_none() {
                        tracing::warn!(running = running.len(), "shutdown grace over; killing the remaining programs");
                        controls.kill.cancel();
                        // Stopping takes up to the kill grace before the reports go out.
                        hand_back_end =
                            Some(Instant::now() + self.runner.kill_grace + HAND_BACK_WINDOW);
                    } else {
                        tracing::warn!(running = running.len(), "hand-back window over; giving up the remaining reports");
                        controls.abandon.cancel();
                    }
                }
            }
        }
    }
}

fn log_done(done: Result<(Uuid, Outcome), tokio::task::JoinError>) {
    match done {
        Ok((id, outcome)) => tracing::debug!(command_id = %id, ?outcome, "command done"),
        Err(error) => tracing::error!(%error, "a command's task ended abnormally"),
    }
}

/// Checks in until the server answers; `None` when `stop` comes first. A refusal (401, 403,
/// 404, 422, …) is fatal: the key, the name or the server URL is wrong.
async fn first_check_in(
    client: &Client,
    body: &CheckIn,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Value>> {
    let mut backoff = server_backoff();
    loop {
        let answer = tokio::select! {
            answer = client.check_in(body) => answer,
            () = stop.cancelled() => return Ok(None),
        };
        let error = match answer {
            Ok(agent) => return Ok(Some(agent)),
            Err(error @ ClientError::Retryable { .. }) => error,
            Err(error) => return Err(refusal(client, &error)),
        };
        let delay = error.retry_delay(&mut backoff);
        tracing::warn!(server = client.server(), %error, retry_in = ?delay, "check-in failed");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return Ok(None),
        }
    }
}

/// A clear message for a check-in the server refused.
fn refusal(client: &Client, error: &ClientError) -> anyhow::Error {
    let hint = match error {
        ClientError::Fatal { status: 401, .. } => {
            "the token is not valid: check --token-file, KEEL_AGENT_TOKEN or --token"
        }
        ClientError::Fatal { status: 403, .. } => {
            "the token lacks the `agent` scope, or --name is not the token's agent"
        }
        ClientError::NotFound(_) => "no check-in route: is --server a keel server?",
        _ => "the check-in was refused",
    };
    anyhow::anyhow!("{} refused the check-in: {error} ({hint})", client.server())
}

/// Checks in every [`CHECK_IN_INTERVAL`], learning the server's limits anew; failures are
/// logged and tried at the next tick.
async fn keep_checking_in(client: Client, body: CheckIn, limits: Arc<Mutex<ReportLimits>>) {
    let mut ticks = tokio::time::interval(CHECK_IN_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match client.check_in(&body).await {
            Ok(agent) => {
                let learnt = ReportLimits::from_check_in(&agent);
                let mut limits = limits.lock();
                if *limits != learnt {
                    tracing::info!(limits = ?learnt, "the server's limits changed");
                    *limits = learnt;
                }
            }
            Err(error @ ClientError::Retryable { .. }) => tracing::warn!(%error, "check-in failed"),
            Err(error) => tracing::error!(%error, "check-in refused"),
        }
    }
}

/// One `--label key=value`, checked as the server checks it.
fn label(raw: &str) -> Result<(String, String), String> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}` is not key=value"))?;
    keel_store::labels::check_label_key(key)?;
    keel_store::labels::check_label_value(value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The `--label` pairs as a map (the last value of a key repeated wins), within the count limit.
fn labels(pairs: &[(String, String)]) -> anyhow::Result<keel_store::Labels> {
    let labels: keel_store::Labels = pairs.iter().cloned().collect();
    keel_store::labels::check_labels(&labels).map_err(|rule| anyhow::anyhow!("--label: {rule}"))?;
    Ok(labels)
}

/// The `--queues` list without empty entries; each a valid queue name.
fn queues(raw: &[String]) -> anyhow::Result<Vec<String>> {
    let mut queues = Vec::new();
    for queue in raw.iter().map(|queue| queue.trim()) {
        if queue.is_empty() {
            continue;
        }
        if let Err(rule) = keel_store::check_queue_name(queue) {
            anyhow::bail!("--queues: {queue:?} is not a queue name ({rule})");
        }
        if !queues.iter().any(|known| known == queue) {
            queues.push(queue.to_owned());
        }
    }
    Ok(queues)
}

/// An `--env-pass` name: a variable name other than the agent's token.
fn env_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a variable name (A-Z a-z 0-9 _)"));
    }
    if name == "KEEL_AGENT_TOKEN" {
        return Err("the agent's token is never passed to the program".to_owned());
    }
    Ok(name.to_owned())
}

/// What the agent tells about itself on check-in.
async fn metadata(concurrency: u32) -> Value {
    let from_file = tokio::fs::read_to_string("/etc/hostname")
        .await
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    let hostname = from_file.or_else(|| {
        std::env::var("HOSTNAME")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    });
    json!({
        "hostname": hostname,
        "pid": std::process::id(),
        "concurrency": concurrency,
    })
}

/// The first SIGTERM/SIGINT cancels `stop`; the second cancels `now`.
struct Signals {
    stop: CancellationToken,
    now: CancellationToken,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let stop = CancellationToken::new();
        let now = CancellationToken::new();
        let signals = Self {
            stop: stop.clone(),
            now: now.clone(),
        };
        tokio::spawn(async move {
            for (token, what) in [(stop, "stopping"), (now, "exiting at once")] {
                tokio::select! {
                    Some(()) = terminate.recv() => tracing::warn!("SIGTERM: {what}"),
                    Some(()) = interrupt.recv() => tracing::warn!("SIGINT: {what}"),
                    else => return,
                }
                token.cancel();
            }
        });
        Ok(signals)
    }
}

/// The agent's retries towards the server: 200 ms doubling to 30 s, with equal jitter.
pub(crate) fn server_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
}

#[cfg(test)]
mod tests;
