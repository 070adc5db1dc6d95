//! What the boot benchmarks share: run a monitor as a child, time the lines it prints,
//! its exit and its peak RSS, the same way for every monitor.

#![allow(dead_code)] // each bench uses a part

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// One run of a monitor.
#[derive(Default, Clone)]
pub struct Sample {
    /// For each marker asked for: when the first stdout line containing it appeared
    /// (ms after spawn), if it did.
    pub markers_ms: Vec<Option<f64>>,
    /// Spawn → process exit.
    pub to_exit_ms: f64,
    /// wait4's ru_maxrss: the largest of the process and the children it waited for.
    pub max_rss_kib: i64,
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

/// The median (upper middle for an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Writes `{"bench":NAME,<extra>"results":[RESULTS]}` to target/bench/NAME.json and says
/// where. `extra` is zero or more `"key":value,` pairs.
pub fn write_json(name: &str, extra: &str, results: &[String]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}.json"));
    let body = format!(
        "{{\"bench\":\"{name}\",{extra}\"results\":[{}]}}\n",
        results.join(",")
    );
    match std::fs::write(&path, body) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
}
