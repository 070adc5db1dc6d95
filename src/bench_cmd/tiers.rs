//! The tiers `hostd bench` compares, each running the same workload
//! (benches/workload, embedded in hostd) or, for WebAssembly, the hello component.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};

use super::instance::{parse_loops, Instance, Loops};

/// Every tier, in the order rounds visit them.
pub const ALL: &[&str] = &[
    "native",
    "container",
    "wasm",
    "wasmtime-serve",
    "microvm-builtin",
    "microvm-qemu",
    "firecracker",
];

/// How long a start (or a guest's loops) may take before the run counts as failed.
const START_LIMIT: Duration = Duration::from_secs(180);
/// The same for a microVM with `--quick` (its boot alone is 10-20 s on an idle nested
/// PVM host; a guest that takes longer fails the run rather than the time budget).
const QUICK_VM_LIMIT: Duration = Duration::from_secs(100);

/// What every tier's runs share.
#[derive(Debug)]
pub struct Ctx {
    pub dir: PathBuf,
    pub hostd: PathBuf,
    pub workload: PathBuf,
    pub component: PathBuf,
    pub fn_cache: PathBuf,
    pub loop_budget_ms: u64,
    pub quick: bool,
    seq: AtomicU32,
}

impl Ctx {
    pub fn new(
        dir: &Path,
        workload: &[u8],
        component: &[u8],
        loop_budget_ms: u64,
    ) -> anyhow::Result<Ctx> {
        use std::os::unix::fs::PermissionsExt;
        let wl = dir.join("workload");
        std::fs::write(&wl, workload).context("writing the workload program")?;
        std::fs::set_permissions(&wl, std::fs::Permissions::from_mode(0o755))?;
        let component_path = dir.join("hello.wasm");
        std::fs::write(&component_path, component).context("writing the hello component")?;
        Ok(Ctx {
            dir: dir.to_path_buf(),
            hostd: crate::hostd_exe().context("finding hostd's own path")?,
            workload: wl,
            component: component_path,
            fn_cache: dir.join("fn-cache"),
            loop_budget_ms,
            quick: false,
            seq: AtomicU32::new(0),
        })
    }

    fn next(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// How a tier runs the workload.
#[derive(Debug)]
pub enum Kind {
    Native,
    Container {
        runtime: PathBuf,
        rootfs: PathBuf,
        cgroup_base: String,
    },
    HostdFn,
    WasmtimeServe {
        bin: PathBuf,
    },
    MicroVm {
        vmm: &'static str,
        image: PathBuf,
        /// Whether the guest gets a network (and serves HTTP).
        net: bool,
    },
}

/// A tier ready to run.
#[derive(Debug)]
pub struct Tier {
    pub name: &'static str,
    pub kind: Kind,
    /// What runs it (`crun 1.8.1`, `QEMU (TCG)` …).
    pub runtime: String,
    /// Per metric: why it is missing or what dominates it here.
    pub notes: BTreeMap<String, String>,
}

/// A started instance and where it serves HTTP, if it does.
pub struct Started {
    pub inst: Instance,
    pub addr: Option<SocketAddr>,
    /// The network namespace `addr` is reached in (a microVM's), if not the host's.
    pub netns: Option<String>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// The cgroup hostd runs in (v1: the memory controller's, v2: the unified one); the
/// container's cgroup goes below it, never above or beside.
fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let find = |pred: &dyn Fn(&str) -> bool| {
        text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            pred(ctrl).then(|| path.to_string())
        })
    };
    find(&|c| c.split(',').any(|c| c == "memory"))
        .or_else(|| find(&|c| c.is_empty()))
        .unwrap_or_else(|| "/".into())
}

/// The microVM image's spec: the workload as the only service; `ARGS` is replaced.
const GUEST_SPEC: &str = r#"# hostd bench: the workload as a microVM's only service.
name = "bench"
memory = "256M"

[[files]]
path = "/bin/workload"
source = "workload"
mode = "0755"

[services.work]
command = "/bin/workload"
args = ARGS
main = true
"#;

