//! Spawn a program as a child and time the lines it prints, its exit and its peak RSS,
//! the same way for every monitor and tier.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// One run of a monitor.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// For each marker asked for: when the first stdout line containing it appeared
    /// (ms after spawn), if it did.
    pub markers_ms: Vec<Option<f64>>,
    /// Spawn → process exit.
    pub to_exit_ms: f64,
    /// wait4's ru_maxrss: the largest of the process and the children it waited for.
    pub max_rss_kib: i64,
    /// User + system CPU time of the process and every descendant it waited for
    /// (wait4's rusage), ms.
    pub cpu_ms: f64,
    pub exit_status: i32,
    /// hostd's own `timings` line (stderr), if it printed one.
    pub internal: Option<String>,
}

/// Spawns `cmd`, timing the first stdout line containing each of `markers`.
pub fn spawn_and_measure(mut cmd: Command, markers: &[&str]) -> Option<Sample> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let stderr = child.stderr.take()?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let mut seen: Vec<Option<f64>> = vec![None; markers.len()];
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        for (m, t) in markers.iter().zip(seen.iter_mut()) {
            if t.is_none() && line.contains(m) {
                *t = Some(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; we wait for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; the pid is our child, not yet reaped.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let exit = start.elapsed();
    let stderr = err_reader.join().unwrap_or_default();
    Some(Sample {
        markers_ms: seen,
        to_exit_ms: exit.as_secs_f64() * 1e3,
        max_rss_kib: usage.ru_maxrss,
        cpu_ms: [usage.ru_utime, usage.ru_stime]
            .iter()
            .map(|t| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3)
            .sum(),
        exit_status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        internal: stderr
            .lines()
            .find(|l| l.contains("timings"))
            .map(str::to_string),
    })
}
