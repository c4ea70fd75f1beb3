//! The `keel` binary.

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use keel::cli::{Cli, Command, StoreCommand};
use keel::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_) | Command::Admin(_)) {
        keel::server::keep_files_private();
    }
    match cli.command {
        Command::Serve(args) => {
            match Config::load(args.source.config.as_deref(), &args.overrides()) {
                Ok(config) => block_on(keel::server::serve(config)),
                Err(error) => fail(&error),
            }
        }
        Command::Agent(args) => block_on(keel::agent::run(args)),
        Command::Migrate(args) => match Config::load(args.config.as_deref(), &args.overrides()) {
            Ok(config) => block_on(async move { keel::server::migrate(&config).await }),
            Err(error) => fail(&error),
        },
        Command::Store(StoreCommand::Copy(args)) => block_on(keel::server::copy_store(args)),
        Command::Admin(args) => block_on(keel::admin::run(args)),
        Command::Config(args) => {
            match Config::load(args.source.config.as_deref(), &args.overrides())
                .map_err(anyhow::Error::from)
                .and_then(|config| Ok(config.to_redacted_toml()?))
            {
                Ok(shown) => {
                    print!("{shown}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&*error),
            }
        }
    }
}

/// Runs `future` on a multi-threaded runtime; an error is printed and exits with status 2.
fn block_on(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error),
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&*error),
    }
}

fn fail(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprint!("keel: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprint!(": {cause}");
        source = cause.source();
    }
    eprintln!();
    ExitCode::from(2)
}
