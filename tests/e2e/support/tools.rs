//! The programs the end-to-end suite runs, and what to do when one is missing. A test that
//! needs a program or root and finds it missing fails at once, naming what is missing, the
//! Debian package it comes in and how to install the lot; it never skips (CI has them all, and a
//! missing one there must fail loudly).
//!
//! The packages come from `scripts/packages`, the list `scripts/install-packages` installs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `program`, found on PATH, as a command to run; panics with how to get it if it is not.
pub fn command(program: &str) -> Command {
    Command::new(require(program))
}

/// The path of `program` on PATH; panics with how to get it if it is not there.
pub fn require(program: &str) -> PathBuf {
    match find(program) {
        Some(path) => path,
        None => panic!("{}", missing_message(program)),
    }
}

/// Panics, saying how to run the suite as root, unless this process runs as root. `what` is
/// the test's reason, e.g. "pinning Docker Hub's names in /etc/hosts".
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        panic!(
            "e2e: {what} needs root, and this test runs as uid {uid}. The end-to-end suite runs \
             as root: `scripts/test` as root (it installs the Debian packages it needs first). \
             Without root, `cargo test --release --lib --test mirror` runs the unit and \
             in-process tests."
        );
    }
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One line of `scripts/packages`.
struct Package {
    group: String,
    name: String,
    /// `/no-recommends`: installed without the packages it recommends.
    bare: bool,
    programs: Vec<String>,
}

fn packages() -> &'static [Package] {
    static LIST: OnceLock<Vec<Package>> = OnceLock::new();
    LIST.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/packages");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        parse(&text)
    })
}

fn parse(text: &str) -> Vec<Package> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let group = fields.next()?.to_string();
            let package = fields.next()?;
            let name = package.trim_end_matches("/no-recommends").to_string();
            let bare = name.len() != package.len();
            let programs = fields.map(str::to_string).collect();
            Some(Package {
                group,
                name,
                bare,
                programs,
            })
        })
        .collect()
}

/// What a test says when `program` is not on PATH: that program and its package, every other
/// program of the test packages missing here (so one install fixes them all), and the command.
fn missing_message(program: &str) -> String {
    let list = packages();
    let package_of = |p: &str| {
        list.iter()
            .find(|pkg| pkg.programs.iter().any(|q| q == p))
            .map(|pkg| pkg.name.as_str())
    };
    let own = match package_of(program) {
        Some(pkg) => format!("Debian package {pkg}"),
        None => "not in scripts/packages".to_string(),
    };
    let missing: Vec<&Package> = list
        .iter()
        .filter(|pkg| pkg.group == "test" || pkg.programs.iter().any(|p| p == program))
        .filter(|pkg| pkg.programs.iter().any(|p| find(p).is_none()))
        .collect();
    let names = |bare: bool| {
        let names: Vec<&str> = missing
            .iter()
            .filter(|p| p.bare == bare)
            .map(|p| p.name.as_str())
            .collect();
        names.join(" ")
    };
    let (plain, bare) = (names(false), names(true));
    let mut apt = format!("apt-get install -y {plain}");
    if !bare.is_empty() {
        apt += &format!(" && apt-get install -y --no-install-recommends {bare}");
    }
    format!(
        "e2e: `{program}` is not installed ({own}). The end-to-end suite runs real programs, \
         as root; the Debian packages it needs that are missing here: {plain} {bare}. Install \
         them as root with `scripts/install-packages test` (or `{apt}`), or run the whole \
         suite with `scripts/test` as root, which installs them first. Without them, \
         `cargo test --release --lib --test mirror` runs the unit and in-process tests."
    )
}

#[test]
fn the_package_list_names_a_package_for_every_program_the_suite_runs() {
    let list = packages();
    for program in [
        "docker-registry",
        "skopeo",
        "containerd",
        "ctr",
        "podman",
        "dockerd",
        "docker",
        "htpasswd",
        "openssl",
        "curl",
        "python3",
        "promtool",
        "chromium",
    ] {
        assert!(
            list.iter()
                .any(|p| p.group == "test" && p.programs.iter().any(|q| q == program)),
            "scripts/packages has no test package for {program}"
        );
    }
    let message = missing_message("no-such-program-e2e");
    assert!(message.contains("`no-such-program-e2e` is not installed (not in scripts/packages)"));
    assert!(
        message.contains("scripts/install-packages test"),
        "{message}"
    );
    let parsed = parse("# c\nbuild cmake cmake\ntest prometheus/no-recommends promtool\n");
    assert_eq!(parsed[1].name, "prometheus");
    assert_eq!(parsed[1].programs, ["promtool"]);
}
