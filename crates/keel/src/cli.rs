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
}

impl SourceArgs {
    /// The flags that override the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: None,
            data_dir: self.data_dir.clone(),
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
