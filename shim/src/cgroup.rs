//! The task's cgroup: every process of the task (`hostd run`, its VMM, its device
//! backends) joins it before it runs, so that `ctr task ps` lists them, `ctr task
//! metrics` reports their memory, CPU and process count, and delete can kill whatever
//! is left and remove the cgroup. cgroup v2 (one directory) and v1 (one directory per
//! controller: memory, cpuacct, pids) are both handled.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
/// cgroup v1 controllers the shim uses (memory and CPU figures, process count).
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpuacct", "pids"];

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: cannot {what}")]
pub struct CgroupError {
    path: PathBuf,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// The task's cgroup directories (one on v2, one per controller on v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<(String, PathBuf)>,
}

/// What `stats` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of memory charged to the cgroup.
    pub memory_bytes: u64,
    /// Memory limit (u64::MAX when none).
    pub memory_limit: u64,
    /// CPU time in nanoseconds.
    pub cpu_ns: u64,
    /// User CPU time in nanoseconds.
    pub cpu_user_ns: u64,
    /// System CPU time in nanoseconds.
    pub cpu_system_ns: u64,
    /// Processes in the cgroup.
    pub pids: u64,
}

/// Whether the host has the unified (v2) hierarchy at /sys/fs/cgroup.
pub fn is_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The path below each hierarchy: the OCI config's `cgroupsPath` when it is a plain
/// path (what ctr gives: `/NAMESPACE/ID`), else `/hostd/NAMESPACE/ID` (systemd-style
/// `slice:prefix:name` paths are not handled by this shim).
pub fn relative_path(cgroups_path: Option<&str>, namespace: &str, id: &str) -> PathBuf {
    match cgroups_path {
        Some(p) if !p.contains(':') && !p.split('/').any(|c| c == "..") => {
            PathBuf::from(p.trim_start_matches('/'))
        }
        _ => PathBuf::from("hostd").join(namespace).join(id),
    }
}

impl Cgroup {
    /// Creates the cgroup (and its parents).
    pub fn create(relative: &Path) -> Result<Cgroup, CgroupError> {
        let dirs: Vec<(String, PathBuf)> = if is_v2() {
            vec![("unified".into(), Path::new(ROOT).join(relative))]
        } else {
            V1_CONTROLLERS
                .iter()
                .filter(|c| Path::new(ROOT).join(c).join("cgroup.procs").exists())
                .map(|c| (c.to_string(), Path::new(ROOT).join(c).join(relative)))
                .collect()
        };
        for (_, d) in &dirs {
            std::fs::create_dir_all(d).map_err(|source| CgroupError {
                path: d.clone(),
                what: "create it",
                source,
            })?;
        }
        Ok(Cgroup { dirs })
    }

    /// Files that a child writes "0" into before it runs, to join the cgroup
    /// ([`join_self`]). Opened close-on-exec.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|(_, d)| {
                let p = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError {
                        path: p,
                        what: "open cgroup.procs",
                        source,
                    })
            })
            .collect()
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let Some((_, d)) = self.dirs.first() else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for dir in tree(d) {
            pids.extend(
                std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok()),
            );
        }
        pids.sort_unstable();
        pids
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill has no memory effects; a pid that already exited gives ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Kills whatever is left (SIGKILL, until the cgroup is empty or `limit` passes)
    /// and removes the cgroup's directories.
    pub fn destroy(&self, limit: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + limit;
        while !self.pids().is_empty() && Instant::now() < deadline {
            self.signal_all(libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(20));
        }
        // Children first (`hostd run` puts its VMM in a cgroup of its own below).
        for d in self
            .dirs
            .iter()
            .flat_map(|(_, d)| tree(d).into_iter().rev())
        {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // Busy while the last killed process is still being torn down.
                    Err(_) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(source) => {
                        return Err(CgroupError {
                            path: d,
                            what: "remove it",
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Memory, CPU and process figures.
    pub fn usage(&self) -> Usage {
        let mut u = Usage {
            memory_limit: u64::MAX,
            ..Usage::default()
        };
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        let num = |s: String| s.trim().parse::<u64>().ok();
        for (controller, d) in &self.dirs {
            match controller.as_str() {
                "unified" => {
                    u.memory_bytes = num(read(d, "memory.current")).unwrap_or(0);
                    u.memory_limit = num(read(d, "memory.max")).unwrap_or(u64::MAX);
                    u.pids = num(read(d, "pids.current")).unwrap_or(self.pids().len() as u64);
                    for line in read(d, "cpu.stat").lines() {
                        let mut it = line.split_whitespace();
                        let (Some(k), Some(v)) =
                            (it.next(), it.next().and_then(|v| v.parse().ok()))
                        else {
                            continue;
                        };
                        let v: u64 = v;
                        match k {
                            "usage_usec" => u.cpu_ns = v * 1000,
                            "user_usec" => u.cpu_user_ns = v * 1000,
                            "system_usec" => u.cpu_system_ns = v * 1000,
                            _ => {}
                        }
                    }
                }
                "memory" => {
                    u.memory_bytes = num(read(d, "memory.usage_in_bytes")).unwrap_or(0);
                    u.memory_limit = num(read(d, "memory.limit_in_bytes")).unwrap_or(u64::MAX);
                }
                "cpuacct" => {
                    u.cpu_ns = num(read(d, "cpuacct.usage")).unwrap_or(0);
                    u.cpu_user_ns = num(read(d, "cpuacct.usage_user")).unwrap_or(0);
                    u.cpu_system_ns = num(read(d, "cpuacct.usage_sys")).unwrap_or(0);
                }
                "pids" => u.pids = num(read(d, "pids.current")).unwrap_or(0),
                _ => {}
            }
        }
        u
    }
}

/// `dir` and every cgroup below it, parents before children.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            let mut subs: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            subs.sort();
            out.extend(subs);
        }
        i += 1;
    }
    out
}

/// In a forked child before exec: joins the cgroup by writing "0" (this process) into
/// each `cgroup.procs`. Async-signal-safe: only write(2).
pub fn join_self(files: &[OwnedFd]) -> std::io::Result<()> {
    for f in files {
        // SAFETY: a valid open fd and a 1-byte static buffer.
        let n = unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Some("/test/c1"), "test", "c1"),
            PathBuf::from("test/c1")
        );
        assert_eq!(
            relative_path(Some("system.slice:cri:c1"), "k8s", "c1"),
            PathBuf::from("hostd/k8s/c1")
        );
        assert_eq!(
            relative_path(Some("/a/../../etc"), "n", "c"),
            PathBuf::from("hostd/n/c")
        );
        assert_eq!(relative_path(None, "n", "c"), PathBuf::from("hostd/n/c"));
    }
}
