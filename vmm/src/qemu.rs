//! The QEMU runner: boots a [`BootSpec`] under QEMU's `microvm` machine.
//!
//! The console (8250 on 0x3f8) is relayed to our stdout as it arrives; guest init's own
//! lines give the timings and the exit code. The exit code also arrives through an
//! `isa-debug-exit` device on [`abi::EXIT_PORT`]. Ctrl-C (SIGINT) or SIGTERM asks guest
//! init for a clean shutdown over the console input; a second one, or a guest that does
//! not power off in time, ends QEMU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostd_images::abi;
use vmm_sys_util::eventfd::EventFd;

use crate::backends::RunningBackends;
use crate::boot::{BootSpec, Outcome, Timings};
use crate::host::{kvm_kind, KvmKind};
use crate::payload::{Payload, PayloadError};
use crate::since_start_ms;

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if this host's KVM can run a Linux guest, else TCG.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// Runner options.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Accelerator choice.
    pub accel: Accel,
    /// How long the guest gets to power off after a shutdown request before QEMU is
    /// killed.
    pub shutdown_grace: Duration,
    /// Give up (kill QEMU, error) after this long; `None` runs until the guest ends.
    pub timeout: Option<Duration>,
}

/// Why a QEMU run failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed or failed to start.
    #[error("cannot start {binary} (install it with `apt-get install qemu-system-x86`)")]
    Spawn {
        /// The QEMU binary.
        binary: String,
        /// The error.
        source: std::io::Error,
    },
    /// QEMU exited before the guest powered off through guest init.
    #[error("{0}")]
    Guest(String),
    /// Waiting for QEMU failed.
    #[error("waiting for QEMU: {0}")]
    Io(#[from] std::io::Error),
}

/// The QEMU binary (override with HOSTD_QEMU).
pub fn qemu_binary() -> String {
    std::env::var("HOSTD_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Decides the accelerator and says why.
pub fn choose_accel(accel: Accel) -> (&'static str, Option<&'static str>) {
    match accel {
        Accel::Kvm => ("kvm", None),
        Accel::Tcg => ("tcg", None),
        Accel::Auto => match kvm_kind() {
            KvmKind::Hardware => ("kvm", None),
            KvmKind::Absent => (
                "tcg",
                Some("no usable /dev/kvm; using TCG (software emulation)"),
            ),
            KvmKind::Pvm => (
                "tcg",
                Some(
                    "/dev/kvm is a nested PVM hypervisor that cannot carry a Linux guest under \
                     QEMU; using TCG (software emulation)",
                ),
            ),
        },
    }
}

/// QEMU's `-sandbox` with everything hostd's QEMU does not need denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The QEMU command line for a boot spec.
/// `devices` are the arguments that attach the running device backends
/// ([`RunningBackends::qemu_args`]); with any, guest memory is a shared memfd.
pub fn command_line(boot: &BootSpec, accel: &str, devices: &[String]) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &str| a.push(s.to_string());
    push("-M");
    // No ACPI, no option ROMs: an MP table, the 8250 console and our exit port.
    // QEMU's own PIT, PIC and RTC stay on (the RTC gives the guest wall-clock time): without the first two a guest under TCG cannot calibrate
    // its clocks and stalls (measured). They are QEMU's, not hostd's VMM's.
    // dump-guest-core=off: a core dump of QEMU never carries guest memory.
    push(if devices.is_empty() {
        "microvm,x-option-roms=off,isa-serial=on,acpi=off,dump-guest-core=off"
    } else {
        // Backends in other processes map guest memory: it must be a shared memfd.
        "microvm,x-option-roms=off,isa-serial=on,acpi=off,dump-guest-core=off,memory-backend=mem"
    });
    if boot.sandbox_devices {
        // QEMU's own seccomp filter, everything it does not need denied: obsolete
        // syscalls, set*uid and friends, fork/exec, and scheduler/resource changes.
        push("-sandbox");
        push(SANDBOX);
    }
    push("-accel");
    push(accel);
    push("-cpu");
    push(if accel == "kvm" { "host" } else { "max" });
    push("-smp");
    push(&boot.vcpus.to_string());
    push("-m");
    push(&format!("{}M", boot.memory_mib));
    for s in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        push(s);
    }
    // QEMU's threads named for what they do (`CPU 0/TCG`, `CPU 0/KVM`, `worker`), as
    // top -H and /proc show them: what runs the guest apart from QEMU's own work.
    push("-name");
    push("hostd,debug-threads=on");
    push("-chardev");
    push("stdio,id=console,signal=off");
    push("-serial");
    push("chardev:console");
    push("-device");
    push(&format!(
        "isa-debug-exit,iobase={:#x},iosize=1",
        abi::EXIT_PORT
    ));
    // Modern (virtio 1.x) virtio-mmio, as the built-in VMM offers; QEMU defaults to legacy.
    push("-global");
    push("virtio-mmio.force-legacy=false");
    a.extend(devices.iter().cloned());
    let mut push = |s: &str| a.push(s.to_string());
    push("-kernel");
    push(&boot.kernel.to_string_lossy());
    if let Some(initrd) = &boot.initrd {
        push("-initrd");
        push(&initrd.to_string_lossy());
    }
    push("-append");
    push(&boot.cmdline);
    a
}

