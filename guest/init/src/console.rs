//! The console: init's own log lines and every service's output, prefixed with its
//! name, one whole line at a time.

use std::io::{BufRead, Read, Write};
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

/// One program's output on its way to the console.
struct Source {
    prefix: String,
    pipe: std::fs::File,
    /// Bytes read but not yet printed (no newline yet).
    buf: Vec<u8>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Source {
    /// Prints every whole line in `buf` (see [`take_lines`]); with `eof`, the rest too.
    fn flush_lines(&mut self, eof: bool) {
        for line in take_lines(&mut self.buf, eof) {
            write_line(&self.prefix, &line);
        }
    }

    fn finish(&mut self) {
        self.flush_lines(true);
        self.done.store(true, Ordering::SeqCst);
        RELAYS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes the lines out of `buf`, without their `\n` and trailing `\r`s: every one that
/// ends in a newline, every MAX_LINE bytes without one (a longer line is split), and
/// with `eof` what is left.
fn take_lines(buf: &mut Vec<u8>, eof: bool) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    loop {
        let end = match buf.iter().position(|&b| b == b'\n') {
            Some(nl) if nl < MAX_LINE => nl + 1,
            _ if buf.len() >= MAX_LINE => MAX_LINE,
            _ if eof && !buf.is_empty() => buf.len(),
            _ => return lines,
        };
        let mut line: Vec<u8> = buf.drain(..end).collect();
        while line.last() == Some(&b'\n') || line.last() == Some(&b'\r') {
            line.pop();
        }
        lines.push(line);
    }
}

/// Pipes handed to the relay thread, and the eventfd that tells it so.
static NEW_SOURCES: Mutex<Vec<Source>> = Mutex::new(Vec::new());
static RELAY_WAKE: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// Starts the one thread that relays every program's output (before the snapshot point,
/// so that a restored VM starts no thread per service: each costs guest kernel work).
pub fn start_relay_thread() {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        log("cannot start the output relay: eventfd failed");
        return;
    }
    // SAFETY: a fresh fd that nothing else owns.
    let wake = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&wake);
    let spawned = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || relay_loop(raw));
    match spawned {
        Ok(_) => {
            let _ = RELAY_WAKE.set(wake);
        }
        Err(e) => log(&format!("cannot start the output relay: {e}")),
    }
}

/// The relay thread: polls the eventfd and every pipe, prints whole lines as they come.
fn relay_loop(wake: libc::c_int) {
    let mut sources: Vec<Source> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        sources.append(&mut NEW_SOURCES.lock().unwrap_or_else(|p| p.into_inner()));
        let mut fds: Vec<libc::pollfd> = std::iter::once(wake)
            .chain(
                sources
                    .iter()
                    .map(|s| std::os::fd::AsRawFd::as_raw_fd(&s.pipe)),
            )
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into `v` from the eventfd.
            unsafe { libc::read(wake, v.as_mut_ptr().cast(), v.len()) };
        }
        let mut ready = fds[1..].iter().map(|p| p.revents != 0);
        sources.retain_mut(|s| {
            if !ready.next().unwrap_or(false) {
                return true;
            }
            match (&s.pipe).read(&mut chunk) {
                Ok(0) | Err(_) => {
                    s.finish();
                    false
                }
                Ok(n) => {
                    s.buf.extend_from_slice(&chunk[..n]);
                    s.flush_lines(false);
                    true
                }
            }
        });
    }
}

/// Copies `pipe` to the console, prefixing each line with `[name] `, until EOF (on the
/// relay thread, started now if it is not yet running).
pub fn relay(name: &str, pipe: std::fs::File) -> Relay {
    let done = Relay::default();
    if RELAY_WAKE.get().is_none() {
        start_relay_thread();
    }
    let Some(wake) = RELAY_WAKE.get() else {
        log(&format!("cannot start the output relay for {name}"));
        done.0.store(true, Ordering::SeqCst);
        return done;
    };
    RELAYS.fetch_add(1, Ordering::SeqCst);
    NEW_SOURCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Source {
            prefix: format!("[{name}] "),
            pipe,
            buf: Vec::new(),
            done: done.0.clone(),
        });
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from `one` to the eventfd.
    unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(wake),
            one.as_ptr().cast(),
            8,
        )
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_as_the_old_per_pipe_relay_did() {
        let mut buf = b"one\r\ntwo\npart".to_vec();
        assert_eq!(
            take_lines(&mut buf, false),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert_eq!(buf, b"part");
        buf.extend_from_slice(b"ial\n\nlast");
        assert_eq!(
            take_lines(&mut buf, false),
            vec![b"partial".to_vec(), Vec::new()]
        );
        assert_eq!(take_lines(&mut buf, true), vec![b"last".to_vec()]);
        assert!(buf.is_empty());
        // A line longer than MAX_LINE comes out in MAX_LINE pieces; a newline that is
        // the MAX_LINE-th byte still ends its line.
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let lines = take_lines(&mut long, false);
        assert_eq!(
            lines.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![MAX_LINE, 10]
        );
        let mut exact = vec![b'y'; MAX_LINE - 1];
        exact.push(b'\n');
        assert_eq!(take_lines(&mut exact, false).len(), 1);
        assert!(exact.is_empty());
    }
}
