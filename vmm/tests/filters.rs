//! Each seccomp filter denies what its thread kind does not need: the offending
//! process dies with SIGSYS.

use hostd_vmm::jail::child_killed_by;
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

fn sleep_briefly() {
    std::thread::sleep(std::time::Duration::from_millis(1));
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
