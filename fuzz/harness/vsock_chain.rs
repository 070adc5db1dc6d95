//! A hostile driver against the vsock backend: arbitrary guest memory (descriptor
//! tables, rings, packet headers and payloads) and queue geometry for tx and rx, and
//! raw packets fed straight to the host-side state machine. Nothing may panic, nothing
//! may touch memory outside the guest's, and every packet the host sends must be a
//! well-formed stream packet from CID 2 within the credit rules. The host serves two
//! capability ports; each raw packet is also fed to it as bytes from the capability
//! relay (frames decoded as the backend does), and what it writes to the relay must
//! decode as well-formed frames.

use hostd_devices::vhost_user::cap_link::Decoder;
use hostd_devices::vhost_user::vsock::{rx_queue, tx_queue, Header, Host, HEADER_LEN, MAX_PAYLOAD};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;

fn queue(size: u8, base: u32) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(u16::from(size % 32) + 1);
    q.set_desc_table_address(Some(base), Some(0));
    q.set_avail_ring_address(Some(base + 0x200), Some(0));
    q.set_used_ring_address(Some(base + 0x300), Some(0));
    q.set_ready(true);
    Some(q)
}

fn check(p: &[u8]) {
    let h = Header::parse(p).expect("the host sends whole headers");
    assert_eq!(h.src_cid, 2);
    assert_eq!(h.dst_cid, 3);
    assert_eq!(h.len as usize, p.len() - HEADER_LEN);
    assert!(p.len() - HEADER_LEN <= MAX_PAYLOAD);
}

/// Passes what `host` wrote for the relay through `d`: every frame must decode.
fn check_link(host: &mut Host, d: &mut Decoder) {
    d.push(&std::mem::take(host.link_output()));
    while let Some(_frame) = d.next_frame().expect("the host writes well-formed frames") {}
}

/// One input: see the module's documentation for its layout.
pub fn run(data: &[u8]) {
    // Layout: [rx size][tx size][n raw packets][per packet: 2-byte length, bytes]...[guest memory].
    let (Some(&rx_size), Some(&tx_size), Some(&n)) = (data.first(), data.get(1), data.get(2))
    else {
        return;
    };
    let mut host = Host::new(3, &[("db_password".into(), b"hunter2".to_vec())]);
    host.serve_capabilities(2);
    // What the host sends the relay, reassembled across the whole input.
    let mut to_relay = Decoder::default();

    let mut rest = &data[3..];
    for _ in 0..(n % 8) {
        if rest.len() < 2 {
            break;
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let _ = host.receive(&rest[2..2 + len]);
        check_link(&mut host, &mut to_relay);
        // The same bytes as frames from the relay.
        let mut from_relay = Decoder::default();
        from_relay.push(&rest[2..2 + len]);
        while let Ok(Some(f)) = from_relay.next_frame() {
            host.link_receive(f);
        }
        check_link(&mut host, &mut to_relay);
        rest = &rest[2 + len..];
        // Drain what the host wants to send, into buffers of varying room.
        let mut room = HEADER_LEN + len % 64;
        for _ in 0..64 {
            match host.next(room) {
                Some(p) => {
                    check(&p);
                    assert!(p.len() <= room);
                }
                None => break,
            }
            room += 7;
        }
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&rest[..rest.len().min(MEM)], GuestAddress(0));
    let (Some(mut rx), Some(mut tx)) = (queue(rx_size, 0), queue(tx_size, 0x800)) else {
        return;
    };
    for _ in 0..2 {
        let _ = tx_queue(&mut host, &mut tx, &mem);
        let _ = rx_queue(&mut host, &mut rx, &mem);
        check_link(&mut host, &mut to_relay);
    }
}
