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

/// I/O port of the snapshot point (docs/snapshots.md). Guest init writes
/// [`snapshot::TAKE`] to it once it is ready and before volumes, secrets and services
/// (the built-in VMM may then snapshot the paused VM), then reads one byte from it:
/// [`snapshot::RESTORED`] when this VM was restored from that snapshot, anything else
/// (QEMU answers 0xff, the VMM [`snapshot::COLD`]) when it booted.
pub const SNAPSHOT_PORT: u16 = 0x506;
/// I/O port a restored guest reads its resume information from, 4 bytes per `in`:
/// [`snapshot::RESUME_INFO_LEN`] bytes, the host's wall clock (seconds and
/// nanoseconds since the epoch, u64 and u32 little-endian, 4 bytes of zero) and then
/// fresh entropy.
pub const RESUME_INFO_PORT: u16 = 0x508;

/// Values on [`SNAPSHOT_PORT`] and the layout of [`RESUME_INFO_PORT`].
pub mod snapshot {
    /// Written by guest init: a snapshot may be taken now.
    pub const TAKE: u8 = 1;
    /// Read back: this VM booted.
    pub const COLD: u8 = 1;
    /// Read back: this VM was restored from a snapshot.
    pub const RESTORED: u8 = 2;
    /// Bytes of entropy in the resume information.
    pub const RESUME_ENTROPY_LEN: usize = 64;
    /// Bytes of the resume information: clock (16) and entropy.
    pub const RESUME_INFO_LEN: usize = 16 + RESUME_ENTROPY_LEN;
}

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

/// The host's vsock CID, where guest init fetches secrets.
pub const VSOCK_HOST_CID: u32 = 2;
/// vsock port on the host serving the secrets payload (`NAME=HEX\n` lines, then EOF).
/// The vsock backend (devices/src/vhost_user/vsock.rs) listens on the same number.
pub const VSOCK_SECRETS_PORT: u32 = 1025;
/// vsock port on the host that echoes what it receives (round-trip self-test).
pub const VSOCK_ECHO_PORT: u32 = 1026;
/// First host vsock port of the capabilities: the guest reaches the `i`-th of
/// [`capability_names`] (0-based) on port `VSOCK_CAPS_PORT_BASE + i`, from a privileged
/// port (guest init's relay); the host side carries it to the capability over Noise.
pub const VSOCK_CAPS_PORT_BASE: u32 = 1100;
/// The entry of the secrets payload that carries this boot's capability token: random
/// bytes the host makes for each run, which guest init's relay sends first on every
/// capability connection. The host's relay refuses a connection without them, so a
/// program in the guest that goes around init (even as root, from a privileged port)
/// reaches no capability. No service can declare this secret name (a secret name
/// cannot start with a dot).
pub const CAPS_TOKEN_SECRET: &str = ".hostd-caps-token";
/// Bytes of the capability token.
pub const CAPS_TOKEN_LEN: usize = 32;
/// Most distinct capabilities one image's services may declare.
pub const MAX_CAPABILITIES: usize = 64;
/// Where a service finds the capabilities it was granted: `/run/hostd/caps/NAME`, a
/// Unix socket whose every connection is a byte stream to the capability's service.
pub const CAPS_DIR: &str = "/run/hostd/caps";

/// Whether `name` can name a capability: 1 to 64 letters, digits, `-` or `_` (the
/// names `hostd cap add` accepts).
pub fn is_capability_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Every capability the services of `m` declare, sorted and without repeats: the
/// order fixing each one's port ([`VSOCK_CAPS_PORT_BASE`] + index), computed alike by
/// the host and guest init from the same manifest.
pub fn capability_names(m: &crate::manifest::Manifest) -> Vec<String> {
    let set: std::collections::BTreeSet<&String> = m
        .services
        .values()
        .flat_map(|s| s.capabilities.iter())
        .collect();
    set.into_iter().cloned().collect()
}

/// Where a service finds the secrets it was granted: `/run/secrets/NAME`.
pub const SECRETS_DIR: &str = "/run/secrets";
/// Kernel command line flag making guest init send a line to [`VSOCK_ECHO_PORT`] and
/// log what comes back.
pub const VSOCK_SELFTEST_FLAG: &str = "hostd.vsock_selftest=1";
/// Printed (after [`CONSOLE_PREFIX`]) once secrets arrived: `secrets received over vsock (N)`.
pub const LINE_SECRETS_RECEIVED: &str = "secrets received over vsock (";
/// Printed (after [`CONSOLE_PREFIX`]) by the vsock self-test: `vsock echo: LINE`.
pub const LINE_VSOCK_ECHO: &str = "vsock echo: ";

/// The resolver configuration guest init writes at boot (on the /run tmpfs), from
/// `hostd.dns=`/`hostd.search=` on the kernel command line or else the manifest's
/// `network`; the image's `/etc/resolv.conf` links here.
pub const RESOLV_CONF: &str = "/run/hostd/resolv.conf";
/// Kernel command line key for DNS servers, comma-separated (`hostd run --net dns=`).
pub const CMDLINE_DNS: &str = "hostd.dns=";
/// Kernel command line key for search domains, comma-separated.
pub const CMDLINE_SEARCH: &str = "hostd.search=";
