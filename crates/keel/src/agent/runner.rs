//! Runs one claimed command: the program, its progress, heartbeats and the report.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use super::client::{Client, ClientError};
use super::process::ProcessGroup;
use super::report::{self, ReportLimits, Tail};
use super::server_backoff;

/// The prefix of a progress line on the program's stderr: `KEEL_PROGRESS <json>`.
pub const PROGRESS_PREFIX: &str = "KEEL_PROGRESS";

/// At least this much of the end of the program's stdout is kept (more when the server's
/// result limit is larger); earlier output is read and dropped.
pub const STDOUT_LIMIT: usize = 512 * 1024;

/// At most this much of the program's other stderr lines is kept (the last bytes).
pub const STDERR_TAIL_LIMIT: usize = 8 * 1024;

/// A stderr line longer than this (or than the progress limit and 1 KiB, when that is more) is
/// cut; a progress line that long is not progress.
pub const LINE_LIMIT: usize = 64 * 1024;

/// The agent's variables a program gets, besides `--env-pass` and `KEEL_COMMAND_*`.
pub const ENV_KEPT: [&str; 3] = ["PATH", "HOME", "LANG"];

/// The lease assumed when a claimed command does not say (the server always does).
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The program run for each command, with fixed arguments (none from the command line).
#[derive(Debug, Clone)]
pub struct Program {
    /// The executable, looked up in `PATH` when it has no slash.
    pub path: PathBuf,
    /// Arguments passed before nothing else; the command comes on stdin.
    pub args: Vec<OsString>,
}

/// How a runner paces itself.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The program.
    pub program: Program,
    /// Heartbeats come every third of the lease, but never more often than this.
    pub heartbeat_floor: Duration,
    /// After the program exits, how long to wait for its stdout and stderr to close (a
    /// background child may hold them open).
    pub output_settle: Duration,
    /// When the program is stopped, how long its process group has between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Variables of the agent's environment passed on to the program (`--env-pass`).
    pub env_pass: Vec<String>,
    /// The server's limits, less margins; refreshed at every check-in.
    pub limits: Arc<Mutex<ReportLimits>>,
}

impl RunnerConfig {
    /// The agent's pacing: heartbeats at most every 500 ms, 5 s for output to settle, 5 s
    /// between SIGTERM and SIGKILL; keel's default limits; no variable passed on.
    pub fn new(program: Program) -> Self {
        Self {
            program,
            heartbeat_floor: Duration::from_millis(500),
            output_settle: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            env_pass: Vec::new(),
            limits: Arc::new(Mutex::new(ReportLimits::default())),
        }
    }
}

/// Signals from the agent to all its runners during shutdown.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// The shutdown grace is over: kill the program and hand the command back.
    pub kill: CancellationToken,
    /// The hand-back window is over too: stop retrying reports.
    pub abandon: CancellationToken,
}

/// A command as claimed: the fields the runner needs and the object the program gets.
#[derive(Debug, Clone)]
pub struct ClaimedCommand {
    /// The command id.
    pub id: Uuid,
    /// The command type.
    pub kind: String,
    /// Attempts so far, this one included.
    pub attempts: u64,
    /// The lease each claim or heartbeat grants.
    pub lease: Duration,
    /// The token that fences heartbeat, complete and fail.
    pub claim_token: String,
    /// The command object the server returned, without `claim_token`.
    pub object: Map<String, Value>,
}

#[derive(Deserialize)]
struct Head {
    id: Uuid,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    attempts: u64,
    #[serde(default)]
    lease_seconds: Option<u64>,
    claim_token: String,
}

impl ClaimedCommand {
    /// Reads one entry of a claim answer.
    pub fn from_json(value: Value) -> Result<Self, String> {
        let head = Head::deserialize(&value).map_err(|error| error.to_string())?;
        let Value::Object(mut object) = value else {
            return Err("not an object".to_owned());
        };
        object.remove("claim_token");
        Ok(Self {
            id: head.id,
            kind: head.kind,
            attempts: head.attempts,
            lease: head
                .lease_seconds
                .filter(|seconds| *seconds > 0)
                .map_or(DEFAULT_LEASE, Duration::from_secs),
            claim_token: head.claim_token,
            object,
        })
    }
}

