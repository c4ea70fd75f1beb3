//! keel's configuration: the struct below is the reference (every field says what it is for).
//!
//! Sources, later ones winning: built-in defaults, the TOML file (`keel.toml` in the working
//! directory when present, or `--config FILE`), `KEEL_*` environment variables (nested keys
//! joined with `__`, for example `KEEL_HTTP__LISTEN=127.0.0.1:9000`), then command-line flags.
//! An unknown key or a bad value is an error that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use keel_store::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The default listen address: loopback, on a port no common service uses.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7740";

/// The configuration file read when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "keel.toml";

/// The SQLite database, in the data directory.
pub const DATABASE_FILE: &str = "keel.db";

/// How `keel config` shows an unset `admin.token`.
const UNSET_ADMIN_TOKEN: &str =
    "[admin]\n# token is unset: keel serve generates one in <data_dir>/admin-token\n";

/// How `keel config` shows an unset `store.url`.
const UNSET_STORE_URL: &str = "[store]\n# url is unset: SQLite in <data_dir>/keel.db (an SQLite path or a postgres:// URL may be set)\n";

/// Environment variables with the `KEEL_` prefix that are not configuration keys: `KEEL_CONFIG`
/// (the file), `KEEL_FAILPOINTS` (docs/failpoints.md), and `KEEL_REQUIRE_BROWSER`,
/// `KEEL_TEST_POSTGRES_URL` and `KEEL_REQUIRE_POSTGRES` (CI sets them for the whole test run,
/// whose servers must still start; docs/operator-page.md, docs/store.md).
const NON_CONFIG_ENV: &[&str] = &[
    "CONFIG",
    "FAILPOINTS",
    "REQUIRE_BROWSER",
    "TEST_POSTGRES_URL",
    "REQUIRE_POSTGRES",
];

/// Prefixes (after `KEEL_`) of variables that belong to other parts of keel, not to the
/// server's configuration: `KEEL_AGENT_*` are `keel agent`'s flags, `KEEL_COMMAND_*` what the
/// agent hands its program. A shell set up for an agent can still start `keel serve`.
const OTHER_ENV_PREFIXES: &[&str] = &["AGENT_", "COMMAND_"];

/// Whether the variable `KEEL_<key>` is a configuration key (`key` is without `KEEL_`).
fn is_config_env(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    !NON_CONFIG_ENV.contains(&upper.as_str())
        && !OTHER_ENV_PREFIXES
            .iter()
            .any(|prefix| upper.starts_with(prefix))
}

/// Everything keel can be told.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where keel keeps its data: the database, the admin token file, logs.
    pub data_dir: PathBuf,
    /// The HTTP server.
    pub http: HttpConfig,
    /// Access to the `/v1/admin` routes.
    pub admin: AdminConfig,
    /// Access to `/metrics`.
    pub metrics: crate::telemetry::MetricsConfig,
    /// The async logger: sinks, streams, filters, queue.
    pub log: keel_log::LogConfig,
    /// How supervised tasks are restarted after a panic.
    pub supervisor: keel_guard::supervisor::RestartPolicy,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Intervals of keel's own periodic jobs.
    pub jobs: JobsConfig,
    /// The database.
    pub store: StoreConfig,
    /// Commands, agents and leases.
    pub commands: CommandsConfig,
    /// Fair sharing and load shedding: rate limits, long-poll caps, the in-flight limit and
    /// pressure (docs/overload.md).
    pub overload: crate::http::overload::OverloadConfig,
    /// Notifications: senders' secrets and the delivery workers (docs/notifications.md).
    pub notifications: crate::notifications::config::NotificationsConfig,
}

/// The database: embedded SQLite in `<data_dir>/keel.db` by default, or PostgreSQL when `url`
/// names one (several keel instances may share it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where the data lives: unset (SQLite in `<data_dir>/keel.db`), an SQLite file's path, or a
    /// PostgreSQL URL (`postgres://user:password@host:5432/database`). A secret: it may hold a
    /// password.
    pub url: Option<Secret>,
    /// Applies the migrations the database lacks at start (`false`: refuse to start until
    /// `keel migrate` applied them). keel always refuses a database migrated by a newer keel.
    pub migrate: bool,
    /// SQLite: `full` (default): a committed change survives a power loss; `normal`: it
    /// survives a process kill, and the last commits may be lost on a power loss. See
    /// docs/store.md.
    pub synchronous: keel_store::Synchronous,
    /// SQLite: connections of the read pool.
    pub read_connections: u32,
    /// SQLite: writes that may wait for the writer; when it is full, a write waits up to
    /// `write_timeout` for room, then the request gets 503 `overloaded`.
    pub write_queue: usize,
    /// SQLite: the most writes committed together in one group.
    pub max_group: usize,
    /// SQLite: how long a write waits for room in a full queue (and the writer for another
    /// process's lock, a reader for a free connection).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// PostgreSQL: the connection pool.
    pub postgres: PostgresConfig,
}

