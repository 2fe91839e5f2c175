//! The OCI distribution protocol as dockside speaks it: digests, repository
//! names and references, the read-only subset of the `/v2/` API routes, and
//! manifest media types.
//!
//! Everything here is pure parsing with no I/O, so the rest of the server can
//! rely on the types being valid by construction: a `RepoName` or `Digest`
//! that exists has already passed the grammar, and is safe to use in upstream
//! URLs and on-disk paths.

pub mod digest;
pub mod host;
pub mod manifest;
pub mod media;
pub mod range;
pub mod reference;
pub mod route;

pub use digest::Digest;
pub use host::{HostError, RegistryHost};
pub use reference::{ImageRef, Reference, RepoName, Tag};
pub use route::{Route, RouteError, Target};

/// Longest prefix of a rejected value that error messages carry.
///
/// Rejected values come straight from clients (request paths, query strings),
/// so they can be arbitrarily long; keeping a prefix is enough to recognise the
/// mistake without letting one request write kilobytes into the logs.
const SHOWN_MAX: usize = 200;

/// A rejected value, cut to a loggable length for an error variant.
///
/// Error messages format it with `{:?}`, which escapes control characters, so
/// the value can't forge log lines either.
pub(crate) fn shown(value: &str) -> String {
    if value.len() <= SHOWN_MAX {
        return value.to_owned();
    }
    let mut end = SHOWN_MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_keeps_short_values() {
        assert_eq!(shown("abc"), "abc");
        assert_eq!(shown(""), "");
        let exact = "x".repeat(SHOWN_MAX);
        assert_eq!(shown(&exact), exact);
    }

    #[test]
    fn shown_cuts_long_values() {
        let long = "y".repeat(SHOWN_MAX + 50);
        let cut = shown(&long);
        assert_eq!(cut, format!("{}…", "y".repeat(SHOWN_MAX)));
    }

    #[test]
    fn shown_cuts_on_a_char_boundary() {
        // 'é' is two bytes, so SHOWN_MAX falls inside a character for odd offsets.
        let long = format!("a{}", "é".repeat(SHOWN_MAX));
        let cut = shown(&long);
        assert!(cut.ends_with('…'));
        assert!(cut.len() <= SHOWN_MAX + '…'.len_utf8());
    }
}