/// How a command ended, from the agent's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program exited 0 and the server took the result.
    Completed,
    /// The program failed (or could not start) and the server took the error.
    Failed,
    /// A cancel was requested; the program was killed and the server was told.
    Cancelled,
    /// The agent is shutting down; the program was killed and the command handed back.
    HandedBack,
    /// The server answered 409 or 404: the lease was lost; the command was dropped.
    LeaseLost,
    /// The report could not be delivered (refused, lease over, or shutdown); the server
    /// will release the command when its lease expires.
    NotReported(String),
}

/// What the runner tells the server.
#[derive(Debug, Clone)]
enum Report {
    Complete(Value),
    /// `fail`; `then` is the outcome once the server took it.
    Fail {
        error: Value,
        retryable: bool,
        then: Outcome,
    },
}

/// Why the runner stopped waiting for the program.
enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Cancel,
    Lost,
    Shutdown,
}

/// Returns once the local lease deadline has passed without a renewal moving it.
async fn lease_lapse(deadline: &Mutex<Instant>) {
    loop {
        let at = *deadline.lock();
        tokio::time::sleep_until(at).await;
        if *deadline.lock() <= Instant::now() {
            return;
        }
    }
}

/// What the heartbeat task tells the runner.
#[derive(Debug)]
enum HeartbeatStop {
    Cancel,
    Lost(String),
}

/// Runs `command` to the end: the program, heartbeats, and the report. `leased_at` is when
/// the claim's answer arrived: the local view of when the lease started.
pub async fn run(
    client: &Client,
    config: &RunnerConfig,
    command: ClaimedCommand,
    leased_at: Instant,
    controls: &Controls,
) -> Outcome {
    let deadline = Arc::new(Mutex::new(leased_at + command.lease));
    let limits = *config.limits.lock();
    let mut child = match spawn(config, &command) {
        Ok(child) => child,
        Err(error) => {
            tracing::error!(command_id = %command.id, program = %config.program.path.display(), %error, "cannot start the program");
            let report = Report::Fail {
                error: json!({"spawn_error": error.to_string()}),
                retryable: true,
                then: Outcome::Failed,
            };
            return deliver(client, &command, report, &deadline, controls).await;
        }
    };
    tracing::info!(command_id = %command.id, r#type = %command.kind, attempt = command.attempts, pid = child.id(), "running");
    // Armed until the program's group is known to be stopped: dropping the runner (a second
    // signal) kills the whole group, not only the program.
    let mut group = ProcessGroup::of(&child);

    let output = Arc::new(Mutex::new(Output::new(&limits)));
    let mut tasks: Vec<AbortOnDropHandle<()>> = Vec::new();
    if let Some(mut stdin) = child.stdin.take() {
        let bytes = serde_json::to_vec(&command.object).unwrap_or_default();
        let id = command.id;
        tasks.push(AbortOnDropHandle::new(tokio::spawn(async move {
            // A program that does not read its stdin closes the pipe; that is its right.
            if let Err(error) = stdin.write_all(&bytes).await {
                tracing::debug!(command_id = %id, %error, "the program did not take its stdin");
            }
        })));
    }
    let stdout = child.stdout.take().map(|pipe| {
        let output = Arc::clone(&output);
        AbortOnDropHandle::new(tokio::spawn(read_stdout(pipe, output)))
    });
    let stderr = child.stderr.take().map(|pipe| {
        let output = Arc::clone(&output);
        AbortOnDropHandle::new(tokio::spawn(read_stderr(pipe, output)))
    });

    let (stop_tx, mut stop_rx) = mpsc::channel(1);
    // Every task of this command ends with it, however it ends.
    let heartbeats = AbortOnDropHandle::new(tokio::spawn(heartbeat_loop(
        client.clone(),
        command.id,
        command.claim_token.clone(),
        heartbeat_interval(command.lease, config.heartbeat_floor),
        command.lease,
        Arc::clone(&output),
        Arc::clone(&deadline),
        stop_tx,
    )));

    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status),
        Some(stop) = stop_rx.recv() => match stop {
            HeartbeatStop::Cancel => Ended::Cancel,
            HeartbeatStop::Lost(reason) => {
                tracing::warn!(command_id = %command.id, %reason, "lease lost; killing the program and dropping the command");
                Ended::Lost
            }
        },
        () = lease_lapse(&deadline) => {
            tracing::warn!(command_id = %command.id, "the lease could not be renewed before it ran out; stopping the program and dropping the command");
            Ended::Lost
        }
        () = controls.kill.cancelled() => Ended::Shutdown,
    };
    drop(heartbeats);

    let report = match ended {
        Ended::Exited(status) => {
            // The program was reaped: its process id, and so the group's, may be reused.
            group.disarm();
            drop(tasks);
            settle(stdout, stderr, config.output_settle).await;
            let output = std::mem::replace(&mut *output.lock(), Output::new(&limits));
            match status {
                Ok(status) if status.success() => {
                    if output.stdout.is_cut() {
                        tracing::info!(command_id = %command.id, bytes = output.stdout.seen(), "the program's output is larger than the result may be; its end is kept");
                    }
                    Report::Complete(report::stdout_result(&output.stdout, limits.result))
                }
                Ok(status) => {
                    tracing::warn!(command_id = %command.id, %status, "the program failed");
                    Report::Fail {
                        error: report::exit_error(
                            status.code(),
                            status.signal(),
                            &output.tail.text(),
                            limits.error,
                        ),
                        retryable: true,
                        then: Outcome::Failed,
                    }
                }
                Err(error) => Report::Fail {
                    error: json!({"wait_error": error.to_string(), "stderr_tail": output.tail.text()}),
                    retryable: true,
                    then: Outcome::Failed,
                },
            }
        }
        Ended::Cancel | Ended::Lost | Ended::Shutdown => {
            group.stop(&mut child, config.kill_grace).await;
            drop((tasks, stdout, stderr));
            match ended {
                Ended::Cancel => {
                    tracing::info!(command_id = %command.id, "cancel requested; program stopped");
                    Report::Fail {
                        error: json!({"cancelled": true}),
                        retryable: false,
                        then: Outcome::Cancelled,
                    }
                }
                Ended::Shutdown => {
                    tracing::warn!(command_id = %command.id, "shutdown grace over; program stopped, handing the command back");
                    Report::Fail {
                        error: json!({"agent_shutdown": true}),
                        retryable: true,
                        then: Outcome::HandedBack,
                    }
                }
                _ => return Outcome::LeaseLost,
            }
        }
    };
    deliver(client, &command, report, &deadline, controls).await
}

