//! Snapshots of a running VM of the built-in VMM, and restoring them (docs/snapshots.md).
//!
//! A snapshot is taken at the snapshot point guest init offers
//! ([`hostd_images::abi::SNAPSHOT_PORT`]): every vCPU is paused (its pending I/O
//! completed), its registers, MSRs, LAPIC and events read; then the VM's irqchip, PIT
//! and clock, the console UART, each virtio-mmio transport and guest memory are written
//! to one file:
//!
//! ```text
//! 0      header (HEADER_LEN bytes used of one page): magic, version, key, memory
//!        length and digest, state offset, length and digest, digest of the header
//! 4096   guest memory, every region at its offset in the memfd; all-zero pages are
//!        holes (a sparse file)
//! …      state: records (tag, vCPU, length, bytes), page-aligned after memory
//! ```
//!
//! The file is written to a temporary name in the cache directory by the VM's process
//! (which has it open from before its jail) and renamed into place by `hostd run` once
//! the VM ended, only if its header is complete: a reader never sees a partial file.
//! Restoring checks the header, the state's digest and, while reading memory back, the
//! memory's digest; any mismatch means a cold boot (and the snapshot is replaced).

mod cache;
mod file;
mod pause;
mod state;

pub use cache::{open, warn_unusable, Prepared, Saved, SnapshotCache};
pub use file::{
    load_memory, parse, write, Header, HEADER_LEN, MAGIC, MAX_STATE_LEN, MEMORY_OFFSET, VERSION,
};
pub use pause::{ioctls, Pause, SnapshotPort, PORTS_LEN};
pub use state::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, saveable_msrs, State, VcpuState, VmState,
};

use std::path::{Path, PathBuf};

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the snapshot file failed.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot this hostd can restore.
    #[error("not a usable snapshot: {0}")]
    Format(&'static str),
    /// The file is a snapshot of another image or configuration.
    #[error("the snapshot was taken for another image or configuration")]
    KeyMismatch,
    /// A digest did not match: the file is damaged.
    #[error("the snapshot's {0} does not match its digest (damaged)")]
    Digest(&'static str),
    /// A KVM call failed.
    #[error("{what}")]
    Kvm {
        /// Which call.
        what: String,
        /// The failure.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The saved state does not fit this VM.
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
}

pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Kvm { what, source }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}
