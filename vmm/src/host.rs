//! Facts about the host: can its KVM run a Linux guest.

use std::path::Path;

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// No usable /dev/kvm.
    Absent,
    /// Hardware-assisted KVM.
    Hardware,
    /// A nested PVM hypervisor (kvm_pvm): guest kernel code runs through KVM's
    /// instruction emulator, about a thousand times slower, and stock kernels stop on
    /// instructions it lacks. See DESIGN.md, "How this machine behaves".
    Pvm,
}

/// Detects what /dev/kvm is.
pub fn kvm_kind() -> KvmKind {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        KvmKind::Absent
    } else if pvm_loaded() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// Whether this host's KVM is the PVM module (given that /dev/kvm is usable).
pub fn pvm_loaded() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Reads a small file the kernel generates (/proc, /sys, a cgroup's files) a page at a
/// time. `std::fs::read_to_string` asks for the size first, which such files give as 0
/// or 4096, and then reads 32 bytes and grows from there: 6 to 13 system calls for one
/// of them where this makes 3 or 4, and hostd reads several on the way to a VM's first
/// `KVM_RUN` (a system call costs ~0.1 ms in the nested test host, docs/startup.md).
pub fn read_kernel_file(path: impl AsRef<Path>) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    loop {
        let len = buf.len();
        buf.resize(len + 4096, 0);
        match file.read(&mut buf[len..]) {
            Ok(0) => {
                buf.truncate(len);
                break;
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Makes `dir` and any missing parents, each new one 0700 (hostd's directories under
/// /run: the runtime mount point, the per-boot caches).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::read_kernel_file;

    #[test]
    fn kernel_files_read_whole_whatever_their_size() {
        let status = read_kernel_file("/proc/self/status").expect("/proc/self/status");
        assert!(
            status.contains("\nThreads:") && status.ends_with('\n'),
            "{status}"
        );
        // Longer than one read, and from a file that reports its size.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("long");
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).expect("write");
        assert_eq!(read_kernel_file(&path).expect("read"), text);
        assert!(read_kernel_file(dir.path().join("missing")).is_err());
    }
}
