//! Untrusted files: an image header + section table (what `hostd inspect`/`run` parse
//! before anything else), and a kernel file handed to the built-in VMM's loader.

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
    let Ok(mut file) = hostd_vmm::kvm::memory::memfd_with(c"fuzz-kernel", data) else {
        return;
    };
    let _ = hostd_vmm::kvm::boot::load_file(
        &mem,
        4 << 20,
        &mut file,
        "fuzz",
        Some(&data[..data.len().min(4096)]),
        "console=ttyS0",
        2,
    );
}