/// The PostgreSQL connection pool of one keel instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// The most connections this instance opens.
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long an operation waits for a connection before the request gets 503 with
    /// `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// The schema keel's tables live in (empty: the database's default search path).
    pub schema: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        let options = keel_store::PgOptions::new("");
        Self {
            max_connections: options.max_connections,
            min_connections: options.min_connections,
            acquire_timeout: options.acquire_timeout,
            schema: String::new(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        let sqlite = keel_store::SqliteOptions::default();
        Self {
            url: None,
            migrate: true,
            synchronous: sqlite.synchronous,
            read_connections: sqlite.read_connections,
            write_queue: sqlite.writer.queue_capacity,
            max_group: sqlite.writer.max_group,
            write_timeout: sqlite.writer.enqueue_timeout,
            postgres: PostgresConfig::default(),
        }
    }
}

/// Which database a configuration names.
#[derive(Debug, Clone)]
pub enum Backend {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(keel_store::PgOptions),
}

/// Commands, agents and leases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// How often the release-stuck job returns commands whose lease expired.
    #[serde(with = "humantime_serde")]
    pub release_stuck_interval: Duration,
    /// An agent seen within this window is listed as online.
    #[serde(with = "humantime_serde")]
    pub agent_online_window: Duration,
    /// Finished commands (completed, failed, cancelled, dead) older than this are deleted,
    /// with their attempts and idempotency keys.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the retention job runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// The largest `params`, `result`, `error` and `progress`; agents learn them at check-in.
    pub limits: CommandLimits,
    /// How often the scheduler creates the commands of schedules whose fire time has come.
    #[serde(with = "humantime_serde")]
    pub schedule_interval: Duration,
    /// A fire time at most this old when the scheduler reaches it still fires; an older one was
    /// missed (keel was down, the schedule paused) and the schedule's `missed` policy applies.
    /// At least `schedule_interval`.
    #[serde(with = "humantime_serde")]
    pub schedule_grace: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            release_stuck_interval: Duration::from_secs(60),
            agent_online_window: Duration::from_secs(90),
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_interval: Duration::from_secs(600),
            limits: CommandLimits::default(),
            schedule_interval: Duration::from_secs(1),
            schedule_grace: Duration::from_secs(5),
        }
    }
}

/// The largest JSON values a command carries, each measured as keel serialises the parsed
/// value (compact, so `1e2` counts as `100.0`). Larger ones get 413 `payload_too_large`.
/// The check-in answer tells agents these numbers under `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CommandLimits {
    /// The largest `params` a command is created with, in bytes.
    pub params_bytes: usize,
    /// The largest `result` a completion reports, in bytes.
    pub result_bytes: usize,
    /// The largest `error` a failure reports, in bytes.
    pub error_bytes: usize,
    /// The largest `progress` a heartbeat stores, in bytes.
    pub progress_bytes: usize,
}

impl CommandLimits {
    /// The smallest limit accepted: room for a truncated report and its marker.
    pub const MIN_BYTES: usize = 1024;
    /// How far below `http.body_limit` each limit must stay: room for the rest of the
    /// request body (claim token, field names, `retryable`).
    pub const BODY_MARGIN: usize = 1024;
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            params_bytes: 64 * 1024,
            result_bytes: 64 * 1024,
            error_bytes: 64 * 1024,
            progress_bytes: 64 * 1024,
        }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body_limit: usize,
    /// A request not answered within this time gets 408.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Once the first byte of a request arrives, its head (request line and headers) must be
    /// complete within this time, or the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed when the next request does not start
    /// within this time (from its opening or its previous response).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections served at once (lowered to fit the open-file limit); at the cap a new
    /// connection replaces the oldest idle one. Health probes have reserved places beyond it.
    pub max_connections: usize,
}

/// Access to the admin routes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The bearer token for `/v1/admin/*` (besides operator keys). When unset, keel creates a
    /// random one at first start and keeps it in `<data_dir>/admin-token` (readable by its
    /// owner only).
    pub token: Option<Secret>,
}

