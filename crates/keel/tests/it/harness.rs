//! Starts `keel serve` as a child process and talks to it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// How a test server is started.
#[derive(Default)]
pub struct Options {
    /// `KEEL_FAILPOINTS`.
    pub failpoints: Option<&'static str>,
    /// Lines added to the `[http]` table of the generated `keel.toml`.
    pub http: &'static str,
    /// TOML appended to the generated `keel.toml`.
    pub extra_toml: &'static str,
    /// Leave `admin.token` unset, so keel generates one.
    pub no_admin_token: bool,
    /// Lines added to the `[log]` table.
    pub log_extra: &'static str,
    /// Start the server under `ulimit -n` of this many open files.
    pub open_file_limit: Option<u32>,
    /// Environment variables set for `keel serve`.
    pub env: &'static [(&'static str, &'static str)],
    /// Send `keel serve`'s stderr to this file of the server's directory instead of the test
    /// output.
    pub stderr_file: Option<&'static str>,
}

pub struct Server {
    child: Option<Child>,
    pub config_path: PathBuf,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(Options::default()).await
    }

    pub async fn start_without_admin_token() -> Server {
        Self::start_with(Options {
            no_admin_token: true,
            ..Options::default()
        })
        .await
    }

    pub async fn start_with(options: Options) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            r#"data_dir = "{data}"

[http]
listen = "127.0.0.1:{port}"
{http}

{admin}

[supervisor]
initial_backoff = "10ms"
max_backoff = "80ms"
reset_after = "5s"
max_restarts = 3
within = "10s"

[shutdown]
grace = "5s"
log_flush = "5s"

{log}
{extra}
"#,
            data = dir.path().display(),
            http = options.http,
            admin = if options.no_admin_token {
                String::new()
            } else {
                format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n")
            },
            log = LOG_TOML.replace("{log_extra}", options.log_extra),
            extra = options.extra_toml,
        );
        let config_path = dir.path().join("keel.toml");
        std::fs::write(&config_path, config).unwrap();

        let child = spawn_serve(
            &config_path,
            dir.path(),
            options.failpoints,
            options.open_file_limit,
            options.env,
            options.stderr_file.map(|name| dir.path().join(name)),
        );
        let server = Server {
            child: Some(child),
            config_path,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        wait_for_port(&server.base).await;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` (for example `TERM`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn still_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the server to exit, at most `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < deadline,
                "keel did not exit within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs").join(LOG_FILE)
    }

    /// Every JSON record written to the test's log file so far.
    pub fn log_records(&self) -> Vec<Value> {
        read_records(&self.log_path())
    }
}

impl Server {
    /// Kills the server with SIGKILL, as a crash or `kill -9` would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts `keel serve` again on the same configuration, data directory and port.
    pub async fn restart(&mut self) {
        self.restart_with(None).await;
    }

    /// [`Server::restart`] with `KEEL_FAILPOINTS` set to `failpoints`. It also returns when
    /// keel stops before its port opens (a failpoint may stop it that early): see
    /// [`Server::wait_exit`].
    pub async fn restart_with(&mut self, failpoints: Option<&str>) {
        assert!(self.child.is_none(), "kill the server first");
        let mut child = spawn_serve(
            &self.config_path,
            self.dir.path(),
            failpoints,
            None,
            &[],
            None,
        );
        let address = self.base.trim_start_matches("http://").to_owned();
        let started = Instant::now();
        while std::net::TcpStream::connect(&address).is_err() && child.try_wait().unwrap().is_none()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "keel did not open its port within 30s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
    }

