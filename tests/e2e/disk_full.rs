//! A cache on a full disk: pulls keep working pass-through, nothing partial is kept, the error
//! is counted, and caching resumes once there is room again.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::airgap::files_under;
use crate::cache::{new_lines, pull_and_check};
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry, count};
use crate::support::{digest_of, http};

/// A tmpfs of a given size, mounted on a temp dir and unmounted on drop (also on panic).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        crate::support::tools::require_root("mounting a tmpfs for the cache");
        let dir = tempfile::Builder::new()
            .prefix("e2e-tmpfs-")
            .tempdir()
            .unwrap();
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir.path(),
        );
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], self.dir.path());
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn mount(args: &[&str], at: &Path) {
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The value of one sample in `/metrics`, 0 when it is not there.
fn metric(d: &Dockside, sample: &str) -> u64 {
    let text = http::get(&format!("{}/metrics", d.admin_url()))
        .unwrap()
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_full_disk_serves_pass_through_then_caches_once_there_is_room() {
    let reg = Registry::start(Auth::None);
    // One layer larger than the disk, and small ones that fit.
    let img = Image::generate(400, &[24 << 20, 20_000, 5_000], Format::Oci);
    crate::support::skopeo::push(&reg, "library/big", "v1", &img);
    let big = img
        .blobs()
        .into_iter()
        .max_by_key(|b| b.data.len())
        .unwrap()
        .digest
        .clone();
    let blob_gets = |log: &[_]| count(log, "GET", &format!("/v2/library/big/blobs/{big}"));

    let disk = Tmpfs::mount("8m");
    let dir = tempfile::Builder::new()
        .prefix("e2e-dockside-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::symlink(disk.path(), dir.path().join("cache")).unwrap();
    // The size cap is no help here: the disk is smaller than it.
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    cfg.max_size = "1GiB".into();
    let d = Dockside::start_in(&cfg, dir);

    let before = reg.access_log();
    pull_and_check(&d, "library/big:v1", &img);
    let first = reg.access_log();
    assert_eq!(blob_gets(&new_lines(&before, &first)), 1);
    let errors = r#"dockside_store_write_errors_total{kind="no_space",object="blob"}"#;
    assert!(metric(&d, errors) >= 1, "the full disk was not counted");
    let cache = d.cache_dir();
    assert_eq!(files_under(&cache.join("tmp")), Vec::<PathBuf>::new());
    for object in files_under(&cache.join("objects")) {
        let name = object.file_name().unwrap().to_str().unwrap().to_string();
        assert_ne!(format!("sha256:{name}"), big, "the big layer was kept");
        let data = std::fs::read(&object).unwrap();
        assert_eq!(digest_of(&data), format!("sha256:{name}"), "partial object");
    }
    assert!(
        d.log().contains("cache write failed"),
        "the write error was not logged"
    );

    // Room again: the next pull caches the layer, and the one after asks the upstream nothing.
    disk.resize("64m");
    pull_and_check(&d, "library/big:v1", &img);
    let second = reg.access_log();
    assert_eq!(blob_gets(&new_lines(&first, &second)), 1);
    pull_and_check(&d, "library/big:v1", &img);
    let third = reg.access_log();
    assert_eq!(
        blob_gets(&new_lines(&second, &third)),
        0,
        "the layer was not cached once there was room"
    );
    let kept = cache
        .join("objects/sha256")
        .join(&big[7..9])
        .join(&big[7..]);
    assert_eq!(digest_of(&std::fs::read(kept).unwrap()), big);
}
