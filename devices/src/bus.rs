//! Port-I/O and MMIO buses: a sorted map from address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base; `data` is 1 to 8
/// bytes as the guest accessed them. Guest-controlled: implementations check both.
pub trait BusDevice: Send {
    /// A guest read. Unwritten bytes of `data` read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Base of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
    /// Zero length or the range wraps around.
    #[error("invalid range {base:#x}+{len:#x}")]
    Invalid {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .devices
            .iter()
            .map(|(b, (l, _))| format!("{b:#x}+{l:#x}"))
            .collect();
        f.debug_struct("Bus").field("devices", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid { base, len })?;
        if let Some((b, (l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `[addr, addr + size)` entirely, and the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((dev, offset))
    }

    /// Dispatches a read; returns false when no device covers the access (the guest
    /// then reads all ones, as from an empty bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                data.fill(0);
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device covers it (dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8;
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(0x100, 0x10, dev.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            bus.insert(0x10f, 1, dev.clone()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x10, dev.clone()),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(0x110, 1, dev.clone()).is_ok());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        let mut b = [0u8; 4];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b[0], 4);
        // Straddling the end of a device is not dispatched.
        assert!(!bus.read(0x10e, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x0, &[1]));
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(
            dev.lock().map(|d| d.0.clone()).unwrap_or_default(),
            vec![(0xf, vec![9])]
        );
    }
}
