//! vCPU setup for PVH entry and the exit loop. Every exit is handled explicitly; an
//! exit the VMM cannot handle stops the VM with an error naming the exit, RIP and the
//! instruction bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use hostd_devices::bus::Bus;
use kvm_bindings::{kvm_segment, CpuId};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::boot::Entry;
use super::cpuid::{self, CpuTemplate};
use crate::jail;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit code to the exit port.
    ExitCode(u8),
    /// The guest reset or triple-faulted (`reboot=t`, or a crash).
    Shutdown,
    /// The VMM stopped it (signal, timeout).
    Stopped,
    /// An exit the VMM cannot handle.
    Error(String),
}

/// What a vCPU thread shares with the control thread.
#[derive(Debug)]
pub struct Shared {
    /// The port-I/O bus.
    pub pio: Bus,
    /// The MMIO bus.
    pub mmio: Bus,
    /// Set when the VM must stop; vCPU threads check it after every exit.
    pub stop: AtomicBool,
    /// The first reason the VM stopped.
    pub reason: Mutex<Option<StopReason>>,
    /// When vCPU 0 first entered KVM_RUN.
    pub first_run: Mutex<Option<Instant>>,
    /// Guest memory, to read instruction bytes for error reports.
    pub mem: GuestMemoryMmap,
    /// Every vCPU thread and the control thread meet here once their seccomp filters
    /// are installed; only then does guest code run.
    pub start: Barrier,
    /// The guest profile, when asked for (`HOSTD_GUEST_PROFILE`, profile.rs).
    pub profile: Option<super::profile::Profile>,
    /// Wakes the control thread: the VM must stop, or a device left it work.
    pub wake: Arc<EventFd>,
    /// Pausing for a snapshot, when this run may take one (snapshot.rs).
    pub snapshot: Option<Arc<super::snapshot::Pause>>,
    /// Writes KVM coalesced instead of exiting (coalesced.rs), played back before any
    /// exit is handled.
    pub coalesced: Option<super::coalesced::Ring>,
}

impl Shared {
    /// Plays back the coalesced writes, if any, onto the buses.
    pub fn drain_coalesced(&self) {
        if let Some(ring) = &self.coalesced {
            ring.drain(&self.pio, &self.mmio);
        }
    }

    /// Records `reason` (the first one wins) and asks every vCPU to stop.
    pub fn stop_with(&self, reason: StopReason) {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }
}

/// ioctls a running vCPU thread issues.
const VCPU_IOCTLS: &[u64] = &[
    0xae80,      // KVM_RUN
    0x8090_ae81, // KVM_GET_REGS
    0x8138_ae83, // KVM_GET_SREGS
    0xc018_ae85, // KVM_TRANSLATE
    // Instruction assist on nested PVM hosts (assist.rs): resume past a completed
    // instruction and inject the exception it raises.
    0x4090_ae82, // KVM_SET_REGS
    0x8040_ae9f, // KVM_GET_VCPU_EVENTS
    0x4040_aea0, // KVM_SET_VCPU_EVENTS
    0x81a0_ae8c, // KVM_GET_FPU (fwait: is an x87 exception pending?)
    // The console's transmit register coalesced or not, as the guest sets the UART up
    // (coalesced.rs).
    super::coalesced::KVM_REGISTER_COALESCED_MMIO,
    super::coalesced::KVM_UNREGISTER_COALESCED_MMIO,
];

