//! The built-in VMM: one KVM VM with its vCPU threads, guest memory on a memfd, the
//! in-kernel irqchip and PIT, an 8250 console, the boot-marker and exit ports and
//! virtio-mmio devices. No PCI, no ACPI, no other emulated hardware.

pub mod assist;
pub mod boot;
pub mod coalesced;
pub mod cpuid;
pub mod cpuid_cache;
pub mod memory;
pub mod mptable;
pub mod profile;
pub mod snapshot;
pub mod vcpu;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use hostd_devices::bus::{Bus, SharedDevice};
use hostd_devices::marker::{BootMarker, ExitPort, Reports};
use hostd_devices::serial::{Console, COM1_IRQ, COM1_LEN, COM1_PORT};
use hostd_devices::virtio::mmio::{cmdline_arg, MmioTransport};
use hostd_devices::virtio::vhost_user::{forward_interrupts, Handshake, VhostUserDevice};
use hostd_images::abi;
use kvm_bindings::kvm_pit_config;
use kvm_ioctls::{Kvm, VmFd};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use crate::backends::{DeviceBackend, RunningBackends, Sockets};
use crate::boot::{Outcome, Timings};
use crate::host::KvmKind;
use crate::jail;
use crate::layout;
pub use cpuid::CpuTemplate;
use vcpu::{Shared, StopReason};

/// What to boot and how.
#[derive(Debug)]
pub struct KvmConfig {
    /// The kernel (ELF with a PVH note, as it is or packed), read straight into guest
    /// memory.
    pub kernel: crate::payload::Payload,
    /// The initrd, read straight into guest memory.
    pub initrd: Option<crate::payload::Payload>,
    /// Kernel command line (the VMM appends its devices).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// CPU template; `None` picks by host kind.
    pub template: Option<CpuTemplate>,
    /// Devices, each served by its own backend process (`hostd backend …`).
    pub devices: Vec<DeviceBackend>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Install seccomp filters and drop capabilities (off only with --no-sandbox).
    pub sandbox: bool,
    /// Restore from, or take, a snapshot at guest init's snapshot point
    /// (`--snapshot-cache`, docs/snapshots.md).
    pub snapshot: Option<snapshot::SnapshotCache>,
}

/// Why the VM could not run.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM call failed during setup.
    #[error("KVM: {0}")]
    Setup(String),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The guest did something the VMM cannot handle.
    #[error("{0}")]
    Guest(String),
    /// Sandboxing failed.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
}

fn setup<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, KvmError> {
    r.map_err(|e| KvmError::Setup(format!("{what}: {e}")))
}

/// ioctls the control thread issues after setup: only the VM state reads of a
/// snapshot. Otherwise it waits, relays signals as console input and kicks vCPU
/// threads.
const CONTROL_IOCTLS: &[u64] = snapshot::ioctls::VM;

/// The control thread's seccomp filter, which the threads it starts once the guest runs
/// inherit: waiting (futex, sleeps, poll on its wake eventfd), kicking vCPU threads
/// (tgkill, or tkill with musl), writing the console and logs, finishing vhost-user device activation
/// (sendmsg/recvmsg on the backend sockets it already holds), watching and finally
/// killing the backend processes (wait4/waitid, kill), tearing down (close, munmap).
pub fn control_filter() -> Result<BpfProgram, jail::JailError> {
    let mut syscalls = jail::COMMON_SYSCALLS.to_vec();
    syscalls.extend_from_slice(&[
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_tgkill,
        // musl's pthread_kill (hostd's VM path is built with musl, docs/startup.md).
        libc::SYS_tkill,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_kill,
        // Writing a snapshot into the file opened before the jail.
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        // Starting the device threads once the guest runs (`start_device_threads`):
        // threads only (`clone` with CLONE_THREAD; `clone3` gets ENOSYS), their stacks'
        // guard pages (`mprotect`, never executable), and what a new thread does before
        // its code (robust futex list, restartable sequences, its name, the C library's
        // count of CPUs for its first allocation's arena).
        libc::SYS_clone,
        libc::SYS_mprotect,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        // A forwarder's own filter on top of this one (`jail::install_stacked`).
        libc::SYS_seccomp,
    ]);
    let mut ioctls = CONTROL_IOCTLS.to_vec();
    // The PIT thread (pit_reinjection_off).
    ioctls.push(KVM_REINJECT_CONTROL);
    jail::filter(&syscalls, &ioctls)
}

/// KVM_REINJECT_CONTROL, `_IO(KVMIO, 0x71)`: whether the in-kernel PIT reinjects the
/// ticks a guest did not acknowledge in time.
const KVM_REINJECT_CONTROL: u64 = 0xae71;

/// `struct kvm_reinject_control`.
#[repr(C)]
struct ReinjectControl {
    pit_reinject: u8,
    reserved: [u8; 31],
}

/// Turns the in-kernel PIT's tick reinjection off, on a thread of its own that ends
/// once it is done (under the control thread's filter).
///
/// KVM creates the PIT with reinjection on, and turning it off waits for an SRCU grace
/// period (`kvm_pit_set_reinject` unregisters an interrupt-acknowledge notifier and
/// calls `synchronize_srcu`). KVM does that itself when it destroys the VM, in the VM
/// process's exit: the process could not be reaped, and `hostd run` not end, until the
/// grace period was over (15 ms, the system idle, on this machine: docs/startup.md).
/// Done here, while the guest boots, nobody waits for it, and at the VM's end there is
/// nothing left to turn off. The ticks themselves are delivered as before; only ticks
/// missed while the guest had the previous one pending are dropped instead of delivered
/// later, as QEMU's `lost_tick_policy=discard` does. Linux uses the PIT only until its
/// local APIC timer runs (and to calibrate where it must).
fn pit_reinjection_off(vm: OwnedFd) -> Result<(), KvmError> {
    spawn_filtered("pit", None, move || {
        let off = ReinjectControl {
            pit_reinject: 0,
            reserved: [0; 31],
        };
        // SAFETY: KVM_REINJECT_CONTROL reads one kvm_reinject_control, which `off` is
        // and outlives the call; `vm` is the VM's fd.
        let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_REINJECT_CONTROL as _, &off) };
        if r != 0 {
            tracing::debug!("KVM_REINJECT_CONTROL: {}", std::io::Error::last_os_error());
        }
    })
}

/// A duplicate of the VM's fd for [`pit_reinjection_off`]'s thread: the VM's file stays
/// open until its ioctl is done, whenever the run ends.
fn vm_fd_for_pit(vm: &VmFd) -> Result<OwnedFd, KvmError> {
    // SAFETY: the VM's fd is open for as long as `vm` is borrowed.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd()) }
        .try_clone_to_owned()
        .map_err(|e| KvmError::Setup(format!("duplicating the VM's fd: {e}")))
}

/// One device queue's interrupt forwarding: the backend's "used buffers" eventfd, the
/// transport's interrupt status, the guest interrupt.
type Forwarder = (
    Arc<EventFd>,
    Arc<AtomicU32>,
    Arc<dyn hostd_devices::Interrupt>,
);

