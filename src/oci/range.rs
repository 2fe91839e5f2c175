//! The client's `Range` header on a blob: one `bytes=` range, or the whole blob.

/// A range no byte of the blob is in: `416` with `Content-Range: bytes */<len>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range {header:?} is outside the blob")]
    Unsatisfiable { header: String, len: u64 },
}

/// The part of a blob a response sends: `end` is exclusive, `None` if not yet known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: Option<u64>,
    pub partial: bool,
}

/// A single `bytes=` range against a blob of length `len`. Unparseable or multi-range headers
/// are ignored (the whole blob is sent), as RFC 9110 allows; so is any range on a blob whose
/// length is not known yet.
pub fn parse_range(header: Option<&str>, len: Option<u64>) -> Result<Span, RangeError> {
    let whole = Span {
        start: 0,
        end: len,
        partial: false,
    };
    let (Some(header), Some(len)) = (header, len) else {
        return Ok(whole);
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(whole);
    };
    if spec.contains(',') {
        return Ok(whole);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(whole);
    };
    let unsatisfiable = || RangeError::Unsatisfiable {
        header: header.to_owned(),
        len,
    };
    let (start, end) = match (first.trim(), last.trim()) {
        ("", "") => return Ok(whole),
        ("", suffix) => {
            let Ok(n) = suffix.parse::<u64>() else {
                return Ok(whole);
            };
            // No byte can be the last N of an empty blob (RFC 9110: unsatisfiable).
            if n == 0 || len == 0 {
                return Err(unsatisfiable());
            }
            (len.saturating_sub(n), len)
        }
        (first, last) => {
            let Ok(start) = first.parse::<u64>() else {
                return Ok(whole);
            };
            let end = match last {
                "" => len,
                last => match last.parse::<u64>() {
                    // A last byte of u64::MAX is a client saying "to the end": no overflow.
                    Ok(l) if l >= start => l.saturating_add(1).min(len),
                    _ => return Ok(whole),
                },
            };
            if start >= len {
                return Err(unsatisfiable());
            }
            (start, end)
        }
    };
    Ok(Span {
        start,
        end: Some(end),
        partial: true,
    })
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::error::ApiError;

    fn span(start: u64, end: u64) -> Span {
        Span {
            start,
            end: Some(end),
            partial: true,
        }
    }

    #[test]
    fn a_suffix_range_of_an_empty_blob_is_unsatisfiable() {
        let err = parse_range(Some("bytes=-5"), Some(0)).unwrap_err();
        assert_eq!(
            err,
            RangeError::Unsatisfiable {
                header: "bytes=-5".into(),
                len: 0
            }
        );
    }

    #[test]
    fn a_last_byte_of_u64_max_means_to_the_end() {
        let header = format!("bytes=10-{}", u64::MAX);
        assert_eq!(
            parse_range(Some(&header), Some(100)).unwrap(),
            span(10, 100)
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range(Some("bytes=0-9"), Some(100)).unwrap(),
            span(0, 10)
        );
        assert_eq!(
            parse_range(Some("bytes=90-"), Some(100)).unwrap(),
            span(90, 100)
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), Some(100)).unwrap(),
            span(90, 100)
        );
        assert_eq!(
            parse_range(Some("bytes=50-500"), Some(100)).unwrap(),
            span(50, 100)
        );
        assert!(
            !parse_range(Some("bytes=0-1,5-6"), Some(100))
                .unwrap()
                .partial
        );
        assert!(!parse_range(Some("items=0-1"), Some(100)).unwrap().partial);
        assert!(!parse_range(Some("bytes=5-1"), Some(100)).unwrap().partial);
        assert!(!parse_range(Some("bytes=0-9"), None).unwrap().partial);
        let err = parse_range(Some("bytes=100-"), Some(100)).unwrap_err();
        assert_eq!(
            ApiError::from(err).status(),
            StatusCode::RANGE_NOT_SATISFIABLE
        );
        assert!(parse_range(Some("bytes=-0"), Some(100)).is_err());
    }
}
