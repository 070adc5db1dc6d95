//! Facts about the host: can its KVM run a Linux guest.

use std::path::Path;

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// No usable /dev/kvm.
    Absent,
    /// Hardware-assisted KVM.
    Hardware,
    /// A nested PVM hypervisor (kvm_pvm): guest kernel code runs through KVM's
    /// instruction emulator, about a thousand times slower, and stock kernels stop on
    /// instructions it lacks. See DESIGN.md, "How this machine behaves".
    Pvm,
}

/// Detects what /dev/kvm is.
pub fn kvm_kind() -> KvmKind {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        KvmKind::Absent
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}
