//! virtio over MMIO: the transport's register file ([`mmio`]) and device models.

pub mod mmio;
pub mod rng;
pub mod vhost_user;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1: a modern (virtio 1.x) device. The only kind we offer.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Device type id.
    fn device_type(&self) -> u32;
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device config space (`offset` relative to 0x100). Guest-controlled.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes device config space. Guest-controlled.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver notified queue `index`: consume what it offers. Returns whether
    /// used buffers were added (so the transport raises an interrupt).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The driver accepted these features (FEATURES_OK).
    fn acked_features(&mut self, _features: u64) {}
    /// The driver set DRIVER_OK with these queues set up.
    fn activate(&mut self, _queues: &[Queue]) {}
    /// Gives the device the transport's interrupt status and line, for devices that
    /// raise interrupts from elsewhere than [`VirtioDevice::process_queue`].
    fn attach_interrupt(
        &mut self,
        _status: std::sync::Arc<std::sync::atomic::AtomicU32>,
        _irq: std::sync::Arc<dyn crate::Interrupt>,
    ) {
    }
}