    /// Runs `keel admin --config <this server's config> ARGS`; returns its stdout, trimmed.
    pub fn admin_cli(&self, args: &[&str]) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("admin")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("KEEL_FAILPOINTS")
            .output()
            .unwrap();
        assert!(output.status.success(), "keel admin {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Creates an organisation.
    pub fn create_org(&self, name: &str) {
        self.admin_cli(&["create-org", name]);
    }

    /// A client that presents `token`.
    pub fn api(&self, token: &str) -> Api {
        Api {
            client: self.client.clone(),
            base: self.base.clone(),
            token: token.to_owned(),
        }
    }

    /// Creates an operator key with `keel admin create-operator-key` and returns a client that
    /// uses it.
    pub fn operator(&self) -> Api {
        self.api(&self.admin_cli(&["create-operator-key", "--name", "test-operator"]))
    }

    /// Creates an API key and returns a client that uses it.
    pub fn key(&self, org: &str, scopes: &str, agent: Option<&str>) -> Api {
        let mut args = vec![
            "create-key",
            "--org",
            org,
            "--name",
            "test",
            "--scopes",
            scopes,
        ];
        if let Some(agent) = agent {
            args.extend(["--agent", agent]);
        }
        Api {
            client: self.client.clone(),
            base: self.base.clone(),
            token: self.admin_cli(&args),
        }
    }
}

/// A client with one API key; every call states the status it expects.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        expect: u16,
    ) -> Value {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, expect, "{method} {path}: {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    pub async fn get(&self, path: &str, expect: u16) -> Value {
        self.call(reqwest::Method::GET, path, None, expect).await
    }

    pub async fn post(&self, path: &str, body: &Value, expect: u16) -> Value {
        self.call(reqwest::Method::POST, path, Some(body), expect)
            .await
    }

    /// Checks the agent in (serving `queues`).
    pub async fn check_in(&self, queues: &[&str]) -> Value {
        self.post(
            "/v1/agents/check-in",
            &serde_json::json!({
                "version": "test",
                "queues": queues,
                "boot_id": uuid::Uuid::new_v4(),
            }),
            200,
        )
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_serve(
    config: &Path,
    dir: &Path,
    failpoints: Option<&str>,
    open_file_limit: Option<u32>,
    env: &[(&str, &str)],
    stderr_file: Option<PathBuf>,
) -> Child {
    let keel = env!("CARGO_BIN_EXE_keel");
    let mut command = match open_file_limit {
        // `exec` keeps the pid: signals and kills reach keel itself.
        Some(limit) => {
            let mut shell = Command::new("sh");
            shell
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(keel);
            shell
        }
        None => Command::new(keel),
    };
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env_remove("KEEL_FAILPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(match &stderr_file {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::piped(),
        });
    if let Some(failpoints) = failpoints {
        command.env("KEEL_FAILPOINTS", failpoints);
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().unwrap();
    // Keep stderr drained (the panic hook writes there) and visible in test output.
    if let Some(stderr) = child.stderr.take() {
        pipe_to_test_output(stderr, "keel stderr");
    }
    child
}

/// Copies a child's output to the test's output, line by line, prefixed.
pub fn pipe_to_test_output(stream: impl std::io::Read + Send + 'static, prefix: &'static str) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{prefix}] {line}");
        }
    });
}

/// Waits until the server's port accepts connections, without sending a request, so a test's
/// first request is its own.
async fn wait_for_port(base: &str) {
    let address = base.trim_start_matches("http://").to_owned();
    poll_until(Duration::from_secs(30), || async {
        std::net::TcpStream::connect(&address).is_ok()
    })
    .await;
}

pub fn read_records(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The value of a metric line such as `keel_panics_total{component="http"} 1`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// POSTs `body` with `Idempotency-Key: key` until an instance answers `expect` (or 200, a
/// retry answered with what an earlier try created), trying `apis` (the same key on several
/// instances) in turn from `first`, as a careful client of several instances would: an instance
/// that does not answer (killed) is tried again on the next one; an answer in `retried` (429
/// and 503, which must say when in `Retry-After`; 500 where a test injects panics) after its
/// `Retry-After`, or 200 ms. The instance may have committed a request before its answer was
/// lost: the key makes the retry safe. Returns the answer.
pub async fn post_until(
    apis: &[Api],
    first: usize,
    path: &str,
    key: &str,
    body: &Value,
    expect: u16,
    retried: &[u16],
) -> Value {
    for attempt in 0..600 {
        let api = &apis[(first + attempt) % apis.len()];
        let response = api
            .client
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await;
        let Ok(response) = response else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = response.status().as_u16();
        let retry_after: Option<u64> = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let text = response.text().await.unwrap_or_default();
        if status == expect || status == 200 {
            return serde_json::from_str(&text).unwrap();
        }
        assert!(retried.contains(&status), "POST {path}: {status} {text}");
        assert!(
            retry_after.is_some() || !matches!(status, 429 | 503),
            "a {status} says when to retry"
        );
        tokio::time::sleep(retry_after.map_or(Duration::from_millis(200), Duration::from_secs))
            .await;
    }
    panic!("POST {path} was never accepted");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 20 ms until it holds; fails the test after `deadline`.
pub async fn poll_until<F, Fut>(deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < deadline,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The log file every stream of a test server goes to, as JSON lines.
pub const LOG_FILE: &str = "all.jsonl";

const LOG_TOML: &str = r#"
[log]
dir = "logs"
{log_extra}

[[log.sinks]]
name = "all"
kind = "file"
streams = ["app", "audit", "access", "error"]
format = "json"
file = { path = "all.jsonl", max_size = "1GiB", compress = false }
"#;
