//! The virtio-mmio transport, modern (version 2) register layout (virtio 1.2, 4.2.2).
//! Every register access is guest-controlled: unaligned or wrongly sized accesses to
//! the common registers are ignored, queue registers are only writable while the queue
//! is not ready, and a driver that sets up an invalid queue gets DEVICE_NEEDS_RESET.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::Interrupt;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4853_4f48; // "HOSH"

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added.
const INT_VRING: u32 = 1;

/// One queue of a [`TransportState`]: what the driver set up, and where the device
/// stands in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueState {
    /// QueueReady.
    pub ready: bool,
    /// QueueNum.
    pub size: u16,
    /// Descriptor table, driver (avail) and device (used) ring addresses.
    pub desc: u64,
    /// Driver area.
    pub avail: u64,
    /// Device area.
    pub used: u64,
    /// The next available entry the device will take. For a device served by a backend
    /// this is the used ring's index at the snapshot (every request taken was answered:
    /// guest init is quiescent when it asks for one), which a fresh backend resumes at.
    pub next_avail: u16,
}

/// The register file of a transport, for a snapshot ([`MmioTransport::save`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportState {
    /// Device status.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Selector registers.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueState>,
}

/// Bytes of one encoded [`QueueState`].
const QUEUE_STATE_LEN: usize = 1 + 2 + 8 * 3 + 2;
/// Bytes of an encoded [`TransportState`] before its queues.
const TRANSPORT_STATE_LEN: usize = 4 + 8 + 4 * 5 + 2;

impl TransportState {
    /// Little-endian encoding, read back by [`TransportState::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(TRANSPORT_STATE_LEN + self.queues.len() * QUEUE_STATE_LEN);
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&self.driver_features.to_le_bytes());
        for x in [
            self.queue_sel,
            self.device_features_sel,
            self.driver_features_sel,
            self.interrupt_status,
            self.config_generation,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&(self.queues.len() as u16).to_le_bytes());
        for q in &self.queues {
            v.push(u8::from(q.ready));
            v.extend_from_slice(&q.size.to_le_bytes());
            for a in [q.desc, q.avail, q.used] {
                v.extend_from_slice(&a.to_le_bytes());
            }
            v.extend_from_slice(&q.next_avail.to_le_bytes());
        }
        v
    }

    /// Parses [`TransportState::to_bytes`]' encoding; `None` unless `b` is exactly one.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let mut s = TransportState {
            status: r.u32()?,
            driver_features: r.u64()?,
            queue_sel: r.u32()?,
            device_features_sel: r.u32()?,
            driver_features_sel: r.u32()?,
            interrupt_status: r.u32()?,
            config_generation: r.u32()?,
            queues: Vec::new(),
        };
        let n = r.u16()?;
        for _ in 0..n {
            let ready = match r.take(1)?[0] {
                0 => false,
                1 => true,
                _ => return None,
            };
            s.queues.push(QueueState {
                ready,
                size: r.u16()?,
                desc: r.u64()?,
                avail: r.u64()?,
                used: r.u64()?,
                next_avail: r.u16()?,
            });
        }
        r.0.is_empty().then_some(s)
    }
}

