//! virtio-rng: fills every device-writable buffer the driver offers with bytes from
//! the host's getrandom(2).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{device_type, VirtioDevice, VIRTIO_F_VERSION_1};

/// Largest number of bytes served per descriptor chain (bounds work per request).
const MAX_PER_CHAIN: u32 = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    /// Bytes served so far.
    pub served: u64,
}

/// Fills `buf` from getrandom(2). Shared by the in-process device and the vhost-user
/// backend.
pub(crate) fn random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, which getrandom fills.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::other("getrandom returned no bytes"));
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    continue;
                }
                let len = desc.len().min(MAX_PER_CHAIN - written);
                let mut buf = vec![0u8; len as usize];
                if random(&mut buf).is_err() {
                    tracing::warn!("virtio-rng: getrandom failed");
                    break;
                }
                if let Err(e) = mem.write_slice(&buf, desc.addr()) {
                    // A descriptor pointing outside guest memory: the guest's bug.
                    tracing::debug!("virtio-rng: bad descriptor: {e}");
                    break;
                }
                written += len;
                if written >= MAX_PER_CHAIN {
                    break;
                }
            }
            self.served += u64::from(written);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::debug!("virtio-rng: add_used: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }
}
