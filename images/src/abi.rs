//! The contract between the host (runners, VMM) and guest init, besides the manifest:
//! I/O ports guest init writes to and the lines it prints on the console.

/// I/O port guest init writes a [`marker`] byte to at milestones of the boot. The VMM
/// timestamps each write; under QEMU the port is unassigned and writes are ignored.
pub const BOOT_MARKER_PORT: u16 = 0x505;

/// Values written to [`BOOT_MARKER_PORT`].
pub mod marker {
    /// Guest init has started (first instruction of PID 1's main).
    pub const INIT_STARTED: u8 = 1;
    /// Every service without dependencies left to wait for has been started.
    pub const SERVICES_STARTED: u8 = 2;
}

/// I/O port guest init writes the VM's exit code (one byte) to just before powering
/// off. Under QEMU this is an `isa-debug-exit` device (QEMU then exits with
/// `code * 2 + 1`); the built-in VMM stops the VM with the code.
pub const EXIT_PORT: u16 = 0x501;

/// Exit code guest init uses when it cannot do its own job (unreadable manifest,
/// failed boot step, a `main` service that cannot be started).
pub const EXIT_INIT_FAILED: u8 = 125;

/// The block device a runner attaches the image's `rootfs` section as (the first
/// virtio-blk disk), and the one guest init mounts as the read-only root when the
/// manifest has a `root`.
pub const ROOT_DEVICE: &str = "/dev/vda";

/// Every console line guest init prints itself starts with this.
pub const CONSOLE_PREFIX: &str = "hostd-init: ";
/// Printed (after [`CONSOLE_PREFIX`]) as soon as init runs.
pub const LINE_STARTED: &str = "started";
/// Printed (after [`CONSOLE_PREFIX`]) when a service is started: `service NAME started`.
pub const LINE_SERVICE_STARTED: &str = "service ";
/// Printed (after [`CONSOLE_PREFIX`]) last: `powering off (exit code N)`.
pub const LINE_POWER_OFF: &str = "powering off (exit code ";

/// A line the host writes to the console input to ask guest init for a clean shutdown
/// (SIGTERM to every service, then power off).
pub const SHUTDOWN_REQUEST: &str = "\u{1b}hostd:shutdown";
