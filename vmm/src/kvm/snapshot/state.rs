//! The KVM state of a VM (vCPUs, irqchip, PIT, clock) and its records in a snapshot.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::{kvm, SnapshotError};

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

#[cfg(test)]
mod tests {
    use super::super::file::{hash_page, PAGE};
    use super::super::{parse, Header, HEADER_LEN, MEMORY_OFFSET};
    use super::*;
    use sha2::{Digest, Sha256};

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
