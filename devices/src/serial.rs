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

    /// A UART continuing from `saved` (bytes from [`Console::save`], e.g. read back from
    /// a snapshot): registers and pending input as they were. `None` when `saved` is
    /// not a UART state.
    pub fn restored(irq: Arc<dyn Interrupt>, out: W, saved: &[u8]) -> Option<Self> {
        let (regs, input) = saved.split_at_checked(9)?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: input.to_vec(),
        };
        let uart =
            Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out).ok()?;
        Some(Console { uart })
    }

    /// The UART's registers and pending input, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        let s = self.uart.state();
        let mut v = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        v.extend_from_slice(&s.in_buffer);
        v
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