/// Starts each device's handshake thread and one interrupt forwarder per device queue,
/// which turns the backend's "used buffers" signal into the transport's interrupt
/// status and the guest interrupt. Called once this thread has its filter (if jailed),
/// which they inherit; a forwarder adds `forwarder`'s (read and write eventfds,
/// futexes) on top.
fn start_device_threads(
    handshakes: Vec<Handshake>,
    forwarders: Vec<Forwarder>,
    forwarder: Option<Arc<BpfProgram>>,
) -> Result<(), KvmError> {
    for handshake in handshakes {
        hostd_devices::thread::named("vhost-user-hello")
            .spawn(move || handshake.run())
            .map_err(|e| KvmError::Setup(format!("handshake thread: {e}")))?;
    }
    for (call, status, irq) in forwarders {
        spawn_filtered("irq-forward", forwarder.clone(), move || {
            forward_interrupts(call, status, irq)
        })?;
    }
    Ok(())
}

/// Starts a thread named `name` that adds `filter` to the one it inherits from the
/// control thread (started once that has its own) and runs `body`. If the filter cannot
/// be installed, the error is logged and `body` never runs.
fn spawn_filtered(
    name: &'static str,
    filter: Option<Arc<BpfProgram>>,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), KvmError> {
    hostd_devices::thread::named(name)
        .spawn(move || {
            if let Some(Err(e)) = filter.map(|p| jail::install_stacked(&p)) {
                tracing::error!("{name} thread: {e}");
                return;
            }
            body()
        })
        .map(drop)
        .map_err(|e| KvmError::Setup(format!("{name} thread: {e}")))
}

/// How long a partial console line is held back (and how often the control thread looks
/// at the coalesced console ring while the guest prints).
const CONTROL_PERIOD: Duration = Duration::from_millis(5);

/// The longest the control thread sleeps while the guest is quiet. It wakes for every
/// event (a stop, a signal, a device activation, a boot marker, a snapshot step, a
/// backend's end, the first byte of a partial console line) and for deadlines; this only
/// bounds how late a polled console write left in the coalesced ring with no exit after
/// it (no driver we know of does that: Linux's console reads the line status after each
/// message) is printed.
const QUIET_PERIOD: Duration = Duration::from_secs(1);

/// How long the control thread may sleep while the guest is quiet: the period doubles with
/// each quiet look, from [`CONTROL_PERIOD`] to [`QUIET_PERIOD`].
fn quiet_period(quiet_looks: u32) -> Duration {
    CONTROL_PERIOD
        .saturating_mul(1 << quiet_looks.min(16))
        .min(QUIET_PERIOD)
}

/// Sleeps until `wake` is signalled, one of `fds` polls readable, or `timeout` passed
/// (`None`: no timeout), then clears `wake`. Also the QEMU runner's wait.
pub(crate) fn wait_for_wake(wake: &EventFd, fds: &mut [libc::pollfd], timeout: Option<Duration>) {
    for p in fds.iter_mut() {
        p.revents = 0;
    }
    // Rounded up: a deadline 0.3 ms away is not a busy loop of zero-timeout polls.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int
    });
    // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    let _ = wake.read();
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
/// Makes every vCPU thread still running return from KVM_RUN (EINTR) once.
fn kick(threads: &[std::thread::JoinHandle<()>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // SAFETY: the pthread is alive (not finished) and the signal has a handler.
        unsafe { libc::pthread_kill(t.as_pthread_t() as _, kick_signal()) };
    }
}

/// Writes the snapshot of the paused VM (every vCPU parked with its state). A failure
/// is a warning: the VM runs on, and no snapshot is stored.
fn take_snapshot(
    vcpus: Vec<Result<snapshot::VcpuState, String>>,
    vm: &VmFd,
    console: &Mutex<Console<StdoutWriter>>,
    transports: &[Arc<Mutex<MmioTransport>>],
    mem: &vm_memory::GuestMemoryMmap,
    file: &std::fs::File,
    key: &[u8; 32],
) {
    let t = Instant::now();
    let state = (|| -> Result<snapshot::State, String> {
        Ok(snapshot::State {
            vcpus: vcpus.into_iter().collect::<Result<_, _>>()?,
            vm: snapshot::save_vm(vm).map_err(|e| e.to_string())?,
            serial: console.lock().unwrap_or_else(|p| p.into_inner()).save(),
            transports: transports
                .iter()
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save())
                .collect(),
        })
    })();
    match state.and_then(|s| snapshot::write(file, key, mem, &s).map_err(|e| e.to_string())) {
        Ok(()) => tracing::info!(
            "snapshot taken at guest init's snapshot point in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => tracing::warn!("no snapshot taken: {e}"),
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// The console's output, a line at a time. The UART hands over one byte per
/// transmit-register write and flushes after each (vm-superio), which on stdout was a
/// write(2) per byte of console output (the probe's 299 bytes: 299 of them). Here its
/// flush writes only complete lines (or a full buffer); a partial line (a prompt, an
/// echoed key) goes out [`CONTROL_PERIOD`] after its first byte ([`console_tick`]; the
/// first held byte wakes a control thread that sleeps longer), at the end of the run, or
/// when the writer is dropped.
struct HeldLines<W: Write> {
    out: W,
    held: Vec<u8>,
    /// When the first byte still held arrived.
    since: Option<Instant>,
    /// Bytes transmitted so far: the control thread's sign that the guest is printing.
    transmitted: u64,
    /// Written when a partial line starts being held, at most once per
    /// [`CONTROL_PERIOD`] (while the guest prints, the control thread looks that often
    /// anyway).
    wake: Option<Arc<EventFd>>,
    /// When `wake` was last written.
    woke: Option<Instant>,
}

/// The console's writer: hostd's stdout.
type StdoutWriter = HeldLines<std::io::Stdout>;

impl<W: Write> HeldLines<W> {
    /// Written out at this size even without a newline.
    const MAX: usize = 4096;

    fn new(out: W) -> Self {
        HeldLines {
            out,
            held: Vec::new(),
            since: None,
            transmitted: 0,
            wake: None,
            woke: None,
        }
    }

    /// Writes out everything held back.
    fn write_out(&mut self) -> std::io::Result<()> {
        self.since = None;
        if self.held.is_empty() {
            return Ok(());
        }
        let r = self
            .out
            .write_all(&self.held)
            .and_then(|()| self.out.flush());
        // Output that could not be written is not kept: a closed stdout stays closed.
        self.held.clear();
        r
    }

    /// Writes out a partial line held for `hold` or longer; else how much longer the one
    /// held now will wait (`None`: nothing held).
    fn write_out_after(&mut self, hold: Duration) -> (std::io::Result<()>, Option<Duration>) {
        match self.since.map(|t| t.elapsed()) {
            Some(held_for) if held_for < hold => (Ok(()), Some(hold - held_for)),
            _ => (self.write_out(), None),
        }
    }
}

impl<W: Write> Write for HeldLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.held.extend_from_slice(buf);
        self.transmitted += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.held.last() == Some(&b'\n') || self.held.len() >= Self::MAX {
            self.write_out()
        } else {
            if self.since.is_none() && !self.held.is_empty() {
                let now = Instant::now();
                self.since = Some(now);
                let due = self.woke.is_none_or(|t| now - t >= CONTROL_PERIOD);
                if let Some(w) = self.wake.as_ref().filter(|_| due) {
                    let _ = w.write(1);
                    self.woke = Some(now);
                }
            }
            Ok(())
        }
    }
}

