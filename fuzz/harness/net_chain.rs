//! A hostile driver against the net backend's chain handling: arbitrary guest memory
//! (descriptor tables, rings, headers, buffers) and queue geometry for both queues. The
//! tx path sends every frame into a Vec instead of a TAP; the rx path delivers frames of
//! fuzzer-chosen sizes (from a byte slice, instead of a TAP) into the rx chains, twice,
//! so frames left waiting and chains given back are exercised too. Nothing may panic,
//! nothing may touch memory outside the guest's, and every frame sent must be within
//! bounds.

use hostd_devices::vhost_user::net::{rx_queue, tx_queue, MAX_FRAME};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;

/// A queue of `size` (1..=32; sizes that are not a power of two are invalid and must be
/// refused) with its rings packed near `base`, so that short inputs reach them.
fn queue(size: u8, base: u32) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(u16::from(size % 32) + 1);
    q.set_desc_table_address(Some(base), Some(0));
    q.set_avail_ring_address(Some(base + 0x200), Some(0));
    q.set_used_ring_address(Some(base + 0x300), Some(0));
    q.set_ready(true);
    Some(q)
}

/// One input: see the module's documentation for its layout.
pub fn run(data: &[u8]) {
    // Layout: [rx size][tx size][n frames][n * 2 bytes of frame lengths][guest memory].
    let (Some(&rx_size), Some(&tx_size), Some(&nframes)) = (data.first(), data.get(1), data.get(2))
    else {
        return;
    };
    let lens_end = (3 + usize::from(nframes % 16) * 2).min(data.len());
    let (lens, seed) = data[3..].split_at(lens_end - 3);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&seed[..seed.len().min(MEM)], GuestAddress(0));
    let (Some(mut rx), Some(mut tx)) = (queue(rx_size, 0), queue(tx_size, 0x800)) else {
        return;
    };

    let mut sent: Vec<Vec<u8>> = Vec::new();
    if tx_queue(&mut tx, &mem, &mut |f| sent.push(f.to_vec())).is_ok() {
        for f in &sent {
            assert!(
                f.len() >= 14 && f.len() <= MAX_FRAME,
                "tx frame of {} bytes",
                f.len()
            );
        }
    }

    let mut frames: Vec<Vec<u8>> = lens
        .chunks_exact(2)
        .map(|l| vec![0x5a; usize::from(u16::from_le_bytes([l[0], l[1]]))])
        .collect();
    let mut pending = None;
    for _ in 0..2 {
        let _ = rx_queue(&mut rx, &mem, &mut pending, &mut || frames.pop());
    }
}
