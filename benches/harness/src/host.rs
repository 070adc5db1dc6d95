//! What the figures were measured on: CPU model, kernel, and what kind of virtualization
//! the host offers.

use serde::{Deserialize, Serialize};

/// The host a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `hardware-kvm`, `nested-pvm` or `none` (see [`host_kind`]).
    pub host_kind: String,
    pub mem_total_mib: u64,
}

impl HostInfo {
    pub fn detect() -> HostInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        HostInfo {
            cpu_model,
            cpus,
            kernel,
            host_kind: host_kind().into(),
            mem_total_mib: crate::mem::meminfo_kib("MemTotal").unwrap_or(0) / 1024,
        }
    }
}

/// `nested-pvm` when KVM is the PVM module (a guest kernel runs as a PVM guest: guest
/// kernel code is emulated or paravirtualized, docs/pvm.md), `hardware-kvm` when
/// /dev/kvm opens and the CPU advertises VMX or SVM, `none` without a usable /dev/kvm.
pub fn host_kind() -> &'static str {
    if !crate::kvm_usable() {
        return "none";
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return "nested-pvm";
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    if flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        "hardware-kvm"
    } else {
        "kvm-unknown"
    }
}
