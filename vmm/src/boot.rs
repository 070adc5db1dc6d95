//! What a runner boots: a kernel, an optional initrd, an optional read-only root disk,
//! a command line, vCPUs, memory.

use std::path::PathBuf;

use crate::backends::DeviceBackend;

/// A bootable guest, independent of the runner.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Kernel file (ELF vmlinux with a PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Initrd (cpio), if any.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Devices, each served by its own jailed backend process over vhost-user, in the
    /// order the guest should find them (an image's root disk first: `/dev/vda`).
    pub devices: Vec<DeviceBackend>,
    /// Jail the backends (off only with --no-sandbox).
    pub sandbox_devices: bool,
}

/// The kernel command line every hostd guest gets before the image's own additions:
/// the 8250 console, a reset that ends the VM (`reboot=t` triple-faults, which runners
/// treat as the end), no waiting on a panic, and no check of the IO-APIC timer: under
/// software emulation on a loaded host the kernel's check that the 8254 timer ticks
/// through the IO-APIC can miss its window and panic ("IO-APIC + timer doesn't work"),
/// which Firecracker and cloud images avoid the same way.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 no_timer_check quiet";

/// Time points of one run, measured from the hostd process start.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// The hypervisor process (or first KVM_RUN) started.
    pub vm_started_ms: Option<f64>,
    /// Guest init reported it started.
    pub init_started_ms: Option<f64>,
    /// The first service was started.
    pub first_service_ms: Option<f64>,
    /// The VM ended.
    pub exited_ms: Option<f64>,
    /// Start-up steps up to the first KVM_RUN and when each ended (built-in VMM):
    /// where the time before the guest runs goes, without a tracer slowing it.
    pub phases: Vec<(String, f64)>,
}

impl Timings {
    /// The start-up steps as one line ("start-up (ms from hostd start): args 2, …"), or
    /// None when none were recorded.
    pub fn phases_line(&self) -> Option<String> {
        if self.phases.is_empty() {
            return None;
        }
        let steps: Vec<String> = self
            .phases
            .iter()
            .map(|(n, t)| format!("{n} {t:.1}"))
            .chain(self.vm_started_ms.map(|t| format!("first KVM_RUN {t:.1}")))
            .collect();
        Some(format!(
            "start-up (ms from hostd start): {}",
            steps.join(", ")
        ))
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let show = |v: Option<f64>| {
            v.map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "-".into())
        };
        write!(
            f,
            "timings (from hostd start): vm started {}, guest init {}, first service {}, exit {}",
            show(self.vm_started_ms),
            show(self.init_started_ms),
            show(self.first_service_ms),
            show(self.exited_ms)
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The guest's exit code (the `main` service's), as guest init reported it.
    pub exit_code: u8,
    /// When things happened.
    pub timings: Timings,
}