/// The guest's HTTP port and addresses: each microVM gets a network namespace of its
/// own holding a TAP device, so every instance can use the same ones.
const GUEST_PORT: u16 = 8080;
const TAP: &str = "hbench0";
const GUEST_NET: &str = "ip=10.0.2.2/24,gw=10.0.2.1";

/// Whether microVMs can get a network here: root (network namespaces, TAP) and `ip`.
fn guest_net_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes network namespace `ns` with the TAP device at 10.0.2.1/24.
fn netns_create(ns: &str) -> anyhow::Result<()> {
    let steps: [&[&str]; 5] = [
        &["netns", "add", ns],
        &["-n", ns, "link", "set", "lo", "up"],
        &["-n", ns, "tuntap", "add", TAP, "mode", "tap"],
        &["-n", ns, "addr", "add", "10.0.2.1/24", "dev", TAP],
        &["-n", ns, "link", "set", TAP, "up"],
    ];
    for args in steps {
        let out = Command::new("ip").args(args).output()?;
        if !out.status.success() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Runs `f` on a thread that joined network namespace `ns` (threads it starts inherit
/// it), or here when `ns` is None.
pub fn in_netns<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    let t = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network
        // namespace, a thread made for this and ended after `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    t.join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace {ns} panicked"))?
        .context("joining the network namespace")
}

/// Prepares the tier `name`, or says why it cannot run here.
pub fn prepare(
    name: &'static str,
    ctx: &Ctx,
    firecracker: Option<&Path>,
    image: &mut Option<Result<(PathBuf, bool), String>>,
) -> Result<Tier, String> {
    let tier = |kind, runtime: String| Tier {
        name,
        kind,
        runtime,
        notes: BTreeMap::new(),
    };
    let mut t = match name {
        "native" => tier(Kind::Native, "the workload as a host process".into()),
        "container" => {
            // crun refuses a cgroup v1/v2 hybrid whose v2 side holds controllers; runc
            // does not.
            let hybrid = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
                .is_ok_and(|c| !c.trim().is_empty());
            let runtime = on_path("crun")
                .filter(|_| !hybrid)
                .or_else(|| on_path("runc"))
                .ok_or(if hybrid {
                    "runc is not on PATH, and crun cannot run on this host's hybrid cgroups (apt-get install runc)"
                } else {
                    "neither crun nor runc is on PATH (apt-get install crun)"
                })?;
            let rootfs = ctx.dir.join("rootfs");
            (|| -> std::io::Result<()> {
                for d in ["proc", "dev", "tmp"] {
                    std::fs::create_dir_all(rootfs.join(d))?;
                }
                std::fs::copy(&ctx.workload, rootfs.join("workload"))?;
                Ok(())
            })()
            .map_err(|e| format!("cannot make the OCI bundle's root file system: {e}"))?;
            let v = version(&runtime);
            tier(
                Kind::Container {
                    runtime,
                    rootfs,
                    cgroup_base: own_cgroup(),
                },
                v,
            )
        }
        "wasm" => tier(
            Kind::HostdFn,
            "hostd fn serve (wasmtime, pooling allocator)".into(),
        ),
        "wasmtime-serve" => {
            let bin = on_path("wasmtime").ok_or("wasmtime is not on PATH")?;
            let v = version(&bin);
            tier(Kind::WasmtimeServe { bin }, v)
        }
        "microvm-builtin" | "microvm-qemu" => {
            let vmm = if name == "microvm-builtin" {
                "kvm"
            } else {
                "qemu"
            };
            if vmm == "kvm" && !hostd_bench::kvm_usable() {
                return Err("no usable /dev/kvm".into());
            }
            if vmm == "qemu" && on_path(&hostd_vmm::qemu::qemu_binary()).is_none() {
                return Err(format!(
                    "{} is not on PATH (apt-get install qemu-system-x86)",
                    hostd_vmm::qemu::qemu_binary()
                ));
            }
            let (image, net) = image
                .get_or_insert_with(|| {
                    let net = guest_net_usable();
                    build_image(ctx, net)
                        .map(|i| (i, net))
                        .map_err(|e| format!("{e:#}"))
                })
                .clone()?;
            let runtime = if vmm == "kvm" {
                format!("hostd's VMM on KVM ({})", hostd_bench::host::host_kind())
            } else {
                let (accel, _) = hostd_vmm::qemu::choose_accel(hostd_vmm::qemu::Accel::Auto);
                format!(
                    "{} ({})",
                    version(Path::new(&hostd_vmm::qemu::qemu_binary())),
                    accel.to_uppercase()
                )
            };
            let mut t = tier(Kind::MicroVm { vmm, image, net }, runtime);
            if net {
                let how = "over hostd's net backend and a TAP device, from a network namespace made per instance";
                for m in ["requests_per_s", "p50_ms", "p99_ms"] {
                    t.notes.insert(m.into(), how.into());
                }
            } else {
                let http =
                    "needs a guest network: root and `ip` (a TAP device in a network namespace)";
                for m in ["requests_per_s", "p50_ms", "p99_ms"] {
                    t.notes.insert(m.into(), http.into());
                }
                t.notes.insert("cold_start_ms".into(), "spawn to the service's first console line (`workload: ready`), not to an HTTP 200 (no guest network)".into());
            }
            if hostd_bench::host::host_kind() == "nested-pvm" || t.runtime.contains("TCG") {
                let why = if vmm == "kvm" {
                    "every guest kernel entry is emulated on this nested PVM host (docs/pvm.md): dominated by emulation, not by the VMM"
                } else {
                    "QEMU TCG translates every guest instruction: dominated by emulation"
                };
                for m in ["syscall_ns", "pagefault_mib_s", "cold_start_ms"] {
                    let prev = t
                        .notes
                        .remove(m)
                        .map(|p| format!("{p}; "))
                        .unwrap_or_default();
                    t.notes.insert(m.into(), format!("{prev}{why}"));
                }
                if vmm == "qemu" {
                    t.notes.insert("cpu_relative".into(), why.into());
                }
            }
            t
        }
        "firecracker" => {
            let Some(fc) = firecracker else {
                return Err("only with --firecracker PATH".into());
            };
            return Err(format!(
                "--firecracker {} given, but booting the workload under Firecracker is not implemented in hostd bench yet",
                fc.display()
            ));
        }
        other => return Err(format!("unknown tier {other}")),
    };
    if name == "wasm" || name == "wasmtime-serve" {
        let why = "the function tier runs wasi:http handlers only; the loops are a native program (no wasm command world here)";
        for m in ["syscall_ns", "pagefault_mib_s", "cpu_relative"] {
            t.notes.insert(m.into(), why.into());
        }
        t.notes.insert(
            "pss_mib".into(),
            "one server process serving the hello component (instances are per request inside it)"
                .into(),
        );
    }
    Ok(t)
}

/// Builds the microVM image: the workload as the only service, the default guest kernel.
fn build_image(ctx: &Ctx, net: bool) -> anyhow::Result<PathBuf> {
    let dir = ctx.dir.join("image");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&ctx.workload, dir.join("workload"))?;
    let args = if net {
        format!("[\"guest\", \"{GUEST_PORT}\"]")
    } else {
        "[\"guest\"]".to_string()
    };
    std::fs::write(dir.join("bench.toml"), GUEST_SPEC.replace("ARGS", &args))?;
    let image = dir.join("bench.img");
    let out = Command::new(&ctx.hostd)
        .arg("build")
        .arg(dir.join("bench.toml"))
        .arg("-o")
        .arg(&image)
        .env("HOSTD_LOG", "warn")
        .output()
        .context("running hostd build")?;
    if !out.status.success() {
        bail!(
            "hostd build of the bench image failed (is the guest kernel built? guest/kernel/build.sh): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(image)
}

impl Tier {
    fn start_limit(&self, ctx: &Ctx) -> Duration {
        if ctx.quick && self.is_microvm() {
            QUICK_VM_LIMIT
        } else {
            START_LIMIT
        }
    }

    pub fn is_microvm(&self) -> bool {
        matches!(self.kind, Kind::MicroVm { .. })
    }

    pub fn runs_loops(&self) -> bool {
        matches!(
            self.kind,
            Kind::Native | Kind::Container { .. } | Kind::MicroVm { .. }
        )
    }

    fn container(&self, ctx: &Ctx, args: &[&str]) -> anyhow::Result<Instance> {
        let Kind::Container {
            runtime,
            rootfs,
            cgroup_base,
        } = &self.kind
        else {
            bail!("not a container tier");
        };
        let id = format!("hostd-bench-{}-{}", std::process::id(), ctx.next());
        let bundle = ctx.dir.join(&id);
        std::fs::create_dir_all(&bundle)?;
        let cgroup = format!("{}/{id}", cgroup_base.trim_end_matches('/'));
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/"],
                "cwd": "/",
                "noNewPrivileges": true,
                "capabilities": {"bounding": [], "effective": [], "permitted": [], "ambient": []},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}]
            },
            "root": {"path": rootfs, "readonly": true},
            "hostname": "bench",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=1m"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "size=1m"]}
            ],
            "linux": {
                // The host's network namespace: the same client reaches every tier.
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "cgroupsPath": cgroup,
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"]
            }
        });
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let mut cmd = Command::new(runtime);
        if runtime.ends_with("crun") {
            cmd.arg("--cgroup-manager=cgroupfs");
        }
        cmd.args(["run", "--bundle"]).arg(&bundle).arg(&id);
        let mut inst = Instance::spawn(cmd)?;
        let rt = runtime.clone();
        inst.on_drop(move || {
            let _ = Command::new(&rt).args(["delete", "--force", &id]).output();
            let _ = std::fs::remove_dir_all(&bundle);
        });
        Ok(inst)
    }

    /// The loops in a running microVM: started by `GET /loops` when it has a network,
    /// else run at boot; the result from the answer or the console. The CPU loop is also
    /// timed by the host from the console lines around it: a guest clock that ran more
    /// than 10% off the host's (e.g. under TCG) would skew every figure, so they are
    /// corrected by that rate.
    fn guest_loops(&self, ctx: &Ctx, s: &mut Started) -> anyhow::Result<Loops> {
        let limit = self.start_limit(ctx);
        let request = match s.addr {
            Some(addr) => {
                let ns = s.netns.clone();
                Some(std::thread::spawn(move || {
                    in_netns(ns.as_deref(), move || {
                        hostd_bench::http::get(addr, "/loops", limit)
                    })
                }))
            }
            None => None,
        };
        let (begin, _) = s.inst.wait_line("workload: cpu begin", limit)?;
        let (end, _) = s.inst.wait_line("workload: cpu end", limit)?;
        let line = match request {
            Some(r) => {
                let body = r
                    .join()
                    .map_err(|_| anyhow::anyhow!("the /loops request panicked"))???;
                String::from_utf8_lossy(&body).into_owned()
            }
            None => s.inst.wait_line("workload: loops", limit)?.1,
        };
        let mut l = parse_loops(&line).context("unreadable loops line")?;
        let host_ms = end.duration_since(begin).as_secs_f64() * 1e3;
        let rate = l.cpu_ms / host_ms;
        if host_ms > 0.0 && rate.is_finite() && (rate - 1.0).abs() > 0.1 {
            l.syscall_ns /= rate;
            l.pagefault_mib_s *= rate;
            l.cpu_ms = host_ms;
            l.guest_clock_rate = Some(rate);
        }
        Ok(l)
    }

    /// Starts one instance (not waiting for it to be ready).
    pub fn start(&self, ctx: &Ctx) -> anyhow::Result<Started> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let p = port.to_string();
        let (inst, addr) = match &self.kind {
            Kind::Native => {
                let mut c = Command::new(&ctx.workload);
                c.args(["serve", &p]);
                (Instance::spawn(c)?, Some(addr))
            }
            Kind::Container { .. } => (
                self.container(ctx, &["/workload", "serve", &p])?,
                Some(addr),
            ),
            Kind::HostdFn => {
                let mut c = Command::new(&ctx.hostd);
                c.args(["fn", "serve"])
                    .arg(&ctx.component)
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--cache-dir")
                    .arg(&ctx.fn_cache)
                    .env("HOSTD_LOG", "warn");
                (Instance::spawn(c)?, Some(addr))
            }
            Kind::WasmtimeServe { bin } => {
                let mut c = Command::new(bin);
                c.arg("serve")
                    .arg("--addr")
                    .arg(addr.to_string())
                    .arg(&ctx.component);
                (Instance::spawn(c)?, Some(addr))
            }
            Kind::MicroVm { vmm, image, net } => {
                let ns = net.then(|| format!("hostd-bench-{}-{}", std::process::id(), ctx.next()));
                let mut c = match &ns {
                    Some(ns) => {
                        netns_create(ns)?;
                        // `ip netns exec` execs hostd: the same pid, so SIGTERM reaches it.
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns]).arg(&ctx.hostd);
                        c
                    }
                    None => Command::new(&ctx.hostd),
                };
                c.args(["run", "--vmm", vmm, "--timeout", "600"]);
                if ns.is_some() {
                    c.arg("--net").arg(format!("tap={TAP},{GUEST_NET}"));
                }
                c.arg(image).env("HOSTD_LOG", "warn,hostd_vmm=error");
                let mut i = match Instance::spawn(c) {
                    Ok(i) => i,
                    Err(e) => {
                        if let Some(ns) = &ns {
                            let _ = Command::new("ip").args(["netns", "del", ns]).output();
                        }
                        return Err(e);
                    }
                };
                i.gentle = true;
                let addr = ns
                    .is_some()
                    .then(|| SocketAddr::from(([10, 0, 2, 2], GUEST_PORT)));
                if let Some(ns) = ns.clone() {
                    i.on_drop(move || {
                        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
                    });
                }
                return Ok(Started {
                    inst: i,
                    addr,
                    netns: ns,
                });
            }
        };
        Ok(Started {
            inst,
            addr,
            netns: None,
        })
    }

    /// Starts an instance and waits until it is ready: the first HTTP 200, or for a
    /// microVM its service's first line. Returns it and the time that took in ms.
    pub fn cold_start(&self, ctx: &Ctx) -> anyhow::Result<(Started, f64)> {
        let mut s = self.start(ctx)?;
        let limit = self.start_limit(ctx);
        let ready = match s.addr {
            Some(addr) => in_netns(s.netns.as_deref(), move || {
                hostd_bench::http::wait_for_200(addr, "/", limit)
            })?
            .map_err(|e| {
                let err = s.inst.stderr();
                let err = if err.trim().is_empty() {
                    "(nothing on stderr)".into()
                } else {
                    err
                };
                anyhow::anyhow!("{e}; it printed:\n{err}")
            })?,
            None => {
                s.inst
                    .wait_line("workload: ready", self.start_limit(ctx))?
                    .0
            }
        };
        let ms = ready.duration_since(s.inst.started).as_secs_f64() * 1e3;
        Ok((s, ms))
    }

    /// The loops: inside a running microVM from its console, else a run of their own.
    pub fn loops(&self, ctx: &Ctx, running: Option<&mut Started>) -> anyhow::Result<Option<Loops>> {
        let budget = ctx.loop_budget_ms.to_string();
        let mut inst = match (&self.kind, running) {
            (Kind::MicroVm { .. }, Some(s)) => return self.guest_loops(ctx, s).map(Some),
            (Kind::Native, _) => {
                let mut c = Command::new(&ctx.workload);
                c.args(["loops", &budget]);
                Instance::spawn(c)?
            }
            (Kind::Container { .. }, _) => self.container(ctx, &["/workload", "loops", &budget])?,
            _ => return Ok(None),
        };
        let (_, line) = inst.wait_line("workload: loops", Duration::from_secs(60))?;
        parse_loops(&line)
            .map(Some)
            .context("unreadable loops line")
    }
}
