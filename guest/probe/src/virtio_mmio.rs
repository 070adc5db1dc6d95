//! virtio-mmio (virtio 1.x, "modern" register layout, version 2) and one polled
//! virtqueue round trip for an entropy device (virtio-rng, device id 4).
//!
//! All register accesses are 32-bit volatile `mov`s; all ring memory is written and
//! read with volatile accesses so the compiler neither drops nor reorders them.
//! x86 keeps stores in order and loads in order, and the notify write is itself a
//! trapping MMIO access, so compiler fences are the only barriers needed (and `mfence`,
//! an SSE2 instruction, is avoided on purpose).

use crate::layout::MAPPED_LIMIT;
use crate::uart::{newline, put_dec, put_hex, put_hex_bytes, put_line, put_str};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{compiler_fence, Ordering};

// Register offsets (virtio 1.x spec, 4.2.2 "MMIO Device Register Layout").
const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
/// The register file the probe uses ends below this offset.
const REGISTERS_END: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of feature word 1.
const F_VERSION_1_WORD1: u32 = 1;

/// Device id of the entropy device.
pub const DEVICE_ID_RNG: u32 = 4;

/// Queue size the probe asks for (the device may offer less).
const QUEUE_SIZE: usize = 8;
/// Bytes requested from the entropy device.
const RNG_BUF_LEN: usize = 16;
/// Descriptor flag: the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// How many times the used ring is polled before giving up. Each poll also reads the
/// device's InterruptStatus register: a trapping MMIO access that paces the loop by
/// the monitor's speed instead of the CPU's (no timers in the probe).
const POLL_LIMIT: u32 = 2_000_000;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(64))]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(64))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

#[repr(C, align(64))]
struct Buffer([u8; RNG_BUF_LEN]);

/// One split virtqueue and its one buffer, in a page of `.bss` (identity-mapped, so
/// the physical address is the pointer value).
#[repr(C, align(4096))]
struct QueueMemory {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
    buf: Buffer,
}

static mut QUEUE: QueueMemory = QueueMemory {
    desc: [const {
        Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }
    }; QUEUE_SIZE],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; QUEUE_SIZE],
        used_event: 0,
    },
    used: Used {
        flags: 0,
        idx: 0,
        ring: [const { UsedElem { id: 0, len: 0 } }; QUEUE_SIZE],
        avail_event: 0,
    },
    buf: Buffer([0; RNG_BUF_LEN]),
};

/// A virtio-mmio register window.
struct Transport {
    base: usize,
}

