//! A cgroup per VM, below the cgroups `hostd run` itself is in (as systemd's delegation
//! would place it), never above or beside them: a process is only ever moved into a
//! descendant of its own cgroup, so it never leaves the memory cgroup the host put it in.
//!
//! Works on cgroup v1 (one hierarchy per controller; memory, pids and cpu are used where
//! mounted) and on v2 (one unified hierarchy).

use std::path::{Path, PathBuf};

use super::JailError;

/// Memory a VM may use besides its guest RAM: the VMM's or QEMU's own code, heap and
/// (TCG) translation cache, the backends' code and heaps, page tables. Measured: a VM
/// with 256 MiB of guest RAM and four backends peaks at about 150 MiB above its RAM
/// under QEMU TCG; 512 MiB leaves room without letting a VM take the host.
pub const MEMORY_OVERHEAD_MIB: u64 = 512;

/// Processes and threads a VM may have besides one thread per vCPU: the VMM's or
/// QEMU's own threads and the backends' (each has a handful).
pub const PIDS_BASE: u64 = 128;

/// The limits for one VM.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// memory.limit_in_bytes (v1) / memory.max (v2).
    pub memory_bytes: u64,
    /// pids.max.
    pub pids: u64,
    /// CPU bandwidth in whole CPUs (cfs quota = this × period).
    pub cpus: u64,
}

impl Limits {
    /// Guest RAM plus [`MEMORY_OVERHEAD_MIB`]; [`PIDS_BASE`] plus the vCPUs; one CPU per
    /// vCPU plus one for the device backends and the VMM's own threads.
    pub fn for_vm(memory_mib: u32, vcpus: u32) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + MEMORY_OVERHEAD_MIB) << 20,
            pids: PIDS_BASE + u64::from(vcpus),
            cpus: u64::from(vcpus) + 1,
        }
    }
}

const CFS_PERIOD_US: u64 = 100_000;

/// The per-VM cgroup(s): one directory per v1 hierarchy used, or one v2 directory.
///
/// Made in two steps, so that the VM's process can start in between: [`VmCgroup::create`]
/// makes the directories (the process is forked into them or enters them), then
/// [`VmCgroup::limit`] writes the limits while that process sets its VM up; it waits
/// for them before its guest runs (see `supervisor::limits_in_place`).
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    /// Per directory, the controllers whose limits [`VmCgroup::limit`] writes.
    controls: Vec<Controls>,
}

/// The limits one directory takes.
#[derive(Debug)]
enum Controls {
    /// A v1 hierarchy's controllers.
    V1(Vec<String>),
    /// The v2 controllers enabled for it (memory always).
    V2(Vec<&'static str>),
}

/// Where a cgroup hierarchy is mounted and which cgroup of it this process is in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    /// Controllers (v1), or empty for v2.
    controllers: Vec<String>,
    /// The mount point.
    mount: PathBuf,
    /// Our cgroup, relative to the mount.
    own: String,
}

/// `/proc/self/cgroup` lines: `ID:CONTROLLERS:PATH` (v2: `0::PATH`).
fn own_cgroups(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            Some((
                ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

/// A cgroup mount: v1 with its controllers (and `name=` if named), or v2.
#[derive(Debug)]
struct Mount {
    v2: bool,
    controllers: Vec<String>,
    path: PathBuf,
    root: String,
}

/// cgroup mounts from `/proc/self/mountinfo`.
fn cgroup_mounts(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for l in text.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let options = r.next().unwrap_or_default();
        let f: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount)) = (f.get(3), f.get(4)) else {
            continue;
        };
        let (v2, controllers) = match fstype {
            "cgroup" => (
                false,
                options
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "xattr"
                                | "noprefix"
                                | "clone_children"
                                | "cpuset_v2_mode"
                        ) && !o.starts_with("release_agent=")
                    })
                    .map(str::to_string)
                    .collect(),
            ),
            "cgroup2" => (true, Vec::new()),
            _ => continue,
        };
        out.push(Mount {
            v2,
            controllers,
            path: PathBuf::from(mount),
            root: root.to_string(),
        });
    }
    out
}

