//! `hostd`: `hostd run` and the device backends here; every other subcommand is handed
//! to `hostd-full` (src/lib.rs). Started without the standard library's runtime set-up
//! (vm_start.rs says why).
#![no_main]

#[path = "vm_start.rs"]
mod vm_start;

#[no_mangle]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    vm_start::init();
    // SAFETY: the C library's arguments to `main`.
    let args = unsafe { vm_start::args(argc, argv) };
    hostd::main::<false>(args);
    0
}
