//! The 8250 UART on 0x3f8 (IRQ 4): the console. Output goes to a writer (hostd's
//! stdout); input is queued from the host.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::Interrupt;

/// Base port of the console UART.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports it decodes.
pub const COM1_LEN: u64 = 8;
/// Its interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Adapter from our [`Interrupt`] to vm-superio's `Trigger`.
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("IrqTrigger")
    }
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

/// The console UART.
pub struct Console<W: Write + Send> {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for Console<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl<W: Write + Send> Console<W> {
    /// A UART writing guest output to `out` and raising `irq`.
    pub fn new(irq: Arc<dyn Interrupt>, out: W) -> Self {
        Console {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest to read. Returns how many bytes fit.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl<W: Write + Send> BusDevice for Console<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, v) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}
