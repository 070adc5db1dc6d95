//! New namespaces and an empty root: after [`enter_empty_root`] the process sees a
//! read-only tmpfs with nothing in it, and no host mounts to climb back to.

use std::ffi::CString;

use super::JailError;

fn check(what: &str, r: libc::c_int) -> Result<(), JailError> {
    if r != 0 {
        return Err(JailError(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn c(s: &str) -> Result<CString, JailError> {
    CString::new(s).map_err(|_| JailError(format!("NUL in {s:?}")))
}

/// unshare(mount, IPC, UTS and — unless `keep_net` — network namespaces), then
/// pivot_root into a fresh empty tmpfs, drop the old root and make `/` read-only.
pub fn enter_empty_root(keep_net: bool) -> Result<(), JailError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !keep_net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with namespace flags has no memory effects.
    check("unshare", unsafe { libc::unshare(flags) })?;
    let none = c("none")?;
    let root = c("/")?;
    // Nothing we mount from here on propagates back to the host.
    // SAFETY: valid NUL-terminated strings; null data is allowed.
    check("make / private", unsafe {
        libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // The new root is a tmpfs mounted over /tmp inside our private mount namespace: no
    // directory is created on the host, and the host's /tmp is untouched.
    let dir = std::path::PathBuf::from("/tmp");
    let new_root = c(&dir.to_string_lossy())?;
    let tmpfs = c("tmpfs")?;
    let opts = c("size=16k,mode=0755")?;
    // SAFETY: valid NUL-terminated strings.
    check("mount tmpfs", unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            new_root.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    })?;
    let old = dir.join("old");
    std::fs::create_dir(&old).map_err(|e| JailError(format!("mkdir {}: {e}", old.display())))?;
    let old_c = c(&old.to_string_lossy())?;
    // SAFETY: pivot_root via syscall with two valid paths.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), old_c.as_ptr())
    } as libc::c_int)?;
    std::env::set_current_dir("/").map_err(|e| JailError(format!("chdir /: {e}")))?;
    let old_in_new = c("/old")?;
    // SAFETY: a valid path; MNT_DETACH lazily drops the whole old tree.
    check("umount old root", unsafe {
        libc::umount2(old_in_new.as_ptr(), libc::MNT_DETACH)
    })?;
    std::fs::remove_dir("/old").map_err(|e| JailError(format!("rmdir /old: {e}")))?;
    // SAFETY: remount of the new root read-only; valid strings.
    check("remount / read-only", unsafe {
        libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })?;
    Ok(())
}
