//! `listen`, `admin_listen` and `threads`: where the server accepts connections and how many
//! worker threads it runs.

use std::net::SocketAddr;

use super::error::{Check, ConfigError};
use super::raw::Listen;

/// A sanity bound: more worker threads than this is a typo, not a plan.
const MAX_THREADS: usize = 1024;

impl Check<'_> {
    pub(super) fn listen(&self, raw: &Listen) -> Result<Vec<String>, ConfigError> {
        let addrs = match raw {
            Listen::One(addr) => {
                self.socket_addr("listen", addr)?;
                return Ok(vec![addr.clone()]);
            }
            Listen::Many(addrs) => addrs,
        };
        if addrs.is_empty() {
            return Err(self.invalid("listen", "the list is empty".into()));
        }
        let mut seen = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let key = format!("listen[{i}]");
            let parsed = self.socket_addr(&key, addr)?;
            if seen.contains(&parsed) {
                return Err(self.invalid(&key, format!("{addr:?} is listed twice")));
            }
            seen.push(parsed);
        }
        Ok(addrs.clone())
    }

    pub(super) fn admin_listen(
        &self,
        raw: Option<String>,
        listen: &[String],
    ) -> Result<Option<String>, ConfigError> {
        let Some(addr) = raw else { return Ok(None) };
        let parsed = self.socket_addr("admin_listen", &addr)?;
        // Both were validated, so these parses succeed.
        if listen
            .iter()
            .any(|l| l.parse::<SocketAddr>().ok() == Some(parsed))
        {
            return Err(self.invalid("admin_listen", format!("{addr:?} is also a listen address")));
        }
        Ok(Some(addr))
    }

    pub(super) fn socket_addr(&self, key: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
        addr.parse().map_err(|_| {
            self.invalid(
                key,
                format!("{addr:?} is not a socket address (e.g. 0.0.0.0:5000 or [::]:5000)"),
            )
        })
    }

    pub(super) fn threads(&self, raw: Option<usize>) -> Result<usize, ConfigError> {
        match raw {
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
            Some(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            Some(n) => {
                Err(self.invalid("threads", format!("{n} is not between 1 and {MAX_THREADS}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;

    #[test]
    fn listen_errors() {
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "localhost:5000"));
        assert_contains(
            &msg,
            &["listen: \"localhost:5000\" is not a socket address"],
        );
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "['[::]:1', ':::1']"));
        assert_contains(&msg, &["listen[1]: \":::1\" is not a socket address"]);
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "[]"));
        assert_contains(&msg, &["listen: the list is empty"]);
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "['0.0.0.0:1', '0.0.0.0:01']"));
        assert_contains(&msg, &["listen[1]: \"0.0.0.0:01\" is listed twice"]);
    }

    #[test]
    fn admin_listen_errors() {
        let msg = err(&format!("{MINIMAL}admin_listen: ':9090'\n"));
        assert_contains(&msg, &["admin_listen: \":9090\" is not a socket address"]);
        let msg = err(&format!("{MINIMAL}admin_listen: 0.0.0.0:5000\n"));
        assert_contains(
            &msg,
            &["admin_listen: \"0.0.0.0:5000\" is also a listen address"],
        );
    }

    #[test]
    fn threads_bounds() {
        let msg = err(&format!("{MINIMAL}threads: 0\n"));
        assert_contains(&msg, &["threads: 0 is not between 1 and 1024"]);
        let msg = err(&format!("{MINIMAL}threads: 5000\n"));
        assert_contains(&msg, &["threads: 5000"]);
        let msg = err(&format!("{MINIMAL}threads: -1\n"));
        assert_contains(&msg, &["threads", "-1"]);
        assert_eq!(
            parse(&format!("{MINIMAL}threads: 1024\n")).unwrap().threads,
            1024
        );
    }
}
