//! Device backends as separate, jailed processes (`hostd backend …`) speaking
//! vhost-user: started before the VMM, watched while it runs, killed after.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// One device backend to start.
#[derive(Debug, Clone)]
pub enum DeviceBackend {
    /// virtio-rng.
    Rng,
    /// virtio-blk over a file region.
    Block {
        /// Serial number the guest sees; also names the backend in messages.
        id: String,
        /// The file.
        file: PathBuf,
        /// Region start.
        offset: u64,
        /// Region length.
        length: u64,
        /// Refuse writes.
        read_only: bool,
        /// Per-block hash table in the same file: offset, length, sha256 of the table.
        verity: Option<(u64, u64, String)>,
    },
}

impl DeviceBackend {
    fn name(&self) -> String {
        match self {
            DeviceBackend::Rng => "rng".into(),
            DeviceBackend::Block { id, .. } => format!("blk-{id}"),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            DeviceBackend::Rng => vec!["rng".into()],
            DeviceBackend::Block {
                id,
                file,
                offset,
                length,
                read_only,
                verity,
            } => {
                let mut a = vec![
                    "block".into(),
                    "--id".into(),
                    id.clone(),
                    "--file".into(),
                    file.to_string_lossy().into_owned(),
                    "--offset".into(),
                    offset.to_string(),
                    "--length".into(),
                    length.to_string(),
                ];
                if *read_only {
                    a.push("--read-only".into());
                }
                if let Some((o, l, d)) = verity {
                    a.push("--verity".into());
                    a.push(format!("{o}:{l}:{d}"));
                }
                a
            }
        }
    }

    /// The QEMU device that attaches this backend (on the virtio-mmio bus).
    fn qemu_device(&self, chardev: &str) -> String {
        match self {
            DeviceBackend::Rng => format!("vhost-user-rng,chardev={chardev}"),
            DeviceBackend::Block { .. } => format!("vhost-user-blk,chardev={chardev},num-queues=1"),
        }
    }
}

/// Why backends could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BackendsError {
    /// A backend did not come up.
    #[error("device backend {name}: {message}")]
    Start {
        /// Which backend.
        name: String,
        /// What happened.
        message: String,
    },
}

/// Running backend processes and their sockets.
#[derive(Debug)]
pub struct RunningBackends {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    devices: Vec<(String, PathBuf, String)>,
}

impl RunningBackends {
    /// Starts every backend (re-executing `exe`) and waits until each listens.
    pub fn start(
        exe: &Path,
        backends: &[DeviceBackend],
        sandbox: bool,
    ) -> Result<Self, BackendsError> {
        let dir = tempfile::Builder::new()
            .prefix("hostd-devices-")
            .tempdir()
            .map_err(|e| BackendsError::Start {
                name: "all".into(),
                message: format!("cannot create a socket directory: {e}"),
            })?;
        let mut running = RunningBackends {
            dir,
            children: Vec::new(),
            devices: Vec::new(),
        };
        for b in backends {
            let name = b.name();
            let socket = running.dir.path().join(format!("{name}.sock"));
            let mut cmd = Command::new(exe);
            cmd.arg("backend")
                .args(b.args())
                .arg("--socket")
                .arg(&socket);
            if !sandbox {
                cmd.arg("--no-sandbox");
            }
            let child = cmd.spawn().map_err(|e| BackendsError::Start {
                name: name.clone(),
                message: e.to_string(),
            })?;
            running.children.push((name.clone(), child));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if let Some(msg) = running.check() {
                    return Err(BackendsError::Start { name, message: msg });
                }
                if Instant::now() > deadline {
                    return Err(BackendsError::Start {
                        name,
                        message: "did not listen within 10 s".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            running.devices.push((
                name,
                socket,
                b.qemu_device(&format!("dev{}", running.devices.len())),
            ));
        }
        Ok(running)
    }

    /// QEMU arguments: shared guest memory (memfd, so backends can map it) is set up by
    /// the caller with `memory-backend=mem`; this adds the object and every device.
    pub fn qemu_args(&self, memory_mib: u32) -> Vec<String> {
        let mut a = vec![
            "-object".to_string(),
            format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        ];
        for (i, (_, socket, device)) in self.devices.iter().enumerate() {
            a.push("-chardev".into());
            a.push(format!("socket,id=dev{i},path={}", socket.display()));
            a.push("-device".into());
            a.push(device.clone());
        }
        a
    }

    /// Whether any backend has died: a message naming it and how, or None.
    pub fn check(&mut self) -> Option<String> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                let how = match (status.code(), status.signal()) {
                    (_, Some(libc::SIGSYS)) => {
                        "was killed by its seccomp filter (SIGSYS)".to_string()
                    }
                    (_, Some(sig)) => format!("was killed by signal {sig}"),
                    (Some(c), _) => format!("exited with status {c}"),
                    _ => "exited".to_string(),
                };
                return Some(format!("device backend {name} (pid {}) {how}", child.id()));
            }
        }
        None
    }
}

impl Drop for RunningBackends {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