/// A secret of the configuration, held as a [`SecretString`]: `Debug` shows `[REDACTED]` and
/// serialising (`keel config`) writes [`REDACTED`], so whatever holds one is redacted by its
/// type. [`ExposeSecret::expose_secret`] reads it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

/// What a [`Secret`] serialises as.
pub const REDACTED: &str = "<redacted>";

impl Secret {
    /// The secret's text.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Self(SecretString::from(secret))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight requests and tasks may take to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How long the logger may take to write what it still holds.
    #[serde(with = "humantime_serde")]
    pub log_flush: Duration,
}

/// Intervals of keel's own periodic jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How often the metrics recorder folds histogram samples and the logger's queue gauges
    /// are refreshed.
    #[serde(with = "humantime_serde")]
    pub telemetry_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("keel-data"),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            metrics: crate::telemetry::MetricsConfig::default(),
            log: keel_log::LogConfig::default(),
            supervisor: keel_guard::supervisor::RestartPolicy::default(),
            shutdown: ShutdownConfig::default(),
            jobs: JobsConfig::default(),
            store: StoreConfig::default(),
            commands: CommandsConfig::default(),
            overload: crate::http::overload::OverloadConfig::default(),
            notifications: Default::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7740)),
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            log_flush: Duration::from_secs(5),
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            telemetry_interval: Duration::from_secs(5),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a key is unknown or has the wrong type; the message names
    /// the key as `keel.toml` spells it, whichever source gave it.
    #[error("configuration: {}", describe(.0))]
    Load(Box<figment::Error>),
    /// `--config` names a file that does not exist.
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    /// The restart policy makes no sense.
    #[error("configuration: {0}")]
    Supervisor(#[from] keel_guard::supervisor::PolicyError),
    /// A value is well-typed but not acceptable.
    #[error("configuration: `{key}` {problem}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(error: Box<figment::Error>) -> Self {
        Self::Load(error)
    }
}

/// Each of figment's errors as "`dotted.key`: what is wrong (from where)". figment's own text
/// names the key as the source spells it (`HTTP.BODY_LIMIT` from the environment) and with the
/// profile (`default.http.body_limit`).
fn describe(error: &figment::Error) -> String {
    let each = error.clone().into_iter().map(|error| {
        // keel's keys are lower case; the environment's are upper case.
        let key: Vec<String> = error.path.iter().map(|part| part.to_lowercase()).collect();
        let from = match &error.metadata {
            Some(metadata) => match &metadata.source {
                Some(source) => format!(" (from {} {source})", metadata.name),
                None => format!(" (from {})", metadata.name),
            },
            None => String::new(),
        };
        if key.is_empty() {
            format!("{}{from}", error.kind)
        } else {
            format!("`{}`: {}{from}", key.join("."), error.kind)
        }
    });
    each.collect::<Vec<_>>().join("; ")
}

/// Values given on the command line; each overrides every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--store-url`
    pub store_url: Option<String>,
}

