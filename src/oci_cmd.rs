//! `hostd oci pack`: a hostd image as an OCI image archive, so that containerd (`ctr
//! image import`, a registry push with skopeo) carries it as a container image and the
//! `containerd-shim-hostd-v1` runtime boots it (docs/containerd.md).
//!
//! The archive is an OCI image layout in a tar: `oci-layout`, `index.json` and three
//! blobs: one uncompressed layer holding the image at `/NAME.img`, the image config
//! (`Cmd` names that file) and the manifest. Every timestamp, owner and order is fixed,
//! so the same image always gives the same bytes (and the same digests).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Media types containerd 1.6 imports and unpacks.
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Subcommands of `hostd oci`.
#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Pack a hostd image as an OCI image archive that `ctr image import` takes; run it
    /// with `ctr run --runtime io.containerd.hostd.v1 REF ID` (docs/containerd.md).
    Pack {
        /// The hostd image (`hostd build … -o app.img`).
        image: PathBuf,
        /// Where to write the archive.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// The image's name in containerd [default: hostd.local/NAME:latest, NAME being
        /// the image file's name without `.img`].
        #[arg(long, value_name = "REF")]
        r#ref: Option<String>,
    },
}

/// Runs a `hostd oci` subcommand.
pub fn run(cmd: OciCommand) -> Result<i32> {
    match cmd {
        OciCommand::Pack {
            image,
            output,
            r#ref,
        } => {
            let name = image_name(&image)?;
            let reference = r#ref.unwrap_or_else(|| format!("hostd.local/{name}:latest"));
            check_reference(&reference)?;
            // Checked like `hostd inspect` does: a damaged image is refused here, not at boot
            // (its error names the file and says what is wrong).
            hostd_images::format::Image::open(&image)?;
            let bytes = std::fs::read(&image)
                .with_context(|| format!("cannot read {}", image.display()))?;
            let archive = pack(&bytes, &format!("{name}.img"), &reference)?;
            hostd_images::format::write_atomically(&output, &archive)
                .with_context(|| format!("cannot write {}", output.display()))?;
            writeln!(
                std::io::stdout().lock(),
                "{}: {reference}",
                output.display()
            )?;
            Ok(0)
        }
    }
}

/// The file name without `.img`, as a name a reference may hold.
fn image_name(image: &Path) -> Result<String> {
    let stem = image
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".img").unwrap_or(n).to_ascii_lowercase())
        .unwrap_or_default();
    if stem.is_empty()
        || !stem
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
    {
        bail!(
            "{}: name the image file with letters, digits, `-`, `_` or `.` (or give --ref)",
            image.display()
        );
    }
    Ok(stem)
}

/// Refuses what containerd would not take as an image name: the reference grammar of the
/// distribution spec (`[HOST[:PORT]/]PATH[:TAG]`, path components of lowercase letters and
/// digits joined by `.`, `_`, `__` or dashes; a tag of up to 128 word characters, `.` or
/// `-`, not starting with either; 255 characters at most for the name). A digest
/// (`@sha256:…`) is not taken: the archive's own manifest gives it.
fn check_reference(reference: &str) -> Result<()> {
    let why = reference_error(reference);
    match why {
        None => Ok(()),
        Some(why) => bail!(
            "--ref {reference:?} is not an image reference ({why}); e.g. registry.example:5000/team/app:v1"
        ),
    }
}