/// The hierarchies to use: the v1 ones holding memory, pids and cpu, or else the v2
/// one (when it has the memory controller).
fn hierarchies(cgroup: &str, mountinfo: &str) -> Vec<Hierarchy> {
    let own = own_cgroups(cgroup);
    let mounts = cgroup_mounts(mountinfo);
    let mut v1 = Vec::new();
    for want in ["memory", "pids", "cpu"] {
        let Some((ctrls, path)) = own.iter().find(|(c, _)| c.iter().any(|c| c == want)) else {
            continue;
        };
        let Some(m) = mounts.iter().find(|m| !m.v2 && m.controllers == *ctrls) else {
            continue;
        };
        let rel = path.strip_prefix(m.root.as_str()).unwrap_or(path);
        let h = Hierarchy {
            controllers: ctrls.clone(),
            mount: m.path.clone(),
            own: rel.trim_start_matches('/').to_string(),
        };
        if !v1.contains(&h) {
            v1.push(h);
        }
    }
    if v1
        .iter()
        .any(|h| h.controllers.iter().any(|c| c == "memory"))
    {
        return v1;
    }
    let v2 = own
        .iter()
        .find(|(c, _)| c.is_empty())
        .and_then(|(_, path)| {
            mounts.iter().find(|m| m.v2).map(|m| Hierarchy {
                controllers: Vec::new(),
                mount: m.path.clone(),
                own: path
                    .strip_prefix(m.root.as_str())
                    .unwrap_or(path)
                    .trim_start_matches('/')
                    .to_string(),
            })
        });
    match v2 {
        Some(h)
            if crate::host::read_kernel_file(h.mount.join(&h.own).join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) =>
        {
            vec![h]
        }
        _ => Vec::new(),
    }
}

/// The common case without reading mountinfo: this process is only in the v2 hierarchy
/// (`0::PATH`, nothing else), cgroup2 is mounted on /sys/fs/cgroup, and this process is
/// listed in that mount's `PATH/cgroup.procs` (so PATH is relative to the mount's root,
/// as it is unless only a subtree is mounted there). Checked for the memory controller
/// as [`hierarchies`] does. None when any of it does not hold: then mountinfo decides.
fn unified_at_sys_fs_cgroup(cgroup: &str) -> Option<Hierarchy> {
    let mut lines = cgroup.lines();
    let own = lines.next()?.strip_prefix("0::")?;
    if lines.next().is_some() || !own.starts_with('/') {
        return None;
    }
    const MOUNT: &str = "/sys/fs/cgroup";
    const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;
    // SAFETY: an all-zero statfs is a valid value for statfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs buffer that lives for the call.
    if unsafe { libc::statfs(c"/sys/fs/cgroup".as_ptr(), &mut st) } != 0
        || st.f_type as libc::c_long != CGROUP2_SUPER_MAGIC
    {
        return None;
    }
    let own = own.trim_start_matches('/').to_string();
    let dir = Path::new(MOUNT).join(&own);
    let me = std::process::id().to_string();
    let procs = crate::host::read_kernel_file(dir.join("cgroup.procs")).ok()?;
    if !procs.lines().any(|p| p == me) {
        return None;
    }
    crate::host::read_kernel_file(dir.join("cgroup.controllers"))
        .ok()?
        .split_whitespace()
        .any(|c| c == "memory")
        .then(|| Hierarchy {
            controllers: Vec::new(),
            mount: PathBuf::from(MOUNT),
            own,
        })
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value)
        .map_err(|e| JailError(format!("writing {value:?} to {}: {e}", path.display())))
}

/// The name of the cgroup of the VM whose `hostd run` has host pid `pid`.
fn name_for(pid: u32) -> String {
    format!("hostd-vm-{pid}")
}

