//! Shared harness for the end-to-end tests: processes, the upstream registry, a token server,
//! deterministic test images, the dockside binary and the real clients.

pub mod certs;
pub mod clients;
pub mod cluster;
pub mod dockside;
pub mod endpoint;
pub mod fault_proxy;
pub mod http;
pub mod image;
pub mod moto;
pub mod proc;
pub mod registry;
pub mod s3;
pub mod serial;
pub mod serve;
pub mod skopeo;
pub mod token;
pub mod tools;

use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Polls `f` until it returns `Some`, or panics naming `what` once `timeout` has passed.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads a file that may not exist yet (then empty).
pub fn read_lossy(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A unique-enough token for log barriers and names.
pub fn nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}
