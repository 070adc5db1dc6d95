//! Ending on SIGINT, SIGTERM or SIGHUP without leaving anything behind, for commands
//! that have no guest to shut down (`hostd build`): the signals are blocked in every
//! thread and one thread waits for them, removes every scratch file and directory
//! ([`hostd_images::scratch`]) and exits with 128 + the signal's number. Child
//! processes (apt, mkfs) start with the signal mask cleared by the standard library.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal being handled (0: none yet).
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// Called by `main` before it exits: when a signal is being handled, the command's own
/// outcome (often an error, its scratch files having vanished under it) must not win
/// the race to exit; the signal thread ends the process with 128 + the signal.
pub fn wait_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) != 0 {
        loop {
            std::thread::park();
        }
    }
}

#[cfg(feature = "full")]
/// Installs the waiting thread. Call before any other thread is started.
pub fn remove_scratch_on_signals() {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sigset_t pointer.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a valid, initialised sigset_t and a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: a valid, initialised set; the old mask is not wanted.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        tracing::warn!("cannot block signals: scratch files may be left behind on Ctrl-C");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: a valid set (moved into this thread) and out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                INTERRUPTED.store(sig, Ordering::SeqCst);
                if hostd_images::scratch::remove_all() == 0 {
                    eprintln!("hostd: interrupted (signal {sig}); nothing was written");
                } else {
                    eprintln!("hostd: interrupted (signal {sig}) after its output was written");
                }
                std::process::exit(128 + sig);
            }
        });
    if spawned.is_err() {
        tracing::warn!("cannot start the signal thread: scratch files may be left behind");
    }
}