impl<W: Write> Drop for HeldLines<W> {
    fn drop(&mut self) {
        let _ = self.write_out();
    }
}

/// Writes out the console's partial line, if any.
fn flush_console(console: &Mutex<Console<StdoutWriter>>) {
    if let Err(e) = console
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .output_mut()
        .write_out()
    {
        tracing::debug!("console output: {e}");
    }
}

/// The control loop's look at the console: writes out a partial line held for
/// [`CONTROL_PERIOD`]; returns how long the one still held may wait, and how many bytes
/// the guest has transmitted so far.
fn console_tick(console: &Mutex<Console<StdoutWriter>>) -> (Option<Duration>, u64) {
    let mut c = console.lock().unwrap_or_else(|p| p.into_inner());
    let out = c.output_mut();
    let (r, wait) = out.write_out_after(CONTROL_PERIOD);
    if let Err(e) = r {
        tracing::debug!("console output: {e}");
    }
    (wait, out.transmitted)
}

/// What [`create_vm`] makes and does: the VM, perhaps its memory slot and chips, and its
/// share of [`SetupClaims`].
struct Created {
    vm: VmFd,
    /// Whether this thread registered guest memory and made the irqchip and the PIT
    /// ([`vm_chips`]).
    chips: bool,
    /// What this thread did of the shared set-up work ([`SetupClaims`]).
    claimed: Claimed,
}

struct Filters {
    control: Arc<BpfProgram>,
    vcpu: Arc<BpfProgram>,
    /// The interrupt forwarders': read and write eventfds, futexes.
    forwarder: Arc<BpfProgram>,
}

/// Creates the VM on a thread of its own beside the rest (`run_vmm`); takes its share
/// of the set-up work either thread can do ([`SetupClaims`]: the main thread is still
/// loading the kernel, most often); then registers the guest memory the main thread
/// sends (`memory`: None when it may still be mapped anew, for a snapshot's restore)
/// and makes the irqchip and the PIT ([`vm_chips`]).
fn create_vm(
    kvm: &Kvm,
    claims: &SetupClaims,
    memory: std::sync::mpsc::Receiver<Option<vm_memory::GuestMemoryMmap>>,
) -> Result<Created, KvmError> {
    let vm: VmFd = setup("KVM_CREATE_VM", kvm.create_vm())?;
    let claimed = claims.work(kvm)?;
    // A closed channel: the main thread gave up; the join reports why.
    let chips = match memory.recv() {
        Ok(Some(mem)) => {
            vm_chips(&vm, &mem)?;
            true
        }
        _ => false,
    };
    Ok(Created { vm, chips, claimed })
}

/// Guest memory's slot, then the TSS and identity map addresses, the irqchip and the
/// PIT. The slot first: registered after the irqchip and the PIT, the memory slot's
/// change waited 5 ms on this host.
fn vm_chips(vm: &VmFd, mem: &vm_memory::GuestMemoryMmap) -> Result<(), KvmError> {
    setup("guest memory", memory::register(vm, mem))?;
    if let Err(e) = vm.set_tss_address(layout::KVM_TSS_ADDR as usize) {
        tracing::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    if let Err(e) = vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR) {
        tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
    }
    setup("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
    setup(
        "KVM_CREATE_PIT2",
        vm.create_pit2(kvm_pit_config {
            flags: 0,
            ..Default::default()
        }),
    )
}

impl Filters {
    /// The VM process's three seccomp filters.
    fn compile() -> Result<Filters, KvmError> {
        Ok(Filters {
            control: Arc::new(control_filter()?),
            vcpu: Arc::new(vcpu::vcpu_filter()?),
            forwarder: Arc::new(jail::filter(jail::COMMON_SYSCALLS, &[])?),
        })
    }

    /// The three programs as bytes: per program its length in instructions (u32), then
    /// each instruction (code u16, jt, jf, k u32; little-endian).
    fn encode(&self) -> Vec<u8> {
        let mut out = FILTERS_MAGIC.to_vec();
        for prog in [&self.control, &self.vcpu, &self.forwarder] {
            out.extend_from_slice(&(prog.len() as u32).to_le_bytes());
            for i in prog.iter() {
                out.extend_from_slice(&i.code.to_le_bytes());
                out.extend_from_slice(&[i.jt, i.jf]);
                out.extend_from_slice(&i.k.to_le_bytes());
            }
        }
        out
    }

    /// What [`Filters::encode`] wrote, if `bytes` is exactly that.
    fn decode(bytes: &[u8]) -> Option<Filters> {
        let mut rest = bytes.strip_prefix(FILTERS_MAGIC)?;
        let mut prog = || -> Option<Arc<BpfProgram>> {
            let (n, tail) = rest.split_first_chunk::<4>()?;
            let n = u32::from_le_bytes(*n) as usize;
            if n == 0 || n > BPF_MAXINSNS || tail.len() < n * 8 {
                return None;
            }
            let (body, tail) = tail.split_at(n * 8);
            rest = tail;
            Some(Arc::new(
                body.chunks_exact(8)
                    .map(|c| seccompiler::sock_filter {
                        code: u16::from_le_bytes([c[0], c[1]]),
                        jt: c[2],
                        jf: c[3],
                        k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    })
                    .collect(),
            ))
        };
        let f = Filters {
            control: prog()?,
            vcpu: prog()?,
            forwarder: prog()?,
        };
        rest.is_empty().then_some(f)
    }
}

const FILTERS_MAGIC: &[u8; 8] = b"HOSTDSF1";
/// The kernel's limit on a classic BPF program's length.
const BPF_MAXINSNS: usize = 4096;

/// Run by `hostd run` once the VM's process is started (`supervisor::run`'s `prepare`):
/// the VM process's seccomp filters, compiled on a CPU the VM's set-up does not use
/// meanwhile (~5-10 ms of CPU in the nested test host), sent as bytes. Empty when they
/// do not compile: the VM's process then compiles them itself and reports the error.
fn prepared_filters() -> Vec<u8> {
    Filters::compile().map(|f| f.encode()).unwrap_or_default()
}

/// Set-up work either of the VM process's two set-up threads can do, taken one piece
/// at a time by whichever is free: the VM-creating thread once KVM_CREATE_VM returns
/// (KVM waits there for its worker thread to start and join this process's cgroups,
/// 17-30 ms in the nested test host), or the main thread once the kernel is loaded.
/// Which of the two is longer varies from boot to boot there; the other would only
/// wait. The pieces: what KVM supports in CPUID (`cpuid_cache`, through the host's
/// cache directory opened before the main thread moved into the VM's mount namespace),
/// then the three seccomp filters (with the sandbox, when `hostd run` does not send
/// them).
struct SetupClaims {
    /// Whether the filters are compiled here (with the sandbox, when `hostd run` does
    /// not compile them: [`prepared_filters`]).
    filters: bool,
    /// The host's CPUID cache directory (`cpuid_cache::open_dir`), opened by the main
    /// thread as soon as the VM-creating thread runs, while it is still in the host's
    /// mount namespace.
    cpuid_dir: std::sync::OnceLock<Option<std::fs::File>>,
    /// The next piece to take.
    next: std::sync::atomic::AtomicU8,
}

/// The pieces one thread did.
#[derive(Default)]
struct Claimed {
    cpuid: Option<kvm_bindings::CpuId>,
    filters: Option<Filters>,
}

impl SetupClaims {
    /// Takes and does the pieces no thread has taken yet, in order, until none is left.
    fn work(&self, kvm: &Kvm) -> Result<Claimed, KvmError> {
        let mut out = Claimed::default();
        loop {
            match self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => {
                    out.cpuid = Some(
                        cpuid_cache::supported(
                            kvm,
                            self.cpuid_dir.get_or_init(cpuid_cache::open_dir).as_ref(),
                        )
                        .map_err(KvmError::Setup)?,
                    );
                }
                1 if self.filters => out.filters = Some(Filters::compile()?),
                1 => {}
                _ => return Ok(out),
            }
        }
    }
}

