//! Who a jailed process is on the host: an unprivileged uid and gid of its own, and a
//! life tied to the process that started it.
//!
//! Why a dedicated uid rather than a user namespace: the backends and the VMM need
//! nothing a user namespace would give them (they set up their namespaces and mounts as
//! root, before giving root up), and with a plain uid the host's view is the whole
//! truth: `/proc/<pid>/status` shows the uid the kernel checks, with no mapping to
//! reason about. Each jailed process gets its own id, so two of them (two VMs, or two
//! backends of one VM) cannot signal or trace each other, and the per-uid
//! `RLIMIT_NPROC` counts exactly one process's threads.

use super::JailError;

/// First id of hostd's jail range. 0x7000_0000 (1879048192) lies above every range
/// that distributions hand out (regular users below 60000, systemd's dynamic users
/// 61184-65519, systemd-nspawn's container ranges up to 0x6FFF_FFFF) and below 2^31,
/// where some software misreads ids as negative.
pub const JAIL_ID_BASE: u32 = 0x7000_0000;

/// Ids per VM: slot 0 for the VMM or QEMU, slots 1.. for the device backends.
pub const IDS_PER_VM: u32 = 16;

/// Highest pid the kernel hands out (`/proc/sys/kernel/pid_max` is at most 2^22).
const PID_MAX: u32 = 1 << 22;

/// The uid (= gid) for `slot` of the VM whose `hostd run` process has host pid `vm_pid`:
/// unique among the VMs running at the same time (pids are), and never 0. Slots past
/// the last one share it.
pub fn jail_id(vm_pid: u32, slot: u32) -> u32 {
    JAIL_ID_BASE + (vm_pid % PID_MAX) * IDS_PER_VM + slot.min(IDS_PER_VM - 1)
}

fn check(what: &str, r: libc::c_int) -> Result<(), JailError> {
    if r != 0 {
        return Err(JailError(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Drops every supplementary group, then becomes `id` as real, effective and saved uid
/// and gid. Needs CAP_SETUID/CAP_SETGID (call before the capabilities go); without
/// SECBIT_KEEP_CAPS the kernel clears the permitted and effective sets as it does so.
/// Refuses id 0.
pub fn become_unprivileged(id: u32) -> Result<(), JailError> {
    if id == 0 {
        return Err(JailError(
            "refusing to run a jailed process as uid 0".into(),
        ));
    }
    // SAFETY: an empty group list (null pointer with length 0) is valid.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer arguments.
    check("setresgid", unsafe { libc::setresgid(id, id, id) })?;
    // SAFETY: plain integer arguments.
    check("setresuid", unsafe { libc::setresuid(id, id, id) })?;
    Ok(())
}

/// Makes the kernel SIGKILL the calling process when the thread that created it exits,
/// then checks that `parent` (the pid it was started by) is still its parent: if that
/// parent died before the request was in place, nothing would ever deliver the signal,
/// so the process ends itself instead (exit 1). The request is cleared by any change of
/// uid or gid: call it again after [`become_unprivileged`].
pub fn die_with_parent(parent: libc::pid_t) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments has no memory effects.
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: _exit is always safe; nothing of ours is half-written.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// Marks the process not dumpable: no core dump, and no ptrace or `/proc/<pid>/mem`
/// access by anyone without CAP_SYS_PTRACE, the same uid included.
pub fn not_dumpable() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments has no memory effects.
    check("PR_SET_DUMPABLE", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_ids_are_never_root_and_differ_between_slots_and_vms() {
        assert!(jail_id(0, 0) >= JAIL_ID_BASE);
        assert_ne!(jail_id(100, 0), jail_id(100, 1));
        assert_ne!(jail_id(100, 1), jail_id(101, 1));
        assert_eq!(jail_id(100, 99), jail_id(100, IDS_PER_VM - 1));
        assert!(jail_id(PID_MAX - 1, IDS_PER_VM - 1) < 0x8000_0000);
    }
}
