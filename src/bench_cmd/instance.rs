//! One running instance of a tier (a process tree): its stdout lines with the time each
//! arrived, its memory, and stopping it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A started instance; stopped (and its clean-up run) on drop.
pub struct Instance {
    child: Child,
    pub started: Instant,
    lines: Receiver<(Instant, String)>,
    /// Every line seen so far (for error messages).
    seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Run after the process is gone (e.g. `crun delete`).
    cleanup: Option<Box<dyn FnOnce() + Send>>,
    /// Ask politely first (SIGTERM), for monitors that shut their guest down.
    pub gentle: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Instance {
    /// Spawns `cmd` with stdout and stderr read by threads (stderr lines are kept; lines
    /// on stderr are also searched by [`Instance::wait_line`]).
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Instance> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        let (tx, rx) = channel();
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), l));
            }
        });
        let kept = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept2 = kept.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut k) = kept2.lock() {
                    if k.len() < 64 * 1024 {
                        k.push_str(&l);
                        k.push('\n');
                    }
                }
                let _ = tx2.send((Instant::now(), l));
            }
        });
        Ok(Instance {
            child,
            started,
            lines: rx,
            seen: Vec::new(),
            stderr: kept,
            cleanup: None,
            gentle: false,
        })
    }

    pub fn on_drop(&mut self, f: impl FnOnce() + Send + 'static) {
        self.cleanup = Some(Box::new(f));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line containing `needle`; returns it and when it came.
    pub fn wait_line(
        &mut self,
        needle: &str,
        limit: Duration,
    ) -> anyhow::Result<(Instant, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) => {
                    let hit = l.contains(needle);
                    self.seen.push(l.clone());
                    if hit {
                        return Ok((t, l));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no {needle:?} within {} s; it printed:\n{}",
                        limit.as_secs(),
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "it exited ({}) before printing {needle:?}; it printed:\n{}",
                        status.map_or("?".into(), |s| s.to_string()),
                        self.tail()
                    )
                }
            }
        }
    }

    fn tail(&self) -> String {
        let mut all: Vec<String> = self.seen.iter().rev().take(15).cloned().collect();
        if all.is_empty() {
            return "(nothing)".into();
        }
        all.reverse();
        all.join("\n")
    }

    /// The summed PSS of the process tree in MiB.
    pub fn pss_mib(&self) -> Option<f64> {
        hostd_bench::mem::tree_pss_kib(self.pid()).map(|k| k as f64 / 1024.0)
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.gentle {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Clean-up first: `crun delete --force` stops the container's processes, which
        // killing `crun run` alone would leave behind.
        if let Some(f) = self.cleanup.take() {
            f();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The figures of one `workload: loops …` line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loops {
    pub syscall_ns: f64,
    pub pagefault_mib_s: f64,
    pub cpu_ms: f64,
    /// For a guest: how fast its clock ran against the host's while the CPU loop ran
    /// (1.0: same rate), when it was far enough from 1 that the figures were corrected.
    pub guest_clock_rate: Option<f64>,
}

/// Parses `… workload: loops syscall_ns=A pagefault_mib_s=B cpu_ms=C`.
pub fn parse_loops(line: &str) -> Option<Loops> {
    let rest = &line[line.find("workload: loops")?..];
    let field = |name: &str| -> Option<f64> {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Loops {
        syscall_ns: field("syscall_ns")?,
        pagefault_mib_s: field("pagefault_mib_s")?,
        cpu_ms: field("cpu_ms")?,
        guest_clock_rate: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_loops_line_with_a_console_prefix() {
        let l = parse_loops(
            "[work] workload: loops syscall_ns=61.5 pagefault_mib_s=2100.0 cpu_ms=80.25",
        );
        assert_eq!(
            l,
            Some(Loops {
                syscall_ns: 61.5,
                pagefault_mib_s: 2100.0,
                cpu_ms: 80.25,
                guest_clock_rate: None,
            })
        );
        assert_eq!(parse_loops("workload: loops syscall_ns=x"), None);
        assert_eq!(parse_loops("nothing"), None);
    }
}
