//! `keel serve`: wires the parts together, runs them, and shuts them down on a signal.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting connections, let in-flight requests finish and
//! cancel supervised tasks, both within `shutdown.grace`; then drain the logger within
//! `shutdown.log_flush` and exit 0. A second signal exits at once with status 130.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_guard::components::Components;
use keel_guard::periodic::JobHandle;
use keel_guard::supervisor::Supervisor;
use keel_log::Logger;
use keel_store::{
    ExposeSecret, NewApiKey, PgStore, Scope, SecretString, SqliteOptions, SqliteStore, Store,
    SystemClock, WriterOptions,
};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::postgres::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::election::Election;
use crate::cluster::wake_bus::PgNotify;
use crate::cluster::{self, Instance};
use crate::commands::release::{self, release_expired_leases};
use crate::commands::retention::purge_finished_commands;
use crate::commands::scheduler::{self, fire_due_schedules};
use crate::commands::wakeups::Wakeups;
use crate::config::{Backend, Config};
use crate::deliveries::address::AddressPolicy;
use crate::deliveries::breaker::Breakers;
use crate::deliveries::channels::Channels;
use crate::deliveries::jobs as delivery_jobs;
use crate::deliveries::processor::Processor;
use crate::http::connections::{self, ConnectionLimits};
use crate::http::lifecycle::Lifecycle;
use crate::http::overload::{Overload, StorePressure};
use crate::http::{self, AppState};
use crate::notifications::NotificationState;
use crate::notifications::secrets::SecretBox;
use crate::telemetry;

/// The exit status after a second signal.
pub const FORCED_EXIT_STATUS: i32 = 130;

/// Name of the file that keeps the generated admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Name of the file, in the data directory, that holds the operator key created at first start.
pub const BOOTSTRAP_OPERATOR_KEY_FILE: &str = "operator-key";

/// Name of the file, in the data directory, that holds the admin key of the organisation
/// `default` created at first start.
pub const BOOTSTRAP_ADMIN_KEY_FILE: &str = "default-admin-key";

/// Runs `keel serve` until SIGTERM/SIGINT. Installs the panic hook, the failpoints, the logger
/// and the metrics recorder, which exist once per process.
pub async fn serve(mut config: Config) -> anyhow::Result<()> {
    keel_guard::panic::install_hook();
    let failpoints = keel_guard::failpoints::configure_from_env(crate::failpoints::KNOWN)?;
    create_data_dir(&config.data_dir)?;
    config.log.dir = config.data_dir.join(&config.log.dir);
    let logger = keel_log::init(&config.log).context("starting the logger")?;
    let metrics = telemetry::install_recorder().context("installing the metrics recorder")?;
    if !failpoints.is_empty() {
        tracing::warn!(failpoints = ?failpoints, "failpoints configured");
    }

    // The store is ready (migrated, bootstrapped) before the port opens.
    let (store, postgres) = open_database(&config).await?;
    bootstrap(store.as_ref(), &config.data_dir).await?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding {}", config.http.listen))?;
    let result = run(
        config,
        listener,
        store,
        postgres,
        logger.clone(),
        metrics,
        shutdown_signal(),
    )
    .await;
    if let Err(error) = &result {
        tracing::error!(error = %format!("{error:#}"), "keel stopped with an error");
    }
    result
}

