//! `dockside client-config`: argument handling and output for [`dockside::client_config`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use dockside::client_config::{Client, ClientFile, Mirror, render};
use dockside::config::Config;
use dockside::preflight;

#[derive(clap::Args)]
pub struct Args {
    /// The client to configure.
    #[arg(long = "for", value_enum)]
    client: Client,
    /// dockside's address as the client reaches it, e.g. http://mirror.example:5000.
    #[arg(long)]
    mirror: String,
    /// The dockside config whose upstreams to cover (default: the built-in one).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Write the files under this directory (e.g. /etc/containerd) instead of printing them.
    #[arg(long)]
    out: Option<PathBuf>,
    /// With --out, replace files that exist with other contents.
    #[arg(long, requires = "out")]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => preflight::load(path)?,
        None => Config::embedded_default(),
    };
    let mirror = Mirror::parse(&args.mirror)?;
    let files = render(args.client, &mirror, &config)?;
    match &args.out {
        Some(dir) => files.iter().try_for_each(|f| write(dir, f, args.force)),
        None => print(&files),
    }
}

/// One file as it is; several each under a `==> path <==` line (as `tail` prints them).
fn print(files: &[ClientFile]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if let [file] = files {
        out.write_all(file.contents.as_bytes())?;
        return Ok(());
    }
    for (i, file) in files.iter().enumerate() {
        let sep = if i == 0 { "" } else { "\n" };
        write!(
            out,
            "{sep}==> {} <==\n{}",
            file.default_location().display(),
            file.contents
        )?;
    }
    Ok(())
}

/// Writes `dir/<path>`. An existing file with other contents is kept unless `force`: a
/// daemon.json, for one, usually holds settings of its own.
fn write(dir: &Path, file: &ClientFile, force: bool) -> anyhow::Result<()> {
    let path = dir.join(&file.path);
    let differs = std::fs::read_to_string(&path).is_ok_and(|existing| existing != file.contents);
    if differs && !force {
        bail!(
            "{} exists with other contents; merge by hand or pass --force",
            path.display()
        );
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(&path, &file.contents).with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
