//! Snapshots of a running VM of the built-in VMM, and restoring them (docs/snapshots.md).
//!
//! A snapshot is taken at the snapshot point guest init offers
//! ([`hostd_images::abi::SNAPSHOT_PORT`]): every vCPU is paused (its pending I/O
//! completed), its registers, MSRs, LAPIC and events read; then the VM's irqchip, PIT
//! and clock, the console UART, each virtio-mmio transport and guest memory are written
//! to one file:
//!
//! ```text
//! 0      header (HEADER_LEN bytes used of one page): magic, version, key, memory
//!        length and digest, state offset, length and digest, digest of the header
//! 4096   guest memory, every region at its offset in the memfd; all-zero pages are
//!        holes (a sparse file)
//! …      state: records (tag, vCPU, length, bytes), page-aligned after memory
//! ```
//!
//! The file is written to a temporary name in the cache directory by the VM's process
//! (which has it open from before its jail) and renamed into place by `hostd run` once
//! the VM ended, only if its header is complete: a reader never sees a partial file.
//! Restoring checks the header, the state's digest and, while reading memory back, the
//! memory's digest; any mismatch means a cold boot (and the snapshot is replaced).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use hostd_devices::bus::BusDevice;
use hostd_images::abi::snapshot as abi_snap;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use sha2::{Digest, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// First bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"HOSTDSNP";
/// Format version; a snapshot of another version is not restored.
pub const VERSION: u32 = 1;
/// Where guest memory starts in the file (one page for the header).
pub const MEMORY_OFFSET: u64 = 4096;
/// Bytes of the header that are used.
pub const HEADER_LEN: usize = 168;
/// Largest state section accepted (vCPU states are a few KiB each).
pub const MAX_STATE_LEN: u64 = 16 << 20;
const PAGE: usize = 4096;

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the snapshot file failed.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot this hostd can restore.
    #[error("not a usable snapshot: {0}")]
    Format(&'static str),
    /// The file is a snapshot of another image or configuration.
    #[error("the snapshot was taken for another image or configuration")]
    KeyMismatch,
    /// A digest did not match: the file is damaged.
    #[error("the snapshot's {0} does not match its digest (damaged)")]
    Digest(&'static str),
    /// A KVM call failed.
    #[error("{what}")]
    Kvm {
        /// Which call.
        what: String,
        /// The failure.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The saved state does not fit this VM.
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Kvm { what, source }
}

/// Views a KVM state structure as its bytes.
fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: the kvm-bindings state structures are `repr(C)` plain data (integers,
    // arrays and unions of them) filled in whole by KVM or `Default` (zeroed), so all
    // `size_of::<T>()` bytes are initialized; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Reads a KVM state structure back from exactly its bytes.
fn pod_from<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: `T` is a kvm-bindings `repr(C)` plain-data structure for which every byte
    // pattern is a valid value (what KVM checks, it checks on the ioctl); `b` has exactly
    // `size_of::<T>()` bytes and does not overlap `v`.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    Some(v)
}

/// One vCPU's state.
#[derive(Clone, Default)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: Option<Vec<u8>>,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<(u32, u64)>,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs worth saving: those KVM lists (KVM_GET_MSR_INDEX_LIST) that this vCPU lets
/// us read. (On nested PVM hosts some listed ones are refused.)
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm_fd.get_msr_index_list() else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .ok()
            .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

/// Reads vCPU `vcpu`'s state. Its pending I/O must be complete (see [`Pause::park`]).
pub fn save_vcpu(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, SnapshotError> {
    let mut msrs = Vec::with_capacity(msr_list.len());
    for chunk in msr_list.chunks(64) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Mismatch("too many MSRs".into()))?;
        let n = vcpu.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
        msrs.extend(m.as_slice().iter().take(n).map(|e| (e.index, e.data)));
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
        xsave: vcpu
            .get_xsave()
            .ok()
            .map(|x| x.region.iter().flat_map(|w| w.to_le_bytes()).collect()),
        xcrs: vcpu.get_xcrs().ok(),
        msrs,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

/// Puts a saved vCPU state into a fresh vCPU (CPUID already set). Returns the MSRs
/// KVM refused to set (logged by the caller).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, SnapshotError> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
    if let Some(bytes) = &s.xsave {
        let mut x = kvm_xsave::default();
        for (w, b) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        // SAFETY: `x` is a whole legacy-size kvm_xsave (no extra area is used).
        unsafe { vcpu.set_xsave(&x) }.map_err(kvm("KVM_SET_XSAVE"))?;
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    // Set in bulk; KVM stops at the first MSR it refuses: note it and go on after it.
    let mut refused = Vec::new();
    let mut rest: &[(u32, u64)] = &s.msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .take(64)
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Mismatch("too many MSRs".into()))?;
        let n = vcpu.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        if n < entries.len() {
            refused.push(rest[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

/// The VM's own state: the in-kernel irqchip (PIC master, slave, I/O APIC), PIT and
/// clock.
#[derive(Clone, Default)]
pub struct VmState {
    irqchips: [kvm_irqchip; 3],
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// Reads the VM's irqchip, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let mut s = VmState::default();
    for (id, chip) in s.irqchips.iter_mut().enumerate() {
        chip.chip_id = id as u32;
        vm.get_irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    }
    s.pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    s.clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(s)
}

/// Puts the VM's irqchip, PIT and clock back (the clock continues from the snapshot:
/// guest time does not count the time the snapshot lay on disk; guest init sets the
/// wall clock after a restore).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Everything of a VM but its memory.
#[derive(Clone, Default, Debug)]
pub struct State {
    /// Each vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// The console UART (`Console::save`).
    pub serial: Vec<u8>,
    /// Each virtio-mmio transport, in bus order.
    pub transports: Vec<hostd_devices::virtio::mmio::TransportState>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("VmState").finish_non_exhaustive()
    }
}

mod tag {
    pub const REGS: u8 = 1;
    pub const SREGS: u8 = 2;
    pub const FPU: u8 = 3;
    pub const XSAVE: u8 = 4;
    pub const XCRS: u8 = 5;
    pub const MSRS: u8 = 6;
    pub const LAPIC: u8 = 7;
    pub const MP_STATE: u8 = 8;
    pub const EVENTS: u8 = 9;
    pub const DEBUGREGS: u8 = 10;
    pub const IRQCHIP: u8 = 20;
    pub const PIT: u8 = 21;
    pub const CLOCK: u8 = 22;
    pub const SERIAL: u8 = 30;
    pub const TRANSPORT: u8 = 31;
}

/// Most vCPUs and transports a state may describe (one byte of index each).
const MAX_INDEX: usize = 255;

impl State {
    /// Records: tag (u8), index (u8), length (u32 LE), bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |t: u8, i: usize, b: &[u8]| {
            out.push(t);
            out.push(i as u8);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        for (i, v) in self.vcpus.iter().enumerate() {
            put(tag::REGS, i, pod_bytes(&v.regs));
            put(tag::SREGS, i, pod_bytes(&v.sregs));
            put(tag::FPU, i, pod_bytes(&v.fpu));
            if let Some(x) = &v.xsave {
                put(tag::XSAVE, i, x);
            }
            if let Some(x) = &v.xcrs {
                put(tag::XCRS, i, pod_bytes(x));
            }
            let msrs: Vec<u8> = v
                .msrs
                .iter()
                .flat_map(|(i, d)| i.to_le_bytes().into_iter().chain(d.to_le_bytes()))
                .collect();
            put(tag::MSRS, i, &msrs);
            put(tag::LAPIC, i, pod_bytes(&v.lapic));
            put(tag::MP_STATE, i, pod_bytes(&v.mp_state));
            put(tag::EVENTS, i, pod_bytes(&v.events));
            put(tag::DEBUGREGS, i, pod_bytes(&v.debugregs));
        }
        for (i, c) in self.vm.irqchips.iter().enumerate() {
            put(tag::IRQCHIP, i, pod_bytes(c));
        }
        put(tag::PIT, 0, pod_bytes(&self.vm.pit));
        put(tag::CLOCK, 0, pod_bytes(&self.vm.clock));
        put(tag::SERIAL, 0, &self.serial);
        for (i, t) in self.transports.iter().enumerate() {
            put(tag::TRANSPORT, i, &t.to_bytes());
        }
        out
    }

    /// Parses [`State::encode`]'s records. Every vCPU needs every record but XSAVE and
    /// XCRS; the VM needs all three irqchips, the PIT, the clock and the UART.
    pub fn decode(mut b: &[u8]) -> Result<State, SnapshotError> {
        let bad = SnapshotError::Format;
        let mut s = State::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut chips = [false; 3];
        while !b.is_empty() {
            let (head, rest) = b.split_at_checked(6).ok_or(bad("truncated record"))?;
            let (t, i) = (head[0], usize::from(head[1]));
            let len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]) as usize;
            let (body, rest) = rest
                .split_at_checked(len)
                .ok_or(bad("record longer than the state"))?;
            b = rest;
            if !seen.insert((t, i)) {
                return Err(bad("repeated record"));
            }
            fn vcpu(s: &mut State, i: usize) -> Result<&mut VcpuState, SnapshotError> {
                if i >= MAX_INDEX {
                    return Err(SnapshotError::Format("vCPU index out of range"));
                }
                if s.vcpus.len() <= i {
                    s.vcpus.resize(i + 1, VcpuState::default());
                }
                Ok(&mut s.vcpus[i])
            }
            fn need<T: Copy + Default>(b: &[u8]) -> Result<T, SnapshotError> {
                pod_from(b).ok_or(SnapshotError::Format("record of the wrong size"))
            }
            match t {
                tag::REGS => vcpu(&mut s, i)?.regs = need(body)?,
                tag::SREGS => vcpu(&mut s, i)?.sregs = need(body)?,
                tag::FPU => vcpu(&mut s, i)?.fpu = need(body)?,
                tag::XSAVE => {
                    if body.len() != 4096 {
                        return Err(bad("XSAVE record of the wrong size"));
                    }
                    vcpu(&mut s, i)?.xsave = Some(body.to_vec());
                }
                tag::XCRS => vcpu(&mut s, i)?.xcrs = Some(need(body)?),
                tag::MSRS => {
                    if body.len() % 12 != 0 {
                        return Err(bad("MSR record of the wrong size"));
                    }
                    vcpu(&mut s, i)?.msrs = body
                        .chunks_exact(12)
                        .map(|c| {
                            (
                                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                                u64::from_le_bytes([
                                    c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11],
                                ]),
                            )
                        })
                        .collect();
                }
                tag::LAPIC => vcpu(&mut s, i)?.lapic = need(body)?,
                tag::MP_STATE => vcpu(&mut s, i)?.mp_state = need(body)?,
                tag::EVENTS => vcpu(&mut s, i)?.events = need(body)?,
                tag::DEBUGREGS => vcpu(&mut s, i)?.debugregs = need(body)?,
                tag::IRQCHIP => {
                    let chip: kvm_irqchip = need(body)?;
                    if i > 2 || chip.chip_id as usize != i {
                        return Err(bad("irqchip record out of range"));
                    }
                    s.vm.irqchips[i] = chip;
                    chips[i] = true;
                }
                tag::PIT => s.vm.pit = need(body)?,
                tag::CLOCK => s.vm.clock = need(body)?,
                tag::SERIAL => s.serial = body.to_vec(),
                tag::TRANSPORT => {
                    if i != s.transports.len() {
                        return Err(bad("transport records out of order"));
                    }
                    s.transports.push(
                        hostd_devices::virtio::mmio::TransportState::from_bytes(body)
                            .ok_or(bad("unreadable transport record"))?,
                    );
                }
                _ => return Err(bad("unknown record")),
            }
        }
        if s.vcpus.is_empty() {
            return Err(bad("no vCPU"));
        }
        for i in 0..s.vcpus.len() {
            for t in [
                tag::REGS,
                tag::SREGS,
                tag::FPU,
                tag::MSRS,
                tag::LAPIC,
                tag::MP_STATE,
                tag::EVENTS,
                tag::DEBUGREGS,
            ] {
                if !seen.contains(&(t, i)) {
                    return Err(bad("a vCPU record is missing"));
                }
            }
        }
        if chips != [true; 3]
            || !seen.contains(&(tag::PIT, 0))
            || !seen.contains(&(tag::CLOCK, 0))
            || !seen.contains(&(tag::SERIAL, 0))
        {
            return Err(bad("a VM record is missing"));
        }
        Ok(s)
    }
}

/// A snapshot file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Image and configuration the snapshot is for ([`SnapshotCache::key`]).
    pub key: [u8; 32],
    /// Bytes of guest memory, from [`MEMORY_OFFSET`].
    pub mem_len: u64,
    /// Digest of guest memory: SHA-256 over (page number, page) of every non-zero page.
    pub mem_sha256: [u8; 32],
    /// Where the state records start.
    pub state_offset: u64,
    /// Their length.
    pub state_len: u64,
    /// Their SHA-256.
    pub state_sha256: [u8; 32],
}

impl Header {
    /// The header's bytes, ending in the digest of what precedes it.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..48].copy_from_slice(&self.key);
        b[48..56].copy_from_slice(&self.mem_len.to_le_bytes());
        b[56..88].copy_from_slice(&self.mem_sha256);
        b[88..96].copy_from_slice(&self.state_offset.to_le_bytes());
        b[96..104].copy_from_slice(&self.state_len.to_le_bytes());
        b[104..136].copy_from_slice(&self.state_sha256);
        let d: [u8; 32] = Sha256::digest(&b[..136]).into();
        b[136..168].copy_from_slice(&d);
        b
    }

    /// Parses and checks a header: magic, version, its own digest, and a layout that
    /// fits in `file_len` bytes.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
        let bad = SnapshotError::Format;
        let b = b.get(..HEADER_LEN).ok_or(bad("shorter than its header"))?;
        if b[..8] != MAGIC {
            return Err(bad("no snapshot magic"));
        }
        if b[8..12] != VERSION.to_le_bytes() {
            return Err(bad("another snapshot format version"));
        }
        let d: [u8; 32] = Sha256::digest(&b[..136]).into();
        if b[136..168] != d {
            return Err(SnapshotError::Digest("header"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let arr = |o: usize| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&b[o..o + 32]);
            a
        };
        let h = Header {
            key: arr(16),
            mem_len: u64_at(48),
            mem_sha256: arr(56),
            state_offset: u64_at(88),
            state_len: u64_at(96),
            state_sha256: arr(104),
        };
        let mem_end = MEMORY_OFFSET
            .checked_add(h.mem_len)
            .ok_or(bad("memory length out of range"))?;
        if h.state_offset < mem_end
            || h.state_len > MAX_STATE_LEN
            || h.state_offset.checked_add(h.state_len) != Some(file_len)
        {
            return Err(bad("sections out of place"));
        }
        Ok(h)
    }
}

