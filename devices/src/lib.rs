//! hostd device models. Everything here parses guest-controlled input (port and MMIO
//! accesses, virtqueues): every access is bounds-checked and a bad access is ignored
//! or logged, never a panic.
//!
//! - [`bus`]: the port-I/O and MMIO buses the vCPU exit loop dispatches to.
//! - [`serial`]: the 8250 UART on 0x3f8 (the only legacy device).
//! - [`marker`]: the boot-marker and exit ports guest init (or the probe) writes to.
//! - [`virtio`]: the virtio-mmio transport and the in-process virtio-rng device.
//! - [`thread`]: threads with stacks that never take a transparent huge page.

pub mod bus;
pub mod jail;
pub mod marker;
pub mod serial;
pub mod thread;
pub mod vhost_user;
pub mod virtio;

/// Something that can raise a guest interrupt line (an irqfd in the VMM).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self);
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        if let Err(e) = self.write(1) {
            tracing::warn!("cannot raise interrupt: {e}");
        }
    }
}
