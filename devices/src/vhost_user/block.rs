//! vhost-user virtio-blk over one region of a file.
//!
//! Two uses: the image's read-only root file system (the `rootfs` section of the image
//! file, every 4 KiB block checked against the sha256 recorded for it before a byte
//! reaches the guest), and read-write volumes (a whole file). Requests are bounds-checked
//! against the region; a guest can only ever reach the bytes it was given.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::rng::VHOST_USER_F_PROTOCOL_FEATURES;
use super::{drain, Chain, Memory};
use crate::virtio::VIRTIO_F_VERSION_1;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Verification block size.
pub const VERITY_BLOCK: u64 = 4096;
/// Largest request served (bounds the memory one request can make us use).
const MAX_REQUEST: u64 = 4 << 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The syscalls virtio-blk needs beyond every backend's.
pub const BLOCK_SYSCALLS: &[i64] = &[libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync];

/// Per-block sha256 digests of a read-only region.
#[derive(Debug, Clone)]
pub struct Verity {
    hashes: Vec<[u8; 32]>,
}

impl Verity {
    /// Parses the raw concatenated digests; `region_len` must be covered exactly.
    pub fn new(raw: &[u8], region_len: u64) -> Result<Verity, String> {
        if !raw.len().is_multiple_of(32) {
            return Err(format!(
                "hash table of {} bytes is not a whole number of sha256 digests",
                raw.len()
            ));
        }
        let blocks = region_len.div_ceil(VERITY_BLOCK);
        if (raw.len() / 32) as u64 != blocks {
            return Err(format!(
                "{} digests for {blocks} blocks of {VERITY_BLOCK} bytes",
                raw.len() / 32
            ));
        }
        let hashes = raw
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(Verity { hashes })
    }

    /// The digests for `region`: what `hostd build` records.
    pub fn compute(region: &[u8]) -> Vec<u8> {
        region
            .chunks(VERITY_BLOCK as usize)
            .flat_map(|b| Sha256::digest(b).to_vec())
            .collect()
    }
}

/// A region of a file served as a virtio-blk disk.
#[derive(Debug)]
pub struct BlockBackend {
    file: File,
    offset: u64,
    length: u64,
    read_only: bool,
    verity: Option<Verity>,
    id: String,
    mem: Memory,
}

impl BlockBackend {
    /// Serves `[offset, offset + length)` of `file`. With `verity`, the region is
    /// read-only and every read is verified.
    pub fn new(
        file: File,
        offset: u64,
        length: u64,
        read_only: bool,
        verity: Option<Verity>,
        id: &str,
    ) -> Self {
        BlockBackend {
            file,
            offset,
            length,
            read_only: read_only || verity.is_some(),
            verity,
            id: id.to_string(),
            mem: Memory::new(vm_memory::GuestMemoryMmap::new()),
        }
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.length / SECTOR).to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&128u32.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(VERITY_BLOCK as u32).to_le_bytes()); // blk_size
        c
    }

    /// Reads `len` bytes at region offset `at`, verifying every covering block.
    pub fn read_verified(&self, at: u64, len: u64) -> Result<Vec<u8>, String> {
        let end = at
            .checked_add(len)
            .filter(|e| *e <= self.length)
            .ok_or("read past the end of the disk")?;
        let Some(verity) = &self.verity else {
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, self.offset + at)
                .map_err(|e| e.to_string())?;
            return Ok(buf);
        };
        let first = at / VERITY_BLOCK;
        let last = end.div_ceil(VERITY_BLOCK);
        let start = first * VERITY_BLOCK;
        let stop = (last * VERITY_BLOCK).min(self.length);
        let mut buf = vec![0u8; (stop - start) as usize];
        self.file
            .read_exact_at(&mut buf, self.offset + start)
            .map_err(|e| e.to_string())?;
        for (i, block) in buf.chunks(VERITY_BLOCK as usize).enumerate() {
            let n = first as usize + i;
            let want = verity.hashes.get(n).ok_or("block outside the hash table")?;
            if Sha256::digest(block).as_slice() != want {
                return Err(format!(
                    "block {n} (bytes {}..{}) does not match its recorded sha256: the image was modified after it was built",
                    n as u64 * VERITY_BLOCK,
                    (n as u64 + 1) * VERITY_BLOCK
                ));
            }
        }
        let from = (at - start) as usize;
        Ok(buf[from..from + len as usize].to_vec())
    }

    /// Uses `mem` as guest memory (what the VMM's memory table says).
    pub fn set_memory(&mut self, mem: Memory) {
        self.mem = mem;
    }

    /// Serves one request; returns the bytes written into the chain.
    pub fn request(&self, chain: Chain) -> u32 {
        let mem = self.mem.memory();
        let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(&mem), chain.writer(&mem)) else {
            return 0;
        };
        let mut hdr = [0u8; 16];
        let writable = w.available_bytes();
        if r.read_exact(&mut hdr).is_err() || writable == 0 {
            tracing::debug!("{}: malformed request", self.id);
            return 0;
        }
        let Ok(mut status_w) = w.split_at(writable - 1) else {
            return 0;
        };
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let at = sector.checked_mul(SECTOR);
        let status = match kind {
            T_IN => {
                let len = w.available_bytes() as u64;
                match at
                    .filter(|_| len <= MAX_REQUEST)
                    .ok_or_else(|| "request too large".to_string())
                    .and_then(|at| self.read_verified(at, len))
                {
                    Ok(data) if w.write_all(&data).is_ok() => S_OK,
                    Ok(_) => S_IOERR,
                    Err(e) => {
                        tracing::error!("{}: read of sector {sector} refused: {e}", self.id);
                        S_IOERR
                    }
                }
            }
            T_OUT if self.read_only => S_IOERR,
            T_OUT => {
                let len = r.available_bytes() as u64;
                let ok = at
                    .and_then(|a| {
                        a.checked_add(len)
                            .filter(|e| *e <= self.length && len <= MAX_REQUEST)
                            .map(|_| a)
                    })
                    .and_then(|a| {
                        let mut buf = vec![0u8; len as usize];
                        r.read_exact(&mut buf).ok()?;
                        self.file.write_all_at(&buf, self.offset + a).ok()
                    });
                if ok.is_some() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                let n = self.id.len().min(20);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = w.available_bytes().min(20);
                if w.write_all(&id[..n]).is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            _ => S_UNSUPP,
        };
        let _ = status_w.write_all(&[status]);
        (w.bytes_written() + status_w.bytes_written()) as u32
    }
}