/// Boots `cfg` and runs it to the end. With the sandbox (the default), the VMM runs in
/// a process of its own: PID 1 of a new PID namespace, in a per-VM cgroup, jailed
/// (unprivileged uid, empty root, Landlock, rlimits, seccomp per thread) once its
/// devices are connected; see [`jail::supervisor`].
pub fn run(cfg: KvmConfig) -> Result<Outcome, KvmError> {
    // Counted from now on: a Ctrl-C while the VM is set up stops it as soon as it runs.
    crate::signals::install();
    // A snapshot to restore and a file for a new one are opened here, before the VM's
    // process is jailed; a new one is moved into place once the VM ended.
    let mut prepared = cfg.snapshot.as_ref().and_then(|c| {
        snapshot::Prepared::new(c, u64::from(cfg.memory_mib) << 20)
            .map_err(|e| tracing::warn!("snapshot cache: {}; running without it", causes(&e)))
            .ok()
    });
    let snap = prepared.as_mut().map(|p| VmSnapshot {
        saved: p.saved.take(),
        out: p.tmp.as_ref().and_then(|(f, _)| f.try_clone().ok()),
        key: p.key,
    });
    // A snapshot whose state KVM refuses (taken on another host kernel or CPU, say)
    // fails before the guest runs: then this run boots instead, as for a damaged file.
    let retry = match &snap {
        Some(s) if s.saved.is_some() => cfg.try_clone().ok(),
        _ => None,
    };
    let r = if !cfg.sandbox {
        run_vmm(cfg, snap)
    } else {
        let limits = jail::cgroup::Limits::for_vm(cfg.memory_mib, u32::from(cfg.vcpus));
        jail::supervisor::run(limits, Some(prepared_filters), || {
            run_vmm(cfg, snap).map_err(|e| causes(&e))
        })
        .map_err(KvmError::Guest)
    };
    let path = prepared.as_ref().map(|p| p.path.clone());
    if let Some(p) = prepared {
        p.finish();
    }
    if let (Err(e), Some(cfg), Some(path)) = (&r, retry, path) {
        if e.to_string().contains(RESTORE_FAILED) && crate::signals::count() == 0 {
            tracing::warn!(
                "snapshot {}: {e}; booting instead (a new snapshot replaces it)",
                path.display()
            );
            let _ = std::fs::remove_file(&path);
            // The first attempt's VM process said what a PVM host means; the next one
            // (forked from this process, or this process itself) need not again.
            PVM_WARNED.store(true, Ordering::SeqCst);
            return run(cfg);
        }
    }
    r
}

/// What the errors of a restore that KVM refused begin with (they reach `run` as text
/// from the jailed VM process).
const RESTORE_FAILED: &str = "snapshot: ";

/// An error with its causes, `a: b: c`.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

impl KvmConfig {
    /// A second configuration over duplicates of the payloads' descriptors.
    fn try_clone(&self) -> std::io::Result<KvmConfig> {
        Ok(KvmConfig {
            kernel: self.kernel.try_clone()?,
            initrd: self.initrd.as_ref().map(|i| i.try_clone()).transpose()?,
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            template: self.template,
            devices: self.devices.clone(),
            timeout: self.timeout,
            sandbox: self.sandbox,
            snapshot: self.snapshot.clone(),
        })
    }
}

/// The snapshot side of one run: what to restore, where to write a new one.
struct VmSnapshot {
    saved: Option<snapshot::Saved>,
    out: Option<std::fs::File>,
    key: [u8; 32],
}

/// Whether this run has printed what a nested PVM host means (once per `hostd run`, also
/// when a refused snapshot makes it boot in a second VM process).
static PVM_WARNED: AtomicBool = AtomicBool::new(false);

