//! The process start of `hostd` and `hostd-backend` without the standard library's
//! runtime set-up (`#![no_main]`): these two start every VM (`hostd run`, the VM's
//! process, each device backend), where each start is paid once per process.
//!
//! Before `main`, the runtime finds the main thread's stack for its stack-overflow
//! handler: glibc's `pthread_getattr_np` reads /proc/self/maps line by line with
//! `sscanf`, and every thread then gets an alternate signal stack (three system calls to
//! make, two to remove). In the nested test host, where a process's code runs emulated
//! the first time, that was ~3 ms of each start (perf, `hostd run --kernel /nonexistent`,
//! docs/startup.md). Without it a stack overflow still ends the process (SIGSEGV on the
//! guard page), only without the "has overflowed its stack" line.
//!
//! What of that runtime these programs rely on is done here: the standard fds open (a
//! closed one would be taken by the next file opened, and output meant for the terminal
//! would go into it), SIGPIPE ignored (a write to a closed pipe is an error, not
//! death), and no signal blocked (a backend starts with all blocked). The environment
//! needs nothing (the C library sets it up). The arguments are taken from `main`'s
//! ([`args`]): the standard library reads them before `main` with glibc (an
//! `.init_array` function, which runs for `#![no_main]` programs too) but with musl only
//! in a `main` of its own, so `std::env::args` is empty in a musl build of these
//! programs, which is how they are shipped (docs/startup.md).
//!
//! Their musl build allocates with dlmalloc ([`ALLOC`], for both programs):
//! musl's own allocator maps and unmaps memory as it goes, 70 mmap and 51 munmap calls
//! in a jailed probe's run against 25 and 10 with dlmalloc (glibc: 11 and 1), which
//! keeps what it maps.
//! In the nested test host each of those page-table changes costs more than the code
//! (docs/startup.md, session 32).

/// The musl build's allocator (above).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Call first thing in `main`.
pub fn init() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    let polled = loop {
        // SAFETY: poll reads and writes the three pollfds it is given, which live here.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
        if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break r != -1;
        }
    };
    for p in fds {
        let closed = if polled {
            p.revents & libc::POLLNVAL != 0
        } else {
            // SAFETY: fcntl(F_GETFD) only asks about the fd.
            let flags = unsafe { libc::fcntl(p.fd, libc::F_GETFD) };
            flags == -1
        };
        // SAFETY: a NUL-terminated path; the lowest free fd is the closed one.
        if closed && unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } != p.fd {
            // SAFETY: abort is always sound; a process without its standard fds and no
            // /dev/null to put there cannot report anything.
            unsafe { libc::abort() };
        }
    }
    // SAFETY: setting a signal's disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // No signal blocked: a device backend starts with every signal blocked (its
    // starter shares the VM process's memory until the exec and may run none of its
    // handlers, vmm/src/spawn.rs), and what a caller blocked is not hostd's to keep.
    // SAFETY: an all-zero sigset_t is a valid value to empty.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a local set.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: sets this thread's (the only one's) mask from a local.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
}

/// The command line `main` was given.
///
/// # Safety
/// `argv` holds `argc` pointers to NUL-terminated strings, as the C library passes them
/// to `main`.
pub unsafe fn args(argc: libc::c_int, argv: *const *const libc::c_char) -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    (0..usize::try_from(argc).unwrap_or(0))
        .map(|i| {
            // SAFETY: i < argc: within the caller's array of argc pointers.
            let at = unsafe { argv.add(i) };
            // SAFETY: as above, an initialised element of that array.
            let ptr = unsafe { at.read() };
            // SAFETY: each of those pointers is a C string (the caller's promise).
            let arg = unsafe { std::ffi::CStr::from_ptr(ptr) };
            std::ffi::OsStr::from_bytes(arg.to_bytes()).to_owned()
        })
        .collect()
}
