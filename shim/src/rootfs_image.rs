//! A plain OCI root file system (what an ordinary container image unpacks to) as a
//! hostd image: the directory becomes a one-layer OCI image layout, the spec's `base`;
//! the OCI config's process (args, env, cwd, user) becomes its `main` service; `hostd
//! build` adds hostd's kernel and guest init. The result boots like any image.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::workload::{resolve_in, Process};

/// Why the root file system could not become an image.
#[derive(Debug, thiserror::Error)]
pub enum RootfsImageError {
    /// Scratch space or the layer could not be written.
    #[error("cannot write the root file system's image files in {dir}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The container's command is not found in the root file system.
    #[error("`{program}` is not in the root file system (nor on the process's PATH)")]
    NoProgram { program: String },
    /// `hostd build` could not run.
    #[error("cannot run {hostd} build")]
    Spawn {
        hostd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `hostd build` failed.
    #[error("hostd build of the root file system failed (exit code {code}): {output}")]
    Build { code: i32, output: String },
}

/// The built image and the scratch directory holding it (removed when dropped).
#[derive(Debug)]
pub struct Built {
    /// Scratch: the layout, the spec, the image.
    pub dir: tempfile::TempDir,
    /// The image file.
    pub image: PathBuf,
}

/// Appends `dir` (below `root`) to the tar, in name order, without following symlinks.
fn append_tree(tar: &mut tar::Builder<File>, root: &Path, dir: &Path) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ty = e.file_type()?;
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        if ty.is_dir() {
            tar.append_path_with_name(&path, rel)?;
            append_tree(tar, root, &path)?;
        } else if ty.is_file() || ty.is_symlink() {
            tar.append_path_with_name(&path, rel)?;
        }
        // Device nodes, FIFOs and sockets are skipped: the guest's /dev is a devtmpfs.
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((format!("{:x}", h.finalize()), n))
}

/// Writes an OCI image layout at `layout` with one layer: the tree at `root`.
fn write_layout(root: &Path, layout: &Path) -> std::io::Result<()> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_path = layout.join("layer.tar");
    let mut tar = tar::Builder::new(File::create(&layer_path)?);
    tar.follow_symlinks(false);
    append_tree(&mut tar, root, root)?;
    tar.into_inner()?.sync_all()?;
    let (layer_hex, layer_size) = sha256_file(&layer_path)?;
    std::fs::rename(&layer_path, blobs.join(&layer_hex))?;
    let put = |bytes: &[u8]| -> std::io::Result<(String, usize)> {
        let hex = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok((hex, bytes.len()))
    };
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_hex}")] },
    });
    let (config_hex, config_size) = put(config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{config_hex}"), "size": config_size },
        "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar",
                      "digest": format!("sha256:{layer_hex}"), "size": layer_size } ],
    });
    let (manifest_hex, manifest_size) = put(manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [ { "mediaType": "application/vnd.oci.image.manifest.v1+json",
                         "digest": format!("sha256:{manifest_hex}"), "size": manifest_size } ],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(())
}

/// The program as an absolute path in `root` (looked up on the process's PATH).
fn absolute_program(root: &Path, process: &Process) -> Result<String, RootfsImageError> {
    let program = process.args.first().cloned().unwrap_or_default();
    if program.starts_with('/') {
        return Ok(program);
    }
    let path = process
        .env_var("PATH")
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .find(|c| resolve_in(root, c, 0).is_some_and(|p| p.is_file()))
        .ok_or(RootfsImageError::NoProgram { program })
}

/// The spec: the layout as `base`, the process as the `main` service.
fn spec(name: &str, root: &Path, process: &Process) -> Result<String, RootfsImageError> {
    let mut main = toml::Table::new();
    main.insert("command".into(), absolute_program(root, process)?.into());
    main.insert(
        "args".into(),
        toml::Value::Array(
            process
                .args
                .iter()
                .skip(1)
                .map(|a| a.clone().into())
                .collect(),
        ),
    );
    let mut env = toml::Table::new();
    for e in &process.env {
        if let Some((k, v)) = e.split_once('=') {
            if k != "PATH" && k != "HOME" && k != "HOSTD_FN_LISTEN" {
                env.insert(k.into(), v.into());
            }
        }
    }
    main.insert("env".into(), env.into());
    main.insert("workdir".into(), process.cwd.clone().into());
    main.insert("user".into(), process.user.clone().into());
    main.insert("main".into(), true.into());
    let mut services = toml::Table::new();
    services.insert("main".into(), main.into());
    let mut top = toml::Table::new();
    top.insert("name".into(), name.into());
    top.insert("base".into(), "oci:layout".into());
    top.insert("services".into(), services.into());
    Ok(toml::to_string(&top).unwrap_or_default())
}

/// A name the spec accepts, from the container id.
fn image_name(id: &str) -> String {
    let mut n: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if n.is_empty() {
        n.push_str("container");
    }
    n
}

/// Builds a hostd image from `root` for `process` with `hostd build`.
pub fn build(
    hostd: &Path,
    root: &Path,
    process: &Process,
    id: &str,
) -> Result<Built, RootfsImageError> {
    let write = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| RootfsImageError::Write { dir, source }
    };
    let tmp = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix("hostd-shim-")
        .tempdir_in(&tmp)
        .map_err(write(&tmp))?;
    let spec_text = spec(&image_name(id), root, process)?;
    write_layout(root, &dir.path().join("layout")).map_err(write(dir.path()))?;
    let spec_path = dir.path().join("app.toml");
    File::create(&spec_path)
        .and_then(|mut f| f.write_all(spec_text.as_bytes()))
        .map_err(write(dir.path()))?;
    let image = dir.path().join("app.img");
    let mut cmd = Command::new(hostd);
    cmd.arg("build").arg(&spec_path).arg("-o").arg(&image);
    let (code, output) = crate::service::run_to_end(&mut cmd, &dir.path().join("build.log"))
        .map_err(|source| RootfsImageError::Spawn {
            hostd: hostd.to_path_buf(),
            source,
        })?;
    if code != 0 {
        return Err(RootfsImageError::Build {
            code,
            output: output.trim().to_string(),
        });
    }
    Ok(Built { dir, image })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_process_becomes_the_main_service() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/busybox"), b"x").unwrap();
        let p = Process {
            args: vec!["busybox".into(), "echo".into(), "hi there".into()],
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            cwd: "/tmp".into(),
            user: "1000:1000".into(),
        };
        let s = spec("c1", root.path(), &p).unwrap();
        let v: toml::Table = toml::from_str(&s).unwrap();
        let main = &v["services"]["main"];
        assert_eq!(main["command"].as_str(), Some("/bin/busybox"));
        assert_eq!(main["args"].as_array().unwrap().len(), 2);
        assert_eq!(main["env"]["GREETING"].as_str(), Some("hi"));
        assert!(main["env"].get("PATH").is_none());
        assert_eq!(main["user"].as_str(), Some("1000:1000"));
        assert_eq!(v["base"].as_str(), Some("oci:layout"));
        let missing = Process {
            args: vec!["nope".into()],
            ..p
        };
        assert!(spec("c1", root.path(), &missing).is_err());
        assert_eq!(image_name("a/b:c"), "a-b-c");
    }

    #[test]
    fn the_layout_holds_the_tree() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/busybox"), b"x").unwrap();
        std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).unwrap();
        let out = tempfile::tempdir().unwrap();
        write_layout(root.path(), out.path()).unwrap();
        let index = std::fs::read_to_string(out.path().join("index.json")).unwrap();
        assert!(index.contains("sha256:"));
        assert_eq!(
            std::fs::read_dir(out.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            3
        );
    }
}
