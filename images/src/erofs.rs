//! The read-only root file system: a [`Tree`] packed as an erofs image with
//! `mkfs.erofs` (Debian's erofs-utils).
//!
//! Reproducible: the tree is staged into a fresh temporary directory with exactly the
//! owners and modes it records (nothing from the host, the umask or the staging order
//! survives), and `mkfs.erofs` runs with a fixed timestamp for every inode and for the
//! superblock (`-T0`), a fixed UUID (`-U`), and extended attributes off (`-x-1`, so
//! whatever labels the staging directory picks up on the build host stay out).
//! mkfs.erofs orders directory entries by name itself. Data is stored uncompressed, so
//! every 4 KiB block of the result can be verified on its own
//! ([`crate::verity`]). The result is padded to a multiple of 4 KiB.
//!
//! Owners: when every entry has the same owner (the usual case: all root), they are
//! set with `--force-uid`/`--force-gid` and no `chown` is needed, so this works without
//! root. Otherwise each entry is `chown`ed while staging, which needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rootfs::{Kind, Node, Tree};
use crate::verity::BLOCK_SIZE;

/// The UUID every hostd erofs root gets (a fixed one: the UUID is part of the bytes).
pub const FS_UUID: &str = "686f7374-6400-4000-8000-726f6f746673";

/// The mkfs.erofs binary (override with HOSTD_MKFS_EROFS).
pub fn mkfs_binary() -> String {
    std::env::var("HOSTD_MKFS_EROFS").unwrap_or_else(|_| "mkfs.erofs".into())
}

/// Why the erofs root could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// Staging the tree into the temporary directory failed.
    #[error("cannot stage {path} for the erofs root{hint}")]
    Stage {
        /// The path in the guest.
        path: String,
        /// The I/O error.
        source: std::io::Error,
        /// What to do about it, if anything specific.
        hint: &'static str,
    },
    /// The tree holds something erofs roots do not carry.
    #[error(
        "{path}: device nodes are not supported in an erofs root (the guest's /dev is a devtmpfs)"
    )]
    Unsupported {
        /// The path in the guest.
        path: String,
    },
    /// mkfs.erofs could not be run or failed.
    #[error("{message}")]
    Mkfs {
        /// What happened and what to do.
        message: String,
    },
}

fn stage_err<'a>(
    path: &'a str,
    hint: &'static str,
) -> impl FnOnce(std::io::Error) -> ErofsError + 'a {
    move |source| ErofsError::Stage {
        path: path.to_string(),
        source,
        hint,
    }
}

const CHOWN_HINT: &str =
    " (entries with different owners need root to stage; run `hostd build` as root)";

/// Staging on /dev/shm (tmpfs) when it can hold at most this much.
const SHM_STAGING_MAX: u64 = 1 << 30;

/// Where the root is staged for mkfs.erofs: `$TMPDIR` when set; else /dev/shm when it
/// is there and has room for twice the tree (files and the packed image), up to
/// [`SHM_STAGING_MAX`]; else the system's temporary directory. Measured on the python3
/// image (about 5,000 entries, 70 MiB): staging on ext4 spends most of the build's
/// system time allocating and freeing inodes and blocks; tmpfs does not. The bytes
/// mkfs.erofs writes do not depend on where the tree was staged (entries sorted, no
/// timestamps, no extended attributes).
fn staging_dir(tree: &Tree) -> PathBuf {
    if std::env::var_os("TMPDIR").is_some() {
        return std::env::temp_dir();
    }
    let bytes: u64 = tree
        .iter()
        .map(|(_, n)| match &n.kind {
            Kind::File(d) => d.len() as u64,
            _ => 0,
        })
        .sum();
    let shm = Path::new("/dev/shm");
    if bytes <= SHM_STAGING_MAX && free_bytes(shm).is_some_and(|free| free / 2 > bytes) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// Bytes an unprivileged writer can still put on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid out-value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail.saturating_mul(st.f_frsize))
}

