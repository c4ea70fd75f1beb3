//! `keel admin`: organisations, their API keys and operator keys, from the command line, on the
//! data directory's database (safe while `keel serve` runs: SQLite's WAL lets both use it).

use anyhow::Context as _;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use keel_store::{ApiKeyId, ExposeSecret, NewApiKey, OperatorKeyId, OrgId, Scope, Store};

use crate::cli::SourceArgs;
use crate::config::Config;
use crate::server::open_store;

/// `keel admin` and its subcommands.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Where the configuration (and so the data directory) comes from.
    #[command(flatten)]
    pub config: SourceArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// What `keel admin` can do.
#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Create an organisation; prints its id.
    CreateOrg {
        /// Its unique name.
        name: String,
    },
    /// List organisations.
    ListOrgs,
    /// Create an API key; prints the token (shown once) on stdout.
    CreateKey {
        /// The organisation's name.
        #[arg(long)]
        org: String,
        /// A name for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// Comma-separated scopes. No organisation key opens `/v1/admin/*`: that takes an
        /// operator key (`create-operator-key`).
        #[arg(long, value_delimiter = ',', required = true, value_parser = scope_parser())]
        scopes: Vec<Scope>,
        /// For an `agent` key: the agent it is bound to (created if new).
        #[arg(long)]
        agent: Option<String>,
    },
    /// List the keys of an organisation (never their tokens).
    ListKeys {
        /// The organisation's name.
        #[arg(long)]
        org: String,
    },
    /// Revoke a key: it stops working at once.
    RevokeKey {
        /// The organisation's name.
        #[arg(long)]
        org: String,
        /// The key's id.
        id: uuid::Uuid,
    },
    /// Create an operator key (outside every organisation: it opens `/v1/admin/*` and nothing
    /// of any organisation); prints the token (shown once) on stdout.
    CreateOperatorKey {
        /// A name for the key (who uses it).
        #[arg(long)]
        name: String,
    },
    /// List operator keys (never their tokens).
    ListOperatorKeys,
    /// Revoke an operator key: it stops working at once.
    RevokeOperatorKey {
        /// The key's id.
        id: uuid::Uuid,
    },
}

/// Parses a scope; `--help` lists every scope the store knows.
fn scope_parser() -> impl TypedValueParser<Value = Scope> {
    PossibleValuesParser::new(Scope::ALL.iter().map(|scope| scope.as_str()))
        .try_map(|name| name.parse::<Scope>())
}

/// Runs one `keel admin` action.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.config.as_deref(), &args.config.overrides())?;
    crate::server::create_data_dir(&config.data_dir)?;
    let logger = audit_logger(&config)?;
    let store = open_store(&config).await?;
    let result = act(store.as_ref(), args.action).await;
    store.close().await;
    if !logger.shutdown(config.shutdown.log_flush) {
        eprintln!("keel: the audit log was not written completely");
    }
    result
}

/// The logger of a `keel admin` run: the configured sinks that take the `audit` stream, for
/// that stream only, so what an operator changes here is in the same audit log as the server's
/// records. A stdout sink writes to stderr instead: stdout carries the command's output.
fn audit_logger(config: &Config) -> anyhow::Result<keel_log::Logger> {
    let mut log = config.log.clone();
    log.dir = config.data_dir.join(&log.dir);
    log.sinks
        .retain(|sink| sink.streams.contains(&keel_log::Stream::Audit));
    for sink in &mut log.sinks {
        sink.streams = vec![keel_log::Stream::Audit];
        if sink.kind == keel_log::SinkKind::Stdout {
            sink.kind = keel_log::SinkKind::Stderr;
        }
    }
    keel_log::init(&log).context("starting the audit log")
}

async fn act(store: &dyn Store, action: AdminAction) -> anyhow::Result<()> {
    match action {
        AdminAction::CreateOrg { name } => {
            let org = store.create_organisation(&name).await?;
            tracing::info!(target: "keel::audit", action = "organisation.create", org_id = %org.id.0, org = %org.name, via = "cli", "organisation created");
            println!("{}", org.id.0);
        }
        AdminAction::ListOrgs => {
            for org in store.list_organisations().await? {
                println!("{}\t{}", org.id.0, org.name);
            }
        }
        AdminAction::CreateKey {
            org,
            name,
            scopes,
            agent,
        } => {
            let org = org_id(store, &org).await?;
            let created = store
                .create_api_key(
                    org,
                    NewApiKey {
                        name,
                        scopes,
                        agent_name: agent,
                    },
                )
                .await?;
            tracing::info!(target: "keel::audit", action = "api_key.create", org_id = %org.0, key_id = %created.key.id.0, key_prefix = %created.key.prefix, scopes = ?created.key.scopes, via = "cli", "API key created");
            eprintln!(
                "keel: created key {} (prefix {}); the token below is shown once",
                created.key.id.0, created.key.prefix
            );
            println!("{}", created.token.expose_secret());
        }
        AdminAction::ListKeys { org } => {
            let org = org_id(store, &org).await?;
            for key in store.list_api_keys(org).await? {
                let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "{}\t{}\t{}\t{}{}",
                    key.id.0,
                    key.prefix,
                    key.name,
                    scopes.join(","),
                    revoked_column(key.revoked_at)
                );
            }
        }
        AdminAction::RevokeKey { org, id } => {
            let org = org_id(store, &org).await?;
            store.revoke_api_key(org, ApiKeyId(id)).await?;
            tracing::info!(target: "keel::audit", action = "api_key.revoke", org_id = %org.0, key_id = %id, via = "cli", "API key revoked");
            eprintln!("keel: key {id} revoked");
        }
        AdminAction::CreateOperatorKey { name } => {
            let created = store.create_operator_key(&name).await?;
            tracing::info!(target: "keel::audit", action = "operator_key.create", key_id = %created.key.id, key_prefix = %created.key.prefix, via = "cli", "operator key created");
            eprintln!(
                "keel: created operator key {} (prefix {}); the token below is shown once",
                created.key.id, created.key.prefix
            );
            println!("{}", created.token.expose_secret());
        }
        AdminAction::ListOperatorKeys => {
            for key in store.list_operator_keys().await? {
                println!(
                    "{}\t{}\t{}{}",
                    key.id,
                    key.prefix,
                    key.name,
                    revoked_column(key.revoked_at)
                );
            }
        }
        AdminAction::RevokeOperatorKey { id } => {
            store.revoke_operator_key(OperatorKeyId(id)).await?;
            tracing::info!(target: "keel::audit", action = "operator_key.revoke", key_id = %id, via = "cli", "operator key revoked");
            eprintln!("keel: operator key {id} revoked");
        }
    }
    Ok(())
}

/// The last column of a listed key: `\trevoked`, or nothing.
fn revoked_column(revoked_at: Option<time::OffsetDateTime>) -> &'static str {
    if revoked_at.is_some() {
        "\trevoked"
    } else {
        ""
    }
}

async fn org_id(store: &dyn Store, name: &str) -> anyhow::Result<OrgId> {
    store
        .find_org_by_name(name)
        .await?
        .map(|org| org.id)
        .with_context(|| format!("no organisation named `{name}`"))
}
