//! What a bundle runs, decided from its root file system and OCI config: a hostd image
//! (`*.img`) boots as a microVM, a WebAssembly component (`*.wasm`, or a `fns.toml`
//! manifest naming components and their grants) is served by the function tier, and any
//! other root file system with the config's program in it becomes the root of a
//! microVM built on the fly ([`crate::rootfs_image`]).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a bundle cannot run. Shown in containerd's log and returned by create.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// config.json is missing or not an OCI runtime config.
    #[error("bundle {bundle}: cannot read config.json")]
    Config {
        bundle: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json is not JSON.
    #[error("bundle {bundle}: config.json is not JSON")]
    ConfigJson {
        bundle: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The root file system holds nothing hostd can run.
    #[error(
        "bundle {bundle}: nothing runnable in the root file system: no hostd image (*.img), \
         no WebAssembly component (*.wasm or fns.toml) and no `{program}` to run as the \
         main service (pack an image with `hostd oci pack`, see docs/containerd.md)"
    )]
    NothingRunnable { bundle: PathBuf, program: String },
    /// Several images or components and the config's args do not pick one.
    #[error(
        "bundle {bundle}: the root file system holds several {what} ({names}); name one \
         as the first argument of the container's command"
    )]
    Ambiguous {
        bundle: PathBuf,
        what: &'static str,
        names: String,
    },
    /// The root file system cannot be listed.
    #[error("bundle {bundle}: cannot list the root file system")]
    Rootfs {
        bundle: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The main process as the OCI config gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// Program and arguments.
    pub args: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
}

impl Process {
    /// The value of environment variable `name`, if set.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|e| {
            e.split_once('=')
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v)
        })
    }
}

/// What the bundle runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// `hostd run IMAGE`.
    Image(PathBuf),
    /// `hostd fn serve TARGET` (a .wasm or a fns.toml).
    Function(PathBuf),
    /// A plain root file system: its own program as the main service of a microVM.
    RootFs(PathBuf),
}

/// The parts of config.json the shim uses.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The container's process.
    pub process: Process,
    /// `linux.cgroupsPath`, if set.
    pub cgroups_path: Option<String>,
}

impl Bundle {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Bundle, BundleError> {
        let bytes =
            std::fs::read(dir.join("config.json")).map_err(|source| BundleError::Config {
                bundle: dir.to_path_buf(),
                source,
            })?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|source| BundleError::ConfigJson {
                bundle: dir.to_path_buf(),
                source,
            })?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let p = &v["process"];
        let user = &p["user"];
        Ok(Bundle {
            dir: dir.to_path_buf(),
            process: Process {
                args: strings(&p["args"]),
                env: strings(&p["env"]),
                cwd: p["cwd"].as_str().unwrap_or("/").to_string(),
                user: format!(
                    "{}:{}",
                    user["uid"].as_u64().unwrap_or(0),
                    user["gid"].as_u64().unwrap_or(0)
                ),
            },
            cgroups_path: v["linux"]["cgroupsPath"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        })
    }

    /// Where containerd's layers are mounted.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Decides what runs from the mounted root file system.
    pub fn workload(&self) -> Result<Workload, BundleError> {
        let root = self.rootfs();
        let mut images = Vec::new();
        let mut wasm = Vec::new();
        let mut manifest = None;
        let entries = std::fs::read_dir(&root).map_err(|source| BundleError::Rootfs {
            bundle: self.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if name.ends_with(".img") {
                images.push(name);
            } else if name.ends_with(".wasm") {
                wasm.push(name);
            } else if name == "fns.toml" {
                manifest = Some(name);
            }
        }
        images.sort();
        wasm.sort();
        // The first argument picks one when there are several (`ctr run … REF ID /a.img`).
        let chosen = |list: &[String], what: &'static str| -> Result<PathBuf, BundleError> {
            let first = self
                .process
                .args
                .first()
                .map(|a| a.trim_start_matches('/').to_string());
            if let Some(f) = first.filter(|f| list.contains(f)) {
                return Ok(root.join(f));
            }
            match list {
                [one] => Ok(root.join(one)),
                _ => Err(BundleError::Ambiguous {
                    bundle: self.dir.clone(),
                    what,
                    names: list.join(", "),
                }),
            }
        };
        if !images.is_empty() {
            return chosen(&images, "hostd images").map(Workload::Image);
        }
        if let Some(m) = manifest {
            return Ok(Workload::Function(root.join(m)));
        }
        if !wasm.is_empty() {
            return chosen(&wasm, "WebAssembly components").map(Workload::Function);
        }
        let program = self.process.args.first().cloned().unwrap_or_default();
        if !program.is_empty() && program_exists(&root, &program, &self.process) {
            return Ok(Workload::RootFs(root));
        }
        Err(BundleError::NothingRunnable {
            bundle: self.dir.clone(),
            program: if program.is_empty() {
                "command".into()
            } else {
                program
            },
        })
    }
}

