//! Calls passed on to the upstream as they are: tag lists and referrers, with pagination
//! links pointed back at the name the client used.

use super::manifests::read_limited;
use super::response::{ApiResponse, Body, Outcome, header_str};
use super::{Mirror, PASSTHROUGH_LIMIT};
use crate::error::ApiError;
use crate::oci::RepoName;
use crate::upstream::{Upstream, UpstreamErrorKind};

impl Mirror {
    pub(super) async fn passthrough(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        call: Passthrough<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let resp = upstream
            .passthrough(name, &call.suffix, call.query, call.accept)
            .await
            .map_err(|e| match e.kind {
                // Not "not known to" the upstream: it was not asked, and these calls are never
                // cached, whatever the cache holds of the repository.
                UpstreamErrorKind::Offline => {
                    let what = format!(
                        "{name}/{}, which dockside passes to the upstream,",
                        call.suffix
                    );
                    ApiError::Offline {
                        what,
                        upstream: upstream.name.to_string(),
                        unknown: Box::new(call.not_found.clone()),
                    }
                }
                _ => ApiError::from_upstream(&e, call.not_found.clone()),
            })?;
        let mut out = ApiResponse::new(resp.status(), Outcome::Pass);
        for header in ["content-type", "link", "oci-filters-applied"] {
            if let Some(value) = header_str(&resp, header) {
                let value = match header {
                    "link" => rewrite_link(&value, name, call.asked),
                    _ => value,
                };
                out.headers.push((canonical(header), value));
            }
        }
        let body = read_limited(resp, PASSTHROUGH_LIMIT, &upstream.name)
            .await
            .map_err(|e| ApiError::from_upstream(&e, call.not_found))?;
        out.headers.push(("Content-Length", body.len().to_string()));
        out.body = Body::Full(body);
        Ok(out)
    }
}

/// An API call passed through to the upstream as it is (tag lists, referrers).
pub(super) struct Passthrough<'a> {
    pub(super) suffix: String,
    pub(super) query: Option<&'a str>,
    pub(super) accept: Option<&'a str>,
    /// The repository name as the client wrote it (with any upstream prefix).
    pub(super) asked: &'a RepoName,
    pub(super) not_found: ApiError,
}

/// A pagination `Link` names the upstream's repository path; point it at the name the client
/// used, so a client that came through a path prefix stays on the same upstream.
pub(super) fn rewrite_link(link: &str, upstream_name: &RepoName, asked: &RepoName) -> String {
    let theirs = format!("</v2/{upstream_name}/");
    match link.strip_prefix(&theirs) {
        Some(rest) => format!("</v2/{asked}/{rest}"),
        None => link.to_string(),
    }
}

pub(super) fn canonical(header: &str) -> &'static str {
    match header {
        "content-type" => "Content-Type",
        "link" => "Link",
        _ => "OCI-Filters-Applied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn pagination_links_keep_the_clients_prefix() {
        let upstream = RepoName::parse("owner/app").unwrap();
        let asked = RepoName::parse("ghcr.io/owner/app").unwrap();
        let link = r#"</v2/owner/app/tags/list?last=v9&n=10>; rel="next""#;
        assert_eq!(
            rewrite_link(link, &upstream, &asked),
            r#"</v2/ghcr.io/owner/app/tags/list?last=v9&n=10>; rel="next""#
        );
        let elsewhere = r#"<https://other/x>; rel="next""#;
        assert_eq!(rewrite_link(elsewhere, &upstream, &asked), elsewhere);
    }
}
