//! What KVM supports in CPUID, asked once per boot of the host.
//!
//! `KVM_GET_SUPPORTED_CPUID` makes the host kernel execute CPUID for every leaf and
//! subleaf it reports. On a nested host each of those traps to the outer hypervisor:
//! about 0.75 ms of a `hostd run` of the probe on this PVM host (`perf record` of 20
//! runs, docs/startup.md), paid again by every VM, for an answer that stays the same
//! until the KVM module is reloaded or the host reboots. So, as root, the answer is
//! kept in [`PATH`] (/run is cleared at every boot), keyed by the boot's id and the
//! identity of the /dev/kvm node (device number, inode and change time: a reloaded
//! module registers a new node), with a checksum against damage. Anything that does
//! not match or parse is ignored and the ioctl asked again; a failure to write is only
//! logged. Without root there is no cache, as for the verified-images cache.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Where the cached answer lives (root only; the directory is 0700).
pub const PATH: &str = "/run/hostd/kvm-cpuid";

const MAGIC: &[u8; 8] = b"HOSTDCPU";
const VERSION: u32 = 2;
/// The checksum's length, after the entries.
const SUM_LEN: usize = 8;
/// `kvm_cpuid_entry2` as KVM lays it out: ten u32s.
const ENTRY_LEN: usize = 40;
/// Magic, version, count, then the key.
const HEADER_LEN: usize = 8 + 4 + 4 + KEY_LEN;
/// The boot id (36 ASCII characters) and /dev/kvm's rdev, inode, ctime (s, ns).
const KEY_LEN: usize = 36 + 8 * 4;

/// The cache's directory ([`PATH`]'s), opened once as root (and made if missing), so that
/// a thread that has moved into the VM's own mount namespace (its jail's empty root)
/// still reaches the host's. None without root or when it cannot be made: then no
/// cache.
pub fn open_dir() -> Option<std::fs::File> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let dir = Path::new(PATH).parent()?;
    // Opened as it is, made only when missing: every run after the boot's first
    // would otherwise walk `create_dir_all`'s path code for nothing.
    std::fs::File::open(dir).ok().or_else(|| {
        crate::host::private_dir(dir).ok()?;
        std::fs::File::open(dir).ok()
    })
}