impl Transport {
    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` was checked (in `probe`) to be a window of at least
        // REGISTERS_END bytes below 4 GiB (identity-mapped) named by the monitor on the
        // command line; `offset` is one of the register constants, 4-aligned, below it.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    fn write_addr(&self, low: usize, high: usize, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }
}

fn put_prefix(base: u64) {
    put_str("probe: virtio-mmio at ");
    put_hex(base);
}

/// Identifies the device at `base` and, for an entropy device, does one round trip.
pub fn probe(base: u64, size: u64) {
    if size < REGISTERS_END
        || base
            .checked_add(REGISTERS_END)
            .is_none_or(|end| end > MAPPED_LIMIT)
    {
        put_prefix(base);
        put_str(": window of ");
        put_hex(size);
        put_line(" bytes is too small or not below 4 GiB, skipped");
        return;
    }
    let dev = Transport {
        base: base as usize,
    };
    let magic = dev.read(MAGIC_VALUE);
    if magic != MAGIC {
        put_prefix(base);
        put_str(": bad magic ");
        put_hex(u64::from(magic));
        put_line(", skipped");
        return;
    }
    let version = dev.read(VERSION);
    let device_id = dev.read(DEVICE_ID);
    put_prefix(base);
    put_str(" version ");
    put_dec(u64::from(version));
    put_str(" device-id ");
    put_dec(u64::from(device_id));
    newline();
    if version != 2 {
        put_prefix(base);
        put_line(": only version 2 (virtio 1.x) is supported, skipped");
        return;
    }
    if device_id == DEVICE_ID_RNG {
        match rng_round_trip(&dev) {
            Ok((bytes, len)) => {
                put_str("probe: virtio-rng round trip ok: ");
                put_dec(len as u64);
                put_str(" bytes: ");
                put_hex_bytes(bytes.get(..len).unwrap_or(&bytes));
                newline();
            }
            Err(what) => {
                put_str("probe: virtio-rng error: ");
                put_line(what);
            }
        }
    }
}

/// Device initialisation (virtio 1.x, 3.1.1), one request, then reset. Returns the
/// bytes and how many of them the device wrote.
fn rng_round_trip(dev: &Transport) -> Result<([u8; RNG_BUF_LEN], usize), &'static str> {
    let result = rng_request(dev);
    // Reset whatever happened, so the device stops using the probe's memory.
    dev.write(STATUS, 0);
    result
}

fn rng_request(dev: &Transport) -> Result<([u8; RNG_BUF_LEN], usize), &'static str> {
    dev.write(STATUS, 0);
    if dev.read(STATUS) != 0 {
        return Err("device did not reset (status not 0)");
    }
    dev.write(STATUS, ACKNOWLEDGE);
    dev.write(STATUS, ACKNOWLEDGE | DRIVER);

    dev.write(DEVICE_FEATURES_SEL, 1);
    if dev.read(DEVICE_FEATURES) & F_VERSION_1_WORD1 == 0 {
        return Err("device does not offer VIRTIO_F_VERSION_1");
    }
    dev.write(DRIVER_FEATURES_SEL, 0);
    dev.write(DRIVER_FEATURES, 0);
    dev.write(DRIVER_FEATURES_SEL, 1);
    dev.write(DRIVER_FEATURES, F_VERSION_1_WORD1);
    dev.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if dev.read(STATUS) & FEATURES_OK == 0 {
        return Err("device did not accept features (FEATURES_OK not set)");
    }

    dev.write(QUEUE_SEL, 0);
    if dev.read(QUEUE_READY) != 0 {
        return Err("queue 0 already ready after reset");
    }
    let max = dev.read(QUEUE_NUM_MAX);
    if max == 0 {
        return Err("queue 0 not available (QueueNumMax 0)");
    }
    let num = core::cmp::min(max, QUEUE_SIZE as u32);

    let q = addr_of_mut!(QUEUE);
    // SAFETY: the probe is single-threaded and the device is reset (it owns none of
    // this memory until QueueReady/DRIVER_OK below). Raw pointers into the static and
    // volatile writes only; no reference to the static is held across device access.
    let (desc_addr, avail_addr, used_addr) = unsafe {
        let buf = addr_of_mut!((*q).buf.0).cast::<u8>();
        for i in 0..RNG_BUF_LEN {
            buf.add(i).write_volatile(0);
        }
        addr_of_mut!((*q).desc[0].addr).write_volatile(buf as u64);
        addr_of_mut!((*q).desc[0].len).write_volatile(RNG_BUF_LEN as u32);
        addr_of_mut!((*q).desc[0].flags).write_volatile(VIRTQ_DESC_F_WRITE);
        addr_of_mut!((*q).desc[0].next).write_volatile(0);
        addr_of_mut!((*q).avail.flags).write_volatile(0);
        addr_of_mut!((*q).avail.idx).write_volatile(0);
        addr_of_mut!((*q).used.flags).write_volatile(0);
        addr_of_mut!((*q).used.idx).write_volatile(0);
        (
            addr_of!((*q).desc) as u64,
            addr_of!((*q).avail) as u64,
            addr_of!((*q).used) as u64,
        )
    };
    compiler_fence(Ordering::SeqCst);

    dev.write(QUEUE_NUM, num);
    dev.write_addr(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc_addr);
    dev.write_addr(QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail_addr);
    dev.write_addr(QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used_addr);
    dev.write(QUEUE_READY, 1);
    dev.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    // SAFETY: as above; descriptor 0 is published by the avail index store, which the
    // fence keeps after the ring entry store.
    unsafe {
        addr_of_mut!((*q).avail.ring[0]).write_volatile(0);
        compiler_fence(Ordering::SeqCst);
        addr_of_mut!((*q).avail.idx).write_volatile(1);
    }
    compiler_fence(Ordering::SeqCst);
    dev.write(QUEUE_NOTIFY, 0);

    let mut polls = None;
    for n in 0..POLL_LIMIT {
        // SAFETY: a volatile read of the used index the device writes.
        if unsafe { addr_of!((*q).used.idx).read_volatile() } != 0 {
            polls = Some(n);
            break;
        }
        let _ = dev.read(INTERRUPT_STATUS);
    }
    let Some(polls) = polls else {
        return Err("no used buffer after polling (gave up)");
    };
    // How long the device took, in trapping register reads (a monitor's device latency).
    put_str("probe: virtio-rng answered after ");
    put_dec(u64::from(polls));
    put_line(" polls");
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the used index moved, so used.ring[0] is written; volatile reads.
    let (id, len) = unsafe {
        (
            addr_of!((*q).used.ring[0].id).read_volatile(),
            addr_of!((*q).used.ring[0].len).read_volatile(),
        )
    };
    let isr = dev.read(INTERRUPT_STATUS);
    if isr != 0 {
        dev.write(INTERRUPT_ACK, isr);
    }
    if id != 0 {
        return Err("used ring names a descriptor the probe did not post");
    }
    let len = len as usize;
    if len > RNG_BUF_LEN {
        return Err("device claims to have written more than the buffer holds");
    }
    let mut bytes = [0u8; RNG_BUF_LEN];
    for (i, byte) in bytes.iter_mut().enumerate() {
        // SAFETY: in bounds of the buffer; the device has returned it (used ring entry
        // seen). Volatile because the device, not the program, wrote it.
        *byte = unsafe { addr_of!((*q).buf.0).cast::<u8>().add(i).read_volatile() };
    }
    Ok((bytes, len))
}
