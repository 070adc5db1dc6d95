//! `struct hvm_start_info` (PVH boot ABI): only the magic and the command line are used.

use crate::layout::{CMDLINE_MAX, HVM_START_CMDLINE_OFFSET, HVM_START_MAGIC, MAPPED_LIMIT};

/// Why the command line could not be read.
#[derive(Debug, Clone, Copy)]
pub enum Error {
    /// `EBX` was 0.
    NoStartInfo,
    /// The structure at `EBX` does not start with the PVH magic; carries what was found.
    BadMagic(u32),
    /// `cmdline_paddr` is not below 4 GiB (the probe maps only that); carries it.
    CmdlineNotMapped(u64),
}

/// Reads the command line the monitor passed. An absent command line (`cmdline_paddr`
/// 0) is an empty one.
pub fn cmdline(start_info: u64) -> Result<&'static [u8], Error> {
    if start_info == 0 {
        return Err(Error::NoStartInfo);
    }
    if start_info >= MAPPED_LIMIT - 64 {
        return Err(Error::BadMagic(0));
    }
    let base = start_info as usize as *const u8;
    // SAFETY: the PVH ABI says EBX points at a `hvm_start_info` in guest RAM; boot.rs
    // identity-maps 0..4 GiB and the address was checked to be inside that range.
    // `read_unaligned` because nothing guarantees the structure's alignment.
    let magic = unsafe { base.cast::<u32>().read_unaligned() };
    if magic != HVM_START_MAGIC {
        return Err(Error::BadMagic(magic));
    }
    // SAFETY: as above; the field is at offset 24 of a structure of at least 56 bytes.
    let cmdline_paddr = unsafe {
        base.add(HVM_START_CMDLINE_OFFSET)
            .cast::<u64>()
            .read_unaligned()
    };
    if cmdline_paddr == 0 {
        return Ok(&[]);
    }
    if cmdline_paddr >= MAPPED_LIMIT {
        return Err(Error::CmdlineNotMapped(cmdline_paddr));
    }
    let limit = core::cmp::min(CMDLINE_MAX as u64, MAPPED_LIMIT - cmdline_paddr) as usize;
    let text = cmdline_paddr as usize as *const u8;
    let mut len = 0;
    // SAFETY: each byte read is below 4 GiB (identity-mapped by boot.rs), inside the
    // NUL-terminated string the monitor placed in guest RAM, bounded by CMDLINE_MAX.
    while len < limit && unsafe { text.add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes at `text` were just read, lie in mapped guest RAM, and
    // nothing in the probe ever writes them, so a shared 'static slice is sound.
    Ok(unsafe { core::slice::from_raw_parts(text, len) })
}
