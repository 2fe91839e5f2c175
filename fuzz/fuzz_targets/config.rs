//! `preflight::from_yaml` (`config::Config::from_yaml` and the checks after it) on an operator's
//! config file.
//!
//! Properties: every error names the file it is about (the operator may run several), and an
//! accepted config is consistent: its default upstream is one of its upstreams, names and aliases
//! are lowercase and unique, and the cache has room for something.
#![no_main]

use std::collections::HashSet;

use dockside::config::Config;
use dockside::preflight;
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz/origin.yaml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match preflight::from_yaml(text, ORIGIN) {
        Ok(config) => check(&config),
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with(&format!("{ORIGIN}: ")), "{message:?}");
        }
    }
});

fn check(config: &Config) {
    assert!(config.upstream(&config.default_upstream).is_some());
    assert!(config.cache.max_size > 0);
    assert!(!config.listen.is_empty());
    let mut seen = HashSet::new();
    for upstream in &config.upstreams {
        for name in std::iter::once(&upstream.name).chain(&upstream.aliases) {
            assert_eq!(*name, name.to_ascii_lowercase());
            assert!(seen.insert(name.clone()), "{name:?} names two upstreams");
        }
    }
}
