//! hostd's virtual machine runners.
//!
//! [`kvm`] is hostd's own VMM on KVM. [`qemu`] boots a guest under QEMU's `microvm` machine (KVM where it can run a Linux
//! guest, TCG elsewhere) — the way `linuxkit run qemu` serves laptops and CI.

pub mod backends;
pub mod boot;
pub mod host;
pub mod jail;
pub mod kvm;
pub mod layout;
pub mod payload;
pub mod plan;
pub mod qemu;
pub mod ready;
pub mod signals;
pub mod spawn;
pub mod volumes;

pub use boot::{BootSpec, Outcome, Timings, BASE_CMDLINE};

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Records the moment timings count from; call first thing in `main`.
pub fn mark_start() {
    let _ = START.set(std::time::Instant::now());
    jail::vm_pid();
}

static PHASES: std::sync::Mutex<Vec<(&'static str, f64)>> = std::sync::Mutex::new(Vec::new());

/// Records that start-up step `name` ended now, for `--timings` (see [`Timings::phases`]).
/// A forked VM process keeps the steps its parent recorded before the fork.
pub fn phase(name: &'static str) {
    let now = since_start_ms();
    if let Ok(mut p) = PHASES.lock() {
        p.push((name, now));
    }
}

/// The start-up steps recorded so far, in order.
pub fn phases() -> Vec<(String, f64)> {
    PHASES
        .lock()
        .map(|p| p.iter().map(|(n, t)| (n.to_string(), *t)).collect())
        .unwrap_or_default()
}

/// The instant timings count from.
pub fn start_instant() -> std::time::Instant {
    *START.get_or_init(std::time::Instant::now)
}

/// Milliseconds since [`mark_start`] (or since the first call, if it was never called).
pub fn since_start_ms() -> f64 {
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
        * 1000.0
}