fn run_vmm(cfg: KvmConfig, snap: Option<VmSnapshot>) -> Result<Outcome, KvmError> {
    // /dev/kvm opened once, first (before the jail gives this process a mount namespace
    // of its own, so it is named as on the host).
    let Ok(kvm) = Kvm::new() else {
        return Err(KvmError::Setup(
            "/dev/kvm is missing or not accessible (use --vmm qemu)".into(),
        ));
    };
    crate::phase("/dev/kvm");
    let kind = if crate::host::pvm_loaded() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    };
    let template = cfg.template.unwrap_or(if kind == KvmKind::Pvm {
        CpuTemplate::Pvm
    } else {
        CpuTemplate::Host
    });
    if kind == KvmKind::Pvm {
        assist::enable();
    }
    if kind == KvmKind::Pvm && !PVM_WARNED.swap(true, Ordering::SeqCst) {
        tracing::warn!(
            "/dev/kvm is a nested PVM hypervisor: guest kernel code runs through KVM's instruction \
             emulator, so Linux boots slowly and each guest system call is slow (measured on one \
             such host: 13 s, 0.35 ms; user code runs natively); `--vmm qemu` (TCG) is faster for \
             most services here. CPU template \
             `{}`, PVM kernel arguments and instruction assist on (docs/pvm.md)",
            template.name()
        );
    }
    if cfg.sandbox {
        // glibc gives a new thread a malloc arena of its own, and the first time such an
        // arena shrinks it opens /proc/sys/vm/overcommit_memory, which no thread's
        // filter allows (seen: an interrupt forwarder, started once the guest runs,
        // died with SIGSYS on openat). One arena for every thread never does; this
        // process's threads allocate little once the guest runs. The backends do the
        // same (hostd_devices::vhost_user).
        // SAFETY: mallopt only sets an allocator parameter.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1)
        };
        // No core dumps (guest memory is also MADV_DONTDUMP) and no ptrace by the same uid.
        jail::not_dumpable()?;
    }
    // The VM itself is made on a thread of its own (`create_vm`), started first: KVM
    // waits in KVM_CREATE_VM for kthreadd to create the VM's worker thread and for that
    // worker to join this process's cgroups, 17-23 ms idle in the nested test host
    // (docs/startup.md). This thread makes the backends' network namespace, starts them,
    // maps guest memory and loads the kernel meanwhile; what either can do (CPUID, the
    // seccomp filters) is done by whichever is free first ([`SetupClaims`]); then it
    // connects the devices and takes the file-system half of its jail, while the other
    // may still wait in KVM_CREATE_VM. The helper has ended before the rest of the jail
    // (the uid change needs this process single-threaded).
    let mem_size = u64::from(cfg.memory_mib) << 20;
    let claims = SetupClaims {
        filters: cfg.sandbox && !jail::supervisor::supervised(),
        cpuid_dir: Default::default(),
        next: Default::default(),
    };
    let (created, mine, connected, profile, mut backends, mem, restore, snap_out, loaded) =
        std::thread::scope(|scope| {
            let (send_memory, memory) = std::sync::mpsc::channel();
            let create = hostd_devices::thread::named("kvm-create-vm")
                .spawn_scoped(scope, || create_vm(&kvm, &claims, memory))
                .map_err(|e| KvmError::Setup(format!("KVM_CREATE_VM thread: {e}")))?;
            // The host's /run/hostd, opened before this thread's mount namespace hides it.
            claims.cpuid_dir.get_or_init(cpuid_cache::open_dir);
            // Device backends next: each execs and jails itself (milliseconds) while this
            // process sets the VM up and loads the kernel; the devices connect after that.
            let exe = std::env::current_exe()
                .map_err(|e| KvmError::Setup(format!("own executable: {e}")))?;
            // One empty network namespace for this process and its backends (but net's);
            // entered by this thread only, whose later threads inherit it.
            let host_net = if cfg.sandbox {
                jail::empty_netns_for_backends()?
            } else {
                None
            };
            crate::phase("netns");
            let mut backends = RunningBackends::spawn(
                &exe,
                &cfg.devices,
                cfg.sandbox,
                cfg.memory_mib,
                host_net.as_ref(),
                Sockets::Connected,
            )
            .map_err(|e| KvmError::Setup(e.to_string()))?;
            drop(host_net);
            crate::phase("backends spawned");
            let mut mem = setup("guest memory", memory::create(mem_size))?;
            // To the VM-creating thread, which registers it; a snapshot's restore may map
            // it anew, and registers it itself after the join.
            let _ = send_memory.send(snap.is_none().then(|| mem.clone()));
            let (restore, snap_out) = match snap {
                Some(s) => {
                    let t = Instant::now();
                    let restore = match s.saved.map(|saved| {
                        snapshot::load_memory(&saved, &mem)
                            .map_err(|e| (saved.path.clone(), e))
                            .map(|()| saved.state)
                    }) {
                        Some(Ok(state)) => {
                            tracing::info!(
                                "snapshot memory read in {:.1} ms",
                                t.elapsed().as_secs_f64() * 1e3
                            );
                            Some(state)
                        }
                        Some(Err((path, e))) => {
                            snapshot::warn_unusable(&path, &e);
                            mem = setup("guest memory", memory::create(mem_size))?;
                            None
                        }
                        None => None,
                    };
                    // A restored VM takes no new snapshot.
                    let out = if restore.is_none() {
                        s.out.map(|f| (f, s.key))
                    } else {
                        None
                    };
                    (restore, out)
                }
                None => (None, None),
            };
            // The kernel and initrd go into guest memory now, while the device backends exec
            // and jail themselves (the connections below wait for them); the command line
            // and the boot tables follow once the devices are known. A restored VM's memory
            // holds its kernel already.
            let loaded = match &restore {
                Some(_) => None,
                None => Some(boot::load_payloads(
                    &mem,
                    mem_size,
                    &cfg.kernel,
                    cfg.initrd.as_ref(),
                )?),
            };
            crate::phase("memory+kernel");
            let mine = claims.work(&kvm)?;
            // The devices' connections need neither the VM nor its memory slot.
            // Each was made as its socket was (`spawn`), before the backend exists; each
            // device's handshake runs later on a thread of its own (jailed with this
            // process, under the control thread's filter) while the guest boots, until
            // its driver first needs the backend's answers.
            backends
                .ensure_alive()
                .map_err(|e| KvmError::Setup(e.to_string()))?;
            let mut connected = Vec::new();
            for (name, stream, device_type, queues) in backends.connections(&cfg.devices) {
                let device = VhostUserDevice::prepare(stream, &name, device_type, queues, &mem)
                    .map_err(|e| KvmError::Setup(backends.explain(e.to_string())))?;
                connected.push((device, queues));
            }
            crate::phase("devices connected");
            // Read before the jail hides the file.
            let profile = profile::Profile::from_env();
            if cfg.sandbox {
                // Every thread this process will have: this one, the vCPUs, the PIT's,
                // one interrupt forwarder per device queue, a few for the C library and
                // headroom, and one per device for its handshake.
                let queues: usize = connected.iter().map(|(_, q)| q).sum();
                let threads = 9 + u64::from(cfg.vcpus) + queues as u64 + connected.len() as u64;
                jail::enter_vmm_files(threads, mem_size)?;
                crate::phase("jailed (files)");
            }
            let created = create
                .join()
                .map_err(|_| KvmError::Setup("KVM_CREATE_VM: its thread panicked".into()))??;
            crate::phase("KVM_CREATE_VM");
            Ok::<_, KvmError>((
                created, mine, connected, profile, backends, mem, restore, snap_out, loaded,
            ))
        })?;
    // The host's /run/hostd goes before the rest of the jail: no jailed process holds a
    // directory of the host's.
    drop(claims);
    let Created { vm, chips, claimed } = created;
    let cpuid = mine.cpuid.or(claimed.cpuid).ok_or_else(|| {
        KvmError::Setup("KVM_GET_SUPPORTED_CPUID: asked by neither set-up thread".into())
    })?;
    let filters = mine.filters.or(claimed.filters);
    if !chips {
        vm_chips(&vm, &mem)?;
    }
    // The payloads' files are closed now; nothing of them stays in this process.
    drop(cfg.kernel);
    drop(cfg.initrd);

    // The control thread sleeps on this until something needs it: a stop, a signal, a
    // device's pending activation, a boot marker, a snapshot step, a partial console line.
    let wake = Arc::new(setup(
        "eventfd",
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
    )?);
    let console_writer = || {
        let mut w = StdoutWriter::new(std::io::stdout());
        w.wake = Some(wake.clone());
        w
    };

    // Devices.
    let reports = Reports::default();
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let com1_irq = Arc::new(setup(
        "eventfd",
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
    )?);
    setup("irqfd", vm.register_irqfd(&com1_irq, COM1_IRQ))?;
    let console = Arc::new(Mutex::new(match &restore {
        Some(state) => Console::restored(com1_irq, console_writer(), &state.serial)
            .ok_or_else(|| KvmError::Setup(format!("{RESTORE_FAILED}unusable UART state")))?,
        None => Console::new(com1_irq, console_writer()),
    }));
    setup(
        "serial",
        pio.insert(COM1_PORT, COM1_LEN, console.clone() as SharedDevice),
    )?;
    let marker_wake = wake.clone();
    let marker: SharedDevice = Arc::new(Mutex::new(BootMarker::notifying(
        reports.clone(),
        Box::new(move || {
            let _ = marker_wake.write(1);
        }),
    )));
    setup(
        "boot marker",
        pio.insert(u64::from(abi::BOOT_MARKER_PORT), 1, marker),
    )?;
    // The exit port's callback needs `shared`, which needs the bus: a slot filled below.
    let exit_hook: Arc<Mutex<Option<Arc<Shared>>>> = Arc::default();
    let hook = exit_hook.clone();
    let reports_for_exit = reports.clone();
    let exit: SharedDevice = Arc::new(Mutex::new(ExitPort::new(
        reports.clone(),
        Box::new(move || {
            let code = reports_for_exit
                .lock()
                .map(|r| r.exit_code)
                .unwrap_or(None)
                .unwrap_or(0);
            if let Some(shared) = hook.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                shared.stop_with(StopReason::ExitCode(code));
            }
        }),
    )));
    setup("exit port", pio.insert(u64::from(abi::EXIT_PORT), 1, exit))?;
    let pause = snapshot::Pause::new(
        usize::from(cfg.vcpus),
        snap_out.is_some(),
        restore.is_some(),
    );
    pause.wake_with(wake.clone());
    setup(
        "snapshot port",
        pio.insert(
            u64::from(abi::SNAPSHOT_PORT),
            snapshot::PORTS_LEN,
            Arc::new(Mutex::new(snapshot::SnapshotPort::new(pause.clone()))),
        ),
    )?;
    let mut cmdline = cfg.cmdline.clone();
    // Keep the guest kernel off instructions a nested PVM host cannot run (docs/pvm.md).
    // These are Linux's parameters: another kernel (the probe) gets its command line as
    // given, as under any other monitor.
    if template == CpuTemplate::Pvm && loaded.as_ref().is_none_or(|l| l.linux) {
        cmdline.push(' ');
        cmdline.push_str(&cpuid::pvm_kernel_args(cfg.vcpus));
    }
    let mut next_mmio = layout::VIRTIO_MMIO_START;
    let mut next_irq = layout::VIRTIO_IRQ_BASE;
    // Devices: each served by its own jailed backend process over vhost-user (spawned at
    // the start, connected before the join above); the VMM keeps the virtio-mmio
    // register file and forwards interrupts.
    let mut activations = Vec::new();
    let mut forwarders = Vec::new();
    let mut transports = Vec::new();
    let mut handshakes = Vec::new();
    for ((mut dev, activation, handshake), _) in connected {
        handshakes.push(handshake);
        dev.wake_on_pending(wake.clone());
        let irq = Arc::new(setup(
            "eventfd",
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
        )?);
        setup("irqfd", vm.register_irqfd(&irq, next_irq))?;
        let calls = dev.call_fds();
        let mut transport = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone());
        if let Some(state) = &restore {
            let saved = state.transports.get(transports.len()).ok_or_else(|| {
                KvmError::Setup(format!("{RESTORE_FAILED}fewer devices than this VM has"))
            })?;
            transport.restore(saved).map_err(|e| {
                KvmError::Setup(format!("{RESTORE_FAILED}device {}: {e}", transports.len()))
            })?;
        }
        let status = transport.interrupt_status();
        let transport = Arc::new(Mutex::new(transport));
        transports.push(transport.clone());
        let shared_dev: SharedDevice = transport;
        setup(
            "virtio-mmio",
            mmio.insert(next_mmio, layout::VIRTIO_MMIO_SIZE, shared_dev),
        )?;
        for call in calls {
            forwarders.push((
                call,
                status.clone(),
                irq.clone() as Arc<dyn hostd_devices::Interrupt>,
            ));
        }
        activations.push(activation);
        cmdline.push(' ');
        cmdline.push_str(&cmdline_arg(next_mmio, next_irq));
        next_mmio += layout::VIRTIO_MMIO_SIZE;
        next_irq += 1;
        if next_irq > layout::IRQ_MAX {
            return Err(KvmError::Setup(
                "too many devices for the I/O APIC's inputs".into(),
            ));
        }
    }

    crate::phase("devices");
    let cmdline = cmdline.trim().to_string();
    tracing::info!("kernel command line: {cmdline}");

    if let Some(state) = &restore {
        if state.transports.len() != transports.len() || state.vcpus.len() != usize::from(cfg.vcpus)
        {
            return Err(KvmError::Setup(format!(
                "{RESTORE_FAILED}its devices or vCPUs differ from this VM's"
            )));
        }
    }
    // Boot: the command line and tables beside the kernel loaded above.
    let entry = match &loaded {
        None => boot::Entry { rip: 0, rbx: 0 },
        Some(l) => boot::write_tables(&mem, mem_size, l, cmdline.trim(), cfg.vcpus)?,
    };
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = setup("KVM_CREATE_VCPU", vm.create_vcpu(u64::from(id)))?;
        vcpu::configure(&kvm, &cpuid, &fd, id, cfg.vcpus, template, entry)
            .map_err(KvmError::Setup)?;
        if let Some(state) = &restore {
            let refused =
                snapshot::restore_vcpu(&fd, &state.vcpus[usize::from(id)]).map_err(|e| {
                    KvmError::Setup(format!("{RESTORE_FAILED}vCPU {id}: {}", causes(&e)))
                })?;
            if !refused.is_empty() {
                let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
                tracing::debug!("snapshot: vCPU {id}: KVM refused MSRs {}", list.join(" "));
            }
        }
        vcpus.push(fd);
    }
    crate::phase("vCPUs");
    // Console output without an exit per byte while the guest polls the UART.
    let coalesced = vcpus.first().and_then(|fd| coalesced::Ring::map(&kvm, fd));
    if coalesced.is_some() {
        let zone = setup("coalesced I/O", coalesced::PortZone::new(&vm, COM1_PORT))?;
        console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_transmit_mode(Box::new(move |on| zone.set(on)));
    }
    if let Some(state) = &restore {
        snapshot::restore_vm(&vm, &state.vm)
            .map_err(|e| KvmError::Setup(format!("{RESTORE_FAILED}{}", causes(&e))))?;
        // Guest init started long ago, in the VM the snapshot was taken of.
        reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .markers
            .push((abi::marker::INIT_STARTED, Instant::now()));
        tracing::info!("restored from a snapshot");
    }
    if snap_out.is_some() {
        if let Some(fd) = vcpus.first() {
            pause.set_msrs(snapshot::saveable_msrs(&kvm, fd));
        }
    }
    let shared = Arc::new(Shared {
        pio,
        mmio,
        stop: Default::default(),
        reason: Mutex::new(None),
        first_run: Mutex::new(None),
        mem,
        start: Barrier::new(usize::from(cfg.vcpus) + 1),
        profile,
        wake,
        snapshot: (snap_out.is_some()).then(|| pause.clone()),
        coalesced,
    });
    *exit_hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(shared.clone());

    // SAFETY: sigaction is plain data; zeroed is a valid "no flags, empty mask" value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_kick as *const () as usize;
    // SAFETY: installs a no-op handler without SA_RESTART, so KVM_RUN returns EINTR.
    unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
    // The VM's cgroup limits, which `hostd run` writes meanwhile, before the guest runs;
    // with them the filters it compiled meanwhile (`prepared_filters`), or else here.
    let prepared = jail::supervisor::limits_in_place();
    let filters = match filters {
        Some(f) => Some(f),
        None if cfg.sandbox => Some(match Filters::decode(&prepared) {
            Some(f) => f,
            None => {
                tracing::debug!("no filters from hostd run; compiling them here");
                Filters::compile()?
            }
        }),
        None => None,
    };
    let control_prog = filters.as_ref().map(|f| f.control.clone());
    let vcpu_prog = filters.as_ref().map(|f| f.vcpu.clone());
    crate::phase("filters");
    if cfg.sandbox {
        // The rest of the jail (its first step came before the join), now that this
        // thread is the process's only one.
        jail::enter_vmm_identity()?;
        crate::phase("jailed");
    }
    // The vCPUs first, then the guest runs; every other thread starts while it boots.
    // A thread takes a few ms to start in the nested test host (its first code, its
    // filter), and the guest needs only the vCPUs: the handshakes wait for the backends
    // anyway, the forwarders for the devices' activation (a backend's signal waits in
    // its eventfd until a forwarder reads it), the PIT's for nothing. No guest code runs
    // before every thread of the VMM has its filter: the vCPUs install theirs before the
    // start barrier, this thread its own (the control filter) before it lets them go, and
    // the threads it starts after that inherit it (a forwarder adds its own on top).
    let mut threads = Vec::new();
    for (id, fd) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        let prog = vcpu_prog.clone();
        let handle = hostd_devices::thread::named(&format!("vcpu{id}"))
            .spawn(move || vcpu::run(fd, id as u8, shared, prog))
            .map_err(|e| KvmError::Setup(format!("vCPU thread: {e}")))?;
        threads.push(handle);
    }
    // Duplicated while fcntl is still allowed: the PIT thread holds the VM's file open.
    let pit_vm = vm_fd_for_pit(&vm)?;
    if let Some(Err(e)) = control_prog.as_deref().map(jail::install) {
        shared.stop_with(StopReason::Error(format!("control thread: {e}")));
    }
    crate::phase("vCPU threads");
    shared.start.wait();
    // The guest runs: the backends, started early and waiting since, exec now
    // (`RunningBackends::spawn`).
    backends.release();
    let started = start_device_threads(handshakes, forwarders, filters.map(|f| f.forwarder))
        .and_then(|()| pit_reinjection_off(pit_vm));
    if let Err(e) = started {
        shared.stop_with(StopReason::Error(e.to_string()));
    }
    crate::phase("threads");

    // Control loop. Between passes it sleeps until an event (`wake`, a signal, a
    // backend's end) or the nearest deadline, computed at the end of each pass.
    let _signal_wakes = crate::signals::WakeOnSignal::new(&*shared.wake);
    let exit_fds = backends.exit_fds();
    let mut pollfds: Vec<libc::pollfd> = std::iter::once(shared.wake.as_raw_fd())
        .chain(exit_fds.iter().flatten().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut transmitted = 0;
    let mut quiet_looks = 0;
    let start = Instant::now();
    let mut shutdown_sent: Option<Instant> = None;
    let mut seen_signals = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        for a in &activations {
            if let Some(e) = a.failed() {
                shared.stop_with(StopReason::Error(backends.explain(e.to_string())));
            } else if let Err(e) = a.complete() {
                shared.stop_with(StopReason::Error(e.to_string()));
            }
        }
        if let Some(dead) = backends.check() {
            shared.stop_with(StopReason::Error(format!("{dead}; the VM was stopped")));
        }
        if crate::ready::awaited()
            && reports
                .lock()
                .map(|r| {
                    r.markers
                        .iter()
                        .any(|m| m.0 == abi::marker::SERVICES_STARTED)
                })
                .unwrap_or(false)
        {
            crate::ready::services_started();
        }
        let signals = crate::signals::count();
        if signals > seen_signals {
            seen_signals = signals;
            let init_started = reports
                .lock()
                .map(|r| r.markers.iter().any(|m| m.0 == abi::marker::INIT_STARTED))
                .unwrap_or(false);
            if !init_started {
                // Nobody in the guest could act on a shutdown request yet: stop now.
                tracing::info!("interrupted before guest init started; stopping the VM");
                shared.stop_with(StopReason::Stopped);
            } else if shutdown_sent.is_none() {
                tracing::info!("asking the guest to shut down (again to force)");
                let line = format!("{}\n", abi::SHUTDOWN_REQUEST);
                console
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .input(line.as_bytes());
                shutdown_sent = Some(Instant::now());
            } else {
                shared.stop_with(StopReason::Stopped);
            }
        }
        if shutdown_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) {
            tracing::warn!("the guest did not power off within 30 s; stopping it");
            shared.stop_with(StopReason::Stopped);
        }
        if cfg.timeout.is_some_and(|t| start.elapsed() > t) {
            shared.stop_with(StopReason::Error(format!(
                "the guest did not finish within {:?} (--timeout)",
                cfg.timeout.unwrap_or_default()
            )));
        }
        if let Some((file, key)) = snap_out.as_ref().filter(|_| pause.requested()) {
            match pause.parked() {
                None => kick(&threads),
                Some(states) => {
                    take_snapshot(states, &vm, &console, &transports, &shared.mem, file, key);
                    pause.release();
                }
            }
        }
        if shared.profile.is_some() {
            kick(&threads);
        }
        // A guest that printed and went idle: its last bytes are out within a period.
        shared.drain_coalesced();
        let (held, sent) = console_tick(&console);
        if sent != transmitted {
            transmitted = sent;
            quiet_looks = 0;
        } else {
            quiet_looks += 1;
        }
        // How long to sleep: until the first deadline; no longer than a quiet period
        // while polled console output may sit in the coalesced ring; a short period
        // while something is under way that no event reports the end of.
        let now = Instant::now();
        let periodic = exit_fds.is_none() // backends' ends seen only by looking
            || shared.profile.is_some()
            || pause.requested();
        let deadlines = [
            held,
            shared.coalesced.as_ref().map(|_| quiet_period(quiet_looks)),
            periodic.then_some(CONTROL_PERIOD),
            shutdown_sent.map(|t| (t + Duration::from_secs(30)).saturating_duration_since(now)),
            cfg.timeout
                .map(|t| (start + t).saturating_duration_since(now)),
        ];
        let timeout = deadlines.into_iter().flatten().min();
        wait_for_wake(&shared.wake, &mut pollfds, timeout);
    }
    let exited = Instant::now();
    // A device whose backend failed its handshake makes the run an error, even when the
    // guest got to its end first (its driver was offered no features).
    let device_failure = activations.iter().find_map(|a| a.failed());
    // A vCPU may be waiting for a device's handshake (a backend that never answered).
    for a in &activations {
        a.abandon();
    }
    // Kick every vCPU out of KVM_RUN until it notices `stop`; give up after 1 s.
    let deadline = Instant::now() + Duration::from_secs(1);
    // A kicked vCPU thread is gone within about 0.2 ms here: look again soon (a 2 ms
    // sleep was most of the time from the guest's exit request to our exit).
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        kick(&threads);
        std::thread::sleep(Duration::from_micros(100));
    }
    if threads.iter().any(|t| !t.is_finished()) {
        tracing::warn!("a vCPU thread did not stop within 1 s");
    } else {
        for t in threads {
            let _ = t.join();
        }
    }
    shared.drain_coalesced();
    flush_console(&console);

    if let Some(p) = &shared.profile {
        p.report(30);
    }
    if assist::enabled() {
        let counts: Vec<String> = assist::counts()
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        tracing::info!(
            "instructions completed by the PVM assist: {}",
            counts.join(", ")
        );
    }
    let r = reports.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |t: Instant| {
        t.saturating_duration_since(crate::start_instant())
            .as_secs_f64()
            * 1000.0
    };
    let timings = Timings {
        vm_started_ms: shared.first_run.lock().ok().and_then(|t| *t).map(ms),
        init_started_ms: r
            .markers
            .iter()
            .find(|m| m.0 == abi::marker::INIT_STARTED)
            .map(|m| ms(m.1)),
        first_service_ms: r
            .markers
            .iter()
            .find(|m| m.0 == abi::marker::SERVICES_STARTED)
            .map(|m| ms(m.1)),
        exited_ms: Some(ms(exited)),
        phases: crate::phases(),
    };
    if let Some(e) = device_failure {
        return Err(KvmError::Guest(backends.explain(e.to_string())));
    }
    let reason = shared
        .reason
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match reason {
        Some(StopReason::ExitCode(code)) => Ok(Outcome {
            exit_code: code,
            timings,
        }),
        Some(StopReason::Shutdown) => match r.exit_code {
            Some(code) => Ok(Outcome {
                exit_code: code,
                timings,
            }),
            None => Err(KvmError::Guest(
                "the guest reset (triple fault or reboot) without reporting an exit code".into(),
            )),
        },
        Some(StopReason::Stopped) => Ok(Outcome {
            exit_code: 130,
            timings,
        }),
        Some(StopReason::Error(e)) => Err(KvmError::Guest(e)),
        None => Err(KvmError::Guest(
            "the VM stopped for no recorded reason".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_sent_by_hostd_run_come_back_whole_or_not_at_all() {
        let f = Filters::compile().expect("the filters compile");
        let bytes = f.encode();
        // hostd run writes them into a pipe before the VM's process reads it: a pipe
        // holds 64 KiB, so that write never waits for the reader.
        assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());
        let back = Filters::decode(&bytes).expect("decodes");
        for (a, b) in [
            (&f.control, &back.control),
            (&f.vcpu, &back.vcpu),
            (&f.forwarder, &back.forwarder),
        ] {
            assert_eq!(a.len(), b.len());
            assert!(a
                .iter()
                .zip(b.iter())
                .all(|(x, y)| (x.code, x.jt, x.jf, x.k) == (y.code, y.jt, y.jf, y.k)));
        }
        // Nothing sent (no supervisor, or its compile failed), cut short, or longer.
        assert!(Filters::decode(&[]).is_none());
        for len in [7, 8, 12, bytes.len() - 1] {
            assert!(Filters::decode(&bytes[..len]).is_none(), "cut to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Filters::decode(&longer).is_none());
        let mut other = bytes;
        other[0] ^= 1;
        assert!(Filters::decode(&other).is_none());
    }

    /// As the UART does it: each byte written, then flushed.
    fn put(w: &mut HeldLines<&mut Vec<u8>>, bytes: &[u8]) {
        for b in bytes {
            w.write_all(&[*b]).unwrap_or_else(|e| panic!("{e}"));
            w.flush().unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn console_output_goes_out_a_line_at_a_time() {
        let mut sink = Vec::new();
        {
            let mut w = HeldLines::new(&mut sink);
            put(&mut w, b"ab");
            assert!(w.out.is_empty(), "a partial line waits");
            put(&mut w, b"\r\n");
            assert_eq!(w.out.as_slice(), b"ab\r\n");
            put(&mut w, b"login: ");
            assert_eq!(w.out.as_slice(), b"ab\r\n");
            // The control loop's period.
            w.write_out().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(w.out.as_slice(), b"ab\r\nlogin: ");
            put(&mut w, &[b'x'; 4096]);
            assert_eq!(
                w.out.len(),
                11 + 4096,
                "a full buffer goes out without a newline"
            );
            put(&mut w, b"tail");
        }
        assert!(
            sink.ends_with(b"xtail"),
            "dropping the writer writes out the rest"
        );
    }

    #[test]
    fn a_partial_line_wakes_the_control_thread_once_and_waits_its_period() {
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap_or_else(|e| panic!("{e}")),
        );
        let mut sink = Vec::new();
        let mut w = HeldLines::new(&mut sink);
        w.wake = Some(wake.clone());
        put(&mut w, b"line\n");
        assert_eq!(
            wake.read().ok(),
            Some(1),
            "one wake-up for the line's first byte"
        );
        put(&mut w, b"login: ");
        assert!(
            wake.read().is_err(),
            "none for the next line within the period: the control thread looks anyway"
        );
        w.woke = None; // as if the period had passed
        let (r, wait) = w.write_out_after(Duration::from_secs(3600));
        assert!(r.is_ok());
        assert!(
            wait.is_some_and(|d| d > Duration::from_secs(3000)),
            "{wait:?}"
        );
        assert_eq!(w.out.as_slice(), b"line\n", "held until its period is over");
        let (r, wait) = w.write_out_after(Duration::ZERO);
        assert!(r.is_ok());
        assert_eq!(wait, None);
        assert_eq!(w.out.as_slice(), b"line\nlogin: ");
        assert_eq!(w.transmitted, 12);
        put(&mut w, b"x");
        assert_eq!(
            wake.read().ok(),
            Some(1),
            "a partial line after the period wakes it"
        );
    }

    #[test]
    fn the_quiet_period_grows_from_the_control_period_to_its_bound() {
        assert_eq!(quiet_period(0), CONTROL_PERIOD);
        assert_eq!(quiet_period(1), CONTROL_PERIOD * 2);
        assert_eq!(quiet_period(7), CONTROL_PERIOD * 128);
        assert_eq!(quiet_period(8), QUIET_PERIOD);
        assert_eq!(quiet_period(u32::MAX), QUIET_PERIOD);
    }
}