/// What the console relay learned from guest init's lines.
#[derive(Debug, Default)]
struct ConsoleState {
    init_ms: Option<f64>,
    first_service_ms: Option<f64>,
    exit_code: Option<u8>,
}

fn scan_line(line: &str, st: &mut ConsoleState) {
    let Some(rest) = line
        .trim_end_matches('\r')
        .strip_prefix(abi::CONSOLE_PREFIX)
    else {
        return;
    };
    let now = since_start_ms();
    if rest == abi::LINE_STARTED && st.init_ms.is_none() {
        st.init_ms = Some(now);
    } else if rest.starts_with(abi::LINE_SERVICE_STARTED) && rest.contains(" started (pid ") {
        st.first_service_ms.get_or_insert(now);
        crate::ready::services_started();
    } else if let Some(code) = rest.strip_prefix(abi::LINE_POWER_OFF) {
        st.exit_code = code.trim_end_matches(')').parse().ok();
    }
}

/// Threads QEMU may have (RLIMIT_NPROC under its own uid): its main loop, RCU and
/// signal threads, one per vCPU, and its I/O worker pool (up to 64).
const QEMU_MAX_THREADS: u64 = 128;

/// Boots `boot` under QEMU, relaying the console to stdout, and returns how it ended.
/// With the sandbox (the default), QEMU and the device backends run below a process of
/// their own: PID 1 of a new PID namespace, in a per-VM cgroup (see
/// [`crate::jail::supervisor`]); QEMU itself runs as the VM's unprivileged uid, with
/// its `-sandbox` seccomp filter.
pub fn run(boot: &BootSpec, opts: &QemuOptions) -> Result<Outcome, QemuError> {
    // Counted from now on: a Ctrl-C while the backends start stops the VM at once.
    crate::signals::install();
    if !boot.sandbox_devices {
        tracing::warn!(
            "--no-sandbox: QEMU runs as root without -sandbox, the device backends unjailed, \
             and the VM without a PID namespace or cgroup of its own (for debugging only)"
        );
        return run_qemu(boot, opts);
    }
    let limits = crate::jail::cgroup::Limits::for_vm(boot.memory_mib, boot.vcpus);
    crate::jail::supervisor::run(limits, None, || {
        run_qemu(boot, opts).map_err(|e| e.to_string())
    })
    .map_err(QemuError::Guest)
}

/// The seccomp filter of the process that runs QEMU, once QEMU runs: relaying QEMU's
/// console and stderr (read, write, its own two threads), watching and finally killing
/// QEMU (wait4, kill), sleeping. No files, no sockets, no exec.
pub fn parent_filter() -> Result<seccompiler::BpfProgram, crate::jail::JailError> {
    let mut syscalls = crate::jail::COMMON_SYSCALLS.to_vec();
    syscalls.extend_from_slice(&[
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_kill,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Its two relay threads (jail::filter allows clone with CLONE_THREAD only).
        libc::SYS_clone,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_mprotect,
        libc::SYS_sched_getaffinity,
        libc::SYS_getrandom,
        libc::SYS_poll,
        // The standard library's per-thread signal setup (measured: a relay thread
        // died with SIGSYS on rt_sigaction without it).
        libc::SYS_rt_sigaction,
    ]);
    crate::jail::filter(&syscalls, &[])
}

