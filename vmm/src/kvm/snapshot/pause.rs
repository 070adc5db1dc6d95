//! Pausing the vCPUs at guest init's snapshot point, and the ports guest init uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use hostd_devices::bus::BusDevice;
use hostd_images::abi::snapshot as abi_snap;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;

use super::{save_vcpu, VcpuState};

/// Pausing every vCPU at the snapshot point: the port write asks, each vCPU thread
/// parks (completing its pending I/O first) and leaves its state, the control thread
/// writes the snapshot and releases them.
#[derive(Debug)]
pub struct Pause {
    /// A snapshot is wanted at the snapshot point (this run has a cache and booted).
    take: bool,
    /// This VM was restored (the snapshot port answers so).
    restored: bool,
    requested: AtomicBool,
    inner: Mutex<PauseInner>,
    cond: Condvar,
    msrs: std::sync::OnceLock<Vec<u32>>,
    /// The control thread's eventfd: written when a pause is asked for and when a vCPU
    /// has parked, so that the control thread acts at once.
    wake: std::sync::OnceLock<Arc<EventFd>>,
}

#[derive(Debug, Default)]
struct PauseInner {
    states: Vec<Option<Result<VcpuState, String>>>,
    released: u64,
}

impl Pause {
    /// For `vcpus` vCPUs; `take` whether to snapshot at the snapshot point, `restored`
    /// whether this VM was restored.
    pub fn new(vcpus: usize, take: bool, restored: bool) -> Arc<Pause> {
        Arc::new(Pause {
            take,
            restored,
            requested: AtomicBool::new(false),
            inner: Mutex::new(PauseInner {
                states: vec![None; vcpus],
                released: 0,
            }),
            cond: Condvar::new(),
            msrs: std::sync::OnceLock::new(),
            wake: std::sync::OnceLock::new(),
        })
    }

    /// Wakes the control thread through `wake` on each step of a pause.
    pub fn wake_with(&self, wake: Arc<EventFd>) {
        let _ = self.wake.set(wake);
    }

    fn notify(&self) {
        if let Some(w) = self.wake.get() {
            let _ = w.write(1);
        }
    }

    /// The MSRs to save ([`saveable_msrs`]), once the vCPUs exist.
    pub fn set_msrs(&self, msrs: Vec<u32>) {
        let _ = self.msrs.set(msrs);
    }

    /// Whether the vCPUs are asked to park.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// On the vCPU thread, when [`Pause::requested`]: completes the pending I/O (one
    /// KVM_RUN with immediate_exit), saves the vCPU's state and waits for the release.
    pub fn park(&self, vcpu: &mut VcpuFd, id: usize) {
        vcpu.set_kvm_immediate_exit(1);
        let r = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing vCPU {id}'s I/O: {e}")),
            Ok(exit) => Err(format!("vCPU {id} exited while pausing: {exit:?}")),
        };
        vcpu.set_kvm_immediate_exit(0);
        let state = r.and_then(|()| {
            save_vcpu(vcpu, self.msrs.get().map_or(&[][..], Vec::as_slice))
                .map_err(|e| e.to_string())
        });
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let gen = inner.released;
        if let Some(slot) = inner.states.get_mut(id) {
            *slot = Some(state);
        }
        self.cond.notify_all();
        self.notify();
        while inner.released == gen {
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// On the control thread: every vCPU's state once all have parked.
    pub fn parked(&self) -> Option<Vec<Result<VcpuState, String>>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.states.iter().any(Option::is_none) {
            return None;
        }
        Some(inner.states.iter().flatten().cloned().collect())
    }

    /// Lets the parked vCPUs run on; the snapshot point is passed.
    pub fn release(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for s in &mut inner.states {
            *s = None;
        }
        inner.released += 1;
        self.requested.store(false, Ordering::SeqCst);
        self.cond.notify_all();
    }
}

/// Ports the snapshot device decodes.
pub const PORTS_LEN: u64 =
    (hostd_images::abi::RESUME_INFO_PORT - hostd_images::abi::SNAPSHOT_PORT) as u64 + 4;
const INFO_OFFSET: u64 =
    (hostd_images::abi::RESUME_INFO_PORT - hostd_images::abi::SNAPSHOT_PORT) as u64;

/// The snapshot and resume-information ports: [`PORTS_LEN`] ports from
/// [`hostd_images::abi::SNAPSHOT_PORT`], so that a 4-byte read of
/// [`hostd_images::abi::RESUME_INFO_PORT`] falls inside them.
#[derive(Debug)]
pub struct SnapshotPort {
    pause: Arc<Pause>,
    /// Asked once: the first snapshot point of a run is the one.
    offered: bool,
    info: Vec<u8>,
    cursor: usize,
}

impl SnapshotPort {
    /// Ports answering from `pause`.
    pub fn new(pause: Arc<Pause>) -> Self {
        SnapshotPort {
            pause,
            offered: false,
            info: Vec::new(),
            cursor: 0,
        }
    }

    fn resume_info() -> Vec<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut v = Vec::with_capacity(abi_snap::RESUME_INFO_LEN);
        v.extend_from_slice(&now.as_secs().to_le_bytes());
        v.extend_from_slice(&now.subsec_nanos().to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        let mut entropy = [0u8; abi_snap::RESUME_ENTROPY_LEN];
        if let Err(e) = getrandom(&mut entropy) {
            tracing::error!("no entropy for the restored guest: {e}");
        }
        v.extend_from_slice(&entropy);
        v
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into `buf` past `filled`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl BusDevice for SnapshotPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            0 => {
                if let Some(b) = data.first_mut() {
                    *b = if self.pause.restored {
                        abi_snap::RESTORED
                    } else {
                        abi_snap::COLD
                    };
                }
                if self.pause.restored {
                    self.info = Self::resume_info();
                    self.cursor = 0;
                }
            }
            INFO_OFFSET => {
                for b in data.iter_mut() {
                    if let Some(&v) = self.info.get(self.cursor) {
                        *b = v;
                        self.cursor += 1;
                    }
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&abi_snap::TAKE) && !self.offered {
            self.offered = true;
            if self.pause.take {
                self.pause.requested.store(true, Ordering::SeqCst);
                self.pause.notify();
            }
        }
    }
}

/// ioctl numbers the snapshot needs on vCPU threads (reading state) and on the control
/// thread (the VM's state), for their seccomp filters.
pub mod ioctls {
    use kvm_bindings::*;

    const fn ior(nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }
    const fn iowr(nr: u64, size: usize) -> u64 {
        (3 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }
    use std::mem::size_of;

    /// vCPU state reads.
    pub const VCPU: &[u64] = &[
        iowr(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
        ior(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ior(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        ior(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        ior(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        ior(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
    ];
    /// VM state reads.
    pub const VM: &[u64] = &[
        iowr(0x62, size_of::<kvm_irqchip>()),   // KVM_GET_IRQCHIP
        ior(0x9f, size_of::<kvm_pit_state2>()), // KVM_GET_PIT2
        ior(0x7c, size_of::<kvm_clock_data>()), // KVM_GET_CLOCK
    ];
}