/// Runs the server on `listener` until `shutdown` completes, then shuts down in order. With
/// `postgres` (the store's pool), the instance joins the others on that database: election,
/// wake bus, database probe (`crate::cluster`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    store: Arc<dyn Store>,
    postgres: Option<PgPool>,
    logger: Logger,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let admin_token = admin_token(&config)?;
    let components = Components::new();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(
        components.clone(),
        config.supervisor.clone(),
        cancel.clone(),
        tracker.clone(),
    );
    let backend = if postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let instance = Instance::register(&components, backend);
    let (wakeups, election) = match postgres {
        Some(pool) => {
            cluster::database::start(&supervisor, pool.clone());
            let wakeups = PgNotify::start(
                &supervisor,
                pool.clone(),
                instance.boot_id,
                Wakeups::default(),
            );
            (wakeups, Election::campaign(&supervisor, pool, instance))
        }
        None => (Wakeups::default(), Election::sole()),
    };
    let notifications = Arc::new(NotificationState {
        secrets: SecretBox::load(
            config
                .notifications
                .secret_key
                .as_ref()
                .map(|key| SecretString::from(key.expose_secret()))
                .as_ref(),
            &config.data_dir,
        )
        .context("loading the notification key")?,
        wakeups: wakeups.clone(),
        breakers: Arc::new(Breakers::new(
            config.notifications.breaker_failures,
            config.notifications.breaker_cooldown,
        )),
    });
    start_delivery_workers(&supervisor, &config, &store, &notifications)?;
    let jobs = [
        start_telemetry(&supervisor, &config, &logger, &metrics),
        start_release_stuck(&supervisor, &config, &store, &wakeups, &election),
        start_retention(&supervisor, &config, &store, &election),
        start_scheduler(&supervisor, &config, &store, &wakeups, &election),
        start_delivery_release(&supervisor, &config, &store, &notifications, &election),
        start_delivery_cleanup(&supervisor, &config, &store, &election),
    ];
    let job_names: Vec<&str> = jobs.iter().map(JobHandle::name).collect();
    telemetry::seed(&job_names);
    telemetry::refresh_fleet_gauges(store.as_ref()).await;

    let state = AppState {
        components,
        logger: logger.clone(),
        metrics,
        admin_token,
        metrics_token: config
            .metrics
            .token
            .as_ref()
            .map(|token| Arc::new(SecretString::from(token.expose_secret().to_owned()))),
        store: store.clone(),
        wakeups,
        shutdown: cancel.clone(),
        request_timeout: config.http.request_timeout,
        max_claim_wait: Duration::from_secs(crate::http::commands::MAX_WAIT_SECONDS),
        agent_online_window: config.commands.agent_online_window,
        command_limits: config.commands.limits,
        overload: Arc::new(Overload::new(
            &config.overload,
            Arc::new(StorePressure::new(store.clone())),
        )),
        jobs: Arc::new(
            jobs.into_iter()
                .map(|job| (job.name().to_owned(), job))
                .collect(),
        ),
        keys: Arc::new(crate::http::auth::KeyCache::new()),
        ui_sessions: Arc::new(crate::http::ui::Sessions::default()),
        overviews: Arc::new(crate::http::operations::Overviews::default()),
        notifications,
    };
    let lifecycle = Lifecycle {
        timeout: config.http.request_timeout,
        body_limit: config.http.body_limit,
    };
    let app = http::router(state, lifecycle);
    let address = listener.local_addr().context("reading the bound address")?;
    let open_files = connections::raise_open_file_limit();
    let limits = ConnectionLimits {
        header_read_timeout: config.http.header_read_timeout,
        idle_timeout: config.http.idle_timeout,
        max_connections: connections::connection_cap(config.http.max_connections, open_files),
    };
    if limits.max_connections < config.http.max_connections {
        tracing::warn!(
            configured = config.http.max_connections,
            cap = limits.max_connections,
            open_file_limit = open_files,
            "http.max_connections lowered to fit the open-file limit"
        );
    }
    let server = tokio::spawn(connections::serve(listener, app, limits, cancel.clone()));
    tracing::info!(%address, version = env!("CARGO_PKG_VERSION"), max_connections = limits.max_connections, "keel is listening");

    shutdown.await;
    tracing::info!(grace = ?config.shutdown.grace, "shutting down");
    cancel.cancel();
    tracker.close();
    let drained = tokio::time::timeout(config.shutdown.grace, async {
        let served = server.await;
        tracker.wait().await;
        served
    })
    .await;
    match drained {
        Ok(Ok(())) => tracing::info!("in-flight work finished"),
        Ok(Err(error)) => tracing::error!(%error, "the HTTP server task failed"),
        Err(_) => tracing::warn!("shutdown grace elapsed; abandoning in-flight work"),
    }
    store.close().await;
    tracing::info!("keel stopped");
    if !logger.shutdown(config.shutdown.log_flush) {
        eprintln!(
            "keel: the logger did not drain within {:?}",
            config.shutdown.log_flush
        );
    }
    Ok(())
}

