//! A hostile driver: arbitrary guest memory contents and an arbitrary sequence of
//! register reads and writes (any offset, any width) against the virtio-mmio transport
//! with a virtio-rng device behind it, dispatched through the MMIO bus as the vCPU loop
//! does; optionally after a proper bring-up, so hostile descriptor chains reach the device. Nothing may panic, and nothing may touch memory outside the guest's.

use std::sync::{Arc, Mutex};

use hostd_devices::bus::{Bus, SharedDevice};
use hostd_devices::virtio::mmio::MmioTransport;
use hostd_devices::virtio::rng::Rng;
use hostd_devices::Interrupt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) {}
}

const MEM: usize = 0x10000;
const BASE: u64 = 0xd000_0000;

fn write(bus: &Bus, offset: u64, v: u32) {
    bus.write(BASE + offset, &v.to_le_bytes());
}

/// One input: see the module's documentation for its layout.
pub fn run(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    // Layout of the input: [flags][n ops][n * 8 bytes of ops][guest memory contents].
    let (Some(&flags), Some(&nops)) = (data.first(), data.get(1)) else {
        return;
    };
    let ops_end = (2 + usize::from(nops) * 8).min(data.len());
    let (ops, seed) = data[2..].split_at(ops_end - 2);
    let _ = mem.write_slice(&seed[..seed.len().min(MEM)], GuestAddress(0));
    let dev: SharedDevice = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(Rng::default()),
        mem.clone(),
        Arc::new(NoIrq),
    )));
    let mut bus = Bus::new();
    if bus.insert(BASE, 0x1000, dev).is_err() {
        return;
    }
    if flags & 1 == 1 {
        // A well-behaved bring-up (so the fuzzer reaches the virtqueue with hostile
        // descriptor tables and rings in guest memory), queue geometry from the flags.
        write(&bus, 0x070, 3); // ACKNOWLEDGE | DRIVER
        write(&bus, 0x024, 1);
        write(&bus, 0x020, 1); // VIRTIO_F_VERSION_1
        write(&bus, 0x070, 11); // | FEATURES_OK
        write(&bus, 0x038, u32::from(flags >> 1) + 1); // queue size (may be invalid)
        write(&bus, 0x080, 0x1000);
        write(&bus, 0x090, 0x2000);
        write(&bus, 0x0a0, 0x3000);
        write(&bus, 0x044, 1);
        write(&bus, 0x070, 15); // | DRIVER_OK
        write(&bus, 0x050, 0); // notify
    }
    // Each op: kind (1), offset (2), width (1), value (4).
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1100; // also past the window
        let width = [1usize, 2, 4, 8][usize::from(op[3] % 4)];
        let value = u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]]));
        if op[0] % 2 == 0 {
            let mut buf = [0u8; 8];
            bus.read(BASE + offset, &mut buf[..width]);
        } else {
            bus.write(BASE + offset, &value.to_le_bytes()[..width]);
        }
    }
}
