//! A hostile driver against the block backend: arbitrary guest memory (descriptor
//! table, rings, request headers, buffers) and queue geometry; every chain the queue
//! yields is served against a 64 KiB disk, read-write or verified read-only.

use std::io::Write;

use hostd_devices::vhost_user::block::{BlockBackend, Verity};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const MEM: usize = 0x10000;
const DISK: usize = 0x10000;

/// One input: see the module's documentation for its layout.
pub fn run(data: &[u8]) {
    let Some((&flags, seed)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&seed[..seed.len().min(MEM)], GuestAddress(0));
    let Ok(mut file) = tempfile::tempfile() else {
        return;
    };
    let disk: Vec<u8> = (0..DISK).map(|i| (i % 253) as u8).collect();
    if file.write_all(&disk).is_err() {
        return;
    }
    let verity = (flags & 1 == 1)
        .then(|| Verity::new(&Verity::compute(&disk), DISK as u64))
        .and_then(Result::ok);
    let mut backend = BlockBackend::new(file, 0, DISK as u64, flags & 2 == 2, verity, "fuzz");
    let atomic = GuestMemoryAtomic::new(mem);
    backend.set_memory(atomic.clone());
    let Ok(mut q) = Queue::new(256) else { return };
    // A compact layout so short inputs reach the device: 16 descriptors at 0, the
    // avail ring at 0x100, the used ring at 0x200, buffers anywhere.
    q.set_size(1 << ((flags >> 2) % 5));
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let guard = atomic.memory();
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(guard.clone()) else {
            break;
        };
        let head = chain.head_index();
        let len = backend.request(chain);
        if q.add_used(&*guard, head, len).is_err() {
            break;
        }
    }
}