/// Makes what QEMU must read or connect to (the staged kernel and initrd, the backend
/// sockets) belong to `id`, the uid QEMU runs as.
fn share_with_qemu(
    boot: &BootSpec,
    backends: &RunningBackends,
    id: u32,
) -> Result<(), crate::jail::JailError> {
    let runtime = crate::jail::runtime_dir();
    for file in std::iter::once(&boot.kernel).chain(boot.initrd.as_ref()) {
        if file.starts_with(runtime) {
            if let Some(dir) = file.parent() {
                crate::jail::give_to(dir, id)?;
            }
            crate::jail::give_to(file, id)?;
        }
    }
    backends.share_sockets_with(id)
}

/// What QEMU may touch on the host's file system: its program, libraries and firmware
/// (read), the VM's runtime directory (the staged kernel and initrd, the backend
/// sockets) and the few device nodes it opens. Nothing else: not the host's /etc,
/// /home, /root or /proc of other processes.
fn qemu_landlock() -> Result<hostd_devices::jail::landlock::Prepared, crate::jail::JailError> {
    use std::path::{Path, PathBuf};
    // QEMU from /nix/store (NixOS: the store holds it and its libraries), or from the
    // directory HOSTD_QEMU names; paths that do not exist are left out.
    let binary = PathBuf::from(qemu_binary());
    let own_dir: Option<PathBuf> = binary
        .is_absolute()
        .then(|| binary.canonicalize().ok())
        .flatten()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let read: Vec<&Path> = [
        "/usr",
        "/lib",
        "/lib64",
        "/nix/store",
        "/etc/ld.so.cache",
        "/dev/urandom",
    ]
    .iter()
    .map(Path::new)
    .chain(std::iter::once(crate::jail::runtime_dir()))
    .chain(own_dir.as_deref())
    .collect();
    let read_write: Vec<&Path> = ["/dev/kvm", "/dev/null"].iter().map(Path::new).collect();
    hostd_devices::jail::landlock::prepare(&read, &read_write)
}