/// Parses a whole snapshot held in memory (the fuzz target's entry): header, state
/// digest and records, and memory digest.
pub fn parse(bytes: &[u8]) -> Result<(Header, State), SnapshotError> {
    let h = Header::parse(bytes, bytes.len() as u64)?;
    let state = &bytes[h.state_offset as usize..];
    let d: [u8; 32] = Sha256::digest(state).into();
    if d != h.state_sha256 {
        return Err(SnapshotError::Digest("state"));
    }
    let s = State::decode(state)?;
    let mem = &bytes[MEMORY_OFFSET as usize..(MEMORY_OFFSET + h.mem_len) as usize];
    let mut hasher = Sha256::new();
    for (n, page) in mem.chunks(PAGE).enumerate() {
        hash_page(&mut hasher, n as u64, page);
    }
    if <[u8; 32]>::from(hasher.finalize()) != h.mem_sha256 {
        return Err(SnapshotError::Digest("memory"));
    }
    Ok((h, s))
}

/// A page of zeros: comparing with it is a `memcmp`, fast even in debug builds.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

fn is_zero(page: &[u8]) -> bool {
    match ZERO_PAGE.get(..page.len()) {
        Some(zeros) => page == zeros,
        None => page.iter().all(|&b| b == 0),
    }
}

