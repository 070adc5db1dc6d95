//! hostd probe: a tiny freestanding PVH guest kernel.
//!
//! It proves a monitor boots a PVH ELF, gives it a command line, a UART, virtio-mmio
//! devices and an exit port. See README.md for the contract. Built for
//! `x86_64-unknown-none` (soft-float: no x87/SSE/AVX code is generated) because the
//! guest's kernel-mode code runs through KVM's instruction emulator on this host.

#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
// Host-side unit tests build only the parsers; the rest is bare-metal only.
#![cfg_attr(test, allow(dead_code))]

#[cfg(not(test))]
mod boot;
mod cmdline;
mod fmt;
mod layout;
#[cfg(not(test))]
mod port;
#[cfg(not(test))]
mod start_info;
#[cfg(not(test))]
mod uart;
#[cfg(not(test))]
mod virtio_mmio;

#[cfg(not(test))]
mod probe {
    use crate::layout::EXIT_PORT;
    use crate::uart::{newline, put_bytes, put_dec, put_hex, put_line, put_str};
    use crate::{cmdline, port, start_info, virtio_mmio};

    /// Called by boot.rs in 64-bit mode with the `hvm_start_info` physical address.
    #[no_mangle]
    pub extern "C" fn probe_main(start_info_paddr: u64) -> ! {
        put_line("probe: started");

        let cmdline = match start_info::cmdline(start_info_paddr) {
            Ok(text) => text,
            Err(e) => {
                put_str("probe: error: no command line: ");
                match e {
                    start_info::Error::NoStartInfo => put_str("EBX (hvm_start_info) is 0"),
                    start_info::Error::BadMagic(m) => {
                        put_str("bad hvm_start_info magic ");
                        put_hex(u64::from(m));
                    }
                    start_info::Error::CmdlineNotMapped(a) => {
                        put_str("cmdline_paddr above 4 GiB: ");
                        put_hex(a);
                    }
                }
                newline();
                &[]
            }
        };
        put_str("probe: cmdline: ");
        put_bytes(cmdline);
        newline();

        each_arg(cmdline, cmdline::virtio_mmio, "malformed argument", |dev| {
            virtio_mmio::probe(dev.base, dev.size)
        });
        each_arg(
            cmdline,
            cmdline::cpuid_leaf,
            "probe.cpuid wants LEAF[.SUBLEAF]",
            |(leaf, sub)| print_cpuid(leaf, sub),
        );
        each_arg(
            cmdline,
            cmdline::rdmsr_index,
            "probe.rdmsr wants an MSR index",
            print_msr,
        );

        // The last `probe.exit=` wins, as with repeated kernel parameters.
        let mut code = 0u8;
        for arg in cmdline::args(cmdline) {
            match cmdline::exit_code(arg) {
                Some(Ok(c)) => code = c,
                Some(Err(())) => {
                    put_str("probe: error: probe.exit wants a decimal 0..255, ignored: ");
                    put_bytes(arg);
                    newline();
                }
                None => {}
            }
        }
        exit(code)
    }

    /// Runs `run` on the value of every argument `parse` recognises, in command-line
    /// order; a malformed one gets `probe: error: <what>, skipped: <arg>`.
    fn each_arg<T>(
        cmdline: &[u8],
        parse: fn(&[u8]) -> Option<Result<T, ()>>,
        what: &str,
        mut run: impl FnMut(T),
    ) {
        for arg in cmdline::args(cmdline) {
            match parse(arg) {
                Some(Ok(v)) => run(v),
                Some(Err(())) => {
                    put_str("probe: error: ");
                    put_str(what);
                    put_str(", skipped: ");
                    put_bytes(arg);
                    newline();
                }
                None => {}
            }
        }
    }

    /// Prints what the CPUID instruction returns for `leaf`/`sub` at CPL0, as the guest
    /// sees it (not what the monitor asked KVM for): `probe: cpuid LEAF.SUB: eax=.. ebx=..
    /// ecx=.. edx=..`, hex.
    fn print_cpuid(leaf: u32, sub: u32) {
        let r = core::arch::x86_64::__cpuid_count(leaf, sub);
        put_str("probe: cpuid ");
        put_hex(u64::from(leaf));
        put_str(".");
        put_hex(u64::from(sub));
        for (name, v) in [
            (": eax=", r.eax),
            (" ebx=", r.ebx),
            (" ecx=", r.ecx),
            (" edx=", r.edx),
        ] {
            put_str(name);
            put_hex(u64::from(v));
        }
        newline();
    }

    /// Prints `probe: rdmsr MSR: ` and then the MSR's value. An MSR the machine refuses
    /// raises #GP, which with the probe's empty IDT ends the machine by triple fault: the
    /// line then stops after the colon (what the monitor reports is the shutdown).
    fn print_msr(msr: u32) {
        put_str("probe: rdmsr ");
        put_hex(u64::from(msr));
        put_str(": ");
        let (lo, hi): (u32, u32);
        // SAFETY: RDMSR reads a register into eax:edx and touches no memory; a refused
        // index faults, which ends the machine (documented above), not the Rust program.
        unsafe {
            core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
        }
        put_hex(u64::from(hi) << 32 | u64::from(lo));
        newline();
    }

    /// Prints the exit line, writes the code to the exit port and, if still running (a
    /// monitor without that port), ends the machine by triple fault.
    pub fn exit(code: u8) -> ! {
        put_str("probe: exiting with code ");
        put_dec(u64::from(code));
        newline();
        port::outb(EXIT_PORT, code);
        port::triple_fault()
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        put_str("probe: panic");
        if let Some(loc) = info.location() {
            put_str(" at ");
            put_str(loc.file());
            put_str(":");
            put_dec(u64::from(loc.line()));
        }
        newline();
        exit(255)
    }
}

#[cfg(test)]
fn main() {}