impl Config {
    /// Merges defaults, the file, the environment and `overrides`, then validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, Env::prefixed("KEEL_"))
    }

    fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: Env,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.into())),
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        figment = figment.merge(env.filter(|key| is_config_env(key.as_str())).split("__"));
        if let Some(listen) = overrides.listen {
            figment = figment.merge(("http.listen", listen));
        }
        if let Some(dir) = &overrides.data_dir {
            figment = figment.merge(("data_dir", dir));
        }
        if let Some(url) = &overrides.store_url {
            figment = figment.merge(("store.url", url));
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if self.http.body_limit == 0 {
            return invalid("http.body_limit", "must be at least 1 byte");
        }
        if self.http.request_timeout.is_zero() {
            return invalid("http.request_timeout", "must be longer than 0s");
        }
        if self.http.header_read_timeout.is_zero() {
            return invalid("http.header_read_timeout", "must be longer than 0s");
        }
        if self.http.idle_timeout.is_zero() {
            return invalid("http.idle_timeout", "must be longer than 0s");
        }
        if self.http.max_connections == 0 {
            return invalid("http.max_connections", "must be at least 1");
        }
        if self.jobs.telemetry_interval.is_zero() {
            return invalid("jobs.telemetry_interval", "must be longer than 0s");
        }
        if self.commands.release_stuck_interval.is_zero() {
            return invalid("commands.release_stuck_interval", "must be longer than 0s");
        }
        if self.commands.schedule_interval.is_zero() {
            return invalid("commands.schedule_interval", "must be longer than 0s");
        }
        if self.commands.schedule_grace < self.commands.schedule_interval {
            return invalid(
                "commands.schedule_grace",
                "must be at least commands.schedule_interval",
            );
        }
        if self.store.postgres.max_connections == 0 {
            return invalid("store.postgres.max_connections", "must be at least 1");
        }
        if self.store.postgres.acquire_timeout.is_zero() {
            return invalid("store.postgres.acquire_timeout", "must be longer than 0s");
        }
        let schema = &self.store.postgres.schema;
        if !schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return invalid(
                "store.postgres.schema",
                "a schema name of a-z, 0-9 and _ (or empty)",
            );
        }
        self.validate_command_limits()?;
        self.supervisor.validate()?;
        self.overload
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        self.notifications
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        if let Some(token) = &self.admin.token
            && token.expose_secret().len() < 16
        {
            return invalid("admin.token", "must be at least 16 characters");
        }
        Ok(())
    }

    /// Each command limit is at least [`CommandLimits::MIN_BYTES`] and fits, with
    /// [`CommandLimits::BODY_MARGIN`] to spare, in a request body.
    fn validate_command_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.commands.limits;
        let most = self
            .http
            .body_limit
            .saturating_sub(CommandLimits::BODY_MARGIN);
        for (key, value) in [
            ("commands.limits.params_bytes", limits.params_bytes),
            ("commands.limits.result_bytes", limits.result_bytes),
            ("commands.limits.error_bytes", limits.error_bytes),
            ("commands.limits.progress_bytes", limits.progress_bytes),
        ] {
            if value < CommandLimits::MIN_BYTES || value > most {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!(
                        "must be between {} and `http.body_limit` - {} ({most}), got {value}",
                        CommandLimits::MIN_BYTES,
                        CommandLimits::BODY_MARGIN,
                    ),
                });
            }
        }
        Ok(())
    }

    /// The SQLite database file: `store.url` when it is a path, `<data_dir>/keel.db` when
    /// it is unset.
    pub fn database_path(&self) -> PathBuf {
        match &self.store.url {
            Some(url) if !url.expose_secret().is_empty() => {
                let url = url.expose_secret();
                PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url))
            }
            _ => self.data_dir.join(DATABASE_FILE),
        }
    }

    /// The database `store.url` names.
    pub fn backend(&self) -> Backend {
        match &self.store.url {
            Some(url) if keel_store::is_postgres_url(url.expose_secret()) => {
                let postgres = &self.store.postgres;
                Backend::Postgres(keel_store::PgOptions {
                    max_connections: postgres.max_connections,
                    min_connections: postgres.min_connections,
                    acquire_timeout: postgres.acquire_timeout,
                    schema: (!postgres.schema.is_empty()).then(|| postgres.schema.clone()),
                    ..keel_store::PgOptions::new(url.expose_secret())
                })
            }
            _ => Backend::Sqlite(self.database_path()),
        }
    }

    /// The configuration as TOML, every key with its effective value; every [`Secret`]
    /// serialises as `<redacted>`. An unset `admin.token` (TOML has no null) is a comment
    /// saying so.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut text = toml::to_string_pretty(self)?;
        if self.admin.token.is_none() {
            text = text.replacen("[admin]\n", UNSET_ADMIN_TOKEN, 1);
        }
        if self.store.url.is_none() {
            text = text.replacen("[store]\n", UNSET_STORE_URL, 1);
        }
        Ok(text)
    }
}

