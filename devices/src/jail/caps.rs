//! Capabilities and no_new_privs.

use super::JailError;

/// Empties the capability bounding set, so that nothing executed later can regain a
/// capability. Needs CAP_SETPCAP: call it before giving up root (without it, it stops
/// at the first refusal; the other sets are emptied by [`drop_capabilities`] either
/// way).
///
/// One `prctl` per capability the kernel knows, no more: the loop ends at the first
/// number past the last capability (EINVAL), as each call is a system call, and these
/// are not free on a nested hypervisor (a jailed process made 128 of them before).
pub fn drop_bounding_set() {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // EINVAL: past the kernel's last capability; EPERM: no CAP_SETPCAP, and
            // every later number would be refused alike.
            break;
        }
    }
}

/// Drops every capability of the calling thread (threads started later inherit the
/// empty sets) and sets no_new_privs.
pub fn drop_capabilities() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError(format!(
            "no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    drop_bounding_set();
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    }; // _LINUX_CAPABILITY_VERSION_3
    let data = [Data::default(); 2];
    // SAFETY: header and data are valid, correctly laid out for capset v3.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if r != 0 {
        return Err(JailError(format!(
            "capset: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
