//! The snapshot file: header, memory (sparse) and state, written and read back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::{io, Saved, SnapshotError, State};

/// First bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"HOSTDSNP";
/// Format version; a snapshot of another version is not restored.
pub const VERSION: u32 = 1;
/// Where guest memory starts in the file (one page for the header).
pub const MEMORY_OFFSET: u64 = 4096;
/// Bytes of the header that are used.
pub const HEADER_LEN: usize = 168;
/// Largest state section accepted (vCPU states are a few KiB each).
pub const MAX_STATE_LEN: u64 = 16 << 20;
pub(super) const PAGE: usize = 4096;

/// A snapshot file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Image and configuration the snapshot is for ([`SnapshotCache::key`]).
    pub key: [u8; 32],
    /// Bytes of guest memory, from [`MEMORY_OFFSET`].
    pub mem_len: u64,
    /// Digest of guest memory: SHA-256 over (page number, page) of every non-zero page.
    pub mem_sha256: [u8; 32],
    /// Where the state records start.
    pub state_offset: u64,
    /// Their length.
    pub state_len: u64,
    /// Their SHA-256.
    pub state_sha256: [u8; 32],
}

impl Header {
    /// The header's bytes, ending in the digest of what precedes it.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..48].copy_from_slice(&self.key);
        b[48..56].copy_from_slice(&self.mem_len.to_le_bytes());
        b[56..88].copy_from_slice(&self.mem_sha256);
        b[88..96].copy_from_slice(&self.state_offset.to_le_bytes());
        b[96..104].copy_from_slice(&self.state_len.to_le_bytes());
        b[104..136].copy_from_slice(&self.state_sha256);
        let d: [u8; 32] = Sha256::digest(&b[..136]).into();
        b[136..168].copy_from_slice(&d);
        b
    }

    /// Parses and checks a header: magic, version, its own digest, and a layout that
    /// fits in `file_len` bytes.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
        let bad = SnapshotError::Format;
        let b = b.get(..HEADER_LEN).ok_or(bad("shorter than its header"))?;
        if b[..8] != MAGIC {
            return Err(bad("no snapshot magic"));
        }
        if b[8..12] != VERSION.to_le_bytes() {
            return Err(bad("another snapshot format version"));
        }
        let d: [u8; 32] = Sha256::digest(&b[..136]).into();
        if b[136..168] != d {
            return Err(SnapshotError::Digest("header"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let arr = |o: usize| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&b[o..o + 32]);
            a
        };
        let h = Header {
            key: arr(16),
            mem_len: u64_at(48),
            mem_sha256: arr(56),
            state_offset: u64_at(88),
            state_len: u64_at(96),
            state_sha256: arr(104),
        };
        let mem_end = MEMORY_OFFSET
            .checked_add(h.mem_len)
            .ok_or(bad("memory length out of range"))?;
        if h.state_offset < mem_end
            || h.state_len > MAX_STATE_LEN
            || h.state_offset.checked_add(h.state_len) != Some(file_len)
        {
            return Err(bad("sections out of place"));
        }
        Ok(h)
    }
}

/// Parses a whole snapshot held in memory (the fuzz target's entry): header, state
/// digest and records, and memory digest.
pub fn parse(bytes: &[u8]) -> Result<(Header, State), SnapshotError> {
    let h = Header::parse(bytes, bytes.len() as u64)?;
    let state = &bytes[h.state_offset as usize..];
    let d: [u8; 32] = Sha256::digest(state).into();
    if d != h.state_sha256 {
        return Err(SnapshotError::Digest("state"));
    }
    let s = State::decode(state)?;
    let mem = &bytes[MEMORY_OFFSET as usize..(MEMORY_OFFSET + h.mem_len) as usize];
    let mut hasher = Sha256::new();
    for (n, page) in mem.chunks(PAGE).enumerate() {
        hash_page(&mut hasher, n as u64, page);
    }
    if <[u8; 32]>::from(hasher.finalize()) != h.mem_sha256 {
        return Err(SnapshotError::Digest("memory"));
    }
    Ok((h, s))
}