fn run_qemu(boot: &BootSpec, opts: &QemuOptions) -> Result<Outcome, QemuError> {
    let (accel, note) = choose_accel(opts.accel);
    if let Some(note) = note {
        tracing::info!("{note}");
    }
    let binary = qemu_binary();
    let exe = std::env::current_exe().map_err(QemuError::Io)?;
    // As under the built-in VMM: one empty network namespace for this process, its
    // backends (but net, which opens its TAP in the host's) and QEMU, rather than one
    // each. Only in the VM's own process, which nothing else shares.
    let host_net = if boot.sandbox_devices && crate::jail::supervisor::supervised() {
        crate::jail::empty_netns_for_backends().map_err(|e| QemuError::Guest(e.to_string()))?
    } else {
        None
    };
    let mut backends = RunningBackends::start(
        &exe,
        &boot.devices,
        boot.sandbox_devices,
        boot.memory_mib,
        host_net.as_ref(),
    )
    .map_err(|e| QemuError::Guest(e.to_string()))?;
    drop(host_net);
    let device_args = if boot.devices.is_empty() {
        Vec::new()
    } else {
        backends.qemu_args(boot.memory_mib)
    };
    let args = command_line(boot, accel, &device_args);
    tracing::debug!("{binary} {}", args.join(" "));
    let mut cmd = Command::new(&binary);
    // A clean environment, no inherited fd but the three below, and killed when this
    // thread (the one that waits for it) ends, also by SIGKILL.
    crate::jail::clean_child(&mut cmd, &[]);
    if boot.sandbox_devices {
        let id = crate::jail::vm_jail_id(0);
        share_with_qemu(boot, &backends, id).map_err(|e| QemuError::Guest(e.to_string()))?;
        // With KVM, QEMU keeps the group that may open /dev/kvm.
        let kvm_group = (accel == "kvm")
            .then(|| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
            })
            .flatten();
        crate::jail::run_as(
            &mut cmd,
            id,
            kvm_group,
            QEMU_MAX_THREADS,
            Some(qemu_landlock().map_err(|e| QemuError::Guest(e.to_string()))?),
        );
    }
    // The VM's cgroup limits (`hostd run` writes them meanwhile) before QEMU runs.
    let _ = crate::jail::supervisor::limits_in_place();
    let mut child = cmd
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only us, and we turn it
        // into a clean guest shutdown.
        .process_group(0)
        .spawn()
        .map_err(|source| QemuError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    // The Command holds what its pre-exec steps needed (the Landlock ruleset's fd).
    drop(cmd);
    // Opened before the jail, for the wait loop below: readable once QEMU has ended, and
    // written by the signal handler.
    let qemu_exit = crate::backends::pidfd(child.id());
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).ok();
    if boot.sandbox_devices && crate::jail::supervisor::supervised() {
        // QEMU and the backends run: this process now needs only their pipes, its
        // children's exit statuses and QEMU's pid. Before its relay threads start, so
        // that they inherit all of it.
        backends.keep_sockets();
        let jailed = parent_filter().and_then(|prog| {
            crate::jail::enter_qemu_parent(QEMU_MAX_THREADS + 8)?;
            crate::jail::install(&prog)
        });
        if let Err(e) = jailed {
            kill(&mut child);
            let _ = child.wait();
            return Err(QemuError::Guest(format!("jailing the VM's process: {e}")));
        }
    }
    let mut timings = Timings {
        vm_started_ms: Some(since_start_ms()),
        ..Timings::default()
    };
    let state = Arc::new(Mutex::new(ConsoleState::default()));
    let relay = spawn_console_relay(&mut child, Arc::clone(&state));
    let stderr = spawn_stderr_collector(&mut child);
    let mut stdin = child.stdin.take();

    let started = Instant::now();
    let mut shutdown_sent: Option<Instant> = None;
    let mut seen_signals = 0;
    // The loop sleeps until QEMU or a backend ends (pidfds), a signal arrives (the
    // handler writes `wake`) or a deadline passes: an idle VM wakes it never.
    let _signal_wakes = wake.as_ref().map(crate::signals::WakeOnSignal::new);
    let watched: Option<Vec<RawFd>> = backends.exit_fds().and_then(|mut fds| {
        fds.push(qemu_exit.as_ref()?.as_raw_fd());
        fds.push(wake.as_ref()?.as_raw_fd());
        Some(fds)
    });
    let mut pollfds: Vec<libc::pollfd> = watched
        .iter()
        .flatten()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(dead) = backends.check() {
            // A backend also ends when QEMU does (it hangs up): give QEMU a moment to be
            // the one that ended.
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            // A device is gone: the guest would hang on it. Stop the VM and say why.
            kill(&mut child);
            let _ = child.wait();
            return Err(QemuError::Guest(format!("{dead}; the VM was stopped")));
        }
        let signals = crate::signals::count();
        if signals > seen_signals {
            seen_signals = signals;
            let init_started = state.lock().map(|s| s.init_ms.is_some()).unwrap_or(false);
            if !init_started {
                // Nobody in the guest could act on a shutdown request yet: stop now.
                tracing::info!("interrupted before guest init started; stopping QEMU");
                kill(&mut child);
                let _ = child.wait();
                drop(stdin);
                let _ = relay.join();
                timings.exited_ms = Some(since_start_ms());
                return Ok(Outcome {
                    exit_code: 130,
                    timings,
                });
            } else if shutdown_sent.is_none() {
                tracing::info!("asking the guest to shut down (again to force)");
                if let Some(w) = stdin.as_mut() {
                    let _ = writeln!(w, "{}", abi::SHUTDOWN_REQUEST);
                    let _ = w.flush();
                }
                shutdown_sent = Some(Instant::now());
            } else {
                tracing::warn!("forced stop: killing QEMU");
                kill(&mut child);
            }
        }
        if shutdown_sent.is_some_and(|t| t.elapsed() > opts.shutdown_grace) {
            tracing::warn!(
                "the guest did not power off within {:?}; killing QEMU",
                opts.shutdown_grace
            );
            kill(&mut child);
        }
        if opts.timeout.is_some_and(|t| started.elapsed() > t) {
            kill(&mut child);
            let _ = child.wait();
            return Err(QemuError::Guest(format!(
                "the guest did not finish within {:?} (--timeout); QEMU was killed",
                opts.timeout.unwrap_or_default()
            )));
        }
        let now = Instant::now();
        let timeout = [
            shutdown_sent.map(|t| (t + opts.shutdown_grace).saturating_duration_since(now)),
            opts.timeout
                .map(|t| (started + t).saturating_duration_since(now)),
        ]
        .into_iter()
        .flatten()
        // A deadline that passed was acted on above: look again in 5 ms, not at once.
        .map(|t| t.max(Duration::from_millis(5)))
        .min();
        match (&wake, pollfds.is_empty()) {
            (Some(wake), false) => crate::kvm::wait_for_wake(wake, &mut pollfds, timeout),
            // No pidfds (Linux before 5.3): look every 5 ms.
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    timings.exited_ms = Some(since_start_ms());
    drop(stdin);
    let _ = relay.join();
    let stderr_text = stderr.join().unwrap_or_default();
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    timings.init_started_ms = st.init_ms;
    timings.first_service_ms = st.first_service_ms;
    // isa-debug-exit makes QEMU exit with code * 2 + 1 (7 bits survive). guest init's
    // line carries all 8 bits; the port confirms it. Status 1 is also how QEMU reports
    // its own errors: without init's line it counts as the port only when QEMU said
    // nothing on stderr.
    let status_code = status.code();
    let port_code = status_code
        .filter(|c| c % 2 == 1 && (*c > 1 || stderr_text.trim().is_empty()))
        .map(|c| (c >> 1) as u8);
    match st.exit_code {
        Some(code) if status_code == Some(i32::from(code & 0x7f) * 2 + 1) => Ok(Outcome {
            exit_code: code,
            timings,
        }),
        // Reset instead of the exit port (e.g. a runner without it): trust the line.
        Some(code) if status_code == Some(0) || status_code.is_none() => Ok(Outcome {
            exit_code: code,
            timings,
        }),
        // A guest without hostd's init (a bare --kernel) that used the exit port.
        None if port_code.is_some() => Ok(Outcome {
            exit_code: port_code.unwrap_or_default(),
            timings,
        }),
        _ => {
            let how = match status.code() {
                Some(c) => format!("QEMU exited with status {c}"),
                None => "QEMU was killed".to_string(),
            };
            let stderr_text = stderr_text.trim();
            // QEMU's own words when it has any; otherwise only what is known.
            Err(QemuError::Guest(if !stderr_text.is_empty() {
                format!("{how}: {stderr_text}")
            } else if st.init_ms.is_none() {
                format!("{how} before guest init started (the guest's console is above)")
            } else {
                format!("{how} without guest init powering off")
            }))
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

fn spawn_console_relay(
    child: &mut Child,
    state: Arc<Mutex<ConsoleState>>,
) -> std::thread::JoinHandle<()> {
    let out = child.stdout.take();
    std::thread::spawn(move || {
        let Some(mut out) = out else { return };
        let mut buf = [0u8; 8192];
        let mut line: Vec<u8> = Vec::new();
        let stdout = std::io::stdout();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut o = stdout.lock();
                let _ = o.write_all(&buf[..n]);
                let _ = o.flush();
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    scan_line(&text, &mut state.lock().unwrap_or_else(|p| p.into_inner()));
                    line.clear();
                } else if line.len() < 8192 {
                    line.push(b);
                }
            }
        }
    })
}

