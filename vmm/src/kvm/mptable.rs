//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns
//! its CPUs, its I/O APIC and how ISA interrupts are wired.

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR};

/// Size of the table for `cpus` CPUs (what [`build`] returns).
pub fn size(cpus: u8) -> usize {
    16 + 44 + 20 * usize::from(cpus) + 8 + 8 + 8 * (IRQS as usize) + 8 * 2
}

/// IOAPIC inputs described (ISA IRQ n → pin n).
const IRQS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table, to be placed at `addr`.
pub fn build(addr: u64, cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // after the CPUs' APIC ids 0..cpus
    let mut cfg: Vec<u8> = Vec::new();
    // Configuration table header; lengths and checksum are patched below.
    cfg.extend_from_slice(b"PCMP");
    cfg.extend_from_slice(&0u16.to_le_bytes()); // base table length
    cfg.push(4); // spec revision 1.4
    cfg.push(0); // checksum
    cfg.extend_from_slice(b"HOSTD   "); // OEM id
    cfg.extend_from_slice(b"hostd-vmm   "); // product id
    cfg.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    cfg.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    cfg.extend_from_slice(&0u16.to_le_bytes()); // entry count
    cfg.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    cfg.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    cfg.push(0); // extended checksum
    cfg.push(0); // reserved
    let mut entries: u16 = 0;
    for cpu in 0..cpus {
        cfg.push(0); // processor
        cfg.push(cpu); // local APIC id
        cfg.push(0x14); // local APIC version
        cfg.push(if cpu == 0 { 0b11 } else { 0b01 }); // enabled, BSP
        cfg.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature
        cfg.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        cfg.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    cfg.extend_from_slice(&[1, 0]); // bus 0
    cfg.extend_from_slice(b"ISA   ");
    entries += 1;
    cfg.extend_from_slice(&[2, ioapic_id, 0x11, 1]); // I/O APIC, version, enabled
    cfg.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries += 1;
    for irq in 0..IRQS {
        // INT, conforming polarity/trigger, ISA bus, IRQ n → I/O APIC pin n.
        cfg.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    cfg.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT → LINT0 of every CPU
    cfg.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI → LINT1 of every CPU
    entries += 2;
    let len = cfg.len() as u16;
    cfg[4..6].copy_from_slice(&len.to_le_bytes());
    cfg[34..36].copy_from_slice(&entries.to_le_bytes());
    cfg[7] = checksum(&cfg);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((addr + 16) as u32).to_le_bytes()); // configuration table
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // default configuration: none; no IMCR
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&cfg);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_sizes() {
        for cpus in [1u8, 2, 8, 32] {
            let t = build(0x9fc00, cpus);
            assert_eq!(t.len(), size(cpus));
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(&t[16..20], b"PCMP");
            assert_eq!(u16::from_le_bytes([t[20], t[21]]) as usize, t.len() - 16);
            assert!(t.len() <= 1024, "must fit in the last KiB of base memory");
        }
    }
}