/// The vCPU threads' seccomp filter: KVM_RUN and the register reads for error reports
/// and snapshots, the allocator, writing the console, raising irqfds, getrandom for
/// virtio-rng and a restored guest's entropy.
pub fn vcpu_filter() -> Result<BpfProgram, jail::JailError> {
    let mut syscalls = jail::COMMON_SYSCALLS.to_vec();
    syscalls.push(libc::SYS_getrandom);
    let mut ioctls = VCPU_IOCTLS.to_vec();
    ioctls.extend_from_slice(super::snapshot::ioctls::VCPU);
    jail::filter(&syscalls, &ioctls)
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID for vCPU `id` and, on the boot CPU, the PVH entry state: 32-bit protected
/// mode, paging off, flat segments, EIP = entry, EBX = start info.
pub fn configure(
    kvm: &Kvm,
    supported: &CpuId,
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    template: CpuTemplate,
    entry: Entry,
) -> Result<(), String> {
    let mut cpuid = supported.clone();
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    cpuid::apply(cpuid.as_mut_slice(), template, id, cpus, tsc_deadline);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    // LINT0 as ExtINT, LINT1 as NMI, as the MP table says.
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
    for (off, mode) in [(0x350usize, 0x700u32), (0x360, 0x400)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    if id != 0 {
        return Ok(()); // application processors wait for INIT/SIPI from the boot CPU
    }
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs = flat_segment(0x10, 0xb);
    let data = flat_segment(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = entry.rip;
    regs.rbx = entry.rbx;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    Ok(())
}

/// Describes where a vCPU is: RIP, mode, and up to 16 instruction bytes.
fn where_is(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "(registers unavailable)".into();
    };
    let paging = sregs.cr0 & 0x8000_0000 != 0;
    let linear = if sregs.efer & 0x400 != 0 && sregs.cs.l == 1 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    let phys = if paging {
        vcpu.translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
    } else {
        Some(linear)
    };
    let bytes = phys
        .map(|p| {
            let mut b = [0u8; 16];
            match mem.read_slice(&mut b, GuestAddress(p)) {
                Ok(()) => b
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(_) => "(not in guest memory)".into(),
            }
        })
        .unwrap_or_else(|| "(not mapped)".into());
    let mode = if sregs.efer & 0x400 != 0 {
        "long mode"
    } else if sregs.cr0 & 1 != 0 {
        "protected mode"
    } else {
        "real mode"
    };
    format!(
        "RIP {:#x} ({mode}, CPL {}), instruction bytes: {bytes}",
        regs.rip, sregs.cs.dpl
    )
}

/// Runs vCPU `id` until the VM stops. Installs the vCPU seccomp filter first, if any.
pub fn run(mut vcpu: VcpuFd, id: u8, shared: Arc<Shared>, filter: Option<Arc<BpfProgram>>) {
    if let Some(Err(e)) = filter.map(|f| jail::install(&f)) {
        shared.stop_with(StopReason::Error(format!("vCPU {id}: {e}")));
    }
    // No guest code runs before every thread of the VMM has its filter.
    shared.start.wait();
    if id == 0 {
        shared
            .first_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }
    while !shared.stop.load(Ordering::SeqCst) {
        if let Some(p) = shared.snapshot.as_ref().filter(|p| p.requested()) {
            p.park(&mut vcpu, usize::from(id));
            continue;
        }
        let exit = vcpu.run();
        // Writes the guest made before this exit come first.
        shared.drain_coalesced();
        let reason = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !shared.pio.write(u64::from(port), data) {
                    tracing::trace!("vCPU {id}: write to unassigned port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(StopReason::Shutdown),
            Ok(VcpuExit::Hlt) => Some(StopReason::Shutdown),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::debug!("vCPU {id}: system event {kind}");
                Some(StopReason::Shutdown)
            }
            Ok(VcpuExit::InternalError) => {
                // Nested PVM hosts: complete the few instructions KVM's emulator lacks.
                if super::assist::complete(&vcpu, &shared.mem).is_some() {
                    continue;
                }
                let run = vcpu.get_kvm_run();
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit
                // union is the one KVM filled in.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let what = match internal.suberror {
                    1 => "emulation failure (KVM's instruction emulator cannot execute this instruction)".to_string(),
                    2 => "simultaneous exceptions".to_string(),
                    3 => "delivery event failure".to_string(),
                    s => format!("suberror {s}"),
                };
                Some(StopReason::Error(format!(
                    "vCPU {id}: KVM_EXIT_INTERNAL_ERROR: {what} at {}",
                    where_is(&vcpu, &shared.mem)
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(StopReason::Error(format!(
                "vCPU {id}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            ))),
            Ok(other) => {
                let exit = format!("{other:?}");
                Some(StopReason::Error(format!(
                    "vCPU {id}: unexpected exit {exit} at {}",
                    where_is(&vcpu, &shared.mem)
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if let (Some(p), Ok(regs)) = (&shared.profile, vcpu.get_regs()) {
                    p.record(regs.rip);
                }
                None
            }
            Err(e) => Some(StopReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        if let Some(reason) = reason {
            shared.stop_with(reason);
        }
    }
}