/// A cursor over bytes read back from a snapshot.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Why a saved register file cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The saved queues do not match this device's.
    #[error("the snapshot has {saved} queues for a device with {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A saved queue is not one this device and memory can run.
    #[error("queue {0} of the snapshot is not valid in this VM")]
    InvalidQueue(usize),
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; `irq` is its interrupt line.
    pub fn new(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect();
        let interrupt_status = Arc::new(AtomicU32::new(0));
        device.attach_interrupt(interrupt_status.clone(), irq.clone());
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status,
            config_generation: 0,
        }
    }

    /// The interrupt status register, shared with devices that raise interrupts from
    /// their own threads.
    pub fn interrupt_status(&self) -> Arc<AtomicU32> {
        self.interrupt_status.clone()
    }

    /// The device's current status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The register file and queue positions, for a snapshot. The guest must be paused.
    pub fn save(&self) -> TransportState {
        TransportState {
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    ready: q.ready(),
                    size: q.size(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next_avail: if q.ready() {
                        q.used_idx(&self.mem, Ordering::Acquire)
                            .map(|w| w.0)
                            .unwrap_or(0)
                    } else {
                        0
                    },
                })
                .collect(),
        }
    }

    /// Puts a saved register file back (in a VM restored from a snapshot, before its
    /// vCPUs run) and, if the driver had set DRIVER_OK, activates the device on the
    /// saved queues from their saved positions.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), RestoreError> {
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: s.queues.len(),
                device: self.queues.len(),
            });
        }
        for (i, (q, saved)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            q.reset();
            if saved.size > q.max_size() {
                return Err(RestoreError::InvalidQueue(i));
            }
            q.set_size(saved.size);
            q.set_desc_table_address(Some(saved.desc as u32), Some((saved.desc >> 32) as u32));
            q.set_avail_ring_address(Some(saved.avail as u32), Some((saved.avail >> 32) as u32));
            q.set_used_ring_address(Some(saved.used as u32), Some((saved.used >> 32) as u32));
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_avail);
            q.set_ready(saved.ready);
            if saved.ready && !q.is_valid(&self.mem) {
                return Err(RestoreError::InvalidQueue(i));
            }
        }
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.config_generation = s.config_generation;
        self.interrupt_status
            .store(s.interrupt_status, Ordering::SeqCst);
        self.status = s.status;
        if s.status & status::FEATURES_OK != 0 {
            self.device.acked_features(s.driver_features);
        }
        if s.status & status::DRIVER_OK != 0 {
            self.device.activate(&self.queues);
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .selected_queue()
                .map(|q| q.max_size().into())
                .unwrap_or(0),
            reg::QUEUE_READY => self.selected_queue().map(|q| q.ready().into()).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let queue_writable = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => match self
                .driver_features_sel
            {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if queue_writable => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if queue_writable => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    let ready = v == 1;
                    q.set_ready(ready);
                    if ready && !q.is_valid(&mem) {
                        q.set_ready(false);
                        tracing::debug!("virtio-mmio: driver enabled an invalid queue");
                        self.status |= status::DEVICE_NEEDS_RESET;
                    }
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if queue_writable =>
            {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !7 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(v),
            _ => tracing::trace!("virtio-mmio: write to {offset:#x} ignored"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK sticks only if the driver accepted a subset of what we offer,
        // including VERSION_1; otherwise the driver sees it cleared and gives up.
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && v & status::FEATURES_OK == 0 {
            v &= !status::DRIVER_OK;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            self.device.acked_features(self.driver_features);
        }
        if newly & status::DRIVER_OK != 0 {
            self.device.activate(&self.queues);
        }
        // Bits only ever get set by the driver (besides reset), and NEEDS_RESET is ours.
        self.status = (self.status & status::DEVICE_NEEDS_RESET)
            | (self.status | v) & !status::DEVICE_NEEDS_RESET;
    }

    fn notify(&mut self, index: u32) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index as usize).filter(|q| q.ready()) else {
            return;
        };
        if self.device.process_queue(index as usize, queue, &self.mem) {
            self.interrupt_status.fetch_or(INT_VRING, Ordering::SeqCst);
            self.irq.trigger();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// The kernel command-line argument announcing a device: `virtio_mmio.device=4K@0x…:IRQ`.
pub fn cmdline_arg(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct CountIrq(AtomicU32);
    impl Interrupt for CountIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// A driver's whole bring-up and one request, as the Linux driver (and the probe) do.
    #[test]
    fn rng_round_trip_through_the_register_file() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])
            .unwrap_or_else(|e| panic!("{e}"));
        let irq = Arc::new(CountIrq::default());
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem.clone(), irq.clone());
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 4);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_NUM, 4);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, 0xf);
        // One 16-byte device-writable descriptor at 0x4000, offered in the avail ring.
        let put = |a: u64, v: &[u8]| {
            mem.write_slice(v, GuestAddress(a))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        put(0x1000, &0x4000u64.to_le_bytes());
        put(0x1008, &16u32.to_le_bytes());
        put(0x100c, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
        put(0x2004, &0u16.to_le_bytes()); // ring[0] = desc 0
        put(0x2002, &1u16.to_le_bytes()); // avail idx = 1
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap_or(0);
        let used_len: u32 = mem.read_obj(GuestAddress(0x3008)).unwrap_or(0);
        assert_eq!((used_idx, used_len), (1, 16));
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn hostile_driver_gets_nothing_but_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])
            .unwrap_or_else(|e| panic!("{e}"));
        let irq = Arc::new(CountIrq::default());
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem, irq.clone());
        // Features we never offered: FEATURES_OK does not stick.
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, reg::STATUS, status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(
            r(&mut t, reg::STATUS) & (status::FEATURES_OK | status::DRIVER_OK),
            0
        );
        // Queue outside guest memory: not ready, device needs reset.
        w(&mut t, reg::QUEUE_NUM, 4);
        w(&mut t, reg::QUEUE_DESC_LOW, 0xffff_f000);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // Odd sizes, odd offsets, queue indexes out of range, notify before DRIVER_OK.
        t.write(0x31, &[1, 2, 3, 4]);
        t.write(reg::QUEUE_SEL, &[9]);
        w(&mut t, reg::QUEUE_SEL, 77);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_NOTIFY, 77);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        let mut b = [0u8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }
}
