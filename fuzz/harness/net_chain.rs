//! A hostile driver against the net backend's chain handling: arbitrary guest memory
//! (descriptor tables, rings, headers, buffers) and queue geometry for both queues. The
//! tx path sends every frame into a Vec instead of a TAP; the rx path delivers frames of
//! fuzzer-chosen sizes (from a byte slice, instead of a TAP) into the rx chains, twice,
//! so frames left waiting and chains given back are exercised too; every chain a pass
//! returns must be on the used ring. Nothing may panic, nothing may touch memory outside
//! the guest's, and every frame sent must be within bounds, with a header the acked
//! features allow. The acked features (offloads and
//! mergeable receive buffers or not, legacy header or not) come from the input too, so
//! hostile headers (bad gso_type, hdr_len or csum_start/offset beyond the frame, chains
//! shorter than the header) and mergeable delivery over hostile chains are exercised.

use hostd_devices::vhost_user::net::frames::{check_tx_header, NetHdr, MIN_FRAME};
use hostd_devices::vhost_user::net::{
    rx_queue, tx_queue, Negotiated, MAX_FRAME, NET_HDR_LEN, OFFLOAD_FEATURES,
};
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
    // Layout: [features][rx size][tx size][n frames][n * 2 bytes of frame lengths]
    // [guest memory]. Features: bit 0 offloads, bit 1 version 1 (else legacy header),
    // bit 2 without mergeable buffers.
    let Some((&features, data)) = data.split_first() else {
        return;
    };
    let (Some(&rx_size), Some(&tx_size), Some(&nframes)) = (data.first(), data.get(1), data.get(2))
    else {
        return;
    };
    let mut acked = 0u64;
    if features & 1 != 0 {
        acked |= OFFLOAD_FEATURES;
        if features & 4 != 0 {
            acked &= !hostd_devices::vhost_user::net::frames::VIRTIO_NET_F_MRG_RXBUF;
        }
    }
    if features & 2 != 0 {
        acked |= hostd_devices::virtio::VIRTIO_F_VERSION_1;
    }
    let neg = Negotiated::new(acked);
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
    let mut buf = Vec::new();
    if tx_queue(&mut tx, &mem, neg, &mut buf, &mut |f| sent.push(f.to_vec())).is_ok() {
        let hdr_len = neg.hdr_len();
        for f in &sent {
            let frame = f.len() - hdr_len;
            assert!(
                (MIN_FRAME..=MAX_FRAME).contains(&frame),
                "tx frame of {} bytes",
                f.len()
            );
            let h = NetHdr::parse(f).expect("a header");
            assert_eq!(check_tx_header(&h, frame, neg), Ok(()));
        }
    }

    // Frames from the "TAP": a header (flags and gso_type from the length's bytes, so
    // offloads the driver did not ack arrive too) and filler.
    let mut frames: Vec<Vec<u8>> = lens
        .chunks_exact(2)
        .map(|l| {
            let mut f = vec![0x5a; usize::from(u16::from_le_bytes([l[0], l[1]]))];
            if let Some(h) = f.get_mut(..2) {
                h.copy_from_slice(&[l[0] & 3, l[1] & 0x85]);
            }
            f
        })
        .collect();
    let mut pending = None;
    let mut rx_buf = vec![0u8; NET_HDR_LEN + MAX_FRAME];
    for _ in 0..2 {
        let old = rx.next_used();
        let pass = rx_queue(
            &mut rx,
            &mem,
            neg,
            &mut rx_buf,
            &mut pending,
            &mut |b: &mut [u8]| {
                let f = frames.pop()?;
                let n = f.len().min(b.len());
                b[..n].copy_from_slice(&f[..n]);
                Some(n)
            },
        );
        // Every chain returned is on the used ring, those of a merged frame included
        // (published together, past Queue's own add_used).
        if let Ok(pass) = pass {
            assert_eq!(
                usize::from(rx.next_used().wrapping_sub(old)),
                pass.used % 0x1_0000,
                "{pass:?}"
            );
        }
    }
}
