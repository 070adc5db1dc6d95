//! The console: init's own log lines and every service's output, prefixed with its
//! name, one whole line at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use hostd_images::abi;

static CONSOLE: Mutex<()> = Mutex::new(());
static RELAYS: AtomicUsize = AtomicUsize::new(0);

/// Longest line relayed as one; longer output is split.
const MAX_LINE: usize = 4096;

fn write_line(prefix: &str, body: &[u8]) {
    let _guard = CONSOLE.lock().unwrap_or_else(|p| p.into_inner());
    let mut err = std::io::stderr().lock();
    let mut line = Vec::with_capacity(prefix.len() + body.len() + 1);
    line.extend_from_slice(prefix.as_bytes());
    line.extend_from_slice(body);
    line.push(b'\n');
    let _ = err.write_all(&line);
    let _ = err.flush();
}

/// Prints one of init's own lines.
pub fn log(msg: &str) {
    write_line(abi::CONSOLE_PREFIX, msg.as_bytes());
}

/// One running relay: done once its pipe reached EOF (everything was printed).
#[derive(Debug, Clone, Default)]
pub struct Relay(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Relay {
    /// Waits up to `timeout` for the relay to print everything its program wrote (a
    /// program's exit is logged after its last line, unless a child of it keeps the
    /// pipe open).
    pub fn wait(&self, timeout: std::time::Duration) {
        let end = std::time::Instant::now() + timeout;
        while !self.0.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Copies `pipe` to the console, prefixing each line with `[name] `, until EOF.
pub fn relay(name: &str, pipe: std::fs::File) -> Relay {
    let prefix = format!("[{name}] ");
    let done = Relay::default();
    let flag = done.0.clone();
    RELAYS.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name(format!("relay-{name}"))
        .spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while buf.last() == Some(&b'\n') || buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                        write_line(&prefix, &buf);
                    }
                }
            }
            flag.store(true, Ordering::SeqCst);
            RELAYS.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        RELAYS.fetch_sub(1, Ordering::SeqCst);
        log(&format!("cannot start the output relay for {name}"));
        done.0.store(true, Ordering::SeqCst);
    }
    done
}

/// Waits up to `timeout` for every relay to reach EOF (all output printed).
pub fn drain(timeout: std::time::Duration) {
    let end = std::time::Instant::now() + timeout;
    while RELAYS.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Watches the console input for the host's shutdown request.
pub fn watch_for_shutdown_request() {
    crate::sys::console_no_echo(0);
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(|| {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.contains(abi::SHUTDOWN_REQUEST) => {
                        log("shutdown requested by the host");
                        crate::sys::request_shutdown();
                    }
                    Ok(_) => {}
                }
            }
        });
}
