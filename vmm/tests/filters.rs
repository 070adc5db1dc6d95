//! Each seccomp filter denies what its thread kind does not need: the offending
//! process dies with SIGSYS.

use hostd_devices::jail::seccomp::probes::{mmap_exec, mprotect_exec, new_process};
use hostd_devices::vhost_user::backend_filter;
use hostd_devices::vhost_user::block::BLOCK_SYSCALLS;
use hostd_devices::vhost_user::net::{net_filter, tap::TUNSETOFFLOAD};
use hostd_devices::vhost_user::rng::RNG_SYSCALLS;
use hostd_devices::vhost_user::vsock::VSOCK_SYSCALLS;
use hostd_vmm::jail::{self, child_killed_by, child_status};
use hostd_vmm::kvm::control_filter;
use hostd_vmm::kvm::vcpu::vcpu_filter;

fn open_file() {
    // SAFETY: a raw syscall with a valid NUL-terminated path.
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/etc/passwd".as_ptr(),
            libc::O_RDONLY,
        )
    };
}

fn any_ioctl() {
    // SAFETY: a raw syscall with integer arguments on a bad fd.
    unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae80u64, 0) };
}

fn socket() {
    // SAFETY: a raw syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn getpid() {
    // SAFETY: a raw syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_getpid) };
}

/// KVM_CREATE_VM: not a vCPU's business.
fn create_vm_ioctl() {
    // SAFETY: a raw syscall with integer arguments on a bad fd.
    unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae01u64, 0) };
}

fn execve() {
    // SAFETY: a raw syscall with a valid path and null argv/envp.
    unsafe { libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0) };
}

fn mmap_data() {
    // SAFETY: a fresh anonymous read-write mapping, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        // SAFETY: _exit is always sound.
        unsafe { libc::_exit(3) };
    }
    // SAFETY: the mapping is ours, writable and at least one byte long.
    unsafe { *(p as *mut u8) = 1 };
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(p, 4096) };
}

/// A thread through the standard library: the C library tries clone3 first (the filter
/// answers ENOSYS), then clone with CLONE_THREAD.
fn spawn_thread() {
    let ok = std::thread::Builder::new()
        .name("filtered".into())
        .spawn(|| 7)
        .ok()
        .and_then(|t| t.join().ok())
        == Some(7);
    if !ok {
        // SAFETY: _exit is always sound.
        unsafe { libc::_exit(3) };
    }
}

fn clone3_is_enosys() {
    // SAFETY: clone3 with a null argument: the filter answers before the kernel reads it.
    let r = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
    let e = std::io::Error::last_os_error().raw_os_error();
    if r != -1 || e != Some(libc::ENOSYS) {
        // SAFETY: _exit is always sound.
        unsafe { libc::_exit(3) };
    }
}

fn prctl_dumpable() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
}

fn prctl_seccomp() {
    // SAFETY: prctl with integer arguments (a strict-mode request).
    unsafe { libc::prctl(libc::PR_SET_SECCOMP, 1, 0, 0, 0) };
}

fn sleep_briefly() {
    std::thread::sleep(std::time::Duration::from_millis(1));
}

/// A thread started under the filter (and inheriting it) that adds an interrupt
/// forwarder's filter on top, then does only what a forwarder does: exits 0.
fn stacked_forwarder() {
    forwarder_thread(|| {});
}

/// The same thread, then sleeping: the control filter allows that, the forwarder's
/// does not, and the stack holds the thread to both.
fn stacked_forwarder_sleeps() {
    forwarder_thread(sleep_briefly);
}

fn forwarder_thread(then: fn()) {
    let ok = std::thread::spawn(move || {
        let prog = jail::filter(jail::COMMON_SYSCALLS, &[]).unwrap_or_else(|e| panic!("{e}"));
        jail::install_stacked(&prog).is_ok() && {
            then();
            true
        }
    })
    .join()
    .unwrap_or(false);
    if !ok {
        // SAFETY: _exit is always sound.
        unsafe { libc::_exit(3) };
    }
}