fn hash_page(h: &mut Sha256, n: u64, page: &[u8]) {
    if !is_zero(page) {
        h.update(n.to_le_bytes());
        h.update(page);
    }
}

/// `hostd run --snapshot-cache DIR`: where snapshots live and which one this run's
/// image and configuration would use.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    /// The cache directory.
    pub dir: PathBuf,
    /// SHA-256 over the kernel's and initrd's digests (so the image), the command line,
    /// vCPUs, memory, CPU template and devices: a change of any makes another key.
    pub key: [u8; 32],
}

impl SnapshotCache {
    /// The cache for booting `cfg`'s kernel and initrd with its settings, or `None`
    /// when the kernel has no digest to key on (a bare `--kernel`).
    pub fn for_config(dir: PathBuf, cfg: &super::KvmConfig) -> Option<SnapshotCache> {
        let mut h = Sha256::new();
        h.update(b"hostd snapshot key v1\0");
        h.update(cfg.kernel.sha256()?);
        match &cfg.initrd {
            Some(i) => h.update(i.sha256()?),
            None => h.update([0u8; 32]),
        }
        for part in [
            cfg.cmdline.clone(),
            cfg.vcpus.to_string(),
            cfg.memory_mib.to_string(),
            format!("{:?}", cfg.template),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for d in &cfg.devices {
            let name = d.name();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
        }
        Some(SnapshotCache {
            dir,
            key: h.finalize().into(),
        })
    }

    /// The snapshot file for this key.
    pub fn path(&self) -> PathBuf {
        let hex: String = self.key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.snap"))
    }
}

/// A snapshot found valid so far (header, key, state digest and records): memory is
/// checked while it is read back.
#[derive(Debug)]
pub struct Saved {
    /// The open file.
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// Its state.
    pub state: State,
}

/// What a run with a snapshot cache prepared before the VM's process starts: the
/// snapshot to restore, if a valid one exists, and a temporary file for a new one.
#[derive(Debug)]
pub struct Prepared {
    /// The snapshot to restore from.
    pub saved: Option<Saved>,
    /// A new snapshot is written here (then [`Prepared::finish`] renames it).
    pub tmp: Option<(File, PathBuf)>,
    /// The final name.
    pub path: PathBuf,
    /// The key.
    pub key: [u8; 32],
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens a snapshot and checks all but its memory.
pub fn open(path: &Path, key: &[u8; 32], mem_len: u64) -> Result<Saved, SnapshotError> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut head = [0u8; HEADER_LEN];
    file.read_exact(&mut head).map_err(io(path))?;
    let header = Header::parse(&head, len)?;
    if &header.key != key {
        return Err(SnapshotError::KeyMismatch);
    }
    if header.mem_len != mem_len {
        return Err(SnapshotError::Mismatch(format!(
            "{} bytes of memory for a VM of {mem_len}",
            header.mem_len
        )));
    }
    let mut state = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state, header.state_offset)
        .map_err(io(path))?;
    let d: [u8; 32] = Sha256::digest(&state).into();
    if d != header.state_sha256 {
        return Err(SnapshotError::Digest("state"));
    }
    let state = State::decode(&state)?;
    Ok(Saved {
        file,
        path: path.to_owned(),
        header,
        state,
    })
}

