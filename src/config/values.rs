//! Values shared by every section: sizes (`50GiB`), durations (`30s`), secrets (`Secret`, files
//! holding one) and URLs with their passwords masked for messages.

use std::fmt;
use std::fs;
use std::time::Duration;

use super::error::{Check, ConfigError};
use super::raw::Scalar;

/// A password, kept out of logs: Debug and Display print `***`, so a
/// `{:?}` of the whole Config is safe to log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Check<'_> {
    pub(super) fn size(&self, key: &str, raw: &Scalar) -> Result<u64, ConfigError> {
        let text = &raw.0;
        match parse_size(text) {
            Ok(0) => Err(self.invalid(key, format!("{text:?} must be greater than 0"))),
            Ok(n) => Ok(n),
            Err(SizeError::TooLarge) => Err(self.invalid(key, format!("{text:?} is too large"))),
            Err(SizeError::Malformed) => Err(self.invalid(
                key,
                format!(
                    "{text:?} is not a size (e.g. 50GiB, 500MB; units B, KB, MB, GB, TB, \
                     KiB, MiB, GiB, TiB)"
                ),
            )),
        }
    }

    pub(super) fn duration(&self, key: &str, raw: &Scalar) -> Result<Duration, ConfigError> {
        let text = &raw.0;
        humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration (e.g. 30s, 5m, 1h30m): {e}"),
            )
        })
    }

    /// A duration that must be non-zero: a zero timeout would fail every
    /// request.
    pub(super) fn timeout(
        &self,
        key: &str,
        raw: Option<&Scalar>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else { return Ok(default) };
        let d = self.duration(key, raw)?;
        if d.is_zero() {
            return Err(self.invalid(key, format!("{:?} must be greater than 0", raw.0)));
        }
        Ok(d)
    }

    pub(super) fn password_file(&self, key: &str, path: &str) -> Result<String, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("{path:?} cannot be read: {e}")))?;
        // Files written by `echo` or editors end in a newline that is not
        // part of the password; strip exactly one.
        let trimmed = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        Ok(trimmed.to_owned())
    }
}

#[derive(Debug, PartialEq)]
enum SizeError {
    Malformed,
    TooLarge,
}

/// Parses `<digits><unit>`: no sign, no fraction, no space. Units are
/// case-sensitive, as `mb` and `Mb` would be ambiguous (bits?).
fn parse_size(text: &str) -> Result<u64, SizeError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(SizeError::Malformed);
    }
    let (number, unit) = text.split_at(digits);
    let multiplier = unit_multiplier(unit).ok_or(SizeError::Malformed)?;
    let number: u64 = number.parse().map_err(|_| SizeError::TooLarge)?;
    number.checked_mul(multiplier).ok_or(SizeError::TooLarge)
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    const K: u64 = 1000;
    const KI: u64 = 1024;
    Some(match unit {
        "" | "B" => 1,
        "KB" => K,
        "MB" => K.pow(2),
        "GB" => K.pow(3),
        "TB" => K.pow(4),
        "KiB" => KI,
        "MiB" => KI.pow(2),
        "GiB" => KI.pow(3),
        "TiB" => KI.pow(4),
        _ => return None,
    })
}

/// Masks the password in `scheme://user:password@host...` for messages. The
/// text may not even be a valid URL, so this works on the raw string.
pub(super) fn redact_userinfo(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_len = text[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(text.len() - authority_start);
    let authority = &text[authority_start..authority_start + authority_len];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}***{}",
            &text[..authority_start],
            &text[authority_start + at..]
        ),
        None => text.to_owned(),
    }
}

/// `1.5 MiB`, for operators.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("12B"), Ok(12));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("5TB"), Ok(5_000_000_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("5TiB"), Ok(5 << 40));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16777216TiB"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
        for bad in [
            "", "GiB", "50 GiB", "50 GB!", "50gib", "50G", "50Gi", "50gb", "1.5GiB", "-1", "+1",
            " 1", "1 ", "0x10", "1KiBB", "1iB",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn duration_parsing_and_errors() {
        let c = parse(&format!("{MINIMAL}grace_period: 1m30s\n")).unwrap();
        assert_eq!(c.grace_period, Duration::from_secs(90));
        let c = parse(&format!("{MINIMAL}grace_period: 250ms\n")).unwrap();
        assert_eq!(c.grace_period, Duration::from_millis(250));
        // Zero is meaningful for grace (exit at once) and tag_ttl (always revalidate).
        let c = parse(&format!("{MINIMAL}grace_period: 0s\n")).unwrap();
        assert_eq!(c.grace_period, Duration::ZERO);
        let c = parse(&MINIMAL.replace("max_size: 1GiB", "max_size: 1GiB\n  tag_ttl: 0s")).unwrap();
        assert_eq!(c.cache.tag_ttl, Duration::ZERO);

        let msg = err(&format!("{MINIMAL}grace_period: 5\n"));
        assert_contains(&msg, &["grace_period: \"5\" is not a duration"]);
        let msg = err(&format!("{MINIMAL}grace_period: 5 parsecs\n"));
        assert_contains(&msg, &["grace_period: \"5 parsecs\" is not a duration"]);
        let msg = err(&format!("{MINIMAL}grace_period: -5s\n"));
        assert_contains(&msg, &["grace_period: \"-5s\""]);
        let msg = err(&MINIMAL.replace("max_size: 1GiB", "max_size: 1GiB\n  tag_ttl: soon"));
        assert_contains(&msg, &["cache.tag_ttl: \"soon\" is not a duration"]);
        let msg = err(&with_upstream_keys("    tag_ttl: 1x\n"));
        assert_contains(&msg, &["upstreams[0].tag_ttl: \"1x\" is not a duration"]);
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_userinfo("https://a:b@h/p@q"), "https://***@h/p@q");
        assert_eq!(redact_userinfo("https://h/p@q"), "https://h/p@q");
        assert_eq!(redact_userinfo("no scheme@x"), "no scheme@x");
        assert_eq!(redact_userinfo("http://a@b@c"), "http://***@c");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
        let c = parse(&with_upstream_keys(
            "    username: u\n    password: hunter2\n",
        ))
        .unwrap();
        let dump = format!("{c:?} {c:#?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("***"));
    }
}