/// The CPUID entries KVM supports: from the cache in `dir` ([`open_dir`]) when it
/// matches this boot and this /dev/kvm, else from `KVM_GET_SUPPORTED_CPUID` (and cached
/// there).
pub fn supported(kvm: &Kvm, dir: Option<&std::fs::File>) -> Result<CpuId, String> {
    let cache = dir.and_then(|d| key(kvm).map(|k| (d, k)));
    if let Some((dir, key)) = &cache {
        if let Some(entries) = read(dir).and_then(|bytes| decode(&bytes, key)) {
            return CpuId::from_entries(&entries).map_err(|e| format!("cached CPUID: {e:?}"));
        }
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    if let Some((dir, key)) = &cache {
        if let Err(e) = write(dir, &encode(cpuid.as_slice(), key)) {
            tracing::debug!("CPUID cache {PATH}: {e}");
        }
    }
    Ok(cpuid)
}

/// This boot's id and the identity of the /dev/kvm `kvm` was opened from.
fn key(kvm: &Kvm) -> Option<[u8; KEY_LEN]> {
    let boot = crate::host::read_kernel_file("/proc/sys/kernel/random/boot_id").ok()?;
    let boot = boot.trim().as_bytes();
    if boot.len() != 36 {
        return None;
    }
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a stat buffer that lives for the call.
    if unsafe { libc::fstat(kvm.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    k[..36].copy_from_slice(boot);
    for (i, v) in [
        st.st_rdev,
        st.st_ino,
        st.st_ctime as u64,
        st.st_ctime_nsec as u64,
    ]
    .iter()
    .enumerate()
    {
        k[36 + 8 * i..44 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    Some(k)
}

fn encode(entries: &[kvm_cpuid_entry2], key: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + SUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    for e in entries {
        for v in [
            e.function,
            e.index,
            e.flags,
            e.eax,
            e.ebx,
            e.ecx,
            e.edx,
            e.padding[0],
            e.padding[1],
            e.padding[2],
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    out
}

/// FNV-1a (64 bits) of `bytes`, against a damaged file: the file is root's alone and
/// written whole (O_TMPFILE + linkat), so no attacker is in view, only accidents. A few
/// instructions a byte, where sha256 (version 1 of the file) was ~0.3 % of a profiled
/// probe run's samples in the nested test host, whose emulator translates its code anew
/// at each start.
fn checksum(bytes: &[u8]) -> [u8; SUM_LEN] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.to_le_bytes()
}

/// The entries in `bytes` if they are whole, undamaged and for `key`.
fn decode(bytes: &[u8], key: &[u8; KEY_LEN]) -> Option<Vec<kvm_cpuid_entry2>> {
    let body_len = bytes.len().checked_sub(SUM_LEN)?;
    let (body, sum) = bytes.split_at(body_len);
    if body.len() < HEADER_LEN || checksum(body) != sum {
        return None;
    }
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(body.get(off..off + 4)?.try_into().ok()?))
    };
    if &body[..8] != MAGIC || u32_at(8)? != VERSION || &body[16..HEADER_LEN] != key {
        return None;
    }
    let count = usize::try_from(u32_at(12)?).ok()?;
    if count == 0 || count > KVM_MAX_CPUID_ENTRIES || body.len() != HEADER_LEN + count * ENTRY_LEN {
        return None;
    }
    (0..count)
        .map(|i| {
            let base = HEADER_LEN + i * ENTRY_LEN;
            let w = |j: usize| u32_at(base + 4 * j);
            Some(kvm_cpuid_entry2 {
                function: w(0)?,
                index: w(1)?,
                flags: w(2)?,
                eax: w(3)?,
                ebx: w(4)?,
                ecx: w(5)?,
                edx: w(6)?,
                padding: [w(7)?, w(8)?, w(9)?],
            })
        })
        .collect()
}

/// The cache file's name in its directory.
fn name() -> std::ffi::CString {
    let name = Path::new(PATH).file_name().unwrap_or_default();
    std::ffi::CString::new(name.as_encoded_bytes()).unwrap_or_default()
}

fn read(dir: &std::fs::File) -> Option<Vec<u8>> {
    // SAFETY: an open directory fd and a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name().as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut buf = Vec::with_capacity(HEADER_LEN + KVM_MAX_CPUID_ENTRIES * ENTRY_LEN + 64);
    file.take(buf.capacity() as u64)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Writes `bytes` to the cache file in `dir` as a whole: into an unnamed file
/// (`O_TMPFILE`) that is linked in place once complete, replacing what was there.
/// Concurrent runs each see a whole file or none, and a run killed meanwhile leaves no
/// temporary file behind.
fn write(dir: &std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    use std::ffi::CString;
    let name = name();
    // SAFETY: an open directory fd and a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(std::io::Error::other)?;
    for _ in 0..2 {
        // SAFETY: NUL-terminated paths and open fds that outlive the call.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err);
        }
        // SAFETY: an open directory fd and a NUL-terminated name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    }
    Err(std::io::Error::other("another run keeps replacing it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<kvm_cpuid_entry2> {
        (0..5u32)
            .map(|i| kvm_cpuid_entry2 {
                function: i,
                index: i * 2,
                flags: 1,
                eax: 0x1000 + i,
                ebx: 0x2000 + i,
                ecx: 0x3000 + i,
                edx: 0x4000 + i,
                padding: [0; 3],
            })
            .collect()
    }

    fn key(tag: u8) -> [u8; KEY_LEN] {
        [tag; KEY_LEN]
    }

    fn same(a: &[kvm_cpuid_entry2], b: &[kvm_cpuid_entry2]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                (x.function, x.index, x.flags, x.eax, x.ebx, x.ecx, x.edx)
                    == (y.function, y.index, y.flags, y.eax, y.ebx, y.ecx, y.edx)
            })
    }

    #[test]
    fn entries_come_back_as_written() {
        let bytes = encode(&entries(), &key(7));
        let back = decode(&bytes, &key(7)).expect("decodes");
        assert!(same(&back, &entries()));
    }

    #[test]
    fn another_boot_or_kvm_node_is_a_miss() {
        let bytes = encode(&entries(), &key(7));
        assert!(decode(&bytes, &key(8)).is_none());
    }

    #[test]
    fn damaged_truncated_or_padded_files_are_misses() {
        let bytes = encode(&entries(), &key(7));
        for i in [0, 9, 13, HEADER_LEN + 3, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b, &key(7)).is_none(), "flipped byte {i}");
        }
        for len in [0, 31, 32, HEADER_LEN, bytes.len() - 1] {
            assert!(decode(&bytes[..len], &key(7)).is_none(), "cut to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, &key(7)).is_none());
        assert!(decode(&encode(&[], &key(7)), &key(7)).is_none());
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = std::fs::File::open(dir.path()).expect("open the directory");
        let bytes = encode(&entries(), &key(1));
        assert!(read(&open).is_none());
        write(&open, &bytes).expect("write");
        write(&open, &bytes).expect("rewrite");
        assert_eq!(read(&open).as_deref(), Some(&bytes[..]));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kvm-cpuid")]);
    }
}
