//! OCI images as the base of an image's root file system (spec `base`): an
//! `oci-archive` (a tar of an OCI image layout, what `skopeo copy … oci-archive:F`,
//! `podman save --format oci-archive` and `buildah push … oci-archive:F` write) or an
//! OCI image layout directory. Read from files only: there is no registry client.
//!
//! `index.json` names the image manifest (the one for linux/amd64 when several are
//! listed; the first otherwise); its layers are applied in order, with whiteouts
//! ([`crate::layer`]). Every blob is checked against its digest. The manifest's digest
//! is the image's identity, recorded in hostd's manifest (`base`).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::input;
use crate::rootfs::Tree;

/// Why an OCI base could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct OciError {
    /// The archive or layout directory.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Where the image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A tar file holding an OCI image layout.
    Archive,
    /// An OCI image layout directory.
    Layout,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageManifest {
    layers: Vec<Descriptor>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Blobs by digest.
enum Blobs {
    Archive(BTreeMap<String, Vec<u8>>),
    Layout(PathBuf),
}

impl Blobs {
    fn file(&self, name: &str) -> Result<Vec<u8>, String> {
        match self {
            Blobs::Archive(files) => files
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no {name} in the archive")),
            Blobs::Layout(dir) => {
                let p = dir.join(name);
                let real = std::fs::canonicalize(&p).map_err(|e| format!("{name}: {e}"))?;
                if !real.starts_with(dir) {
                    return Err(format!("{name} leads outside the layout directory"));
                }
                input::read_regular(&real, input::MAX_SOURCE_FILE)
                    .map_err(|e| format!("{name}: {e}"))
            }
        }
    }

    /// A blob, checked against its digest.
    fn blob(&self, digest: &str) -> Result<Vec<u8>, String> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            })
            .ok_or_else(|| format!("digest `{digest}` is not sha256:<64 hex digits>"))?;
        let bytes = self.file(&format!("blobs/sha256/{hex}"))?;
        let got = crate::format::digest_hex(&Sha256::digest(&bytes).into());
        if got != hex {
            return Err(format!("blob {digest} has sha256 {got}: damaged"));
        }
        Ok(bytes)
    }
}

/// Applies the image at `path` onto `tree`; returns the image manifest's digest and
/// the number of layers.
pub fn apply(path: &Path, source: Source, tree: &mut Tree) -> Result<(String, u32), OciError> {
    let fail = |message: String| OciError {
        path: path.to_path_buf(),
        message,
    };
    let blobs = match source {
        Source::Archive => {
            let bytes = input::read_regular(path, input::MAX_SOURCE_FILE)
                .map_err(|e| fail(e.to_string()))?;
            let mut files = BTreeMap::new();
            let mut archive = tar::Archive::new(&bytes[..]);
            for entry in archive
                .entries()
                .map_err(|e| fail(format!("not a tar archive: {e}")))?
            {
                let mut entry = entry.map_err(|e| fail(format!("bad tar entry: {e}")))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry
                    .path()
                    .map_err(|e| fail(e.to_string()))?
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| fail(format!("{name}: {e}")))?;
                files.insert(name, data);
            }
            Blobs::Archive(files)
        }
        Source::Layout => {
            Blobs::Layout(std::fs::canonicalize(path).map_err(|e| fail(e.to_string()))?)
        }
    };
    let index: Index = serde_json::from_slice(&blobs.file("index.json").map_err(fail)?)
        .map_err(|e| fail(format!("index.json: {e}")))?;
    let mut manifests = index.manifests;
    let mut manifest_digest = None;
    // An index may name an index (a multi-platform image); follow at most two levels.
    for _ in 0..3 {
        let chosen = pick(&manifests).ok_or_else(|| fail("index.json lists no image".into()))?;
        if INDEX_TYPES.contains(&chosen.media_type.as_str()) {
            let inner: Index = serde_json::from_slice(&blobs.blob(&chosen.digest).map_err(fail)?)
                .map_err(|e| fail(format!("{}: {e}", chosen.digest)))?;
            manifests = inner.manifests;
            continue;
        }
        manifest_digest = Some(chosen.digest.clone());
        break;
    }
    let digest = manifest_digest.ok_or_else(|| fail("indexes nested too deeply".into()))?;
    let manifest: ImageManifest = serde_json::from_slice(&blobs.blob(&digest).map_err(fail)?)
        .map_err(|e| fail(format!("image manifest {digest}: {e}")))?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let bytes = blobs.blob(&layer.digest).map_err(fail)?;
        let t = layer.media_type.as_str();
        let tar = if t.ends_with("+gzip") || t.ends_with(".gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .map_err(|e| fail(format!("layer {i} ({}): gzip: {e}", layer.digest)))?;
            out
        } else if t.ends_with(".tar") || t.ends_with(".tar.diff") || t.is_empty() {
            bytes
        } else {
            return Err(fail(format!(
                "layer {i} ({}): media type `{t}` is not supported (tar or tar+gzip)",
                layer.digest
            )));
        };
        crate::layer::apply(&tar, tree, true)
            .map_err(|m| fail(format!("layer {i} ({}): {m}", layer.digest)))?;
    }
    Ok((digest, manifest.layers.len() as u32))
}

/// The linux/amd64 entry when platforms are given, else the first.
fn pick(list: &[Descriptor]) -> Option<&Descriptor> {
    list.iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| list.first())
}
