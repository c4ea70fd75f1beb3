//! `keel agent`: a ready agent that claims commands and runs a program for each.

use clap::Args;

/// `keel agent` flags.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The keel server's base URL.
    #[arg(long, env = "KEEL_AGENT_SERVER")]
    pub server: String,
    /// An API key with the `agent` scope.
    #[arg(long, env = "KEEL_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The program run once per command.
    #[arg(long)]
    pub exec: std::path::PathBuf,
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("the agent for {} is not available in this build", args.server)
}