fn spawn_stderr_collector(child: &mut Child) -> std::thread::JoinHandle<String> {
    let err = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = err {
            let _ = e.read_to_string(&mut s);
        }
        s
    })
}

/// A path QEMU can be given for a section of an image: written to a private (0700)
/// directory in the VM's runtime tmpfs ([`crate::jail::runtime_dir`]), as 0600 files.
/// The tmpfs lives in `hostd run`'s own mount namespace, so the copies never reach the
/// host's file system and vanish with the VM's last process, whatever ends it; the
/// directory is also removed on drop.
#[derive(Debug)]
pub struct StagedFiles {
    dir: tempfile::TempDir,
}

impl StagedFiles {
    /// A new private (0700) directory.
    pub fn new() -> std::io::Result<Self> {
        Ok(StagedFiles {
            dir: tempfile::Builder::new()
                .prefix("hostd-run-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir_in(crate::jail::runtime_dir())?,
        })
    }

    /// Writes `bytes` as `name` (mode 0600) and returns its path.
    pub fn put(&self, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)?;
        f.write_all(bytes)?;
        Ok(p)
    }

    /// Writes `payload` as `name` (mode 0600), chunk by chunk, and returns its path once
    /// its digest is checked.
    pub fn put_payload(&self, name: &str, payload: &Payload) -> Result<PathBuf, PayloadError> {
        let (p, f) = self.create(name)?;
        payload.stream(|at, bytes| f.write_all_at(bytes, at).map_err(|e| e.to_string()))?;
        Ok(p)
    }

