//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// keel: hands commands to remote agents, and does not fall over.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// keel's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (SQLite under ./keel-data by default; no set-up needed).
    Serve(ConfigArgs),
    /// Print the effective configuration, secrets redacted.
    Config(ConfigArgs),
    /// Manage organisations, their API keys and operator keys.
    Admin(crate::admin::AdminArgs),
    /// Run an agent: claim commands from a keel server and run a program for each.
    Agent(crate::agent::AgentArgs),
    /// Apply the database migrations this keel has and the database lacks, then exit
    /// (`keel serve` applies them at start too, unless `store.migrate = false`).
    Migrate(SourceArgs),
    /// Move an installation between databases.
    #[command(subcommand)]
    Store(StoreCommand),
}

/// `keel store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy everything from an SQLite file into an empty, migrated PostgreSQL database, queued
    /// and running work included. Stop every keel on the SQLite file first
    /// (docs/store.md, "Moving to PostgreSQL").
    Copy(CopyArgs),
}

/// `keel store copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The SQLite database file (`<data_dir>/keel.db`).
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL URL (`postgres://user:password@host:5432/database`); its migrations are
    /// applied first.
    #[arg(long)]
    pub to: String,
    /// The PostgreSQL schema keel's tables live in (default: the database's search path).
    #[arg(long)]
    pub schema: Option<String>,
}

/// Where the configuration comes from; accepted before or after a subcommand
/// (`keel admin list-orgs --data-dir D`).
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// The TOML configuration file (default: ./keel.toml when it exists).
    #[arg(long, env = "KEEL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// The database (overrides `store.url`): an SQLite file's path, or a PostgreSQL URL
    /// (`postgres://user:password@host:5432/database`).
    #[arg(long, global = true)]
    pub store_url: Option<String>,
}

impl SourceArgs {
    /// The flags that override the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: None,
            data_dir: self.data_dir.clone(),
            store_url: self.store_url.clone(),
        }
    }
}

/// The configuration of `serve` and `config`: its sources and the listen address.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file and the data directory.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Address to listen on (overrides `http.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

impl ConfigArgs {
    /// The flags that override the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            ..self.source.overrides()
        }
    }
}
