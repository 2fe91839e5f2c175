//! The air-gap subcommands as the CLI runs them: open the cache, run the tool, print what an
//! operator needs, and turn failures into an error (a non-zero exit).

use std::path::Path;

use anyhow::{anyhow, bail};

use super::OpenCache;
use super::bundle::{self, Selection};
use super::check;
use super::prefetch::{self, PlatformChoice, human_bytes};
use super::progress::Bars;
use crate::config::Config;
use crate::oci::ImageRef;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Images from the command line and from a list file, in that order.
pub fn images(args: &[String], list: Option<&Path>) -> anyhow::Result<Vec<ImageRef>> {
    let mut images = args
        .iter()
        .map(|a| ImageRef::parse(a).map_err(|e| anyhow!("{a}: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(list) = list {
        images.extend(prefetch::read_list(list)?);
    }
    Ok(images)
}

pub fn prefetch(
    config: &Config,
    images: &[ImageRef],
    platforms: &PlatformChoice,
) -> anyhow::Result<()> {
    if images.is_empty() {
        bail!("no images to prefetch: name some, or give --file");
    }
    let cache = OpenCache::open(config, "prefetch")?;
    let bars = Bars::new(images);
    let report = runtime()?.block_on(prefetch::prefetch(&cache.mirror, images, platforms, &bars));
    bars.finish();
    print!("{}", report.summary());
    let failed: Vec<String> = report
        .failed()
        .map(|(image, _)| image.to_string())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} images failed: {}",
            failed.len(),
            images.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

pub fn export(config: &Config, selection: &Selection, output: &Path) -> anyhow::Result<()> {
    let cache = OpenCache::open(config, "export")?;
    let report = runtime()?.block_on(bundle::export(&cache, selection, output))?;
    for skipped in &report.skipped {
        eprintln!("skipped {skipped}");
    }
    println!(
        "exported {} images ({} objects, {}) to {}",
        report.images,
        report.objects,
        human_bytes(report.bytes),
        output.display()
    );
    Ok(())
}

pub fn import(config: &Config, file: &Path) -> anyhow::Result<()> {
    let cache = OpenCache::open(config, "import")?;
    let report = runtime()?
        .block_on(bundle::import(&cache, file))
        .map_err(|e| anyhow!("{}: {e:#}", file.display()))?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "imported {} images, {} tags: {} objects added ({}), {} already cached",
        report.images,
        report.tags,
        report.objects_added,
        human_bytes(report.bytes_added),
        report.objects_present
    );
    Ok(())
}

pub fn verify(config: &Config) -> anyhow::Result<()> {
    let cache = OpenCache::open(config, "verify")?;
    let report = runtime()?.block_on(check::verify(&cache))?;
    print!("{}", report.summary(&check::quarantine_dir(&cache.dir)));
    if !report.quarantined.is_empty() {
        bail!(
            "{} objects did not match their digest",
            report.quarantined.len()
        );
    }
    Ok(())
}

pub fn du(config: &Config) -> anyhow::Result<()> {
    let cache = OpenCache::open(config, "du")?;
    print!("{}", runtime()?.block_on(check::du(&cache))?.render());
    Ok(())
}