#[cfg(test)]
// figment's `Jail` closures must return its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(jail: &Jail, file: Option<&str>) -> Result<Config, ConfigError> {
        let _ = jail;
        Config::load_with_env(
            file.map(Path::new),
            &Overrides::default(),
            Env::prefixed("KEEL_"),
        )
    }

    #[test]
    fn defaults_need_no_file_and_listen_on_loopback() {
        Jail::expect_with(|jail| {
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.http.listen.to_string(), DEFAULT_LISTEN);
            assert_eq!(config.data_dir, PathBuf::from("keel-data"));
            assert_eq!(config.http.body_limit, 1024 * 1024);
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags_win_in_that_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "keel.toml",
                "data_dir = \"from-file\"\n[http]\nlisten = \"127.0.0.1:9001\"\nrequest_timeout = \"3s\"\n",
            )?;
            jail.set_env("KEEL_HTTP__LISTEN", "127.0.0.1:9002");
            jail.set_env("KEEL_FAILPOINTS", "ignored=off");
            jail.set_env("KEEL_REQUIRE_BROWSER", "1");
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.data_dir, PathBuf::from("from-file"));
            assert_eq!(config.http.listen.to_string(), "127.0.0.1:9002");
            assert_eq!(config.http.request_timeout, Duration::from_secs(3));

            let flags = Overrides {
                listen: Some("127.0.0.1:9003".parse().unwrap()),
                data_dir: Some("from-flag".into()),
                store_url: None,
            };
            let config = Config::load_with_env(None, &flags, Env::prefixed("KEEL_")).unwrap();
            assert_eq!(config.http.listen.to_string(), "127.0.0.1:9003");
            assert_eq!(config.data_dir, PathBuf::from("from-flag"));
            Ok(())
        });
    }

    #[test]
    fn variables_of_the_agent_and_its_programs_are_not_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_AGENT_TOKEN", "keel_abcdefgh_secret");
            jail.set_env("KEEL_AGENT_SERVER", "http://127.0.0.1:1");
            jail.set_env("KEEL_COMMAND_ID", "x");
            jail.set_env("KEEL_CONFIG_X", "not ignored");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("`config_x`"), "{err}");
            assert!(!err.contains("agent"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file("keel.toml", "[http]\nlisten_on = \"x\"\n")?;
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("`http.listen_on`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_HTTP__REQUEST_TIMEOUT", "soon");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("`http.request_timeout`"), "{err}");
            assert!(!err.contains("HTTP.REQUEST_TIMEOUT"), "{err}");
            jail.set_env("KEEL_HTTP__REQUEST_TIMEOUT", "5s");
            jail.create_file("keel.toml", "[http]\nbody_limit = \"big\"\n")?;
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("`http.body_limit`"), "{err}");
            assert!(!err.contains("default."), "{err}");
            jail.create_file("keel.toml", "")?;
            jail.set_env("KEEL_HTTP__REQUEST_TIMEOUT", "5s");
            jail.set_env("KEEL_HTTP__BODY_LIMIT", "0");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("http.body_limit"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn command_limits_are_configurable_and_stay_below_the_body_limit() {
        Jail::expect_with(|jail| {
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.commands.limits.result_bytes, 64 * 1024);
            jail.create_file(
                "keel.toml",
                "[http]\nbody_limit = 2097152\n[commands.limits]\nresult_bytes = 1048576\n",
            )?;
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.commands.limits.result_bytes, 1024 * 1024);
            assert_eq!(config.commands.limits.progress_bytes, 64 * 1024);
            // As large as the body limit leaves no room for the rest of the body.
            jail.set_env("KEEL_HTTP__BODY_LIMIT", "1048576");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("commands.limits.result_bytes"), "{err}");
            jail.set_env("KEEL_HTTP__BODY_LIMIT", "2097152");
            jail.set_env("KEEL_COMMANDS__LIMITS__PROGRESS_BYTES", "100");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("commands.limits.progress_bytes"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn overload_keys_are_read_and_checked() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "keel.toml",
                "[overload]\nmax_in_flight = 100\n[overload.orgs.acme]\nwork_per_second = 5\n",
            )?;
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.overload.max_in_flight, 100);
            assert_eq!(config.overload.orgs["acme"].work_per_second.get(), 5);
            jail.set_env("KEEL_OVERLOAD__RATE_LIMITS__AGENT_BURST", "0");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("agent_burst"), "{err}");
            jail.set_env("KEEL_OVERLOAD__RATE_LIMITS__AGENT_BURST", "10");
            jail.set_env("KEEL_OVERLOAD__RESERVED_FOR_REPORTS", "100");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("overload.reserved_for_reports"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, Some("nope.toml")).unwrap_err();
            assert!(matches!(err, ConfigError::MissingFile(_)));
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted_in_the_toml_and_in_debug() {
        let mut config = Config::default();
        config.admin.token = Some("a-very-secret-admin-token".into());
        config.metrics.token = Some("a-very-secret-metrics-token".into());
        let shown = config.to_redacted_toml().unwrap();
        assert!(!shown.contains("a-very-secret"));
        assert!(shown.contains("<redacted>"));
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!shown.contains("a-very-secret"), "{shown}");
            assert!(shown.contains("REDACTED"), "{shown}");
        }
    }

    #[test]
    fn a_secret_from_the_environment_is_read_and_never_shown() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_ADMIN__TOKEN", "env-secret-admin-token-xyz");
            let config = load_in_jail(jail, None).unwrap();
            let token = config.admin.token.as_ref().unwrap();
            assert_eq!(token.expose_secret(), "env-secret-admin-token-xyz");
            assert!(!format!("{config:?}").contains("env-secret"));
            assert!(!config.to_redacted_toml().unwrap().contains("env-secret"));
            Ok(())
        });
    }
}
