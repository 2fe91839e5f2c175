//! An upstream's static credentials: `username` with exactly one of `password`, `password_file`
//! or `password_env`, resolved once at start.

use super::error::{Check, ConfigError};
use super::raw::RawUpstream;
use super::values::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Check<'_> {
    pub(super) fn credentials(
        &self,
        key: &str,
        raw: &RawUpstream,
    ) -> Result<Option<Credentials>, ConfigError> {
        let sources = [
            raw.password.is_some(),
            raw.password_file.is_some(),
            raw.password_env.is_some(),
        ];
        let source_count = sources.iter().filter(|&&s| s).count();
        let Some(username) = &raw.username else {
            if source_count > 0 {
                return Err(self.invalid(key, "a password is set but username is missing".into()));
            }
            return Ok(None);
        };
        let user_key = format!("{key}.username");
        if username.is_empty() || username.contains(':') {
            return Err(self.invalid(
                &user_key,
                format!("{username:?} is not a username (non-empty, no ':')"),
            ));
        }
        if source_count != 1 {
            return Err(self.invalid(
                key,
                format!(
                    "username {username:?} needs exactly one of password, password_file, \
                     password_env ({source_count} given)"
                ),
            ));
        }
        Ok(Some(Credentials {
            username: username.clone(),
            password: Secret::new(self.password(key, raw)?),
        }))
    }

    /// Resolves the single password source (exactly one is set).
    pub(super) fn password(&self, key: &str, raw: &RawUpstream) -> Result<String, ConfigError> {
        let (password, source_key) = if let Some(p) = &raw.password {
            (p.clone(), format!("{key}.password"))
        } else if let Some(path) = &raw.password_file {
            let source_key = format!("{key}.password_file");
            (self.password_file(&source_key, path)?, source_key)
        } else if let Some(var) = &raw.password_env {
            let source_key = format!("{key}.password_env");
            let value = (self.env)(var).ok_or_else(|| {
                self.invalid(
                    &source_key,
                    format!("environment variable {var:?} is not set (or not UTF-8)"),
                )
            })?;
            (value, source_key)
        } else {
            return Err(self.invalid(key, "no password source".into()));
        };
        if password.is_empty() {
            // Never quote the password itself, only where it came from.
            return Err(self.invalid(&source_key, "the password is empty".into()));
        }
        Ok(password)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;

    #[test]
    fn inline_password() {
        let c = parse(&with_upstream_keys("    username: u\n    password: pw\n")).unwrap();
        let creds = c.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(creds.password.expose(), "pw");
    }

    #[test]
    fn password_without_username() {
        let msg = err(&with_upstream_keys("    password_env: X\n"));
        assert_contains(
            &msg,
            &["upstreams[0]: a password is set but username is missing"],
        );
    }

    #[test]
    fn username_needs_exactly_one_source() {
        let msg = err(&with_upstream_keys("    username: u\n"));
        assert_contains(
            &msg,
            &[
                "upstreams[0]: username \"u\" needs exactly one of password, password_file, password_env (0 given)",
            ],
        );
        let msg = err(&with_upstream_keys(
            "    username: u\n    password: p\n    password_env: X\n",
        ));
        assert_contains(&msg, &["(2 given)"]);
        assert!(!msg.contains("\"p\""), "{msg}");
    }

    #[test]
    fn bad_usernames() {
        let msg = err(&with_upstream_keys(
            "    username: 'a:b'\n    password: p\n",
        ));
        assert_contains(&msg, &["upstreams[0].username: \"a:b\" is not a username"]);
        let msg = err(&with_upstream_keys("    username: ''\n    password: p\n"));
        assert_contains(&msg, &["upstreams[0].username: \"\" is not a username"]);
    }

    #[test]
    fn password_env_resolution() {
        let text = with_upstream_keys("    username: u\n    password_env: HUB_TOKEN\n");
        let c = parse_env(&text, "HUB_TOKEN", "tok").unwrap();
        assert_eq!(
            c.upstreams[0]
                .credentials
                .as_ref()
                .unwrap()
                .password
                .expose(),
            "tok"
        );
        let msg = err(&text);
        assert_contains(
            &msg,
            &["upstreams[0].password_env: environment variable \"HUB_TOKEN\" is not set"],
        );
        let msg = parse_env(&text, "HUB_TOKEN", "").unwrap_err().to_string();
        assert_contains(
            &msg,
            &["test.yaml: upstreams[0].password_env: the password is empty"],
        );
    }

    #[test]
    fn password_file_is_read_and_one_newline_trimmed() {
        for (contents, expected) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            ("pw\n\n", "pw\n"),
            (" pw \n", " pw "),
        ] {
            let f = temp_file(contents);
            let text = with_upstream_keys(&format!(
                "    username: u\n    password_file: {}\n",
                f.path().display()
            ));
            let c = parse(&text).unwrap();
            let creds = c.upstreams[0].credentials.as_ref().unwrap();
            assert_eq!(creds.password.expose(), expected, "{contents:?}");
        }
    }

    #[test]
    fn password_file_errors() {
        let text = with_upstream_keys("    username: u\n    password_file: /nonexistent/pw\n");
        let msg = err(&text);
        assert_contains(
            &msg,
            &["upstreams[0].password_file: \"/nonexistent/pw\" cannot be read: "],
        );
        let f = temp_file("\n");
        let text = with_upstream_keys(&format!(
            "    username: u\n    password_file: {}\n",
            f.path().display()
        ));
        assert_contains(
            &err(&text),
            &["upstreams[0].password_file: the password is empty"],
        );
    }
}
