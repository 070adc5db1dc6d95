//! Every guest-physical address and size the built-in VMM uses, and why.
//! (The boot layout follows the public x86 conventions Firecracker also uses.)

/// Guest RAM starts at 0.
pub const RAM_START: u64 = 0;

/// PVH `hvm_start_info` (the boot information handed to the kernel in EBX).
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one entry: the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map (e820-style entries), after the module list.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Most memory-map entries we ever write (fits below the command line).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 32;

/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, including the terminating NUL (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The MP table lives in the last KiB of base memory, where Linux looks for it.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base (conventional) memory: [MPTABLE_START, this) is reserved in the memory map.
pub const EBDA_END: u64 = 0xa0000;

/// Kernels are loaded at 1 MiB and up; nothing below is theirs.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the MMIO gap below 4 GiB: RAM above 3 GiB is placed above 4 GiB instead.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// I/O APIC registers (in-kernel irqchip).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers (in-kernel irqchip).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The TSS KVM needs on Intel hosts (three pages in the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The identity-map page KVM needs on Intel hosts (one page before the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// First IRQ line given to virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC input.
pub const IRQ_MAX: u32 = 23;

/// Guest memory regions for `size` bytes of RAM: below the MMIO gap, and the rest above
/// 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(RAM_START, size)]
    } else {
        vec![
            (RAM_START, MMIO_GAP_START),
            (MMIO_GAP_END, size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    // Everything fixed fits where it should (checked at compile time).
    const _: () = {
        assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
        assert!(PVH_MEMMAP_START + (PVH_MEMMAP_MAX_ENTRIES as u64) * 24 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
        assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && VIRTIO_MMIO_START < IOAPIC_ADDR);
    };
}