/// The telemetry job: panic counts and histogram upkeep for the metrics, the log queue gauge.
fn start_telemetry(
    supervisor: &Supervisor,
    config: &Config,
    logger: &Logger,
    metrics: &PrometheusHandle,
) -> JobHandle {
    let logger = logger.clone();
    let metrics = metrics.clone();
    supervisor.every("telemetry", config.jobs.telemetry_interval, move || {
        let logger = logger.clone();
        let metrics = metrics.clone();
        async move {
            fail::fail_point!("job.telemetry");
            keel_guard::panic::export_metrics();
            metrics.run_upkeep();
            let stats = logger.stats();
            metrics::gauge!("keel_log_queue_length").set(stats.queue_len as f64);
        }
    })
}

/// Makes every file and directory keel creates from now on readable by its owner only (umask
/// 0o077): the data directory, the database and its `-wal` and `-shm` files, the key files, the
/// log files. Called at the start of `keel serve` and `keel admin`; not for `keel agent`,
/// whose programs keep the umask they were given.
pub fn keep_files_private() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates the data directory (and its parents) with mode 0700 when it does not exist.
pub fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))
}

/// Narrows the database files to mode 0600: those a keel from before the umask created with
/// the default one (0644) stay private too.
fn restrict_database_files(database: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut path = database.as_os_str().to_owned();
        path.push(suffix);
        let path = std::path::PathBuf::from(path);
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("restricting {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens the database `store.url` names: SQLite (the file created and migrated as needed) or
/// PostgreSQL (migrated unless `store.migrate` is off; refused when a newer keel migrated it).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open_database(config).await?.0)
}

/// [`open_store`], and the PostgreSQL pool when the store is on PostgreSQL.
async fn open_database(config: &Config) -> anyhow::Result<(Arc<dyn Store>, Option<PgPool>)> {
    match config.backend() {
        Backend::Sqlite(path) => Ok((open_sqlite(config, &path).await?, None)),
        Backend::Postgres(options) => {
            let store = PgStore::connect(&options, None)
                .await
                .context("store.url")?;
            store
                .check_schema()
                .await
                .context("checking the PostgreSQL schema")?;
            if config.store.migrate {
                store
                    .migrate()
                    .await
                    .context("migrating the PostgreSQL database")?;
            } else {
                let pending = store.pending_migrations().await?;
                if pending > 0 {
                    anyhow::bail!(
                        "the PostgreSQL database lacks {pending} migration(s) and store.migrate \
                         is false: run `keel migrate` first"
                    );
                }
            }
            let pool = store.pool().clone();
            Ok((Arc::new(store), Some(pool)))
        }
    }
}

/// Opens (creating and migrating it as needed) the SQLite database at `path`.
async fn open_sqlite(config: &Config, path: &Path) -> anyhow::Result<Arc<dyn Store>> {
    let store_config = &config.store;
    let options = SqliteOptions {
        synchronous: store_config.synchronous,
        read_connections: store_config.read_connections,
        busy_timeout: store_config.write_timeout,
        writer: WriterOptions {
            queue_capacity: store_config.write_queue,
            max_group: store_config.max_group,
            enqueue_timeout: store_config.write_timeout,
        },
    };
    let store = SqliteStore::open(path, options, Arc::new(SystemClock))
        .await
        .with_context(|| format!("opening the database {}", path.display()))?;
    restrict_database_files(path)?;
    Ok(Arc::new(store))
}

/// `keel store copy`: migrates the PostgreSQL database, then copies the SQLite file into it
/// (everything, in one transaction) and prints the rows copied per table.
pub async fn copy_store(args: crate::cli::CopyArgs) -> anyhow::Result<()> {
    if !args.from.is_file() {
        anyhow::bail!("--from {}: no such SQLite file", args.from.display());
    }
    if !keel_store::is_postgres_url(&args.to) {
        anyhow::bail!("--to: a postgres:// URL");
    }
    let sqlite = SqliteStore::open(&args.from, SqliteOptions::default(), Arc::new(SystemClock))
        .await
        .with_context(|| format!("opening {}", args.from.display()))?;
    let options = keel_store::PgOptions {
        schema: args.schema.clone(),
        ..keel_store::PgOptions::new(args.to.clone())
    };
    let postgres = PgStore::connect(&options, None).await.context("--to")?;
    postgres
        .migrate()
        .await
        .context("migrating the PostgreSQL database")?;
    let copied = keel_store::copy::sqlite_to_postgres_with_progress(
        &sqlite,
        &postgres,
        &mut |table, rows| {
            if rows == 0 {
                eprintln!("keel: copying {table}…");
            }
        },
    )
    .await;
    sqlite.close().await;
    postgres.close().await;
    let report = copied.context("copying")?;
    print!("{report}");
    println!(
        "keel: copied {} rows; start keel with store.url set to the PostgreSQL URL",
        report.total()
    );
    Ok(())
}

/// `keel migrate`: applies the migrations the database lacks (SQLite applies its own at every
/// open) and says how many it applied.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    match config.backend() {
        Backend::Sqlite(path) => {
            create_data_dir(&config.data_dir)?;
            let store = open_sqlite(config, &path).await?;
            store.close().await;
            println!("keel: {} is migrated", path.display());
        }
        Backend::Postgres(options) => {
            let store = PgStore::connect(&options, None)
                .await
                .context("store.url")?;
            let pending = store.pending_migrations().await?;
            store
                .migrate()
                .await
                .context("migrating the PostgreSQL database")?;
            store.close().await;
            println!("keel: PostgreSQL migrated ({pending} migration(s) applied)");
        }
    }
    Ok(())
}