    /// Writes a kernel payload as `name`: the ELF (or bzImage) it stands for. A packed
    /// kernel becomes a sparse file: only its kept extents take space.
    pub fn put_kernel(&self, name: &str, payload: &Payload) -> Result<PathBuf, PayloadError> {
        let (p, f) = self.create(name)?;
        let len = payload
            .stream_kernel(|at, bytes| f.write_all_at(bytes, at).map_err(|e| e.to_string()))?;
        f.set_len(len).map_err(|source| PayloadError::Write {
            path: p.clone(),
            source,
        })?;
        Ok(p)
    }

    fn create(&self, name: &str) -> Result<(PathBuf, File), PayloadError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.path().join(name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(|source| PayloadError::Write {
                path: p.clone(),
                source,
            })?;
        Ok((p, f))
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_give_timings_and_exit_code() {
        let mut st = ConsoleState::default();
        scan_line("[hello] hostd-init: powering off (exit code 9)", &mut st);
        assert_eq!(st.exit_code, None, "a service cannot fake init's line");
        scan_line("hostd-init: started", &mut st);
        scan_line("hostd-init: service hello started (pid 12)", &mut st);
        scan_line("hostd-init: powering off (exit code 7)\r", &mut st);
        assert!(st.init_ms.is_some() && st.first_service_ms.is_some());
        assert_eq!(st.exit_code, Some(7));
    }

    #[test]
    fn staged_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let staged = StagedFiles::new().expect("staging directory");
        let file = staged.put("kernel", b"bytes").expect("staged file");
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0)
        };
        assert_eq!(mode(staged.path()), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).ok().as_deref(), Some(&b"bytes"[..]));
        let dir = staged.path().to_path_buf();
        drop(staged);
        assert!(!dir.exists(), "the staging directory outlived its owner");
    }

    #[test]
    fn command_line_has_no_legacy_devices_but_the_console() {
        let boot = BootSpec {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            devices: vec![],
            sandbox_devices: true,
        };
        let a = command_line(&boot, "tcg", &[]).join(" ");
        assert!(
            !a.contains("virtio-blk") && !a.contains("memory-backend"),
            "{a}"
        );
        assert!(a.contains("acpi=off") && a.contains("-nodefaults"), "{a}");
        assert!(a.contains("-name hostd,debug-threads=on"), "{a}");
        assert!(a.contains("-smp 2") && a.contains("-m 256M"), "{a}");
        assert!(a.contains(&format!("-sandbox {SANDBOX}")), "{a}");
        assert!(a.contains("dump-guest-core=off"), "{a}");
        let with = command_line(
            &boot,
            "tcg",
            &["-device".into(), "vhost-user-rng,chardev=dev0".into()],
        )
        .join(" ");
        assert!(
            with.contains("memory-backend=mem") && with.contains("vhost-user-rng"),
            "{with}"
        );
    }
}
