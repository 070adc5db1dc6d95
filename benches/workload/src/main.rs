//! The one program `hostd bench` runs in every tier (native process, container, microVM):
//!
//! - `serve PORT`: an HTTP/1.1 hello server (keep-alive, a thread per connection);
//!   prints `workload: ready` once it listens.
//! - `loops [BUDGET_MS]`: the system-call loop (`getppid`, ns per call), the page-fault
//!   loop (fresh anonymous pages touched, MiB/s) and a fixed CPU loop (ms); prints one
//!   `workload: loops …` line. Each loop runs for about BUDGET_MS (default 300) so the
//!   same binary gives usable figures natively and where every kernel entry is emulated.
//! - `guest [PORT]`: what a microVM's only service runs. With a PORT (the guest has a
//!   network): the server, whose `GET /loops` runs the loops and answers their line.
//!   Without: `workload: ready`, the loops, `workload: done`, then idles until stopped.
//!
//! Standard library only, so it builds static for musl with nothing else.
#![allow(clippy::print_stdout)] // its output is its result

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const BODY: &[u8] = b"hello from hostd bench\n";
/// Iterations of the CPU loop: about 50-100 ms on a current x86 core.
const CPU_ITERS: u64 = 100_000_000;
const PAGE: usize = 4096;
/// Bytes touched per page-fault round: a fresh mapping each time.
const PF_REGION: usize = 16 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let code = match arg(0) {
        Some("serve") => match arg(1).and_then(|p| p.parse::<u16>().ok()) {
            Some(port) => serve(port),
            None => usage(),
        },
        Some("loops") => {
            let budget = arg(1).and_then(|b| b.parse().ok()).unwrap_or(300);
            loops(budget);
            0
        }
        Some("guest") => match arg(1).and_then(|p| p.parse::<u16>().ok()) {
            // With a network: serve at once; the loops run on `GET /loops`.
            Some(port) => serve(port),
            None => {
                println!("workload: ready");
                loops(300);
                {
                    // No network: stay up (memory figures are taken now) until stopped.
                    println!("workload: done");
                    let _ = std::io::stdout().flush();
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
            }
        },
        _ => usage(),
    };
    std::process::exit(code);
}

fn usage() -> i32 {
    eprintln!("usage: hostd-bench-workload serve PORT | loops [BUDGET_MS] | guest [PORT]");
    2
}

fn serve(port: u16) -> i32 {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("workload: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    println!("workload: ready");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = handle(conn);
        });
    }
    0
}

/// Answers every request on one connection with the same 200 until the client closes it.
fn handle(conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        BODY.len()
    );
    let mut response = head.into_bytes();
    response.extend_from_slice(BODY);
    loop {
        // Request line, then headers up to the empty line; the bench sends no bodies.
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let run_loops = line.starts_with("GET /loops ");
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        if run_loops {
            let body = loops(300);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            out.write_all(head.as_bytes())?;
            out.write_all(body.as_bytes())?;
        } else {
            out.write_all(&response)?;
        }
    }
}

/// Runs the loops, prints their line and returns it.
fn loops(budget_ms: u64) -> String {
    let budget = budget_ms as f64 / 1e3;
    let syscall_ns = syscall_loop(budget);
    let pf = page_fault_loop(budget);
    // The CPU loop is bracketed by lines so that the host can time it with its own
    // clock (a guest's clock may run at another rate, e.g. under TCG).
    println!("workload: cpu begin");
    let _ = std::io::stdout().flush();
    let cpu_ms = cpu_loop();
    println!("workload: cpu end");
    let line = format!(
        "workload: loops syscall_ns={syscall_ns:.1} pagefault_mib_s={pf:.1} cpu_ms={cpu_ms:.2}"
    );
    println!("{line}");
    let _ = std::io::stdout().flush();
    line
}

/// One `getppid` system call, straight through the `syscall` instruction (no libc
/// wrapper, no vDSO, no caching).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn getppid() -> i64 {
    let ret: i64;
    // SAFETY: getppid (110) takes no arguments, touches no memory and cannot fail; the
    // registers the `syscall` instruction clobbers (rcx, r11) are declared.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") 110i64 => ret,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn getppid() -> i64 {
    i64::from(std::process::id())
}

/// ns per system call: batches of calls until the budget is spent.
fn syscall_loop(budget: f64) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    let mut batch = 16u64;
    let mut sink = 0i64;
    while start.elapsed().as_secs_f64() < budget {
        for _ in 0..batch {
            sink = sink.wrapping_add(getppid());
        }
        calls += batch;
        batch = (batch * 2).min(100_000);
    }
    std::hint::black_box(sink);
    start.elapsed().as_secs_f64() * 1e9 / calls as f64
}

/// MiB/s of fresh anonymous memory touched (one write per page, so one fault per page):
/// rounds of a new 16 MiB allocation (musl and glibc map allocations this large afresh
/// and unmap them on free) until the budget is spent.
fn page_fault_loop(budget: f64) -> f64 {
    let layout = match std::alloc::Layout::from_size_align(PF_REGION, PAGE) {
        Ok(l) => l,
        Err(_) => return f64::NAN,
    };
    let start = Instant::now();
    let mut pages = 0usize;
    while start.elapsed().as_secs_f64() < budget {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return f64::NAN;
        }
        let mut off = 0;
        while off < PF_REGION {
            // SAFETY: `off` < PF_REGION: the pointer stays inside the allocation just made.
            let byte = unsafe { p.add(off) };
            // SAFETY: `byte` points into the live allocation; u8 needs no alignment.
            unsafe { byte.write_volatile(1) };
            pages += 1;
            off += PAGE;
            if pages.is_multiple_of(256) && start.elapsed().as_secs_f64() >= budget {
                break;
            }
        }
        // SAFETY: `p` came from `alloc` with this layout and is freed once.
        unsafe { std::alloc::dealloc(p, layout) };
    }
    let mib = (pages * PAGE) as f64 / (1 << 20) as f64;
    mib / start.elapsed().as_secs_f64()
}

/// ms for a fixed amount of integer work (xorshift); compared with the native figure.
fn cpu_loop() -> f64 {
    let start = Instant::now();
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..CPU_ITERS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    start.elapsed().as_secs_f64() * 1e3
}