fn reference_error(reference: &str) -> Option<&'static str> {
    if reference.contains('@') {
        return Some("a digest is not taken: the archive's manifest gives it");
    }
    // The tag is after the last `:` that follows the last `/` (a `:` before it is a port).
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match reference[last_slash..].rfind(':') {
        Some(i) => (
            &reference[..last_slash + i],
            Some(&reference[last_slash + i + 1..]),
        ),
        None => (reference, None),
    };
    if let Some(tag) = tag {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && word(tag.as_bytes()[0])
            && tag.bytes().all(|c| word(c) || c == b'.' || c == b'-');
        if !ok {
            return Some(
                "a tag is 1-128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`",
            );
        }
    }
    if name.is_empty() || name.len() > 255 {
        return Some("the name is 1-255 characters");
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // A first part with a `.` or `:`, or `localhost`, is a registry host (and port).
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        let (h, port) = host
            .split_once(':')
            .map_or((host, None), |(h, p)| (h, Some(p)));
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        };
        if !h.split('.').all(label_ok) {
            return Some("the registry host is not a host name");
        }
        if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit())) {
            return Some("the registry port is not a number");
        }
    }
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        // Separators between alphanumeric runs: one `.`, one or two `_`, or dashes.
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &c[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
            if !ok {
                return false;
            }
        }
        true
    };
    if !parts.iter().all(|p| component_ok(p)) {
        return Some(
            "each part of the name is lowercase letters and digits joined by `.`, `_`, `__` or `-`",
        );
    }
    None
}

/// `sha256:<hex>` of `bytes`.
fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A tar entry with fixed metadata.
fn append(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, data)
        .with_context(|| format!("cannot add {path} to the archive"))
}

/// The archive's bytes: `file_name` (the image) in one layer, named `reference`.
pub fn pack(image: &[u8], file_name: &str, reference: &str) -> Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    append(&mut layer, file_name, 0o444, image)?;
    let layer = layer.into_inner().context("cannot finish the layer")?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": [format!("/{file_name}")] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len() },
        "layers": [ { "mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer.len() } ],
    }))?;
    let manifest_digest = digest(&manifest);
    let tag = reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [ {
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        } ],
    }))?;
    let mut out = tar::Builder::new(Vec::new());
    append(
        &mut out,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append(&mut out, "index.json", 0o644, &index)?;
    let mut blobs = [
        (layer_digest, layer),
        (config_digest, config),
        (manifest_digest, manifest),
    ];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    for (d, bytes) in &blobs {
        let hex = d.trim_start_matches("sha256:");
        append(&mut out, &format!("blobs/sha256/{hex}"), 0o444, bytes)?;
    }
    out.into_inner().context("cannot finish the archive")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn same_image_same_bytes_and_blobs_match_their_digests() {
        let a = pack(b"not really an image", "hello.img", "hostd.local/hello:v1").unwrap();
        let b = pack(b"not really an image", "hello.img", "hostd.local/hello:v1").unwrap();
        assert_eq!(a, b);
        let mut archive = tar::Archive::new(&a[..]);
        let mut names = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(digest(&data), format!("sha256:{hex}"));
            }
            if name == "index.json" {
                let text = String::from_utf8(data).unwrap();
                assert!(text.contains(r#""io.containerd.image.name":"hostd.local/hello:v1""#));
                assert!(text.contains(r#""org.opencontainers.image.ref.name":"v1""#));
            }
            names.push(name);
        }
        assert_eq!(names.len(), 5, "{names:?}");
    }

    #[test]
    fn references_containerd_takes_and_ones_it_does_not() {
        for good in [
            "hostd.local/hello:latest",
            "hello",
            "hello:v1.2-rc_3",
            "registry.example:5000/team/app:v1",
            "localhost/a/b__c/d-e--f/g.h:T",
            "docker.io/library/debian",
            "a_b",
        ] {
            assert_eq!(reference_error(good), None, "{good}");
        }
        for bad in [
            "BAD REF!!",
            "Hello",
            "",
            "hello:",
            "hello:-x",
            "hello:.x",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "host:port/x",
            "reg.example:/x",
            "-reg.example/x",
            "hello@sha256:0000",
            "hello:v1 ",
            "a\0b",
        ] {
            assert!(reference_error(bad).is_some(), "{bad:?}");
        }
        assert!(reference_error(&format!("hello:{}", "t".repeat(129))).is_some());
        assert!(reference_error(&"a".repeat(256)).is_some());
        assert_eq!(reference_error(&"a".repeat(255)), None);
    }
}
