//! Guest memory: one memfd (so device backends in other processes can map it),
//! mapped in regions around the MMIO gap, registered with KVM.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::layout::ram_regions;

/// Creates `size` bytes of guest memory backed by a memfd.
pub fn create(size: u64) -> Result<GuestMemoryMmap, String> {
    // SAFETY: a valid NUL-terminated name and flags; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"hostd-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| format!("sizing guest memory to {size} bytes: {e}"))?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_regions(size) {
        let f = file.try_clone().map_err(|e| e.to_string())?;
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| format!("mapping guest memory: {e}"))?;
    // A core dump of the VMM never carries guest memory.
    advise(&mem, libc::MADV_DONTDUMP, 0)
        .map_err(|e| format!("madvise(MADV_DONTDUMP) on guest memory: {e}"))?;
    // Best effort, as Cloud Hypervisor does by default: guest memory in 2 MiB pages
    // where the host allows transparent huge pages for shared memory
    // (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` `advise`, `within_size` or
    // `always`; with `never`, Debian's default, this changes nothing). A memfd is
    // shmem, so it never gets the huge pages that `enabled = always` gives
    // Firecracker's anonymous guest memory. With them, copying the kernel in takes a
    // fault per 2 MiB instead of per 4 KiB, and KVM maps 2 MiB pages into the guest's
    // nested page tables: on the nested test host hello's first service output came at
    // a median 1.39 s instead of 2.14 s (docs/startup.md). The first 2 MiB stay in
    // 4 KiB pages: the boot tables, the legacy area and a small kernel like the probe's
    // (at 1 MiB) write a few pages there, and a huge page would be zeroed whole first
    // (~8 ms of the probe's start in the test host, on the way to its first KVM_RUN).
    let _ = advise(&mem, libc::MADV_HUGEPAGE, SMALL_PAGES_BELOW);
    Ok(mem)
}

/// Guest memory below this address is never advised into huge pages.
const SMALL_PAGES_BELOW: u64 = 2 << 20;

/// `madvise(advice)` on every region of `mem`, from guest address `from` on. For advice
/// that changes only how pages are backed or dumped, never their contents.
fn advise(mem: &GuestMemoryMmap, advice: libc::c_int, from: u64) -> Result<(), String> {
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        let skip = from.clamp(start, end) - start;
        if skip == region.len() {
            continue;
        }
        let host = region
            .get_host_address(MemoryRegionAddress(skip))
            .map_err(|e| format!("region host address: {e}"))?;
        // SAFETY: `host` and `len` describe the part from `skip` on of one live mapping
        // owned by `mem` (`skip` is 0 or 2 MiB, page-aligned); the callers' advice
        // (MADV_DONTDUMP, MADV_HUGEPAGE) leaves its contents as they are.
        if unsafe { libc::madvise(host.cast(), (region.len() - skip) as usize, advice) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}

/// Registers every region of `mem` with the VM.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), String> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| format!("region host address: {e}"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes that stays
        // mapped as long as `mem`, which outlives the VM's use of it.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    }
    Ok(())
}

/// An anonymous in-memory file holding `bytes` (a kernel taken out of an image).
pub fn memfd_with(name: &std::ffi::CStr, bytes: &[u8]) -> std::io::Result<File> {
    use std::io::{Seek, Write};
    // SAFETY: a valid NUL-terminated name and flags; the fd is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file)
}
