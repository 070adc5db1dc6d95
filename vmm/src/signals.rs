//! SIGINT/SIGTERM/SIGHUP for the runners: counted, so the run loop can turn the first
//! one into a clean guest shutdown (or, before guest init runs, an immediate stop) and a
//! second into a forced stop. Installed before anything of the VM exists, so that no
//! such signal ends `hostd run` before it has cleaned up.
//!
//! A loop that sleeps until something happens registers its eventfd with
//! [`WakeOnSignal`]: the handler then also writes to it, so a signal ends the sleep at
//! once, whenever it arrives (no periodic look at [`count`] is needed).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

static SIGNALS: AtomicU32 = AtomicU32::new(0);

/// The eventfd the handler writes to after counting, or -1.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: __errno_location has no preconditions; it returns this thread's errno.
        let errno_at = unsafe { libc::__errno_location() };
        // SAFETY: a valid pointer to this thread's errno, saved and restored around the
        // write so that the interrupted code sees its own value.
        let errno = unsafe { *errno_at };
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; 8 valid bytes to an eventfd (every
        // jailed thread's seccomp filter allows write). A full counter (EAGAIN) only
        // means a wake-up is pending already.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        // SAFETY: as above.
        unsafe { *errno_at = errno };
    }
}

/// Installs the counting handler for SIGINT, SIGTERM and SIGHUP (idempotent).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches atomics and writes to an eventfd, both
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// How many SIGINT/SIGTERM arrived so far.
pub fn count() -> u32 {
    SIGNALS.load(Ordering::SeqCst)
}

/// While alive, each counted signal also writes 1 to an eventfd (which the guard
/// borrows: keep the eventfd open at least as long). One registration per process at a
/// time; the previous one is restored on drop.
#[derive(Debug)]
pub struct WakeOnSignal {
    fd: RawFd,
    previous: RawFd,
}

impl WakeOnSignal {
    /// Registers `eventfd` (a nonblocking eventfd, so that the handler never blocks).
    pub fn new(eventfd: &impl AsRawFd) -> Self {
        let fd = eventfd.as_raw_fd();
        WakeOnSignal {
            fd,
            previous: WAKE_FD.swap(fd, Ordering::SeqCst),
        }
    }
}

impl Drop for WakeOnSignal {
    fn drop(&mut self) {
        let _ =
            WAKE_FD.compare_exchange(self.fd, self.previous, Ordering::SeqCst, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn a_signal_writes_to_the_registered_eventfd() {
        install();
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd");
        let before = count();
        {
            let _guard = WakeOnSignal::new(&wake);
            // SAFETY: raising a signal whose handler is installed above.
            unsafe { libc::raise(libc::SIGHUP) };
            assert!(count() > before);
            assert_eq!(wake.read().expect("woken"), 1);
        }
        // Unregistered: counted, the eventfd left alone.
        // SAFETY: as above.
        unsafe { libc::raise(libc::SIGHUP) };
        assert!(
            wake.read().is_err(),
            "nothing written after the guard is dropped"
        );
    }
}
