//! Per-block hashes of a section: the `rootfs-hashes` section holds the sha256 of every
//! [`BLOCK_SIZE`]-byte block of the `rootfs` section, in order, 32 raw bytes each.
//!
//! The image header records the sha256 of both sections, so the hash list is anchored
//! in the header; a block device backend that serves `rootfs` from the image file
//! reads the hash list once (checking it against the header) and then checks every
//! block it serves with [`check_block`], without hashing the whole section first.

use sha2::{Digest, Sha256};

/// Size of a hashed block, in bytes. The `rootfs` section is padded to a multiple of it.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes per block in the hash section.
pub const HASH_SIZE: usize = 32;

/// A block whose bytes do not match the hash list, or a hash list that cannot describe
/// the section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    /// The block's sha256 differs from the recorded one.
    #[error("block {index} of the `rootfs` section does not match its recorded sha256 (the image file was changed after it was built; rebuild or re-fetch it)")]
    Mismatch {
        /// Block number.
        index: u64,
    },
    /// The block lies past the end of the hash list.
    #[error("block {index} is past the end of the `rootfs-hashes` section ({blocks} blocks)")]
    OutOfRange {
        /// Block number.
        index: u64,
        /// Number of blocks the hash list covers.
        blocks: u64,
    },
    /// The hash list's length does not fit the section it describes.
    #[error("the `rootfs-hashes` section is {hashes_len} bytes, but a {section_len}-byte `rootfs` section needs {expected} (one sha256 per {BLOCK_SIZE}-byte block); the image is damaged")]
    Length {
        /// Length of the hash section.
        hashes_len: u64,
        /// Length of the hashed section.
        section_len: u64,
        /// The length it should have.
        expected: u64,
    },
}

/// The hash list of `data`: sha256 of each [`BLOCK_SIZE`]-byte block, concatenated. A
/// short last block is hashed as it is (the builder pads `rootfs`, so there is none).
pub fn block_hashes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(BLOCK_SIZE as usize) * HASH_SIZE);
    for block in data.chunks(BLOCK_SIZE as usize) {
        out.extend_from_slice(&Sha256::digest(block));
    }
    out
}

/// Checks that a hash list of `hashes_len` bytes describes a section of `section_len`
/// bytes.
pub fn check_lengths(section_len: u64, hashes_len: u64) -> Result<(), VerityError> {
    let expected = section_len.div_ceil(BLOCK_SIZE) * HASH_SIZE as u64;
    if hashes_len != expected {
        return Err(VerityError::Length {
            hashes_len,
            section_len,
            expected,
        });
    }
    Ok(())
}

/// Checks block `index` (its bytes in `block`) against the hash list `hashes`.
pub fn check_block(hashes: &[u8], index: u64, block: &[u8]) -> Result<(), VerityError> {
    let blocks = (hashes.len() / HASH_SIZE) as u64;
    let want = usize::try_from(index)
        .ok()
        .and_then(|i| i.checked_mul(HASH_SIZE))
        .and_then(|at| hashes.get(at..at.checked_add(HASH_SIZE)?))
        .ok_or(VerityError::OutOfRange { index, blocks })?;
    if Sha256::digest(block)[..] != *want {
        return Err(VerityError::Mismatch { index });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_checks_and_a_flipped_byte_is_caught() {
        let mut data = vec![0u8; 3 * BLOCK_SIZE as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let hashes = block_hashes(&data);
        assert_eq!(hashes.len(), 3 * HASH_SIZE);
        assert_eq!(
            check_lengths(data.len() as u64, hashes.len() as u64),
            Ok(())
        );
        assert!(check_lengths(data.len() as u64, 64).is_err());
        for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            assert_eq!(check_block(&hashes, i as u64, block), Ok(()));
        }
        data[BLOCK_SIZE as usize + 100] ^= 1;
        assert_eq!(
            check_block(
                &hashes,
                1,
                &data[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize]
            ),
            Err(VerityError::Mismatch { index: 1 })
        );
        assert!(matches!(
            check_block(&hashes, 3, &data[..BLOCK_SIZE as usize]),
            Err(VerityError::OutOfRange {
                index: 3,
                blocks: 3
            })
        ));
        assert!(check_block(&hashes, u64::MAX, &[]).is_err());
    }
}
