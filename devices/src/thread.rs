//! Threads of the VMM and its device backends: named, with stacks of [`STACK`] bytes.
//!
//! Not the standard library's 2 MiB: a thread's stack is one anonymous mapping, and one
//! of 2 MiB and a page or two holds a whole 2 MiB-aligned range, which the kernel backs
//! with a transparent huge page wherever THP is `always` (Debian's kernels). The C
//! library writes the new thread's descriptor at the top of that mapping before the
//! thread exists (`pthread_create`, musl's and glibc's), so that fault, in the thread
//! starting it, zeroes 2 MiB, and each thread then holds 2 MiB of memory for a stack
//! that uses a few pages. In the nested test host (docs/startup.md, session 33) the
//! vCPU thread's start took 28-180 ms in about half the probe's runs that followed a
//! VM's exit (free huge pages then), against 3 ms otherwise. A stack smaller than
//! 2 MiB can never get a huge page.

/// Stack size of every thread hostd's VM path starts: ample for its code, whose frames
/// are shallow (no recursion), and below the size of a huge page.
pub const STACK: usize = 1 << 20;
// Below a huge page with the guard page and the C library's descriptor on top.
const _: () = assert!(STACK + (64 << 10) < 2 << 20);

/// The variable, and its value, that gives threads started by libraries (those of
/// `vhost-user-backend` in a device backend) the same stack: the standard library
/// reads it once, for every thread started without a size of its own.
pub fn min_stack_env() -> (&'static str, String) {
    ("RUST_MIN_STACK", STACK.to_string())
}

/// A thread builder named `name`, with a stack of [`STACK`] bytes.
pub fn named(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_says_the_same_size() {
        let (key, value) = min_stack_env();
        assert_eq!(key, "RUST_MIN_STACK");
        assert_eq!(value.parse::<usize>(), Ok(STACK));
    }

    #[test]
    fn a_named_thread_runs_with_a_stack_of_its_own_size() {
        let got = named("stack-test")
            .spawn(|| {
                // Half the stack in one frame's worth of locals, then its name.
                let buf = [7u8; STACK / 2];
                (
                    std::hint::black_box(&buf)[STACK / 2 - 1],
                    std::thread::current().name().map(String::from),
                )
            })
            .expect("spawn")
            .join()
            .expect("join");
        assert_eq!(got, (7, Some("stack-test".to_string())));
    }
}
