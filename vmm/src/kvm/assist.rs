//! Instruction assist for nested PVM hosts (prototype).

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Set once, before vCPUs run, when /dev/kvm is a nested PVM hypervisor.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the assist path on (PVM hosts only).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Tries to complete the instruction KVM's emulator failed on. Returns a name for it
/// when the vCPU may resume.
pub fn complete(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Option<&'static str> {
    if !ENABLED.load(Ordering::SeqCst) {
        return None;
    }
    let mut regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let t = vcpu.translate_gva(regs.rip).ok()?;
    if t.valid == 0 {
        return None;
    }
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(t.physical_address))
        .ok()?;
    if b[0] == 0xcc && sregs.cs.dpl == 0 {
        let mut ev = vcpu.get_vcpu_events().ok()?;
        ev.exception.injected = 1;
        ev.exception.nr = 3;
        ev.exception.has_error_code = 0;
        regs.rip += 1;
        vcpu.set_regs(&regs).ok()?;
        vcpu.set_vcpu_events(&ev).ok()?;
        return Some("int3");
    }
    None
}
