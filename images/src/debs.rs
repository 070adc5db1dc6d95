//! Debian packages: fetched with `apt-get download` into a cache keyed by exact
//! version, unpacked with `dpkg-deb --fsys-tarfile` into the image tree. Packages are
//! unpacked as they are: no dependency resolution and no maintainer scripts, so a spec
//! lists every package it needs.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::manifest::PackageInfo;
use crate::names;
use crate::rootfs::{Kind, Node, Tree};

/// Why a package could not be used.
#[derive(Debug, thiserror::Error)]
#[error("package `{package}`: {message}")]
pub struct DebError {
    /// The package as written in the spec.
    pub package: String,
    /// What went wrong and what to do.
    pub message: String,
}

fn err(package: &str, message: impl Into<String>) -> DebError {
    DebError {
        package: package.to_string(),
        message: message.into(),
    }
}

fn run(package: &str, cmd: &mut Command) -> Result<Vec<u8>, DebError> {
    let out = cmd.output().map_err(|e| {
        err(
            package,
            format!(
                "cannot run {:?}: {e} (is this a Debian host with apt?)",
                cmd.get_program()
            ),
        )
    })?;
    if !out.status.success() {
        return Err(err(
            package,
            format!(
                "{:?} failed: {}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(out.stdout)
}

/// apt with nothing from the environment that could change its configuration; operands
/// after `--`, so a name can never be read as an option.
fn apt(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("APT_CONFIG");
    c
}

/// Resolves `name` or `name=version` to an exact version.
fn resolve_version(spec: &str) -> Result<(String, String), DebError> {
    // Checked again here (the spec validator checks first): whatever reaches apt is a
    // Debian package name and version, never an option.
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    if !names::is_debian_package(name) || !version.is_none_or(names::is_debian_version) {
        return Err(err(
            spec,
            "not a Debian package name (`name` or `name=version`)",
        ));
    }
    if let Some(version) = version {
        return Ok((name.to_string(), version.to_string()));
    }
    let out = run(
        spec,
        apt("apt-cache").args(["show", "--no-all-versions", "--", spec]),
    )?;
    let text = String::from_utf8_lossy(&out);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .ok_or_else(|| {
            err(
                spec,
                "apt-cache knows no such package (run `apt-get update`?)",
            )
        })?;
    Ok((spec.to_string(), version.trim().to_string()))
}

/// Fetches a package into `cache` (or finds it there) and returns its path and info.
pub fn fetch(spec: &str, cache: &Path) -> Result<(PathBuf, PackageInfo), DebError> {
    let (name, version) = resolve_version(spec)?;
    let dir = cache.join("debs");
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(spec, format!("cannot create {}: {e}", dir.display())))?;
    // apt names files NAME_VERSION_ARCH.deb with ':' escaped as %3a.
    let prefix = format!("{}_{}_", name, version.replace(':', "%3a"));
    let find = |dir: &Path| -> Option<PathBuf> {
        let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".deb"))
            })
            .collect();
        hits.sort();
        hits.pop()
    };
    let path = match find(&dir) {
        Some(p) => p,
        None => {
            tracing::info!("downloading {name}={version}");
            let tmp = tempfile::tempdir_in(&dir).map_err(|e| err(spec, e.to_string()))?;
            let _scratch = crate::scratch::register(tmp.path());
            run(
                spec,
                apt("apt-get")
                    .args(["download", "-q", "--", &format!("{name}={version}")])
                    .current_dir(tmp.path()),
            )?;
            let got =
                find(tmp.path()).ok_or_else(|| err(spec, "apt-get download produced no .deb"))?;
            let dest = dir.join(got.file_name().unwrap_or_default());
            std::fs::rename(&got, &dest).map_err(|e| err(spec, e.to_string()))?;
            dest
        }
    };
    let bytes = std::fs::read(&path).map_err(|e| err(spec, format!("{}: {e}", path.display())))?;
    let sha256 = crate::format::digest_hex(&Sha256::digest(&bytes).into());
    Ok((
        path,
        PackageInfo {
            name,
            version,
            sha256,
        },
    ))
}

/// Unpacks a .deb's data into `tree`. Owners and modes come from the package; mtimes
/// are dropped.
pub fn unpack(package: &str, deb: &Path, tree: &mut Tree) -> Result<(), DebError> {
    let tar_bytes = run(
        package,
        Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb),
    )?;
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let entries = archive
        .entries()
        .map_err(|e| err(package, format!("bad data.tar: {e}")))?;
    let mut links: Vec<(String, String, Node)> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| err(package, format!("bad data.tar entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| err(package, format!("bad path in data.tar: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path = path.trim_start_matches('.').to_string();
        if path.is_empty() || path == "/" {
            continue;
        }
        if path.split('/').any(|c| c == "..") {
            return Err(err(package, format!("refusing path `{path}` with `..`")));
        }
        let h = entry.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let et = h.entry_type();
        let link_name = entry
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned());
        let kind = if et.is_dir() {
            Kind::Dir
        } else if et.is_symlink() {
            Kind::Symlink(link_name.unwrap_or_default())
        } else if et.is_hard_link() {
            let target = link_name
                .unwrap_or_default()
                .trim_start_matches('.')
                .to_string();
            links.push((
                path,
                target,
                Node {
                    kind: Kind::Dir,
                    mode,
                    uid,
                    gid,
                },
            ));
            continue;
        } else if et.is_file() {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| err(package, format!("reading {path}: {e}")))?;
            Kind::File(data)
        } else {
            tracing::warn!("package {package}: skipping special file {path}");
            continue;
        };
        tree.insert(
            &path,
            Node {
                kind,
                mode,
                uid,
                gid,
            },
        );
    }
    // Hard links become copies: cpio newc could share data, but copies keep the
    // archive simple and the result identical for the guest.
    for (path, target, mut node) in links {
        let target_node = tree.get(&target).cloned().ok_or_else(|| {
            err(
                package,
                format!("hard link {path} -> {target}: target missing"),
            )
        })?;
        node.kind = target_node.kind;
        tree.insert(&path, node);
    }
    Ok(())
}