/// Hands `command` back unrun: `fail` with `error`, retryable.
pub async fn hand_back(
    client: &Client,
    command: &ClaimedCommand,
    error: Value,
    leased_at: Instant,
    controls: &Controls,
) -> Outcome {
    let deadline = Mutex::new(leased_at + command.lease);
    let report = Report::Fail {
        error,
        retryable: true,
        then: Outcome::Failed,
    };
    deliver(client, command, report, &deadline, controls).await
}

/// Starts the program in a process group of its own, with the command on stdin (written by
/// the caller) and a cleared environment: [`ENV_KEPT`], the `--env-pass` variables and
/// `KEEL_COMMAND_*`. The program gets the command, never the agent's credentials.
fn spawn(
    config: &RunnerConfig,
    command: &ClaimedCommand,
) -> std::io::Result<tokio::process::Child> {
    let mut program = tokio::process::Command::new(&config.program.path);
    program.args(&config.program.args).env_clear();
    let passed = ENV_KEPT
        .iter()
        .copied()
        .chain(config.env_pass.iter().map(String::as_str));
    for name in passed {
        if let Some(value) = std::env::var_os(name) {
            program.env(name, value);
        }
    }
    program
        .env("KEEL_COMMAND_ID", command.id.to_string())
        .env("KEEL_COMMAND_TYPE", &command.kind)
        .env("KEEL_COMMAND_ATTEMPT", command.attempts.to_string())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// A third of the lease, never below `floor`.
pub fn heartbeat_interval(lease: Duration, floor: Duration) -> Duration {
    (lease / 3).max(floor)
}

/// Waits up to `limit` for both output readers to reach the end, then stops them.
async fn settle(
    stdout: Option<AbortOnDropHandle<()>>,
    stderr: Option<AbortOnDropHandle<()>>,
    limit: Duration,
) {
    let mut handles: Vec<AbortOnDropHandle<()>> = stdout.into_iter().chain(stderr).collect();
    let all = async {
        for handle in &mut handles {
            let _ = handle.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::debug!("the program's output stayed open after it exited; using what was read");
    }
}

/// Renews the lease every `interval` with the latest progress until told to stop.
#[allow(clippy::too_many_arguments)] // one task's inputs; a struct would only rename them
async fn heartbeat_loop(
    client: Client,
    id: Uuid,
    claim_token: String,
    interval: Duration,
    lease: Duration,
    output: Arc<Mutex<Output>>,
    deadline: Arc<Mutex<Instant>>,
    stop: mpsc::Sender<HeartbeatStop>,
) {
    let timeout = interval.clamp(Duration::from_secs(1), super::client::REQUEST_TIMEOUT);
    let mut backoff = server_backoff();
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        let progress = output.lock().progress.clone();
        let sent = Instant::now();
        match client
            .heartbeat(id, &claim_token, progress.as_ref(), timeout)
            .await
        {
            Ok(reply) => {
                *deadline.lock() = sent + lease;
                backoff.reset();
                wait = interval;
                if reply.cancel_requested {
                    let _ = stop.send(HeartbeatStop::Cancel).await;
                    return;
                }
            }
            Err(error @ (ClientError::Stale(_) | ClientError::NotFound(_))) => {
                let _ = stop.send(HeartbeatStop::Lost(error.to_string())).await;
                return;
            }
            Err(error @ ClientError::Retryable { .. }) => {
                // The lease comes first: never later than the next regular heartbeat.
                wait = error.retry_delay(&mut backoff).min(interval);
                tracing::warn!(command_id = %id, %error, retry_in = ?wait, "heartbeat failed");
            }
            Err(ClientError::Fatal { status: 413, .. }) if progress.is_some() => {
                // The server takes less than the agent learnt: the lease comes first.
                tracing::warn!(command_id = %id, "the server refused the progress as too large; renewing the lease without it");
                let mut output = output.lock();
                if output.progress == progress {
                    output.progress = None;
                }
                wait = Duration::ZERO;
            }
            Err(error @ ClientError::Fatal { .. }) => {
                wait = interval;
                tracing::error!(command_id = %id, %error, "heartbeat refused");
            }
        }
    }
}

/// Sends `report`, retrying what is retryable until the lease would have expired.
async fn deliver(
    client: &Client,
    command: &ClaimedCommand,
    mut report: Report,
    deadline: &Mutex<Instant>,
    controls: &Controls,
) -> Outcome {
    let deadline = *deadline.lock();
    let mut backoff = server_backoff();
    let mut shrunk = false;
    loop {
        let attempt = async {
            match &report {
                Report::Complete(result) => {
                    client
                        .complete(command.id, &command.claim_token, result)
                        .await
                }
                Report::Fail {
                    error, retryable, ..
                } => {
                    client
                        .fail(command.id, &command.claim_token, error, *retryable)
                        .await
                }
            }
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout_at(deadline, attempt) => answer,
            () = controls.abandon.cancelled() => return not_reported(command, "the agent stopped before the server answered"),
        };
        let error = match answer {
            Err(_) => return not_reported(command, "the lease expired before the server answered"),
            Ok(Ok(())) => {
                let outcome = match &report {
                    Report::Complete(_) => Outcome::Completed,
                    Report::Fail { then, .. } => then.clone(),
                };
                tracing::info!(command_id = %command.id, outcome = ?outcome, "reported");
                return outcome;
            }
            Ok(Err(error)) => error,
        };
        match error {
            ClientError::Stale(reason) | ClientError::NotFound(reason) => {
                tracing::warn!(command_id = %command.id, %reason, "lease lost; the report was refused and the command dropped");
                return Outcome::LeaseLost;
            }
            ClientError::Fatal { status: 413, .. } if !shrunk => {
                // The server's limits are below those the agent learnt (changed since the
                // last check-in): send what fits any keel server, keeping the outcome.
                tracing::warn!(command_id = %command.id, "the server refused the report as too large; sending a shorter one");
                shrunk = true;
                let least = ReportLimits::smallest();
                report = match report {
                    Report::Complete(result) => {
                        Report::Complete(report::shrink(&result, least.result))
                    }
                    Report::Fail {
                        error,
                        retryable,
                        then,
                    } => Report::Fail {
                        error: report::shrink(&error, least.error),
                        retryable,
                        then,
                    },
                };
            }
            error @ ClientError::Fatal { .. } => {
                return not_reported(command, &format!("the server refused the report: {error}"));
            }
            error @ ClientError::Retryable { .. } => {
                let delay = error.retry_delay(&mut backoff);
                tracing::warn!(command_id = %command.id, %error, retry_in = ?delay, "report failed");
                tokio::select! {
                    () = tokio::time::sleep_until(deadline.min(Instant::now() + delay)) => {}
                    () = controls.abandon.cancelled() => {}
                }
            }
        }
    }
}

fn not_reported(command: &ClaimedCommand, reason: &str) -> Outcome {
    tracing::error!(command_id = %command.id, %reason, "giving up the report; the server will release the command when its lease expires");
    Outcome::NotReported(reason.to_owned())
}

/// What the program wrote, as far as it is kept.
#[derive(Debug)]
struct Output {
    /// The end of stdout: at least [`STDOUT_LIMIT`], at least the result limit.
    stdout: Tail,
    /// The latest progress that fits the progress limit.
    progress: Option<Value>,
    progress_budget: usize,
    /// The stderr lines that were not progress.
    tail: Tail,
    line_limit: usize,
}

impl Output {
    fn new(limits: &ReportLimits) -> Self {
        Self {
            stdout: Tail::new(STDOUT_LIMIT.max(limits.result)),
            progress: None,
            progress_budget: limits.progress,
            tail: Tail::new(STDERR_TAIL_LIMIT),
            line_limit: LINE_LIMIT.max(limits.progress.saturating_add(1024)),
        }
    }
}

async fn read_stdout(mut pipe: impl AsyncRead + Unpin, output: Arc<Mutex<Output>>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        output
            .lock()
            .stdout
            .push(buffer.get(..read).unwrap_or_default());
    }
}