/// Whether `program` names a file in `root`: an absolute path, or a name found on the
/// process's PATH (or the usual one). Symlinks are followed inside `root` only.
fn program_exists(root: &Path, program: &str, process: &Process) -> bool {
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.to_string()]
    } else {
        process
            .env_var("PATH")
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .split(':')
            .map(|d| format!("{d}/{program}"))
            .collect()
    };
    candidates
        .iter()
        .any(|c| resolve_in(root, c, 0).is_some_and(|p| p.is_file()))
}

/// `path` resolved inside `root` (absolute symlinks are taken relative to `root`).
pub fn resolve_in(root: &Path, path: &str, depth: u32) -> Option<PathBuf> {
    if depth > 16 {
        return None;
    }
    let mut cur = root.to_path_buf();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "." => continue,
            ".." => {
                if cur != root {
                    cur.pop();
                }
                continue;
            }
            _ => cur.push(part),
        }
        if let Ok(target) = std::fs::read_link(&cur) {
            let target = target.to_string_lossy().to_string();
            let rest = parts[i + 1..].join("/");
            let joined = if target.starts_with('/') {
                format!("{target}/{rest}")
            } else {
                let parent = cur
                    .parent()
                    .and_then(|p| p.strip_prefix(root).ok())
                    .map(|p| p.to_string_lossy().to_string())
                    .unwrap_or_default();
                format!("/{parent}/{target}/{rest}")
            };
            return resolve_in(root, &joined, depth + 1);
        }
    }
    Some(cur)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let b = Bundle::read(dir.path()).unwrap();
        (dir, b)
    }

    const CONFIG: &str = r#"{"process":{"args":["/bin/sh","-c","echo hi"],"env":["PATH=/bin","A=b"],
        "cwd":"/srv","user":{"uid":1000,"gid":100}},"linux":{"cgroupsPath":"/test/c1"}}"#;

    #[test]
    fn reads_the_process_and_cgroups_path() {
        let (_d, b) = bundle(CONFIG);
        assert_eq!(b.process.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(b.process.env_var("A"), Some("b"));
        assert_eq!(b.process.cwd, "/srv");
        assert_eq!(b.process.user, "1000:100");
        assert_eq!(b.cgroups_path.as_deref(), Some("/test/c1"));
    }

    #[test]
    fn an_image_wins_and_args_pick_among_several() {
        let (d, b) = bundle(r#"{"process":{"args":["/b.img"]}}"#);
        let root = d.path().join("rootfs");
        std::fs::write(root.join("a.img"), b"x").unwrap();
        assert_eq!(b.workload().unwrap(), Workload::Image(root.join("a.img")));
        std::fs::write(root.join("b.img"), b"x").unwrap();
        std::fs::write(root.join("f.wasm"), b"x").unwrap();
        assert_eq!(b.workload().unwrap(), Workload::Image(root.join("b.img")));
        let (d, b) = bundle(r#"{"process":{"args":["x"]}}"#);
        std::fs::write(d.path().join("rootfs/a.img"), b"x").unwrap();
        std::fs::write(d.path().join("rootfs/c.img"), b"x").unwrap();
        let e = b.workload().unwrap_err().to_string();
        assert!(e.contains("several hostd images (a.img, c.img)"), "{e}");
    }

    #[test]
    fn wasm_and_manifest() {
        let (d, b) = bundle(r#"{"process":{"args":[]}}"#);
        let root = d.path().join("rootfs");
        std::fs::write(root.join("f.wasm"), b"x").unwrap();
        assert_eq!(
            b.workload().unwrap(),
            Workload::Function(root.join("f.wasm"))
        );
        std::fs::write(root.join("fns.toml"), b"x").unwrap();
        assert_eq!(
            b.workload().unwrap(),
            Workload::Function(root.join("fns.toml"))
        );
    }

    #[test]
    fn a_root_file_system_needs_its_program() {
        let (d, b) = bundle(CONFIG);
        let e = b.workload().unwrap_err().to_string();
        assert!(
            e.contains("nothing runnable") && e.contains("`/bin/sh`"),
            "{e}"
        );
        let root = d.path().join("rootfs");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/busybox"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/busybox", root.join("usr/bin/sh")).unwrap();
        assert_eq!(b.workload().unwrap(), Workload::RootFs(root.clone()));
        // Found on PATH too; a symlink never leads out of the root.
        let (d, b) = bundle(r#"{"process":{"args":["passwd"],"env":["PATH=/bin"]}}"#);
        std::fs::create_dir(d.path().join("rootfs/bin")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("rootfs/bin/passwd")).unwrap();
        assert!(b.workload().is_err());
    }
}
