//! What a manifest points at: the children of an index (with their platforms), or the config
//! and layers of an image manifest. Used to walk an image from its tag down to every blob, for
//! pinning, prefetching and exporting.

use serde::Deserialize;

use super::Digest;

/// Manifests larger than this are refused (the distribution spec's suggested limit): by the
/// mirror when one arrives from upstream, and by whatever reads one back from the store.
pub const MANIFEST_LIMIT: u64 = 4 * 1024 * 1024;

/// A platform as an index lists it, and as an operator names it (`linux/arm64/v8`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn parse(text: &str) -> Option<Platform> {
        let mut parts = text.split('/');
        let os = parts.next().filter(|s| !s.is_empty())?.to_string();
        let architecture = parts.next().filter(|s| !s.is_empty())?.to_string();
        let variant = parts.next().map(str::to_string);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return None;
        }
        Some(Platform {
            os,
            architecture,
            variant,
        })
    }

    /// Whether an index entry for `other` serves this platform; a missing variant on our side
    /// matches any variant.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Children {
    /// Manifests an index lists, with their platform when given.
    pub manifests: Vec<(Digest, Option<Platform>)>,
    /// An image manifest's config, layers and (for both kinds) subject.
    pub blobs: Vec<Digest>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Shape {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The digests a manifest or index refers to. Descriptors with a digest that is not sha256 are
/// left out (nothing dockside could fetch or store). `None` when the body is not JSON of either
/// shape.
pub fn children(body: &[u8]) -> Option<Children> {
    let shape: Shape = serde_json::from_slice(body).ok()?;
    let parse = |d: &Descriptor| Digest::parse(&d.digest).ok();
    Some(Children {
        manifests: shape
            .manifests
            .iter()
            .filter_map(|d| Some((parse(d)?, d.platform.clone())))
            .collect(),
        blobs: shape
            .config
            .iter()
            .chain(&shape.layers)
            .filter_map(parse)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_children_carry_platforms() {
        let a = Digest::of(b"a");
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"digest":"{a}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"md5:abc"}}]}}"#
        );
        let c = children(body.as_bytes()).unwrap();
        assert_eq!(c.manifests.len(), 1);
        let platform = c.manifests[0].1.clone().unwrap();
        assert!(Platform::parse("linux/arm64").unwrap().matches(&platform));
        assert!(
            !Platform::parse("linux/arm64/v7")
                .unwrap()
                .matches(&platform)
        );
        assert!(c.blobs.is_empty());
    }

    #[test]
    fn image_manifest_lists_config_then_layers() {
        let (cfg, l1) = (Digest::of(b"c"), Digest::of(b"l"));
        let body = format!(
            r#"{{"config":{{"digest":"{cfg}","size":1}},"layers":[{{"digest":"{l1}","size":1}}]}}"#
        );
        assert_eq!(children(body.as_bytes()).unwrap().blobs, vec![cfg, l1]);
        assert!(children(b"not json").is_none());
    }

    #[test]
    fn platform_text() {
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/arm/").is_none());
        assert!(Platform::parse("a/b/c/d").is_none());
    }
}
