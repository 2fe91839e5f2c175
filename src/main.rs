//! The `dockside` command: parse arguments, load the config, set up logging, hand over to the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dockside::config::Config;
use tracing_subscriber::EnvFilter;

mod client_config_cli;

#[derive(Parser)]
#[command(
    name = "dockside",
    version,
    about = "A pull-through caching mirror for OCI / Docker registries"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror until SIGINT (fast) or SIGTERM (graceful, within grace_period).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit: non-zero with a message naming the key and value.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the file(s) that point a registry client at this mirror for every upstream.
    ClientConfig(client_config_cli::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dockside: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            dockside::server::run(config, pingora::server::UnixShutdownSignalWatch)
        }
        Command::CheckConfig { config } => {
            let loaded = Config::load(&config)?;
            println!(
                "{}: ok ({} upstreams, default {})",
                config.display(),
                loaded.upstreams.len(),
                loaded.default_upstream
            );
            Ok(())
        }
        Command::ClientConfig(args) => client_config_cli::run(args),
    }
}

fn init_logging(format: LogFormat) {
    // try_init also bridges the `log` crate (which pingora logs through) into tracing.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