/// Packs `tree` as an erofs image, padded to a multiple of 4 KiB.
pub fn build(tree: &Tree) -> Result<Vec<u8>, ErofsError> {
    let (tmp, _scratch) = crate::scratch::create(
        || {
            tempfile::Builder::new()
                .prefix("hostd-rootfs-")
                .tempdir_in(staging_dir(tree))
        },
        |t| t.path().to_path_buf(),
    )
    .map_err(stage_err("/", " (is TMPDIR writable?)"))?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).map_err(stage_err("/", ""))?;

    // One owner for everything: let mkfs.erofs set it, no chown needed.
    let mut owners = tree.iter().map(|(_, n)| (n.uid, n.gid));
    let first = owners.next().unwrap_or((0, 0));
    let single_owner = owners.all(|o| o == first).then_some(first);
    let chown = single_owner.is_none();

    let mut dirs: Vec<(&str, PathBuf, &Node)> = Vec::new();
    for (path, node) in tree.iter() {
        let host = root.join(&path[1..]);
        match &node.kind {
            Kind::Dir => {
                std::fs::create_dir(&host).map_err(stage_err(path, ""))?;
                // Modes, owners of directories last: a 0555 directory must still
                // take its entries.
                dirs.push((path, host, node));
            }
            Kind::File(data) => {
                std::fs::write(&host, data).map_err(stage_err(path, ""))?;
                set_owner_and_mode(path, &host, node, chown)?;
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &host).map_err(stage_err(path, ""))?;
                if chown {
                    std::os::unix::fs::lchown(&host, Some(node.uid), Some(node.gid))
                        .map_err(stage_err(path, CHOWN_HINT))?;
                }
            }
            Kind::CharDev(..) => {
                return Err(ErofsError::Unsupported {
                    path: path.to_string(),
                })
            }
        }
    }
    for (path, host, node) in dirs.iter().rev() {
        set_owner_and_mode(path, host, node, chown)?;
    }
    // The root directory itself: 0755, root-owned.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .map_err(stage_err("/", ""))?;
    if chown {
        std::os::unix::fs::chown(&root, Some(0), Some(0)).map_err(stage_err("/", CHOWN_HINT))?;
    }

    let out = tmp.path().join("rootfs.erofs");
    let mut cmd = Command::new(mkfs_binary());
    cmd.args(["--quiet", "-x-1", "-T0"])
        .arg(format!("-U{FS_UUID}"));
    if let Some((uid, gid)) = single_owner {
        cmd.arg(format!("--force-uid={uid}"))
            .arg(format!("--force-gid={gid}"));
    }
    cmd.arg(&out).arg(&root);
    run_mkfs(&mut cmd)?;
    let mut bytes = std::fs::read(&out).map_err(|e| ErofsError::Mkfs {
        message: format!("cannot read what {} wrote: {e}", mkfs_binary()),
    })?;
    if bytes.is_empty() {
        return Err(ErofsError::Mkfs {
            message: format!("{} wrote an empty file", mkfs_binary()),
        });
    }
    bytes.resize(
        bytes.len().div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize,
        0,
    );
    Ok(bytes)
}

fn set_owner_and_mode(path: &str, host: &Path, node: &Node, chown: bool) -> Result<(), ErofsError> {
    if chown {
        std::os::unix::fs::chown(host, Some(node.uid), Some(node.gid))
            .map_err(stage_err(path, CHOWN_HINT))?;
    }
    // After chown, which clears set-id bits.
    std::fs::set_permissions(host, std::fs::Permissions::from_mode(node.mode & 0o7777))
        .map_err(stage_err(path, ""))
}

fn run_mkfs(cmd: &mut Command) -> Result<(), ErofsError> {
    let bin = mkfs_binary();
    let out = cmd.output().map_err(|e| ErofsError::Mkfs {
        message: format!(
            "cannot run {bin}: {e} (install erofs-utils: `apt-get install erofs-utils`, or set HOSTD_MKFS_EROFS)"
        ),
    })?;
    if !out.status.success() {
        return Err(ErofsError::Mkfs {
            message: format!(
                "{bin} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfs_available() -> bool {
        Command::new(mkfs_binary()).arg("--help").output().is_ok()
    }

    fn node(kind: Kind, mode: u32) -> Node {
        Node {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn same_tree_in_any_insertion_order_gives_the_same_bytes() {
        if !mkfs_available() {
            eprintln!("SKIP: mkfs.erofs is missing (apt-get install erofs-utils)");
            return;
        }
        let entries = [
            (
                "/bin/tool",
                node(Kind::File(b"#!/bin/sh\n".to_vec()), 0o4755),
            ),
            ("/etc/conf", node(Kind::File(vec![b'x'; 10_000]), 0o640)),
            ("/bin/sh", node(Kind::Symlink("tool".into()), 0o777)),
            ("/ro", node(Kind::Dir, 0o555)),
            ("/ro/inside", node(Kind::File(b"y".to_vec()), 0o444)),
        ];
        let mut a = Tree::new();
        for (p, n) in entries.iter().cloned() {
            a.insert(p, n);
        }
        // (Directories first: a directory inserted after its entries keeps the
        // default 0755 the entries gave it.)
        let mut b = Tree::new();
        b.insert("/ro", node(Kind::Dir, 0o555));
        for (p, n) in entries.iter().rev().cloned() {
            b.insert(p, n);
        }
        assert_eq!(a.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
        let (ia, ib) = match (build(&a), build(&b)) {
            (Ok(ia), Ok(ib)) => (ia, ib),
            (ra, rb) => panic!("{ra:?} {rb:?}"),
        };
        assert!(ia == ib, "erofs images differ");
        assert_eq!(ia.len() % BLOCK_SIZE as usize, 0);
        // erofs superblock magic at 1024.
        assert_eq!(ia.get(1024..1028), Some(&[0xe2, 0xe1, 0xf5, 0xe0][..]));
    }

    #[test]
    fn device_nodes_are_refused() {
        let mut t = Tree::new();
        t.insert("/dev/console", node(Kind::CharDev(5, 1), 0o600));
        assert!(matches!(build(&t), Err(ErofsError::Unsupported { .. })));
    }
}
