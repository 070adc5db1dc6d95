//! Output on the 8250 UART at 0x3f8, plus the few number formats the probe prints.
//!
//! No initialisation: a virtual 8250 transmits whatever is written to THR. Before each
//! byte the line status register is polled for "THR empty", at most `LSR_POLL_LIMIT`
//! times; if that ever runs out (a minimal UART model whose LSR never says "empty"),
//! polling is switched off for good so a broken LSR costs one timeout, not one per byte.

use crate::layout::{UART_LSR, UART_LSR_THRE, UART_THR};
use crate::port::{inb, outb};
use core::sync::atomic::{AtomicBool, Ordering};

const LSR_POLL_LIMIT: u32 = 10_000;

/// Cleared once the LSR poll has timed out.
static POLL_LSR: AtomicBool = AtomicBool::new(true);

fn put_byte(byte: u8) {
    // Plain loads/stores: no `lock`-prefixed instructions are generated for these.
    if POLL_LSR.load(Ordering::Relaxed) {
        let mut ready = false;
        for _ in 0..LSR_POLL_LIMIT {
            if inb(UART_LSR) & UART_LSR_THRE != 0 {
                ready = true;
                break;
            }
        }
        if !ready {
            POLL_LSR.store(false, Ordering::Relaxed);
        }
    }
    outb(UART_THR, byte);
}

/// Writes bytes as they are.
pub fn put_bytes(bytes: &[u8]) {
    for &b in bytes {
        put_byte(b);
    }
}

/// Writes a string as it is.
pub fn put_str(s: &str) {
    put_bytes(s.as_bytes());
}

/// Ends a line.
pub fn newline() {
    put_bytes(b"\r\n");
}

/// Writes a string and ends the line.
pub fn put_line(s: &str) {
    put_str(s);
    newline();
}

/// Writes an unsigned number in decimal.
pub fn put_dec(value: u64) {
    let mut buf = [0u8; 20];
    let text = crate::fmt::dec(value, &mut buf);
    put_bytes(text);
}

/// Writes an unsigned number as `0x` + lowercase hex, no leading zeros.
pub fn put_hex(value: u64) {
    let mut buf = [0u8; 16];
    put_str("0x");
    put_bytes(crate::fmt::hex(value, &mut buf));
}

/// Writes bytes as two lowercase hex digits each.
pub fn put_hex_bytes(bytes: &[u8]) {
    for &b in bytes {
        let pair = crate::fmt::hex_byte(b);
        put_bytes(&pair);
    }
}