#[test]
fn the_control_filter_starts_threads_that_can_only_narrow_it() {
    // The device threads start under it once the guest runs (kvm::start_device_threads).
    let prog = control_filter().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(child_status(&prog, spawn_thread), Ok(0));
    assert_eq!(child_status(&prog, stacked_forwarder), Ok(0));
    assert_eq!(
        child_killed_by(&prog, stacked_forwarder_sleeps),
        Some(libc::SIGSYS)
    );
    // Threads only: no process, no executable memory, no other prctl.
    assert_eq!(child_killed_by(&prog, new_process), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, mmap_exec), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, mprotect_exec), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, prctl_dumpable), Some(libc::SIGSYS));
}

#[test]
fn control_filter_denies_files_ioctls_and_exec() {
    let prog = control_filter().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(child_killed_by(&prog, open_file), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, any_ioctl), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, execve), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, sleep_briefly), None);
}

#[test]
fn vcpu_filter_denies_opening_files_and_sockets() {
    let prog = vcpu_filter().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(child_killed_by(&prog, open_file), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, socket), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, create_vm_ioctl), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, getpid), None);
}

#[test]
fn the_qemu_parent_filter_denies_files_sockets_exec_and_processes() {
    let prog = hostd_vmm::qemu::parent_filter().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(child_killed_by(&prog, open_file), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, socket), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, execve), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, new_process), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, any_ioctl), Some(libc::SIGSYS));
    assert_eq!(child_status(&prog, spawn_thread), Ok(0));
    assert_eq!(child_status(&prog, sleep_briefly), Ok(0));
}

#[test]
fn no_filter_lets_code_be_mapped() {
    let forwarder = jail::filter(jail::COMMON_SYSCALLS, &[]).unwrap_or_else(|e| panic!("{e}"));
    let progs = [
        (
            "control",
            control_filter().unwrap_or_else(|e| panic!("{e}")),
        ),
        ("vcpu", vcpu_filter().unwrap_or_else(|e| panic!("{e}"))),
        ("forwarder", forwarder),
        (
            "qemu parent",
            hostd_vmm::qemu::parent_filter().unwrap_or_else(|e| panic!("{e}")),
        ),
    ];
    for (name, prog) in progs.iter().chain(backend_filters().iter()) {
        assert_eq!(
            child_killed_by(prog, mmap_exec),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(child_status(prog, mmap_data), Ok(0), "{name}");
    }
}

fn backend_filters() -> Vec<(&'static str, seccompiler::BpfProgram)> {
    [
        ("rng backend", RNG_SYSCALLS),
        ("block backend", BLOCK_SYSCALLS),
        ("vsock backend", VSOCK_SYSCALLS),
    ]
    .into_iter()
    .map(|(name, extra)| {
        (
            name,
            backend_filter(extra).unwrap_or_else(|e| panic!("{e}")),
        )
    })
    .chain([(
        "net backend",
        net_filter().unwrap_or_else(|e| panic!("{e}")),
    )])
    .collect()
}

/// TUNSETOFFLOAD: the net backend's (with TUNSETVNETHDRSZ) only ioctl.
fn tun_set_offload() {
    // SAFETY: a raw syscall with integer arguments on a bad fd.
    unsafe { libc::syscall(libc::SYS_ioctl, -1, TUNSETOFFLOAD, 0) };
}

#[test]
fn the_net_backend_filter_allows_its_two_tap_ioctls_and_no_other() {
    let prog = net_filter().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(child_status(&prog, tun_set_offload), Ok(0));
    assert_eq!(child_killed_by(&prog, any_ioctl), Some(libc::SIGSYS));
    assert_eq!(child_killed_by(&prog, create_vm_ioctl), Some(libc::SIGSYS));
}

#[test]
fn backend_filters_allow_threads_but_no_process_no_code_and_few_prctls() {
    for (name, prog) in backend_filters() {
        assert_eq!(
            child_killed_by(&prog, new_process),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(
            child_killed_by(&prog, mmap_exec),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(
            child_killed_by(&prog, mprotect_exec),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(
            child_killed_by(&prog, prctl_dumpable),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(
            child_killed_by(&prog, prctl_seccomp),
            Some(libc::SIGSYS),
            "{name}"
        );
        assert_eq!(child_killed_by(&prog, socket), Some(libc::SIGSYS), "{name}");
        assert_eq!(child_status(&prog, spawn_thread), Ok(0), "{name}");
        assert_eq!(child_status(&prog, clone3_is_enosys), Ok(0), "{name}");
    }
}
