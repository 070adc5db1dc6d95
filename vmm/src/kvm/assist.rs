//! Instruction assist for nested PVM hosts (`kvm_pvm`, see docs/pvm.md).
//!
//! On such a host a non-PVM guest's kernel-mode code runs through KVM's instruction
//! emulator, which gives up (KVM_EXIT_INTERNAL_ERROR, emulation failure) on a few
//! instructions. This module completes the ones a Linux guest needs and lets the vCPU
//! resume. It does nothing unless [`enable`] was called, which the VMM does only when
//! it detected a PVM host: on hardware KVM an emulation failure stays an error.
//!
//! Handled, each measured on this kind of host:
//! - `int3` at CPL0 (Linux's `int3_selftest()` in `alternative_instructions()`, and
//!   `text_poke_bp()`): KVM's emulator only delivers software interrupts in real mode.
//!   Completed by injecting #BP (a trap: RIP after the instruction) through
//!   KVM_SET_VCPU_EVENTS, so the guest's own IDT handler runs.
//! - `fwait` (0x9b) at CPL0 (Linux's `fpu__drop()`, on every exit and exec): waits for
//!   pending x87 exceptions. Completed from the vCPU's x87 status word (KVM_GET_FPU):
//!   with an unmasked exception pending (FSW.ES) it raises #MF, a fault (RIP stays, the
//!   guest's exception-table entry skips it); otherwise it is done, RIP + 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Set once, before vCPUs run, when /dev/kvm is a nested PVM hypervisor.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// How many instructions were completed, by kind (see [`Assist::index`]).
static COUNTS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Turns the assist path on (PVM hosts only).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether the assist path is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// How often each assisted instruction was completed so far, by name.
pub fn counts() -> Vec<(&'static str, u64)> {
    [Assist::Int3, Assist::Fwait]
        .iter()
        .map(|a| (a.name(), COUNTS[a.index()].load(Ordering::Relaxed)))
        .collect()
}

/// What to do for the instruction at RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assist {
    /// `int3` (0xcc) in kernel mode: inject #BP with RIP past the instruction.
    Int3,
    /// `fwait` (0x9b) in kernel mode: #MF if an unmasked x87 exception is pending,
    /// else RIP past the instruction.
    Fwait,
}

impl Assist {
    /// The instruction's name.
    pub fn name(self) -> &'static str {
        match self {
            Assist::Int3 => "int3",
            Assist::Fwait => "fwait",
        }
    }

    fn index(self) -> usize {
        match self {
            Assist::Int3 => 0,
            Assist::Fwait => 1,
        }
    }

    /// Length of the instruction in bytes.
    #[allow(clippy::len_without_is_empty)] // an instruction length, not a collection
    pub fn len(self) -> u64 {
        match self {
            Assist::Int3 | Assist::Fwait => 1,
        }
    }
}

/// Decides from the instruction bytes at RIP (possibly fewer than a full instruction
/// when the page ends) and the CPL whether the instruction is one we complete.
pub fn decode(bytes: &[u8], cpl: u8) -> Option<Assist> {
    match (bytes.first(), cpl) {
        (Some(0xcc), 0) => Some(Assist::Int3),
        (Some(0x9b), 0) => Some(Assist::Fwait),
        _ => None,
    }
}

/// Tries to complete the instruction KVM's emulator failed on. Returns what was done
/// when the vCPU may resume; `None` leaves the exit an error.
pub fn complete(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Option<Assist> {
    if !enabled() {
        return None;
    }
    let mut regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let t = vcpu.translate_gva(regs.rip).ok()?;
    if t.valid == 0 {
        return None;
    }
    // The guest controls RIP: read one byte, checked against guest memory.
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(t.physical_address))
        .ok()?;
    let assist = decode(&b, sregs.cs.dpl)?;
    match assist {
        Assist::Int3 => {
            // A trap: the guest's handler sees RIP after the instruction.
            regs.rip = regs.rip.wrapping_add(assist.len());
            vcpu.set_regs(&regs).ok()?;
            inject(vcpu, 3)?; // #BP
        }
        Assist::Fwait => {
            let fpu = vcpu.get_fpu().ok()?;
            if x87_exception_pending(fpu.fsw) {
                inject(vcpu, 16)?; // #MF, a fault: RIP stays on the fwait
            } else {
                regs.rip = regs.rip.wrapping_add(assist.len());
                vcpu.set_regs(&regs).ok()?;
            }
        }
    }
    COUNTS[assist.index()].fetch_add(1, Ordering::Relaxed);
    tracing::debug!("assisted {} at {:#x}", assist.name(), regs.rip);
    Some(assist)
}

/// FSW.ES: an unmasked x87 exception is pending (the next waiting x87 instruction
/// raises #MF).
fn x87_exception_pending(fsw: u16) -> bool {
    fsw & 0x80 != 0
}

/// Injects exception `nr` (one without an error code) unless an event is already on
/// its way, which would make this one stack on top of it.
fn inject(vcpu: &VcpuFd, nr: u8) -> Option<()> {
    let mut ev = vcpu.get_vcpu_events().ok()?;
    if ev.exception.injected != 0 || ev.exception.pending != 0 {
        return None;
    }
    ev.exception.injected = 1;
    ev.exception.nr = nr;
    ev.exception.has_error_code = 0;
    ev.exception.error_code = 0;
    vcpu.set_vcpu_events(&ev).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_in_kernel_mode_is_assisted() {
        assert_eq!(decode(&[0xcc, 0x90], 0), Some(Assist::Int3));
        assert_eq!(Assist::Int3.len(), 1);
    }

    #[test]
    fn fwait_in_kernel_mode_is_assisted_and_raises_mf_only_when_pending() {
        assert_eq!(decode(&[0x9b, 0x65, 0x48], 0), Some(Assist::Fwait));
        assert_eq!(Assist::Fwait.len(), 1);
        // FNINIT's status word: nothing pending.
        assert!(!x87_exception_pending(0));
        // A masked precision exception sets PE but not ES: nothing to raise.
        assert!(!x87_exception_pending(0x0020));
        // An unmasked invalid operation: IE and ES.
        assert!(x87_exception_pending(0x0081));
    }

    #[test]
    fn user_mode_and_other_instructions_are_not() {
        // int3 at CPL3 is the guest's own business (its kernel gets #BP natively).
        assert_eq!(decode(&[0xcc], 3), None);
        assert_eq!(decode(&[0x9b], 3), None);
        // XRSTOR64, POPCNT: avoided with the PVM command line, never completed here.
        assert_eq!(decode(&[0x48, 0x0f, 0xae, 0x2f], 0), None);
        assert_eq!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7], 0), None);
        assert_eq!(decode(&[], 0), None);
    }

    #[test]
    fn off_unless_enabled() {
        // Unit tests never call enable(): the path stays off, as on hardware KVM.
        assert!(!enabled() || cfg!(not(test)));
    }
}
