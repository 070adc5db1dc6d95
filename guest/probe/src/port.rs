//! x86 port I/O.

use core::arch::asm;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory the Rust program owns; the probe is the only
    // software in the VM and every port it names belongs to a device it drives.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`: `in` touches no memory the Rust program owns.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Ends the machine by triple fault: an empty IDT, then a breakpoint (#BP → #GP → #DF →
/// shutdown). Every monitor ends a VM that triple-faults (KVM reports it as
/// KVM_EXIT_SHUTDOWN), so a monitor without an exit device (Firecracker) ends here too.
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let empty = Idtr { limit: 0, base: 0 };
    // SAFETY: loads an IDT with no entries and raises #BP on this (single) vCPU: the
    // machine shuts down; nothing else in memory is touched.
    unsafe {
        asm!("cli", "lidt [{}]", "int3", in(reg) &empty, options(nostack));
    }
    halt_forever()
}

/// Interrupts off, then halt forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this (single) vCPU; no memory is touched.
        unsafe {
            asm!("cli", "hlt", options(nomem, nostack));
        }
    }
}
