//! Deterministic test images: random-content gzip'd tar layers, a config, an OCI or Docker
//! schema 2 manifest, and image indexes / manifest lists; written as OCI layouts for skopeo.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use super::digest_of;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Oci,
    Docker,
}

/// Content with its digest and media type.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub media_type: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            digest: digest_of(&data),
            media_type: media_type.to_string(),
            data,
        }
    }

    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub arch: String,
}

impl Image {
    /// An image for linux/amd64 whose layers hold `layer_sizes` random bytes each.
    pub fn generate(seed: u64, layer_sizes: &[usize], format: Format) -> Image {
        Image::generate_for(seed, layer_sizes, format, "amd64")
    }

    pub fn generate_for(seed: u64, layer_sizes: &[usize], format: Format, arch: &str) -> Image {
        let (layer_type, config_type, manifest_type) = match format {
            Format::Oci => (OCI_LAYER_GZIP, OCI_CONFIG, OCI_MANIFEST),
            Format::Docker => (DOCKER_LAYER_GZIP, DOCKER_CONFIG, DOCKER_MANIFEST),
        };
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let content = random_bytes(seed.wrapping_mul(1000).wrapping_add(i as u64), size);
            let tar = tar_with_file(&format!("e2e/s{seed}-l{i}.bin"), &content);
            diff_ids.push(digest_of(&tar));
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&tar).unwrap();
            layers.push(Blob::new(layer_type, gz.finish().unwrap()));
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"],
                       "Labels": {"e2e.seed": seed.to_string()}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = Blob::new(config_type, serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        Image {
            manifest: Blob::new(manifest_type, serde_json::to_vec(&manifest).unwrap()),
            config,
            layers,
            arch: arch.to_string(),
        }
    }

    /// Config and layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }

    pub fn layer_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.data.len()).sum()
    }
}

/// A multi-platform image: an OCI index or a Docker manifest list.
#[derive(Clone, Debug)]
pub struct Index {
    pub manifest: Blob,
    pub images: Vec<Image>,
}

impl Index {
    pub fn generate(seed: u64, layer_sizes: &[usize], format: Format, arches: &[&str]) -> Index {
        let images: Vec<Image> = arches
            .iter()
            .enumerate()
            .map(|(i, a)| Image::generate_for(seed * 100 + i as u64, layer_sizes, format, a))
            .collect();
        let list_type = match format {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_LIST,
        };
        let manifests: Vec<serde_json::Value> = images
            .iter()
            .map(|img| {
                let mut d = img.manifest.descriptor();
                d["platform"] = if img.arch == "arm64" {
                    json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
                } else {
                    json!({"architecture": img.arch, "os": "linux"})
                };
                d
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": list_type, "manifests": manifests});
        Index {
            manifest: Blob::new(list_type, serde_json::to_vec(&index).unwrap()),
            images,
        }
    }

    pub fn image(&self, arch: &str) -> &Image {
        self.images
            .iter()
            .find(|i| i.arch == arch)
            .unwrap_or_else(|| panic!("no {arch} image in index"))
    }
}

/// Anything that can be pushed: the top manifest plus everything it references.
pub trait Artifact {
    fn top(&self) -> &Blob;
    /// Every blob and child manifest (not the top manifest).
    fn contents(&self) -> Vec<&Blob>;
    fn is_index(&self) -> bool;
}

impl Artifact for Image {
    fn top(&self) -> &Blob {
        &self.manifest
    }
    fn contents(&self) -> Vec<&Blob> {
        self.blobs()
    }
    fn is_index(&self) -> bool {
        false
    }
}

impl Artifact for Index {
    fn top(&self) -> &Blob {
        &self.manifest
    }
    fn contents(&self) -> Vec<&Blob> {
        self.images
            .iter()
            .flat_map(|i| std::iter::once(&i.manifest).chain(i.blobs()))
            .collect()
    }
    fn is_index(&self) -> bool {
        true
    }
}

/// Writes `art` as an OCI image layout in `dir`, tagged `tag`.
pub fn write_oci_layout(dir: &Path, tag: &str, art: &dyn Artifact) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for b in std::iter::once(art.top()).chain(art.contents()) {
        std::fs::write(blobs.join(b.hex()), &b.data).unwrap();
    }
    let mut desc = art.top().descriptor();
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes `art` in skopeo's `dir:` transport format (version 1.1): `manifest.json`, child
/// manifests as `<hex>.manifest.json`, blobs as `<hex>`. Unlike an OCI layout it can hold
/// Docker media types.
pub fn write_dir_layout(dir: &Path, art: &dyn Artifact) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    std::fs::write(dir.join("manifest.json"), &art.top().data).unwrap();
    for b in art.contents() {
        let name = if art.is_index() && b.media_type.contains("manifest") {
            format!("{}.manifest.json", b.hex())
        } else {
            b.hex().to_string()
        };
        std::fs::write(dir.join(name), &b.data).unwrap();
    }
}

/// Deterministic pseudo-random bytes (xoshiro256** seeded by splitmix64).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut sm = seed ^ 0x5EED_0FD0_CC51_DE00;
    let mut next_sm = || {
        sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = sm;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut s = [next_sm(), next_sm(), next_sm(), next_sm()];
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out.extend_from_slice(&result.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ustar archive with a directory `e2e/` and one regular file.
pub fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 3 * 512 + 1024);
    out.extend_from_slice(&tar_header("e2e/", 0, b'5', 0o755));
    out.extend_from_slice(&tar_header(name, content.len() as u64, b'0', 0o644));
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0);
    out
}

fn tar_header(name: &str, size: u64, typeflag: u8, mode: u32) -> [u8; 512] {
    assert!(name.len() < 100, "tar name too long");
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], off: usize, s: &str| {
        h[off..off + s.len()].copy_from_slice(s.as_bytes())
    };
    put(&mut h, 0, name);
    put(&mut h, 100, &format!("{mode:07o}"));
    put(&mut h, 108, "0000000");
    put(&mut h, 116, "0000000");
    put(&mut h, 124, &format!("{size:011o}"));
    put(&mut h, 136, &format!("{:011o}", 1_767_225_600u64));
    put(&mut h, 148, "        ");
    h[156] = typeflag;
    put(&mut h, 257, "ustar\0");
    put(&mut h, 263, "00");
    put(&mut h, 265, "root");
    put(&mut h, 297, "root");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    put(&mut h, 148, &format!("{sum:06o}\0 "));
    h
}