impl Prepared {
    /// Looks for this key's snapshot (a damaged or mismatched one is reported and
    /// removed: this run boots and replaces it) and opens a temporary file for a new
    /// one.
    pub fn new(cache: &SnapshotCache, mem_len: u64) -> Result<Prepared, SnapshotError> {
        std::fs::create_dir_all(&cache.dir).map_err(io(&cache.dir))?;
        let path = cache.path();
        let saved = match open(&path, &cache.key, mem_len) {
            Ok(s) => Some(s),
            Err(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => {
                warn_unusable(&path, &e);
                let _ = std::fs::remove_file(&path);
                None
            }
        };
        let tmp_path = cache.dir.join(format!(".{}.tmp", std::process::id()));
        let tmp = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(io(&tmp_path))?;
        Ok(Prepared {
            saved,
            tmp: Some((tmp, tmp_path)),
            path,
            key: cache.key,
        })
    }

    /// After the VM ended: moves a complete new snapshot into place, or removes the
    /// temporary file. Returns whether a snapshot was stored.
    pub fn finish(self) -> bool {
        let Some((file, tmp)) = self.tmp else {
            return false;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut head = [0u8; HEADER_LEN];
        let complete = len > 0
            && file.read_exact_at(&mut head, 0).is_ok()
            && Header::parse(&head, len).is_ok_and(|h| h.key == self.key);
        drop(file);
        if complete {
            match std::fs::rename(&tmp, &self.path) {
                Ok(()) => {
                    tracing::info!("snapshot stored: {}", self.path.display());
                    return true;
                }
                Err(e) => tracing::warn!("cannot store the snapshot {}: {e}", self.path.display()),
            }
        }
        let _ = std::fs::remove_file(&tmp);
        false
    }
}

/// The one warning for a snapshot that cannot be restored.
pub fn warn_unusable(path: &Path, e: &SnapshotError) {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    tracing::warn!(
        "snapshot {}: {msg}; booting instead (a new snapshot replaces it)",
        path.display()
    );
}

/// Reads a snapshot's memory into guest memory and checks its digest. Only the data
/// the file holds is read (all-zero pages are holes in it, and fresh guest memory is
/// zero already).
pub fn load_memory(saved: &Saved, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let fd = saved.file.as_raw_fd();
    let mut hasher = Sha256::new();
    let mut region_file_offset = 0u64;
    let mut page_base = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| SnapshotError::Mismatch("guest memory region".into()))?;
        let start = MEMORY_OFFSET + region_file_offset;
        let end = start + len;
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on an fd this function borrows; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            let data = data as u64;
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            // Whole pages (a file system may report extents at a finer grain), never
            // one already read: `pos` stays page-aligned.
            let page = PAGE as u64;
            let data = (start + (data - start) / page * page).max(pos);
            let hole = (start + (hole - start).div_ceil(page) * page).min(end);
            if hole <= data {
                break;
            }
            let off = (data - start) as usize;
            let n = (hole - data) as usize;
            // SAFETY: `host + off .. + n` lies inside this region's live mapping
            // (off + n <= len), which nothing else accesses before the vCPUs run.
            let dst = unsafe { std::slice::from_raw_parts_mut(host.wrapping_add(off), n) };
            saved
                .file
                .read_exact_at(dst, data)
                .map_err(io(&saved.path))?;
            // Extents come in order: hash each page as the writer did. Pages outside the
            // extents are zero in the file and in fresh memory, and were not hashed;
            // they are not touched here either (no memory is allocated for them).
            let first_page = page_base + off as u64 / PAGE as u64;
            for (k, page) in dst.chunks(PAGE).enumerate() {
                hash_page(&mut hasher, first_page + k as u64, page);
            }
            pos = hole;
        }
        region_file_offset += len;
        page_base += len / PAGE as u64;
    }
    if <[u8; 32]>::from(hasher.finalize()) != saved.header.mem_sha256 {
        return Err(SnapshotError::Digest("memory"));
    }
    Ok(())
}