async fn read_stderr(mut pipe: impl AsyncRead + Unpin, output: Arc<Mutex<Output>>) {
    let mut buffer = vec![0u8; 16 * 1024];
    let line_limit = output.lock().line_limit;
    let mut lines = LineSplitter::new(line_limit);
    loop {
        let read = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        for line in lines.push(buffer.get(..read).unwrap_or_default()) {
            take_stderr_line(&output, &line);
        }
    }
    if let Some(line) = lines.finish() {
        take_stderr_line(&output, &line);
    }
}

fn take_stderr_line(output: &Mutex<Output>, line: &str) {
    let mut output = output.lock();
    match parse_progress(line) {
        Some(progress) => {
            if report::progress_fits(&progress, output.progress_budget) {
                output.progress = Some(progress);
            }
        }
        None => output.tail.push_line(line),
    }
}

/// The progress a stderr line reports: `KEEL_PROGRESS <json>`. Any other line, and a
/// `KEEL_PROGRESS` line whose rest is not JSON, is not progress.
pub fn parse_progress(line: &str) -> Option<Value> {
    let rest = line.strip_prefix(PROGRESS_PREFIX)?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    serde_json::from_str(rest.trim()).ok()
}

/// Splits a byte stream into lines of at most `limit` bytes (longer ones are cut).
#[derive(Debug)]
pub struct LineSplitter {
    line: Vec<u8>,
    limit: usize,
}

impl LineSplitter {
    /// A splitter keeping at most `limit` bytes per line.
    pub fn new(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            limit,
        }
    }

    /// Takes `bytes`; answers the lines they complete (without `\n` or `\r\n`).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (part, newline) = match rest.iter().position(|byte| *byte == b'\n') {
                Some(at) => {
                    let (part, after) = rest.split_at(at);
                    rest = after.get(1..).unwrap_or_default();
                    (part, true)
                }
                None => (std::mem::take(&mut rest), false),
            };
            let room = self.limit.saturating_sub(self.line.len());
            self.line
                .extend_from_slice(part.get(..room.min(part.len())).unwrap_or_default());
            if newline {
                lines.push(self.take());
            }
        }
        lines
    }

    /// The last line when the stream ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
