//! Persistent volumes: one ext4 file per volume name in hostd's state directory,
//! created with its declared size (sparse) and formatted the first time it is used.
//! The same name is the same data, across reboots and new versions of an image.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a volume could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("volume `{name}`: {message}")]
pub struct VolumeError {
    /// Volume name.
    pub name: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// hostd's state directory: $HOSTD_STATE, else ~/.local/share/hostd.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOSTD_STATE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/hostd")
}

/// The file backing volume `name` under `state`.
pub fn volume_path(state: &Path, name: &str) -> PathBuf {
    state.join("volumes").join(format!("{name}.ext4"))
}

fn c_path(p: &Path) -> Result<std::ffi::CString, VolumeError> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| VolumeError {
        name: p.display().to_string(),
        message: "path holds a NUL byte".into(),
    })
}

/// Refuses a name that is not a plain volume name: names come from image manifests,
/// which are untrusted, and become host file names.
fn check_name(name: &str) -> Result<(), VolumeError> {
    if hostd_images::names::is_plain_name(name) {
        return Ok(());
    }
    Err(VolumeError {
        name: name.to_string(),
        message: "not a volume name (1-64 letters, digits, `-`, `_`); the image is refused".into(),
    })
}

/// An exclusive hold on a volume for one VM: while it lives, every other `hostd run`
/// that wants the same volume is refused. Released when dropped or when the process
/// ends, however it ends (an `flock` on `NAME.lock` beside the volume).
#[derive(Debug)]
pub struct VolumeLock {
    file: std::fs::File,
}

/// The fds of the locks this process holds: the VM's process, forked from `hostd run`,
/// closes its copies at once ([`close_inherited_locks`]); only `hostd run` holds them.
static LOCK_FDS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

impl Drop for VolumeLock {
    fn drop(&mut self) {
        if let Ok(mut fds) = LOCK_FDS.lock() {
            fds.retain(|fd| *fd != self.file.as_raw_fd());
        }
    }
}

/// In a child just forked from the process holding volume locks: closes the child's
/// copies of their fds (the parent's hold on each lock stays). Call only in a
/// single-threaded child, which then never drops the parent's [`VolumeLock`]s.
pub fn close_inherited_locks() {
    if let Ok(mut fds) = LOCK_FDS.lock() {
        for fd in fds.drain(..) {
            // SAFETY: closing our copy of an fd the (single-threaded) child inherited
            // and will not use or close again.
            unsafe { libc::close(fd) };
        }
    }
}

/// Takes the volume's lock for `holder` (a description such as `VM hello (hostd pid
/// 123)`), or says who holds it.
pub fn lock(state: &Path, name: &str, holder: &str) -> Result<VolumeLock, VolumeError> {
    use std::io::{Read, Seek, Write};
    check_name(name)?;
    let err = |message: String| VolumeError {
        name: name.to_string(),
        message,
    };
    let dir = state.join("volumes");
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("{name}.lock"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut who = String::new();
            let _ = (&file).take(256).read_to_string(&mut who);
            let who = who.trim();
            return Err(err(format!(
                "in use by {}; a volume is attached to one VM at a time (stop that VM first)",
                if who.is_empty() { "another VM" } else { who }
            )));
        }
        return Err(err(format!("cannot lock {}: {e}", path.display())));
    }
    let _ = file
        .set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(holder.as_bytes()));
    if let Ok(mut fds) = LOCK_FDS.lock() {
        fds.push(file.as_raw_fd());
    }
    Ok(VolumeLock { file })
}

/// Returns the volume's file, creating and formatting it on first use. An existing
/// volume is used as it is (it is never shrunk or reformatted; a larger declared size
/// is reported, not applied).
pub fn ensure(state: &Path, name: &str, size_mib: u32) -> Result<PathBuf, VolumeError> {
    check_name(name)?;
    if !hostd_images::names::VOLUME_MIB.contains(&size_mib) {
        return Err(VolumeError {
            name: name.to_string(),
            message: format!("{size_mib} MiB is out of range (8 MiB to 1 TiB)"),
        });
    }
    let err = |message: String| VolumeError {
        name: name.to_string(),
        message,
    };
    let path = volume_path(state, name);
    if let Ok(meta) = std::fs::metadata(&path) {
        if !meta.is_file() {
            return Err(err(format!(
                "{} is {}, not a regular file",
                path.display(),
                hostd_images::input::kind_name(meta.file_type())
            )));
        }
        let want = u64::from(size_mib) << 20;
        if meta.len() < want {
            tracing::warn!(
                "volume {name} is {} MiB, the image declares {size_mib} MiB; keeping its size",
                meta.len() >> 20
            );
        }
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(state);
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    // Built as an unnamed file (O_TMPFILE) and linked into place only when complete: a
    // failure, a signal or `kill -9` at any point leaves nothing behind.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|e| {
            err(format!(
                "cannot create a volume file in {}: {e}",
                dir.display()
            ))
        })?;
    file.set_len(u64::from(size_mib) << 20)
        .map_err(|e| err(format!("cannot size the new volume: {e}")))?;
    // mkfs opens it through our fd's /proc entry.
    let tmp = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ));
    tracing::info!(
        "creating volume {name} ({size_mib} MiB) at {}",
        path.display()
    );
    let out = Command::new("mkfs.ext4")
        // 4 KiB blocks: the block backend announces a 4 KiB logical block size.
        .args(["-q", "-F", "-b", "4096", "-L"])
        .arg(format!("vol-{name}"))
        // Inode tables and the journal are initialised lazily (by the guest's kernel),
        // so a large volume costs the host no more than the metadata it really uses.
        .args([
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
            "--",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| {
            err(format!(
                "cannot run mkfs.ext4: {e} (apt-get install e2fsprogs)"
            ))
        })?;
    if !out.status.success() {
        return Err(err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let from = c_path(&tmp)?;
    let to = c_path(&path)?;
    // SAFETY: two valid NUL-terminated paths; AT_SYMLINK_FOLLOW links the file the
    // /proc magic link names (our unnamed volume), not the link itself.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        return Err(err(format!(
            "cannot link the new volume into place at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_held_by_one_vm_at_a_time_and_bad_names_never_reach_the_host() {
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = lock(state.path(), "data", "VM one (hostd pid 1)");
        assert!(first.is_ok());
        let second = lock(state.path(), "data", "VM two (hostd pid 2)")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            second.contains("in use by VM one (hostd pid 1)"),
            "{second}"
        );
        drop(first);
        // Free once its holder is gone. (A child another test thread forks meanwhile
        // inherits the lock's fd and holds it until it exits: wait for that.)
        let start = std::time::Instant::now();
        while lock(state.path(), "data", "VM two (hostd pid 2)").is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "the volume stayed locked after its holder was dropped"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for bad in ["../x", "/etc/passwd", "-x", "", "a/b"] {
            assert!(lock(state.path(), bad, "t").is_err(), "{bad}");
            assert!(ensure(state.path(), bad, 16).is_err(), "{bad}");
        }
        assert!(ensure(state.path(), "huge", 4_096_000).is_err());
    }

    #[test]
    fn volumes_are_created_once_and_kept() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("SKIP: mkfs.ext4 missing (apt-get install e2fsprogs)");
            return;
        }
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = ensure(state.path(), "data", 16).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
            16 << 20
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"marker", 15 << 20))
            .unwrap_or_else(|e| panic!("{e}"));
        let again = ensure(state.path(), "data", 32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, p);
        let mut buf = [0u8; 6];
        std::fs::File::open(&p)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 15 << 20))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf, b"marker", "an existing volume is never reformatted");
    }
}