/// Writes guest memory (non-zero pages only) and `state` to `file`, header last.
pub fn write(
    file: &File,
    key: &[u8; 32],
    mem: &GuestMemoryMmap,
    state: &State,
) -> std::io::Result<()> {
    let mut hasher = Sha256::new();
    let mut file_off = MEMORY_OFFSET;
    let mut page_base = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the region's whole live mapping; the vCPUs are paused and the backends
        // idle (the guest is at its snapshot point), so nothing writes it meanwhile.
        let all = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run: Option<usize> = None;
        for (n, page) in all.chunks(PAGE).enumerate() {
            let zero = is_zero(page);
            if !zero {
                hasher.update((page_base + n as u64).to_le_bytes());
                hasher.update(page);
            }
            match (zero, run) {
                (false, None) => run = Some(n * PAGE),
                (true, Some(s)) => {
                    file.write_all_at(&all[s..n * PAGE], file_off + s as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            file.write_all_at(&all[s..], file_off + s as u64)?;
        }
        file_off += len as u64;
        page_base += (len / PAGE) as u64;
    }
    let mem_len = file_off - MEMORY_OFFSET;
    let state_offset = file_off.next_multiple_of(PAGE as u64);
    let bytes = state.encode();
    file.write_all_at(&bytes, state_offset)?;
    let header = Header {
        key: *key,
        mem_len,
        mem_sha256: hasher.finalize().into(),
        state_offset,
        state_len: bytes.len() as u64,
        state_sha256: Sha256::digest(&bytes).into(),
    };
    file.sync_data()?;
    file.write_all_at(&header.encode(), 0)?;
    file.sync_data()
}

/// Pausing every vCPU at the snapshot point: the port write asks, each vCPU thread
/// parks (completing its pending I/O first) and leaves its state, the control thread
/// writes the snapshot and releases them.
#[derive(Debug)]
pub struct Pause {
    /// A snapshot is wanted at the snapshot point (this run has a cache and booted).
    take: bool,
    /// This VM was restored (the snapshot port answers so).
    restored: bool,
    requested: AtomicBool,
    inner: Mutex<PauseInner>,
    cond: Condvar,
    msrs: std::sync::OnceLock<Vec<u32>>,
}

#[derive(Debug, Default)]
struct PauseInner {
    states: Vec<Option<Result<VcpuState, String>>>,
    released: u64,
}

impl Pause {
    /// For `vcpus` vCPUs; `take` whether to snapshot at the snapshot point, `restored`
    /// whether this VM was restored.
    pub fn new(vcpus: usize, take: bool, restored: bool) -> Arc<Pause> {
        Arc::new(Pause {
            take,
            restored,
            requested: AtomicBool::new(false),
            inner: Mutex::new(PauseInner {
                states: vec![None; vcpus],
                released: 0,
            }),
            cond: Condvar::new(),
            msrs: std::sync::OnceLock::new(),
        })
    }

    /// The MSRs to save ([`saveable_msrs`]), once the vCPUs exist.
    pub fn set_msrs(&self, msrs: Vec<u32>) {
        let _ = self.msrs.set(msrs);
    }

    /// Whether the vCPUs are asked to park.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// On the vCPU thread, when [`Pause::requested`]: completes the pending I/O (one
    /// KVM_RUN with immediate_exit), saves the vCPU's state and waits for the release.
    pub fn park(&self, vcpu: &mut VcpuFd, id: usize) {
        vcpu.set_kvm_immediate_exit(1);
        let r = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing vCPU {id}'s I/O: {e}")),
            Ok(exit) => Err(format!("vCPU {id} exited while pausing: {exit:?}")),
        };
        vcpu.set_kvm_immediate_exit(0);
        let state = r.and_then(|()| {
            save_vcpu(vcpu, self.msrs.get().map_or(&[][..], Vec::as_slice))
                .map_err(|e| e.to_string())
        });
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let gen = inner.released;
        if let Some(slot) = inner.states.get_mut(id) {
            *slot = Some(state);
        }
        self.cond.notify_all();
        while inner.released == gen {
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// On the control thread: every vCPU's state once all have parked.
    pub fn parked(&self) -> Option<Vec<Result<VcpuState, String>>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.states.iter().any(Option::is_none) {
            return None;
        }
        Some(inner.states.iter().flatten().cloned().collect())
    }

    /// Lets the parked vCPUs run on; the snapshot point is passed.
    pub fn release(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for s in &mut inner.states {
            *s = None;
        }
        inner.released += 1;
        self.requested.store(false, Ordering::SeqCst);
        self.cond.notify_all();
    }
}

/// Ports the snapshot device decodes.
pub const PORTS_LEN: u64 =
    (hostd_images::abi::RESUME_INFO_PORT - hostd_images::abi::SNAPSHOT_PORT) as u64 + 4;
const INFO_OFFSET: u64 =
    (hostd_images::abi::RESUME_INFO_PORT - hostd_images::abi::SNAPSHOT_PORT) as u64;

/// The snapshot and resume-information ports: [`PORTS_LEN`] ports from
/// [`hostd_images::abi::SNAPSHOT_PORT`], so that a 4-byte read of
/// [`hostd_images::abi::RESUME_INFO_PORT`] falls inside them.
#[derive(Debug)]
pub struct SnapshotPort {
    pause: Arc<Pause>,
    /// Asked once: the first snapshot point of a run is the one.
    offered: bool,
    info: Vec<u8>,
    cursor: usize,
}

impl SnapshotPort {
    /// Ports answering from `pause`.
    pub fn new(pause: Arc<Pause>) -> Self {
        SnapshotPort {
            pause,
            offered: false,
            info: Vec::new(),
            cursor: 0,
        }
    }

    fn resume_info() -> Vec<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut v = Vec::with_capacity(abi_snap::RESUME_INFO_LEN);
        v.extend_from_slice(&now.as_secs().to_le_bytes());
        v.extend_from_slice(&now.subsec_nanos().to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        let mut entropy = [0u8; abi_snap::RESUME_ENTROPY_LEN];
        if let Err(e) = getrandom(&mut entropy) {
            tracing::error!("no entropy for the restored guest: {e}");
        }
        v.extend_from_slice(&entropy);
        v
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into `buf` past `filled`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl BusDevice for SnapshotPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            0 => {
                if let Some(b) = data.first_mut() {
                    *b = if self.pause.restored {
                        abi_snap::RESTORED
                    } else {
                        abi_snap::COLD
                    };
                }
                if self.pause.restored {
                    self.info = Self::resume_info();
                    self.cursor = 0;
                }
            }
            INFO_OFFSET => {
                for b in data.iter_mut() {
                    if let Some(&v) = self.info.get(self.cursor) {
                        *b = v;
                        self.cursor += 1;
                    }
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&abi_snap::TAKE) && !self.offered {
            self.offered = true;
            if self.pause.take {
                self.pause.requested.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// ioctl numbers the snapshot needs on vCPU threads (reading state) and on the control
/// thread (the VM's state), for their seccomp filters.
pub mod ioctls {
    use kvm_bindings::*;

    const fn ior(nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }
    const fn iowr(nr: u64, size: usize) -> u64 {
        (3 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }
    use std::mem::size_of;

    /// vCPU state reads.
    pub const VCPU: &[u64] = &[
        iowr(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
        ior(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ior(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        ior(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        ior(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        ior(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
    ];
    /// VM state reads.
    pub const VM: &[u64] = &[
        iowr(0x62, size_of::<kvm_irqchip>()),   // KVM_GET_IRQCHIP
        ior(0x9f, size_of::<kvm_pit_state2>()), // KVM_GET_PIT2
        ior(0x7c, size_of::<kvm_clock_data>()), // KVM_GET_CLOCK
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let mut v = VcpuState::default();
        v.regs.rip = 0xffff_ffff_8100_0000;
        v.msrs = vec![(0x10, 1234), (0xc000_0080, 0xd01)];
        v.xsave = Some(vec![7; 4096]);
        let mut s = State {
            vcpus: vec![v.clone(), v],
            serial: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            ..Default::default()
        };
        for (i, c) in s.vm.irqchips.iter_mut().enumerate() {
            c.chip_id = i as u32;
        }
        s.transports
            .push(hostd_devices::virtio::mmio::TransportState::default());
        s
    }

    #[test]
    fn state_round_trips_and_damage_is_refused() {
        let s = sample();
        let b = s.encode();
        let back = State::decode(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.encode(), b);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 1234), (0xc000_0080, 0xd01)]);
        // Truncated anywhere: an error, never a panic.
        for n in 0..b.len() {
            let _ = State::decode(&b[..n]);
        }
        assert!(State::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn a_file_round_trips_through_parse_and_any_flipped_byte_is_caught() {
        let s = sample();
        let state = s.encode();
        let mut mem = vec![0u8; 3 * PAGE];
        mem[PAGE + 5] = 9;
        let mut hasher = Sha256::new();
        for (n, p) in mem.chunks(PAGE).enumerate() {
            hash_page(&mut hasher, n as u64, p);
        }
        let state_offset = MEMORY_OFFSET + mem.len() as u64;
        let h = Header {
            key: [3; 32],
            mem_len: mem.len() as u64,
            mem_sha256: hasher.finalize().into(),
            state_offset,
            state_len: state.len() as u64,
            state_sha256: Sha256::digest(&state).into(),
        };
        let mut file = vec![0u8; MEMORY_OFFSET as usize];
        file[..HEADER_LEN].copy_from_slice(&h.encode());
        file.extend_from_slice(&mem);
        file.extend_from_slice(&state);
        let (back, _) = parse(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, h);
        for at in [
            3,
            20,
            140,
            MEMORY_OFFSET as usize + PAGE + 5,
            file.len() - 1,
        ] {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(parse(&bad).is_err(), "flip at {at} not caught");
        }
    }
}