/// A page of zeros: comparing with it is a `memcmp`, fast even in debug builds.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

fn is_zero(page: &[u8]) -> bool {
    match ZERO_PAGE.get(..page.len()) {
        Some(zeros) => page == zeros,
        None => page.iter().all(|&b| b == 0),
    }
}

pub(super) fn hash_page(h: &mut Sha256, n: u64, page: &[u8]) {
    if !is_zero(page) {
        h.update(n.to_le_bytes());
        h.update(page);
    }
}

/// Reads a snapshot's memory into guest memory and checks its digest. Only the data
/// the file holds is read (all-zero pages are holes in it, and fresh guest memory is
/// zero already).
pub fn load_memory(saved: &Saved, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let fd = saved.file.as_raw_fd();
    let mut hasher = Sha256::new();
    let mut region_file_offset = 0u64;
    let mut page_base = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| SnapshotError::Mismatch("guest memory region".into()))?;
        let start = MEMORY_OFFSET + region_file_offset;
        let end = start + len;
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on an fd this function borrows; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            let data = data as u64;
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            // Whole pages (a file system may report extents at a finer grain), never
            // one already read: `pos` stays page-aligned.
            let page = PAGE as u64;
            let data = (start + (data - start) / page * page).max(pos);
            let hole = (start + (hole - start).div_ceil(page) * page).min(end);
            if hole <= data {
                break;
            }
            let off = (data - start) as usize;
            let n = (hole - data) as usize;
            // SAFETY: `host + off .. + n` lies inside this region's live mapping
            // (off + n <= len), which nothing else accesses before the vCPUs run.
            let dst = unsafe { std::slice::from_raw_parts_mut(host.wrapping_add(off), n) };
            saved
                .file
                .read_exact_at(dst, data)
                .map_err(io(&saved.path))?;
            // Extents come in order: hash each page as the writer did. Pages outside the
            // extents are zero in the file and in fresh memory, and were not hashed;
            // they are not touched here either (no memory is allocated for them).
            let first_page = page_base + off as u64 / PAGE as u64;
            for (k, page) in dst.chunks(PAGE).enumerate() {
                hash_page(&mut hasher, first_page + k as u64, page);
            }
            pos = hole;
        }
        region_file_offset += len;
        page_base += len / PAGE as u64;
    }
    if <[u8; 32]>::from(hasher.finalize()) != saved.header.mem_sha256 {
        return Err(SnapshotError::Digest("memory"));
    }
    Ok(())
}

/// Writes guest memory (non-zero pages only) and `state` to `file`, header last.
pub fn write(
    file: &File,
    key: &[u8; 32],
    mem: &GuestMemoryMmap,
    state: &State,
) -> std::io::Result<()> {
    let mut hasher = Sha256::new();
    let mut file_off = MEMORY_OFFSET;
    let mut page_base = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the region's whole live mapping; the vCPUs are paused and the backends
        // idle (the guest is at its snapshot point), so nothing writes it meanwhile.
        let all = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run: Option<usize> = None;
        for (n, page) in all.chunks(PAGE).enumerate() {
            let zero = is_zero(page);
            if !zero {
                hasher.update((page_base + n as u64).to_le_bytes());
                hasher.update(page);
            }
            match (zero, run) {
                (false, None) => run = Some(n * PAGE),
                (true, Some(s)) => {
                    file.write_all_at(&all[s..n * PAGE], file_off + s as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            file.write_all_at(&all[s..], file_off + s as u64)?;
        }
        file_off += len as u64;
        page_base += (len / PAGE) as u64;
    }
    let mem_len = file_off - MEMORY_OFFSET;
    let state_offset = file_off.next_multiple_of(PAGE as u64);
    let bytes = state.encode();
    file.write_all_at(&bytes, state_offset)?;
    let header = Header {
        key: *key,
        mem_len,
        mem_sha256: hasher.finalize().into(),
        state_offset,
        state_len: bytes.len() as u64,
        state_sha256: Sha256::digest(&bytes).into(),
    };
    file.sync_data()?;
    file.write_all_at(&header.encode(), 0)?;
    file.sync_data()
}
