//! OCI images built offline, in memory, so the tests can push them to a
//! local registry and later compare what comes back byte for byte.
//!
//! Layers are uncompressed tars (`application/vnd.oci.image.layer.v1.tar`):
//! containerd unpacks them as readily as gzip layers, and a test can predict
//! their exact bytes and digests. Every builder is deterministic: the same
//! inputs give the same digests.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde_json::{Value, json};

use super::sha256_digest;

/// Media type of an uncompressed tar layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of an image config.
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a single-platform image manifest.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an image index (a multi-arch "manifest list").
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An `Accept` header value for OCI manifests and indexes. Distribution
/// 2.8 answers 404 `MANIFEST_UNKNOWN` for an OCI manifest when the request's
/// `Accept` does not list its media type.
pub const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// Content-addressed bytes with their media type: a layer, a config, a
/// manifest or an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// The OCI media type.
    pub media_type: &'static str,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The exact bytes a registry stores and serves.
    pub bytes: Bytes,
}

impl Blob {
    /// Wraps `bytes`, computing the digest.
    pub fn new(media_type: &'static str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            media_type,
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The OCI descriptor pointing at this blob.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size(),
        })
    }
}

/// Builds one uncompressed tar layer.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a regular file at `path` (relative, `/`-separated). Parent
    /// directory entries are added first, as real image layers have them.
    pub fn file(mut self, path: &str, contents: &[u8]) -> LayerBuilder {
        let path = path.trim_start_matches('/');
        let dirs = path.rsplit_once('/').map_or("", |(dirs, _)| dirs);
        let mut parent = String::new();
        for part in dirs.split('/').filter(|p| !p.is_empty()) {
            parent.push_str(part);
            parent.push('/');
            if self.dirs.insert(parent.clone()) {
                let mut header = fixed_header(tar::EntryType::Directory, 0o755, 0);
                self.tar
                    .append_data(&mut header, &parent, std::io::empty())
                    .expect("append tar directory");
            }
        }
        let mut header = fixed_header(tar::EntryType::Regular, 0o644, contents.len());
        self.tar
            .append_data(&mut header, path, contents)
            .expect("append tar file");
        self
    }

    /// Adds a file of `size` pseudo-random (incompressible) bytes drawn
    /// from `seed`, for streaming tests.
    pub fn random_file(self, path: &str, size: usize, seed: u64) -> LayerBuilder {
        let contents = random_bytes(size, seed);
        self.file(path, &contents)
    }

    /// The finished layer.
    pub fn build(self) -> Blob {
        let bytes = self.tar.into_inner().expect("finish tar");
        Blob::new(LAYER_TAR, bytes)
    }
}

/// A tar header with every field that would vary between runs pinned.
fn fixed_header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size as u64);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// `size` pseudo-random bytes from `seed`.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0; size];
    rng.fill(&mut bytes);
    bytes
}

/// An `os`/`architecture` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: &'static str,
    /// e.g. `amd64`.
    pub architecture: &'static str,
}

impl Platform {
    /// linux/amd64, the platform of this test host.
    pub const LINUX_AMD64: Platform = Platform {
        os: "linux",
        architecture: "amd64",
    };
    /// linux/arm64, the other half of the multi-arch index.
    pub const LINUX_ARM64: Platform = Platform {
        os: "linux",
        architecture: "arm64",
    };
}

/// A single-platform image: config, layers and the manifest tying them.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The platform the config declares.
    pub platform: Platform,
    /// The image config blob.
    pub config: Blob,
    /// The layer blobs, bottom first.
    pub layers: Vec<Blob>,
    /// The manifest itself (`application/vnd.oci.image.manifest.v1+json`).
    pub manifest: Blob,
}

