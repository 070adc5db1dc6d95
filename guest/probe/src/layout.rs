//! Every fixed address, port and size the probe relies on, in one place.

/// I/O port of the boot marker: byte 1 is written here first thing (see boot.rs).
#[allow(dead_code)] // written from the entry assembly; kept here for the record
pub const BOOT_MARKER_PORT: u16 = 0x505;
/// I/O port of the exit device: one byte, the exit code (QEMU isa-debug-exit style).
pub const EXIT_PORT: u16 = 0x501;
/// 8250 UART transmit holding register (COM1).
pub const UART_THR: u16 = 0x3f8;
/// 8250 UART line status register; bit 5 = transmit holding register empty.
pub const UART_LSR: u16 = 0x3fd;
/// LSR bit: THR empty.
pub const UART_LSR_THRE: u8 = 1 << 5;

/// `struct hvm_start_info` magic (PVH boot ABI).
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of `cmdline_paddr` (u64) in `struct hvm_start_info`.
pub const HVM_START_CMDLINE_OFFSET: usize = 24;
/// Longest command line the probe reads (bytes, without the NUL).
pub const CMDLINE_MAX: usize = 4096;

/// Only addresses below this are identity-mapped by boot.rs.
pub const MAPPED_LIMIT: u64 = 1 << 32;
