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

/// Called with `true` when a write to the transmit register has no effect but the output
/// (no "THR empty" interrupt, no divisor latch, no loopback), `false` when it has others.
pub type TransmitHook = Box<dyn FnMut(bool) + Send>;

/// The console UART.
pub struct Console<W: Write + Send> {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
    /// Told when transmitting changes between output only and more (see [`TransmitHook`]).
    on_transmit: Option<(TransmitHook, bool)>,
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
            on_transmit: None,
        }
    }

    /// The output writer (e.g. to write out what it holds back: the UART flushes it
    /// after every byte).
    pub fn output_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
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
        Some(Console {
            uart,
            on_transmit: None,
        })
    }

    /// Whether a write to the transmit register only outputs its byte: the "THR empty"
    /// interrupt is off (the driver polls the line status, as Linux's console and early
    /// console writes and the probe do), the divisor latch is closed (offset 0 is the
    /// transmit register, not the divisor's low byte) and loopback is off (the byte is not
    /// received back). Such writes may be batched and played back later, in order, as
    /// long as that happens before the guest next reads or reconfigures the UART.
    pub fn transmit_is_output_only(&self) -> bool {
        const IER_THR_EMPTY: u8 = 0x02;
        const LCR_DLAB: u8 = 0x80;
        const MCR_LOOP: u8 = 0x10;
        let s = self.uart.state();
        s.interrupt_enable & IER_THR_EMPTY == 0
            && s.line_control & LCR_DLAB == 0
            && s.modem_control & MCR_LOOP == 0
    }

    /// Calls `hook` now with [`Console::transmit_is_output_only`] and again whenever the
    /// guest's register writes change it.
    pub fn on_transmit_mode(&mut self, mut hook: TransmitHook) {
        let now = self.transmit_is_output_only();
        hook(now);
        self.on_transmit = Some((hook, now));
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
            // IER, LCR and MCR decide what a transmit-register write does.
            if matches!(off, 1 | 3 | 4) && self.on_transmit.is_some() {
                let now = self.transmit_is_output_only();
                if let Some((hook, was)) = self.on_transmit.as_mut().filter(|(_, w)| *w != now) {
                    *was = now;
                    hook(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The hook hears each change between "a transmit write only outputs" and not, as the
    /// guest writes IER, LCR and MCR, and nothing when a write changes nothing.
    #[test]
    fn transmit_mode_follows_ier_lcr_mcr() {
        let irq = Arc::new(Count::default());
        let mut c = Console::new(irq.clone(), Vec::new());
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s = seen.clone();
        c.on_transmit_mode(Box::new(move |on| s.lock().expect("hook log").push(on)));
        // Reset state: IER 0, no DLAB, no loopback.
        c.write(1, &[0x01]); // receive interrupt only: still output only
        c.write(1, &[0x03]); // THR empty interrupt on
        c.write(1, &[0x00]); // and off
        c.write(3, &[0x83]); // divisor latch open (8N1)
        c.write(0, &[0x01]); // divisor low byte, not output
        c.write(3, &[0x03]); // closed
        c.write(4, &[0x10]); // loopback
        c.write(4, &[0x00]);
        c.write(0, b"x");
        assert_eq!(
            *seen.lock().expect("hook log"),
            vec![true, false, true, false, true, false, true]
        );
        assert_eq!(c.uart.writer(), b"x");
        // Turning the THR-empty interrupt on raises it once (vm-superio), a plain write
        // with it off raises nothing.
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