impl Manifest {
    /// Builds the config (with `rootfs.diff_ids` = the layer digests, as the
    /// layers are uncompressed) and the manifest. `label` lands in the
    /// config so that images with identical layers still differ.
    pub fn new(platform: Platform, layers: Vec<Blob>, label: &str) -> Manifest {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let config = json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Labels": { "pullthrough.test/image": label },
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Blob::new(CONFIG, serde_json::to_vec(&config).expect("config json"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(
            MANIFEST,
            serde_json::to_vec(&manifest).expect("manifest json"),
        );
        Manifest {
            platform,
            config,
            layers,
            manifest,
        }
    }

    /// The manifest digest.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// Config first, then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// What a tag points at: one manifest, or an index over several.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest or index a tag resolves to.
    pub root: Blob,
    /// The platform manifests: one for a single image, one per platform
    /// for an index.
    pub manifests: Vec<Manifest>,
}

impl Image {
    /// A single-platform image whose tag points straight at `manifest`.
    pub fn single(manifest: Manifest) -> Image {
        Image {
            root: manifest.manifest.clone(),
            manifests: vec![manifest],
        }
    }

    /// An index (`application/vnd.oci.image.index.v1+json`) over
    /// `manifests`, each entry carrying its platform.
    pub fn index(manifests: Vec<Manifest>) -> Image {
        let entries: Vec<Value> = manifests
            .iter()
            .map(|m| {
                let mut d = m.manifest.descriptor();
                d["platform"] = json!({
                    "architecture": m.platform.architecture,
                    "os": m.platform.os,
                });
                d
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": entries,
        });
        let root = Blob::new(INDEX, serde_json::to_vec(&index).expect("index json"));
        Image { root, manifests }
    }

    /// A small linux/amd64 image: one layer with a couple of files whose
    /// content includes `name`, so different names give different digests.
    pub fn small(name: &str) -> Image {
        Image::single(Manifest::new(
            Platform::LINUX_AMD64,
            vec![small_layer(name, Platform::LINUX_AMD64)],
            name,
        ))
    }

    /// A linux/amd64 + linux/arm64 index; each platform has its own layer
    /// and config.
    pub fn multi_arch(name: &str) -> Image {
        Image::index(
            [Platform::LINUX_AMD64, Platform::LINUX_ARM64]
                .into_iter()
                .map(|p| Manifest::new(p, vec![small_layer(name, p)], name))
                .collect(),
        )
    }

    /// A linux/amd64 image with a small layer and a second layer holding one
    /// file of `size` pseudo-random bytes (for streaming tests).
    pub fn with_big_layer(name: &str, size: usize) -> Image {
        let big = LayerBuilder::new()
            .random_file("data/big.bin", size, seed_from(name))
            .build();
        Image::single(Manifest::new(
            Platform::LINUX_AMD64,
            vec![small_layer(name, Platform::LINUX_AMD64), big],
            name,
        ))
    }

    /// The digest a tag resolves to (manifest or index).
    pub fn digest(&self) -> &str {
        &self.root.digest
    }

    /// Whether the root is an index.
    pub fn is_index(&self) -> bool {
        self.root.media_type == INDEX
    }

    /// Every config and layer blob, each once, in push order.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut seen = BTreeSet::new();
        self.manifests
            .iter()
            .flat_map(Manifest::blobs)
            .filter(|b| seen.insert(b.digest.as_str()))
            .collect()
    }

    /// The config or layer blob with `digest`.
    pub fn blob(&self, digest: &str) -> Option<&Blob> {
        self.blobs().into_iter().find(|b| b.digest == digest)
    }

    /// The manifest for `architecture` (on linux).
    pub fn manifest_for(&self, architecture: &str) -> Option<&Manifest> {
        self.manifests
            .iter()
            .find(|m| m.platform.architecture == architecture)
    }

    /// The largest layer, e.g. the one [`Image::with_big_layer`] adds.
    pub fn largest_layer(&self) -> &Blob {
        self.manifests
            .iter()
            .flat_map(|m| &m.layers)
            .max_by_key(|b| b.size())
            .expect("an image has at least one layer")
    }
}

/// A layer with a few small files naming the image and platform.
fn small_layer(name: &str, platform: Platform) -> Blob {
    LayerBuilder::new()
        .file("etc/pullthrough-test", format!("{name}\n").as_bytes())
        .file(
            "etc/platform",
            format!("{}/{}\n", platform.os, platform.architecture).as_bytes(),
        )
        .file("hello.txt", b"hello from the pullthrough test harness\n")
        .build()
}

/// A stable seed derived from `name` (FNV-1a), so random content depends on
/// the image name only.
fn seed_from(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn images_are_deterministic_and_well_formed() {
    let a = Image::multi_arch("x");
    let b = Image::multi_arch("x");
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), Image::multi_arch("y").digest());
    assert!(a.is_index());

    let index: Value = serde_json::from_slice(&a.root.bytes).expect("index parses");
    assert_eq!(index["mediaType"], INDEX);
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().expect("arch"))
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);

    let m = a.manifest_for("arm64").expect("arm64 manifest");
    let config: Value = serde_json::from_slice(&m.config.bytes).expect("config parses");
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["rootfs"]["diff_ids"][0], m.layers[0].digest);

    let big = Image::with_big_layer("big", 3 << 20);
    assert!(big.largest_layer().size() > 3 << 20);
    let mut archive = tar::Archive::new(&big.largest_layer().bytes[..]);
    let sizes: Vec<u64> = archive
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry").header().size().expect("size"))
        .collect();
    assert_eq!(sizes, [0, 3 << 20]);
}
