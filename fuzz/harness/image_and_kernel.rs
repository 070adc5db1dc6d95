//! Untrusted files: an image header + section table (what `hostd inspect`/`run` parse
//! before anything else), a packed kernel section, and a kernel file (an ELF, or a packed
//! section: the loader tells them apart) handed to the built-in VMM's loader.

use hostd_images::format::{parse_header, BLOCK};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// One input: see the module's documentation for its layout.
pub fn run(data: &[u8]) {
    // Header parsing against a claimed file length derived from the input.
    let claimed = data
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    if let Ok(h) = parse_header(data, claimed) {
        for s in &h.sections {
            assert!(s.offset % BLOCK == 0 && s.offset + s.length <= h.file_length);
        }
    }
    let _ = parse_header(data, data.len() as u64);

    // The kernel loader on the same bytes, into 4 MiB of guest memory.
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]) else {
        return;
    };
    // The packed-kernel decoder on its own.
    if let Ok(elf) = hostd_images::kernel::unpack(data) {
        assert!(elf.len() as u64 <= hostd_images::input::MAX_KERNEL);
    }
    let payload = |name: &std::ffi::CStr, bytes: &[u8]| {
        hostd_vmm::kvm::memory::memfd_with(name, bytes)
            .and_then(|f| hostd_vmm::payload::Payload::from_file(f, "fuzz"))
    };
    let (Ok(kernel), Ok(initrd)) = (
        payload(c"fuzz-kernel", data),
        payload(c"fuzz-initrd", &data[..data.len().min(4096)]),
    ) else {
        return;
    };
    let _ = hostd_vmm::kvm::boot::load(&mem, 4 << 20, &kernel, Some(&initrd), "console=ttyS0", 2);
}