impl VmCgroup {
    /// Creates the cgroup(s) of the VM of `hostd run` pid `vm_pid` below this process's
    /// own, without limits yet ([`VmCgroup::limit`]).
    pub fn create(vm_pid: u32) -> Result<VmCgroup, JailError> {
        let read = |p: &str| {
            crate::host::read_kernel_file(p).map_err(|e| JailError(format!("reading {p}: {e}")))
        };
        let own = read("/proc/self/cgroup")?;
        let found = match unified_at_sys_fs_cgroup(&own) {
            Some(h) => vec![h],
            None => hierarchies(&own, &read("/proc/self/mountinfo")?),
        };
        if found.is_empty() {
            return Err(JailError(
                "no cgroup hierarchy with the memory controller is mounted".into(),
            ));
        }
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            controls: Vec::new(),
        };
        for h in found {
            let parent = h.mount.join(&h.own);
            let dir = parent.join(name_for(vm_pid));
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(JailError(format!("creating {}: {e}", dir.display())));
                }
            }
            cg.dirs.push(dir);
            cg.controls.push(if h.controllers.is_empty() {
                Controls::V2(enable_v2(&parent)?)
            } else {
                Controls::V1(h.controllers)
            });
        }
        Ok(cg)
    }

    /// Writes `limits` to the cgroup(s).
    pub fn limit(&self, limits: Limits) -> Result<(), JailError> {
        for (dir, controls) in self.dirs.iter().zip(&self.controls) {
            match controls {
                Controls::V2(wanted) => {
                    write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                    if wanted.contains(&"pids") {
                        write(&dir.join("pids.max"), &limits.pids.to_string())?;
                    }
                    if wanted.contains(&"cpu") {
                        write(
                            &dir.join("cpu.max"),
                            &format!("{} {CFS_PERIOD_US}", limits.cpus * CFS_PERIOD_US),
                        )?;
                    }
                }
                Controls::V1(controllers) => {
                    for c in controllers {
                        match c.as_str() {
                            "memory" => {
                                write(
                                    &dir.join("memory.limit_in_bytes"),
                                    &limits.memory_bytes.to_string(),
                                )?;
                                // Swap counts too where the kernel accounts it.
                                let memsw = dir.join("memory.memsw.limit_in_bytes");
                                if memsw.exists() {
                                    write(&memsw, &limits.memory_bytes.to_string())?;
                                }
                            }
                            "pids" => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                            "cpu" => {
                                write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                                write(
                                    &dir.join("cpu.cfs_quota_us"),
                                    &(limits.cpus * CFS_PERIOD_US).to_string(),
                                )?;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes what VMs whose `hostd run` is gone (killed with SIGKILL) left beside this
    /// VM's cgroup(s).
    pub fn remove_stale(&self) {
        for p in self.dirs.iter().filter_map(|d| d.parent()) {
            remove_stale(p);
        }
    }

    /// Moves the calling process into the VM's cgroup(s) (everything it starts from
    /// now on is in them too).
    ///
    /// Writing `cgroup.procs` moves a whole thread group under the kernel's global
    /// threadgroup lock, and the first write-lock of it waits for an RCU grace period
    /// (measured on this host: 14.5 ms, the largest single step before the first
    /// KVM_RUN). A single-threaded process (the VM process, just forked) moves itself
    /// on v1 through `tasks` ("0": this thread), which takes no such lock (0.05 ms) and
    /// ends the same. v2 has no `tasks`; it and a threaded caller use `cgroup.procs`.
    pub fn enter(&self) -> Result<(), JailError> {
        let single_threaded = std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1);
        for d in &self.dirs {
            let tasks = d.join("tasks");
            if single_threaded && tasks.exists() {
                write(&tasks, "0")?;
            } else {
                write(&d.join("cgroup.procs"), "0")?;
            }
        }
        Ok(())
    }

    /// A descriptor of the VM's cgroup when it is a single cgroup v2 directory, for
    /// `clone3(CLONE_INTO_CGROUP)`: a child created straight into it never moves itself
    /// in through `cgroup.procs`, whose global lock waits for an RCU grace period (v1
    /// has `tasks` for that instead, see [`VmCgroup::enter`]). None on v1 or when the
    /// directory cannot be opened.
    pub fn v2_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let [dir] = self.dirs.as_slice() else {
            return None;
        };
        if dir.join("tasks").exists() {
            return None;
        }
        std::fs::File::open(dir)
            .ok()
            .map(std::os::fd::OwnedFd::from)
    }

    /// The directories, for messages and tests.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for VmCgroup {
    /// Removes the cgroups once their processes are gone (the caller waited for them;
    /// the kernel may still be tearing the last one down, hence a few tries).
    fn drop(&mut self) {
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}

/// Enables the memory, pids and cpu controllers (those `parent` has) for the cgroups
/// below `parent`, where they are not yet; returns those enabled.
fn enable_v2(parent: &Path) -> Result<Vec<&'static str>, JailError> {
    let available =
        crate::host::read_kernel_file(parent.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&'static str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    // Only the controllers not enabled yet (after the first VM: none). A write to
    // `cgroup.subtree_control`, even one that changes nothing, takes the kernel's
    // threadgroup lock for writing, which waits for an RCU grace period.
    let enabled =
        crate::host::read_kernel_file(parent.join("cgroup.subtree_control")).unwrap_or_default();
    let enable: String = wanted
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let control = parent.join("cgroup.subtree_control");
    let first = if enable.is_empty() {
        Ok(())
    } else {
        write(&control, &enable)
    };
    if let Err(e) = first {
        // v2 enables controllers for children only of a cgroup without processes
        // of its own: move this process into a leaf below its cgroup first (still
        // below, never out of it), then try again.
        let leaf = parent.join("hostd-run");
        let _ = std::fs::create_dir(&leaf);
        write(&leaf.join("cgroup.procs"), "0")?;
        write(&control, &enable)
            .map_err(|e2| JailError(format!("{e}; after moving to a leaf: {e2}")))?;
    }
    Ok(wanted)
}

/// Removes `hostd-vm-PID` cgroups below `parent` whose `hostd run` no longer exists and
/// that hold no process.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hostd-vm-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/e810
1:cpu:/
0::/
";

    #[test]
    fn v1_hierarchies_are_found_below_our_own_cgroups() {
        let h = hierarchies(CGROUP_V1, MOUNTINFO_V1);
        assert_eq!(
            h,
            vec![
                Hierarchy {
                    controllers: vec!["memory".into()],
                    mount: "/sys/fs/cgroup/memory".into(),
                    own: "process_api/e810".into(),
                },
                Hierarchy {
                    controllers: vec!["pids".into()],
                    mount: "/sys/fs/cgroup/pids".into(),
                    own: "".into(),
                },
                Hierarchy {
                    controllers: vec!["cpu".into()],
                    mount: "/sys/fs/cgroup/cpu".into(),
                    own: "".into(),
                },
            ]
        );
    }

    #[test]
    fn a_combined_cpu_hierarchy_and_a_mounted_subtree_are_handled() {
        let mountinfo = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /lxc/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        let cgroup = "4:memory:/lxc/x/app\n1:cpu,cpuacct:/\n";
        let h = hierarchies(cgroup, mountinfo);
        assert_eq!(h[0].own, "app");
        assert_eq!(h[1].controllers, ["cpu", "cpuacct"]);
        assert_eq!(h[1].mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
    }

    #[test]
    fn the_v2_shortcut_is_taken_only_for_a_process_in_v2_alone() {
        // v1 hierarchies beside v2, a path not absolute, a second v2 line: mountinfo
        // decides.
        assert!(unified_at_sys_fs_cgroup(CGROUP_V1).is_none());
        assert!(unified_at_sys_fs_cgroup("0::relative\n").is_none());
        assert!(unified_at_sys_fs_cgroup("0::/a\n0::/b\n").is_none());
        assert!(unified_at_sys_fs_cgroup("").is_none());
        // A cgroup this process is not in is never taken, even where v2 is mounted.
        assert!(unified_at_sys_fs_cgroup("0::/hostd-test-no-such-cgroup\n").is_none());
    }

    #[test]
    fn limits_add_the_stated_overhead() {
        let l = Limits::for_vm(256, 2);
        assert_eq!(l.memory_bytes, (256 + MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(l.pids, PIDS_BASE + 2);
        assert_eq!(l.cpus, 3);
    }
}
