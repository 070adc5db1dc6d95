//! SIGINT/SIGTERM/SIGHUP for the runners: counted, so the run loop can turn the first
//! one into a clean guest shutdown (or, before guest init runs, an immediate stop) and a
//! second into a forced stop. Installed before anything of the VM exists, so that no
//! such signal ends `hostd run` before it has cleaned up.

use std::sync::atomic::{AtomicU32, Ordering};

static SIGNALS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs the counting handler for SIGINT, SIGTERM and SIGHUP (idempotent).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// How many SIGINT/SIGTERM arrived so far.
pub fn count() -> u32 {
    SIGNALS.load(Ordering::SeqCst)
}
