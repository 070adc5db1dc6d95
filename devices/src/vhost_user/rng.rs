//! vhost-user virtio-rng.

use std::io::{self, Write};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use vmm_sys_util::epoll::EventSet;

use vm_memory::GuestAddressSpace;

use super::{drain, Memory};
use crate::virtio::VIRTIO_F_VERSION_1;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest number of bytes served per chain.
const MAX_PER_CHAIN: usize = 64 * 1024;

/// The entropy backend.
#[derive(Debug)]
pub struct RngBackend {
    mem: Memory,
}

impl Default for RngBackend {
    fn default() -> Self {
        RngBackend {
            mem: Memory::new(vm_memory::GuestMemoryMmap::new()),
        }
    }
}

/// The syscalls virtio-rng needs beyond every backend's.
pub const RNG_SYSCALLS: &[i64] = &[libc::SYS_getrandom];

impl VhostUserBackendMut for RngBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        // QEMU's vhost-user front ends ask for up to 1024 entries (vhost-user-rng does).
        1024
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | super::RING_FEATURES
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(
        &mut self,
        mem: vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>,
    ) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let vring = super::kicked_vring(device_event, evset, vrings)?;
        let mem = self.mem.clone();
        drain(vring, &mem, |chain| {
            let m = mem.memory();
            let Ok(mut w) = chain.writer(&m) else {
                return 0;
            };
            let len = w.available_bytes().min(MAX_PER_CHAIN);
            let mut buf = vec![0u8; len];
            if crate::virtio::rng::random(&mut buf).is_err() || w.write_all(&buf).is_err() {
                return 0;
            }
            w.bytes_written() as u32
        })
    }
}
