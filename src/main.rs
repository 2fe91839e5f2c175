//! The `dockside` command: parse arguments, load the config, set up logging, hand over to the
//! library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dockside::airgap::bundle::Selection;
use dockside::airgap::commands as airgap;
use dockside::airgap::prefetch::PlatformChoice;
use dockside::config::Config;
use dockside::listeners::Listeners;
use dockside::preflight;
use dockside::server::Start;
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
    /// Run the mirror until SIGINT (fast) or SIGTERM (graceful, within grace_period). Listens on
    /// `listen` and `admin_listen`, or on the sockets a service manager passed (systemd socket
    /// activation, named `registry` and `admin`).
    Serve {
        /// The config file; without it, the built-in default (config/dockside.yaml as compiled
        /// in: Docker Hub, port 5000, the cache in ./dockside-cache).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Zero-downtime upgrade: take the listening sockets over from the server running with
        /// this config. Start this, then send the old process SIGQUIT within 5 s; it hands its
        /// listeners over and drains.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file and exit: non-zero with a message naming the key and value.
    CheckConfig {
        /// The config file; without it, the built-in default is checked.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the file(s) that point a registry client at this mirror for every upstream.
    ClientConfig(client_config_cli::Args),
    /// Fetch images into the cache ahead of time (index, chosen platforms, configs, layers).
    Prefetch {
        #[arg(long, short)]
        config: PathBuf,
        /// Platforms to take from multi-platform images, comma-separated (os/arch[/variant]).
        /// The default is linux/amd64 whatever machine runs the prefetch.
        #[arg(long, default_value = "linux/amd64", conflicts_with = "all_platforms")]
        platform: String,
        /// Every platform an index lists.
        #[arg(long)]
        all_platforms: bool,
        /// A file of image references, one per line (# starts a comment).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Image references: [host/]name[:tag|@digest]; a host names an upstream.
        images: Vec<String>,
    },
    /// Write cached images to a tar in the OCI image layout (readable by skopeo oci-archive:).
    Export {
        #[arg(long, short)]
        config: PathBuf,
        /// The tar to write (replaced only once it is complete).
        #[arg(long, short)]
        output: PathBuf,
        /// Every tag in the cache.
        #[arg(long, conflicts_with = "images")]
        all: bool,
        /// Image references, as for prefetch.
        #[arg(required_unless_present = "all")]
        images: Vec<String>,
    },
    /// Load a bundle made by export into the cache, verifying every digest; all or nothing.
    Import {
        #[arg(long, short)]
        config: PathBuf,
        file: PathBuf,
    },
    /// Re-hash every cached object; move mismatches to <cache.dir>/quarantine (exit 1 if any).
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Cache usage by upstream and repository.
    Du {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // The tools print their own report; their logs only need to say what went wrong.
    let default_level = match cli.command {
        Command::Prefetch { .. }
        | Command::Export { .. }
        | Command::Import { .. }
        | Command::Verify { .. }
        | Command::Du { .. } => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
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
        Command::Serve { config, upgrade } => {
            let (config, origin) = load_or_builtin(config.as_deref())?;
            tracing::info!(config = %origin, "configuration loaded");
            let start = match upgrade {
                true => Start::Upgrade,
                false => Start::Fresh(Listeners::for_serve(&config)?),
            };
            dockside::server::run(config, start, pingora::server::UnixShutdownSignalWatch)
        }
        Command::CheckConfig { config } => {
            let (loaded, origin) = load_or_builtin(config.as_deref())?;
            println!(
                "{origin}: ok ({} upstreams, default {})",
                loaded.upstreams.len(),
                loaded.default_upstream
            );
            Ok(())
        }
        Command::ClientConfig(args) => client_config_cli::run(args),
        Command::Prefetch {
            config,
            platform,
            all_platforms,
            file,
            images,
        } => {
            let platforms = match all_platforms {
                true => PlatformChoice::All,
                false => PlatformChoice::parse(&platform).map_err(anyhow::Error::msg)?,
            };
            let images = airgap::images(&images, file.as_deref())?;
            airgap::prefetch(&preflight::load(&config)?, &images, &platforms)
        }
        Command::Export {
            config,
            output,
            all,
            images,
        } => {
            let selection = match all {
                true => Selection::All,
                false => Selection::Images(airgap::images(&images, None)?),
            };
            airgap::export(&preflight::load(&config)?, &selection, &output)
        }
        Command::Import { config, file } => airgap::import(&preflight::load(&config)?, &file),
        Command::Verify { config } => airgap::verify(&preflight::load(&config)?),
        Command::Du { config } => airgap::du(&preflight::load(&config)?),
    }
}

/// What `BUILTIN` names in messages: the default config compiled into the binary.
const BUILTIN: &str = "the built-in default config (config/dockside.yaml)";

/// The config file at `path`, or without one the built-in default, checked as `serve` would;
/// with the name to show for it.
fn load_or_builtin(path: Option<&Path>) -> anyhow::Result<(Config, String)> {
    match path {
        Some(path) => Ok((preflight::load(path)?, path.display().to_string())),
        None => {
            let config = Config::embedded_default();
            preflight::check(&config, BUILTIN)?;
            Ok((config, BUILTIN.to_string()))
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core); with a blocking
/// pool reading chunks for hundreds of downloads, that held tens of MiB of freed memory
/// (peak RSS at 100 concurrent 500 MiB downloads: 77 MiB with the default, 48 MiB with 2).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called first thing, before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    // try_init also bridges the `log` crate (which pingora logs through) into tracing.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