impl VhostUserBackendMut for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        // QEMU's vhost-user front ends ask for up to 1024 entries (vhost-user-rng does).
        1024
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | super::RING_FEATURES
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_window(&self.config(), offset, size)
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(&mut self, mem: Memory) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let vring = super::kicked_vring(device_event, evset, vrings)?;
        let mem = self.mem.clone();
        drain(vring, &mem, |chain| self.request(chain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn backend(data: &[u8], offset: u64, verity: bool) -> BlockBackend {
        let mut f = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&vec![0xEE; offset as usize])
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(data).unwrap_or_else(|e| panic!("{e}"));
        f.rewind().unwrap_or_else(|e| panic!("{e}"));
        let v = verity.then(|| {
            Verity::new(&Verity::compute(data), data.len() as u64).unwrap_or_else(|e| panic!("{e}"))
        });
        BlockBackend::new(f, offset, data.len() as u64, false, v, "test")
    }

    #[test]
    fn verified_reads_return_the_region_and_catch_a_flipped_byte() {
        let data: Vec<u8> = (0..3 * VERITY_BLOCK).map(|i| (i % 251) as u8).collect();
        let b = backend(&data, 8192, true);
        assert!(b.read_only);
        assert_eq!(
            b.read_verified(4000, 200).ok(),
            Some(data[4000..4200].to_vec())
        );
        assert_eq!(
            b.read_verified(0, 3 * VERITY_BLOCK).ok(),
            Some(data.clone())
        );
        assert!(
            b.read_verified(3 * VERITY_BLOCK - 1, 2).is_err(),
            "past the end"
        );
        // Someone edits the image on disk after it was built.
        b.file
            .write_all_at(&[0x00], 8192 + VERITY_BLOCK + 17)
            .unwrap_or_else(|e| panic!("{e}"));
        let err = b
            .read_verified(VERITY_BLOCK + 100, 10)
            .err()
            .unwrap_or_default();
        assert!(err.contains("block 1") && err.contains("sha256"), "{err}");
        assert!(b.read_verified(0, 100).is_ok(), "other blocks still serve");
    }

    #[test]
    fn hash_tables_must_match_the_region() {
        assert!(Verity::new(&[0u8; 31], 4096).is_err());
        assert!(Verity::new(&[0u8; 64], 4096).is_err());
        assert!(Verity::new(&[0u8; 64], 8000).is_ok());
    }

    #[test]
    fn config_reports_capacity_in_sectors() {
        let b = backend(&[0u8; 8192], 0, false);
        assert_eq!(b.get_config(0, 8), 16u64.to_le_bytes().to_vec());
        assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes().to_vec());
        assert_eq!(
            b.get_config(60, 4),
            vec![0; 4],
            "reads past the config are zeros"
        );
    }
}