/// At first start (no organisation yet), creates an operator key, and the organisation
/// `default` with an admin key of its own: two keys, so the organisation's admin holds no
/// operator power. Each token is written to a file readable by its owner only in the data
/// directory; stdout shows the files' paths, never the tokens. Of several instances starting
/// together on one empty database, the one that creates `default` bootstraps; the others go on.
async fn bootstrap(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    if !store.list_organisations().await?.is_empty() {
        return Ok(());
    }
    let org = match store.create_organisation(BOOTSTRAP_ORG).await {
        Ok(org) => org,
        Err(keel_store::StoreError::Conflict(_)) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let operator = store.create_operator_key("bootstrap-operator").await?;
    let operator_path = data_dir.join(BOOTSTRAP_OPERATOR_KEY_FILE);
    write_secret_file(&operator_path, &operator.token)?;
    let admin = store
        .create_api_key(
            org.id,
            NewApiKey {
                name: "bootstrap-admin".to_owned(),
                scopes: vec![Scope::Admin, Scope::CommandsWrite, Scope::CommandsRead],
                agent_name: None,
            },
        )
        .await?;
    let admin_path = data_dir.join(BOOTSTRAP_ADMIN_KEY_FILE);
    write_secret_file(&admin_path, &admin.token)?;
    tracing::info!(target: "keel::audit", action = "bootstrap", org = BOOTSTRAP_ORG, operator_key_prefix = %operator.key.prefix, admin_key_prefix = %admin.key.prefix, "first start: operator key, organisation and its admin key created");
    println!(
        "keel: first start: operator key written to {} and the admin key of organisation `{BOOTSTRAP_ORG}` to {} (readable by their owner only)",
        operator_path.display(),
        admin_path.display()
    );
    Ok(())
}

/// The organisation created at first start.
pub const BOOTSTRAP_ORG: &str = "default";

/// The release-stuck job: expired leases go back to pending, or die.
fn start_release_stuck(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    wakeups: &Wakeups,
    election: &Election,
) -> JobHandle {
    let store = store.clone();
    let wakeups = wakeups.clone();
    every_elected(
        supervisor,
        election,
        release::JOB_NAME,
        config.commands.release_stuck_interval,
        move || {
            let store = store.clone();
            let wakeups = wakeups.clone();
            async move {
                if let Err(error) = release_expired_leases(store.as_ref(), &wakeups, None).await {
                    tracing::error!(%error, "release-stuck: the store failed; retrying at the next tick");
                }
            }
        },
    )
}

/// The retention job: finished commands past `commands.retention` are deleted.
fn start_retention(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    election: &Election,
) -> JobHandle {
    let store = store.clone();
    let retention = config.commands.retention;
    every_elected(
        supervisor,
        election,
        "retention",
        config.commands.retention_interval,
        move || {
            let store = store.clone();
            async move {
                if let Err(error) = purge_finished_commands(store.as_ref(), retention).await {
                    tracing::error!(%error, "retention: the store failed; retrying at the next tick");
                }
            }
        },
    )
}

/// The scheduler job: schedules whose fire time has come create their commands.
fn start_scheduler(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    wakeups: &Wakeups,
    election: &Election,
) -> JobHandle {
    let store = store.clone();
    let wakeups = wakeups.clone();
    let limits = config.commands.limits;
    let online_window = config.commands.agent_online_window;
    let grace = config.commands.schedule_grace;
    every_elected(
        supervisor,
        election,
        scheduler::JOB_NAME,
        config.commands.schedule_interval,
        move || {
            let store = store.clone();
            let wakeups = wakeups.clone();
            async move {
                if let Err(error) =
                    fire_due_schedules(store.as_ref(), &wakeups, &limits, online_window, grace)
                        .await
                {
                    tracing::error!(%error, "scheduler: the store failed; retrying at the next tick");
                }
            }
        },
    )
}

/// The delivery processor's workers (`notifications.workers`), supervised.
fn start_delivery_workers(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    notifications: &Arc<NotificationState>,
) -> anyhow::Result<()> {
    let settings = &config.notifications;
    let policy = AddressPolicy::new(&settings.allowed_networks)
        .map_err(|bad| anyhow::anyhow!("notifications.allowed_networks: `{bad}`"))?;
    let channels = Channels::new(
        store.clone(),
        notifications.secrets.clone(),
        policy,
        settings.permanent_statuses.clone(),
    )
    .context("building the webhook client")?;
    Processor::new(
        store.clone(),
        channels,
        notifications.wakeups.deliveries(),
        notifications.breakers.clone(),
    )
    .start(supervisor, settings.workers);
    Ok(())
}

/// The delivery release job: deliveries whose worker's lease expired go back, or die.
fn start_delivery_release(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    notifications: &Arc<NotificationState>,
    election: &Election,
) -> JobHandle {
    let store = store.clone();
    let notifications = notifications.clone();
    every_elected(
        supervisor,
        election,
        delivery_jobs::RELEASE_JOB,
        config.notifications.release_interval,
        move || {
            let store = store.clone();
            let notifications = notifications.clone();
            async move {
                if let Err(error) =
                    delivery_jobs::release_expired(store.as_ref(), || notifications.wake_workers())
                        .await
                {
                    tracing::error!(%error, "delivery release: the store failed; retrying at the next tick");
                }
            }
        },
    )
}

/// The delivery cleanup job: finished deliveries past `notifications.retention` are deleted.
fn start_delivery_cleanup(
    supervisor: &Supervisor,
    config: &Config,
    store: &Arc<dyn Store>,
    election: &Election,
) -> JobHandle {
    let store = store.clone();
    let retention = config.notifications.retention;
    every_elected(
        supervisor,
        election,
        delivery_jobs::CLEANUP_JOB,
        config.notifications.cleanup_interval,
        move || {
            let store = store.clone();
            async move {
                if let Err(error) = delivery_jobs::purge_finished(store.as_ref(), retention).await {
                    tracing::error!(%error, "delivery cleanup: the store failed; retrying at the next tick");
                }
            }
        },
    )
}

/// Runs `tick` every `interval` as the job `name`, on the elected instance only: elsewhere a
/// tick does nothing (docs/store.md, "Several instances").
fn every_elected<F, Fut>(
    supervisor: &Supervisor,
    election: &Election,
    name: &str,
    interval: Duration,
    mut tick: F,
) -> JobHandle
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let election = election.clone();
    supervisor.every(name, interval, move || {
        let run = election.is_elected().then(&mut tick);
        async move {
            if let Some(run) = run {
                run.await;
            }
        }
    })
}

/// The configured admin token, or the one kept in the data directory (created at first start).
fn admin_token(config: &Config) -> anyhow::Result<Arc<SecretString>> {
    if let Some(token) = &config.admin.token {
        return Ok(Arc::new(SecretString::from(token.expose_secret())));
    }
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let token = existing.trim();
        if !token.is_empty() {
            return Ok(Arc::new(SecretString::from(token)));
        }
    }
    let token = SecretString::from(format!(
        "keel_admin_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ));
    write_secret_file(&path, &token)?;
    tracing::warn!(path = %path.display(), "no admin.token configured; generated one");
    Ok(Arc::new(token))
}

/// Writes `secret` (and a newline) to a new file readable and writable by its owner only
/// (0600, whatever the umask); an existing file is replaced.
pub fn write_secret_file(path: &Path, secret: &SecretString) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // A file that existed keeps its mode through `open`: narrow it too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(secret.expose_secret().as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Completes at the first SIGTERM or SIGINT; a second one exits the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("keel: second signal, exiting now");
        std::process::exit(FORCED_EXIT_STATUS);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers there is no graceful shutdown to wait for.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
