//! The on-disk image format.
//!
//! ```text
//! 0      4 KiB header
//!          0..8     magic "HOSTDIMG"
//!          8..12    format version (u32 LE)
//!         12..16    section count (u32 LE)
//!         16..24    total file length (u64 LE)
//!         24..64    reserved, zero
//!         64..      section table, 64 bytes per entry:
//!                     name (16 bytes, NUL-padded ASCII), offset (u64 LE),
//!                     length (u64 LE), sha256 of the section (32 bytes)
//!       4064..4096  sha256 of bytes 0..4064 (the header digest)
//! 4 KiB  sections, each starting on a 4 KiB boundary, in table order, zero-padded
//! ```
//!
//! The sha256 of the whole file is the image id. Readers check the header digest,
//! the table's bounds and every section digest before trusting any of it.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::stamp::{FileStamp, VerifiedCache};

/// File magic.
pub const MAGIC: &[u8; 8] = b"HOSTDIMG";
/// Current format version.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version still read: version 1 differs only in carrying the kernel
/// as it is, never packed (crate::kernel), which readers of version 2 tell apart anyway.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Header size and section alignment.
pub const BLOCK: u64 = 4096;
/// Size of one section-table entry.
const ENTRY: usize = 64;
/// Where the section table starts.
const TABLE: usize = 64;
/// Where the header digest lives.
const HEADER_DIGEST: usize = BLOCK as usize - 32;
/// Most sections a header can describe.
pub const MAX_SECTIONS: usize = (HEADER_DIGEST - TABLE) / ENTRY;
/// Longest section name.
pub const MAX_NAME: usize = 16;

/// Section names hostd writes.
pub mod sections {
    /// Canonical JSON manifest.
    pub const MANIFEST: &str = "manifest";
    /// The guest kernel (vmlinux ELF or bzImage).
    pub const KERNEL: &str = "kernel";
    /// cpio newc initrd with guest init and the root file system (or, when the image
    /// has a `rootfs` section, only what must exist before the root is mounted).
    pub const INITRD: &str = "initrd";
    /// Read-only erofs root file system, padded to a multiple of 4 KiB; attached to the
    /// guest as a virtio-blk disk straight from the image file at its offset.
    pub const ROOTFS: &str = "rootfs";
    /// sha256 of every 4 KiB block of `rootfs`, in order, 32 raw bytes each
    /// ([`crate::verity`]); what a block backend checks each read against.
    pub const ROOTFS_HASHES: &str = "rootfs-hashes";
    /// A minisign (ed25519) signature of every other section's name, length and
    /// sha256 ([`crate::signature`]); present in signed images only, always last.
    pub const SIGNATURE: &str = "signature";
    /// Every section this hostd reads, in the order it writes them.
    pub const KNOWN: [&str; 6] = [MANIFEST, KERNEL, INITRD, ROOTFS, ROOTFS_HASHES, SIGNATURE];
}

/// What is wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the file failed.
    #[error("{file}")]
    Io {
        /// The image file.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The header is not a hostd header or is damaged.
    #[error("{file}: not a valid hostd image: {reason}")]
    Header {
        /// The image file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A section's bytes do not match its recorded digest, or it lies outside the file.
    #[error("{file}: section `{section}` is corrupt: {reason}")]
    Section {
        /// The image file.
        file: PathBuf,
        /// The damaged section.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// A required section is absent.
    #[error("{file}: section `{section}` is missing")]
    Missing {
        /// The image file.
        file: PathBuf,
        /// The section that was expected.
        section: String,
    },
}

/// One entry of the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Section name.
    pub name: String,
    /// Byte offset in the file (multiple of [`BLOCK`]).
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// sha256 of the section's bytes.
    pub sha256: [u8; 32],
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Total file length recorded at build time.
    pub file_length: u64,
    /// The section table.
    pub sections: Vec<Section>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex of a digest.
pub fn digest_hex(d: &[u8; 32]) -> String {
    hex(d)
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// A section to write: its name, its bytes and, when already known, their sha256.
pub type SectionInput<'a> = (&'a str, &'a [u8], Option<[u8; 32]>);

/// Serialises an image from named sections, in the given order. Returns the whole file.
///
/// Panics never; errors when a name is too long or there are too many sections.
pub fn write_image(sections: &[(&str, &[u8])]) -> Result<Vec<u8>, String> {
    let with: Vec<SectionInput> = sections.iter().map(|(n, d)| (*n, *d, None)).collect();
    write_image_hashed(&with)
}

/// As [`write_image`], with the sha256 of some sections already known (the builder
/// hashes its large sections once, for the manifest, rather than again here). A given
/// digest must be the section's: the builder computes it from the same bytes.
pub fn write_image_hashed(sections: &[SectionInput]) -> Result<Vec<u8>, String> {
    if sections.len() > MAX_SECTIONS {
        return Err(format!(
            "{} sections; at most {MAX_SECTIONS} fit",
            sections.len()
        ));
    }
    let mut table = Vec::with_capacity(sections.len());
    let mut offset = BLOCK;
    for (name, data, known) in sections {
        if name.is_empty() || name.len() > MAX_NAME || !name.is_ascii() {
            return Err(format!(
                "section name `{name}` must be 1-{MAX_NAME} ASCII bytes"
            ));
        }
        table.push(Section {
            name: name.to_string(),
            offset,
            length: data.len() as u64,
            sha256: known.unwrap_or_else(|| Sha256::digest(data).into()),
        });
        offset = align_up(offset + data.len() as u64);
    }
    let total = offset;
    let mut out = vec![0u8; total as usize];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(table.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&total.to_le_bytes());
    for (i, s) in table.iter().enumerate() {
        let e = TABLE + i * ENTRY;
        out[e..e + s.name.len()].copy_from_slice(s.name.as_bytes());
        out[e + 16..e + 24].copy_from_slice(&s.offset.to_le_bytes());
        out[e + 24..e + 32].copy_from_slice(&s.length.to_le_bytes());
        out[e + 32..e + 64].copy_from_slice(&s.sha256);
    }
    let digest: [u8; 32] = Sha256::digest(&out[..HEADER_DIGEST]).into();
    out[HEADER_DIGEST..BLOCK as usize].copy_from_slice(&digest);
    for ((_, data, _), s) in sections.iter().zip(&table) {
        let start = s.offset as usize;
        out[start..start + data.len()].copy_from_slice(data);
    }
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and checks a header block against the actual file length. Checks the magic,
/// version, header digest, and that every section is aligned, in bounds, in order and
/// non-overlapping. Does not read section data. Errors are plain strings; callers add
/// the file name.
pub fn parse_header(block: &[u8], actual_len: u64) -> Result<Header, (Option<String>, String)> {
    let h = |r: String| (None, r);
    if block.len() < BLOCK as usize {
        return Err(h(format!(
            "file is {} bytes, shorter than the {BLOCK}-byte header (truncated?)",
            block.len()
        )));
    }
    if &block[..8] != MAGIC {
        return Err(h(
            "wrong magic (expected \"HOSTDIMG\"); is this a hostd image?".into(),
        ));
    }
    let digest: [u8; 32] = Sha256::digest(&block[..HEADER_DIGEST]).into();
    if digest[..] != block[HEADER_DIGEST..BLOCK as usize] {
        return Err(h(
            "header digest mismatch: the header or section table is damaged".into(),
        ));
    }
    let version = u32_at(block, 8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(h(format!(
            "format version {version}; this hostd reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
        )));
    }
    let count = u32_at(block, 12) as usize;
    if count > MAX_SECTIONS {
        return Err(h(format!("{count} sections; at most {MAX_SECTIONS} fit")));
    }
    let file_length = u64_at(block, 16);
    if actual_len < file_length {
        return Err(h(format!(
            "file is {actual_len} bytes but the header records {file_length} (truncated?)"
        )));
    }
    if actual_len > file_length {
        return Err(h(format!(
            "file is {actual_len} bytes but the header records {file_length} (trailing data)"
        )));
    }
    let mut sections: Vec<Section> = Vec::with_capacity(count);
    let mut end_of_previous = BLOCK;
    for i in 0..count {
        let e = TABLE + i * ENTRY;
        let raw_name = &block[e..e + 16];
        let name_len = raw_name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = std::str::from_utf8(&raw_name[..name_len])
            .ok()
            .filter(|n| !n.is_empty() && n.is_ascii())
            .map(str::to_string)
            .ok_or_else(|| h(format!("section table entry {i} has an invalid name")))?;
        // Covered by the header digest, but they must be zero: no two valid headers
        // differ only in bytes that mean nothing.
        if raw_name[name_len..].iter().any(|b| *b != 0) {
            return Err(h(format!(
                "section table entry {i} (`{name}`) has bytes after its name's NUL"
            )));
        }
        let offset = u64_at(block, e + 16);
        let length = u64_at(block, e + 24);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&block[e + 32..e + 64]);
        let bad = |r: String| (Some(name.clone()), r);
        if !offset.is_multiple_of(BLOCK) {
            return Err(bad(format!("offset {offset} is not {BLOCK}-byte aligned")));
        }
        if offset < end_of_previous {
            return Err(bad(format!(
                "offset {offset} overlaps the header or the previous section"
            )));
        }
        if offset != align_up(end_of_previous) {
            return Err(bad(format!(
                "offset {offset} leaves a gap after the previous section (expected {})",
                align_up(end_of_previous)
            )));
        }
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= file_length)
            .ok_or_else(|| bad(format!("offset {offset} + length {length} runs past the end of the file ({file_length} bytes)")))?;
        if sections.iter().any(|s| s.name == name) {
            return Err(bad("appears twice in the section table".into()));
        }
        end_of_previous = end;
        sections.push(Section {
            name,
            offset,
            length,
            sha256,
        });
    }
    if file_length != align_up(end_of_previous) {
        return Err(h(format!(
            "the header records {file_length} bytes but the sections end at {end_of_previous} \
             (expected {} with padding)",
            align_up(end_of_previous)
        )));
    }
    // The unused part of the section table and the reserved bytes are covered by the
    // header digest already; they must still be zero, so no two valid headers differ
    // only in bytes that mean nothing.
    if block[24..TABLE].iter().any(|b| *b != 0)
        || block[TABLE + count * ENTRY..HEADER_DIGEST]
            .iter()
            .any(|b| *b != 0)
    {
        return Err(h("reserved header bytes are not zero".into()));
    }
    Ok(Header {
        version,
        file_length,
        sections,
    })
}

/// An opened, verified image.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    /// The parsed header.
    pub header: Header,
    /// sha256 of the whole file, hex: the image id.
    pub id: String,
    /// The version of the file that was verified in full (see [`crate::stamp`]): while
    /// it holds, its sections need not be hashed again when they are read.
    pub stamp: Option<FileStamp>,
}

impl Image {
    /// Opens an image and verifies the header and every section digest.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let f = crate::input::open_regular(path).map_err(|source| ImageError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Self::open_file(f, path)
    }

    /// As [`Image::open`], but when `cache` records this very version of the file (its
    /// [`FileStamp`]) as verified in full before, only the header is read and checked
    /// against the recorded header digest; otherwise the image is verified in full and
    /// recorded. Either way the image carries its stamp, so that loading its sections
    /// hashes nothing again while the stamp holds.
    pub fn open_cached(path: &Path, cache: &VerifiedCache) -> Result<Image, ImageError> {
        let io = |source| ImageError::Io {
            file: path.to_path_buf(),
            source,
        };
        let mut f = crate::input::open_regular(path).map_err(io)?;
        let Some(stamp) = FileStamp::settled(&f).map_err(io)? else {
            // Changed a moment ago: verified in full, not recorded.
            return Self::open_file(f, path);
        };
        if let Some((id, header_digest)) = cache.lookup(&stamp) {
            let len = f.metadata().map_err(io)?.len();
            let (header, block) = Self::read_header(&mut f, path, len)?;
            let digest: [u8; 32] = Sha256::digest(&block).into();
            if digest == header_digest && stamp.holds_for(&f) {
                return Ok(Image {
                    path: path.to_path_buf(),
                    header,
                    id,
                    stamp: Some(stamp),
                });
            }
            f.seek(SeekFrom::Start(0)).map_err(io)?;
        }
        let image = Self::open_file(f.try_clone().map_err(io)?, path)?;
        // Recorded only when nothing changed the file while it was read.
        if image.stamp == Some(stamp) {
            let len = f.metadata().map_err(io)?.len();
            let (_, block) = Self::read_header(&mut f, path, len)?;
            let digest: [u8; 32] = Sha256::digest(&block).into();
            cache.record(&stamp, &image.id, &digest);
        }
        Ok(image)
    }

    /// Reads and checks the header block from the start of `f`.
    fn read_header(f: &mut File, path: &Path, len: u64) -> Result<(Header, Vec<u8>), ImageError> {
        let io = |source| ImageError::Io {
            file: path.to_path_buf(),
            source,
        };
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut block = Vec::with_capacity(BLOCK as usize);
        (&mut *f).take(BLOCK).read_to_end(&mut block).map_err(io)?;
        let header = parse_header(&block, len).map_err(|(section, reason)| match section {
            Some(section) => ImageError::Section {
                file: path.to_path_buf(),
                section,
                reason,
            },
            None => ImageError::Header {
                file: path.to_path_buf(),
                reason,
            },
        })?;
        Ok((header, block))
    }

    fn open_file(mut f: File, path: &Path) -> Result<Image, ImageError> {
        let io = |source| ImageError::Io {
            file: path.to_path_buf(),
            source,
        };
        let stamp = FileStamp::settled(&f).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let (header, block) = Self::read_header(&mut f, path, len)?;
        // One pass over the file: the whole-file digest (image id) and each section's.
        let mut whole = Sha256::new();
        whole.update(&block);
        let mut pos = BLOCK;
        let mut buf = vec![0u8; 1 << 20];
        let padding_err = |after: &str| ImageError::Section {
            file: path.to_path_buf(),
            section: after.to_string(),
            reason: "the padding after it is not zero (bytes outside every section)".into(),
        };
        let mut previous = "header";
        for s in &header.sections {
            if !copy_range(&mut f, &mut whole, None, &mut pos, s.offset, &mut buf).map_err(io)? {
                return Err(padding_err(previous));
            }
            previous = &s.name;
            let mut sect = Sha256::new();
            copy_range(
                &mut f,
                &mut whole,
                Some(&mut sect),
                &mut pos,
                s.offset + s.length,
                &mut buf,
            )
            .map_err(io)?;
            let got: [u8; 32] = sect.finalize().into();
            if got != s.sha256 {
                return Err(ImageError::Section {
                    file: path.to_path_buf(),
                    section: s.name.clone(),
                    reason: format!(
                        "sha256 is {} but the header records {}",
                        hex(&got),
                        hex(&s.sha256)
                    ),
                });
            }
        }
        if !copy_range(&mut f, &mut whole, None, &mut pos, len, &mut buf).map_err(io)? {
            return Err(padding_err(previous));
        }
        Ok(Image {
            path: path.to_path_buf(),
            header,
            id: hex(&whole.finalize()),
            // Nothing changed the (settled) file while it was verified: this version is
            // good.
            stamp: stamp.filter(|s| s.holds_for(&f)),
        })
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks up a section by name.
    pub fn section(&self, name: &str) -> Result<&Section, ImageError> {
        self.header
            .sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ImageError::Missing {
                file: self.path.clone(),
                section: name.into(),
            })
    }

    /// Reads and checks the manifest, and checks the sections every image needs against
    /// it: `kernel` present, not empty, of the format and sha256 the manifest records;
    /// `initrd` present and not empty; `rootfs` and `rootfs-hashes` present exactly
    /// when the manifest says the image has a read-only root; and that it has no section
    /// this hostd does not know.
    pub fn manifest(&self) -> Result<Manifest, ImageError> {
        let bad = |section: &str, reason: String| ImageError::Section {
            file: self.path.clone(),
            section: section.into(),
            reason,
        };
        // A section this hostd does not know would be carried along unread (and, in a
        // signed image, signed): an image made for a later format, or by hand.
        if let Some(unknown) = self
            .header
            .sections
            .iter()
            .find(|s| !sections::KNOWN.contains(&s.name.as_str()))
        {
            return Err(bad(
                &unknown.name,
                format!(
                    "is not a section this hostd knows (it reads {}); was the image made \
                     by a later hostd?",
                    sections::KNOWN.join(", ")
                ),
            ));
        }
        let s = self.section(sections::MANIFEST)?;
        if s.length > crate::input::MAX_SPEC {
            return Err(bad(
                sections::MANIFEST,
                format!("{} bytes; at most {}", s.length, crate::input::MAX_SPEC),
            ));
        }
        let manifest = Manifest::from_json(&self.read_section(sections::MANIFEST)?)
            .map_err(|e| bad(sections::MANIFEST, e.to_string()))?;
        let kernel = self.section(sections::KERNEL)?;
        if kernel.length == 0 {
            return Err(bad(sections::KERNEL, "is empty".into()));
        }
        if digest_hex(&kernel.sha256) != manifest.kernel.sha256 {
            return Err(bad(
                sections::KERNEL,
                "its sha256 is not the one the manifest records".into(),
            ));
        }
        if self.section(sections::INITRD)?.length == 0 {
            return Err(bad(sections::INITRD, "is empty".into()));
        }
        match &manifest.root {
            Some(root) => {
                let r = self.section(sections::ROOTFS)?;
                self.section(sections::ROOTFS_HASHES)?;
                if r.length != root.size || digest_hex(&r.sha256) != root.sha256 {
                    return Err(bad(
                        sections::ROOTFS,
                        "its length or sha256 is not what the manifest records".into(),
                    ));
                }
            }
            None => {
                if let Some(extra) = self
                    .header
                    .sections
                    .iter()
                    .find(|s| s.name == sections::ROOTFS || s.name == sections::ROOTFS_HASHES)
                {
                    return Err(bad(
                        &extra.name,
                        "present, but the manifest has no read-only root".into(),
                    ));
                }
            }
        }
        Ok(manifest)
    }

    /// Reads a section's bytes, checking its digest again (the file may have changed
    /// since [`Image::open`]).
    pub fn read_section(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let s = self.section(name)?;
        let io = |source| ImageError::Io {
            file: self.path.clone(),
            source,
        };
        let mut f = crate::input::open_regular(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(s.offset)).map_err(io)?;
        let mut data = Vec::with_capacity(s.length as usize);
        f.take(s.length).read_to_end(&mut data).map_err(io)?;
        let got: [u8; 32] = Sha256::digest(&data).into();
        if data.len() as u64 != s.length || got != s.sha256 {
            return Err(ImageError::Section {
                file: self.path.clone(),
                section: name.into(),
                reason: "changed on disk after it was verified".into(),
            });
        }
        Ok(data)
    }
}

/// Reads from the current position `pos` up to `end`, feeding the whole-file hasher and
/// optionally a section hasher. Short files show up as UnexpectedEof. Returns whether
/// every byte read was zero (what padding must be).
fn copy_range(
    f: &mut File,
    whole: &mut Sha256,
    mut sect: Option<&mut Sha256>,
    pos: &mut u64,
    end: u64,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut all_zero = true;
    while *pos < end {
        let want = ((end - *pos) as usize).min(buf.len());
        f.read_exact(&mut buf[..want])?;
        whole.update(&buf[..want]);
        match sect.as_deref_mut() {
            Some(s) => s.update(&buf[..want]),
            None => all_zero &= buf[..want].iter().all(|b| *b == 0),
        }
        *pos += want as u64;
    }
    Ok(all_zero)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsync, rename. An existing file is only replaced by a complete new one. The file is
/// readable by all (0644, as `cp` would leave it): images, lock files and archives hold
/// no secrets, and a root-built image was unreadable to everyone else (the temporary
/// file is made 0600).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (mut tmp, _scratch) = crate::scratch::create(
        || tempfile::NamedTempFile::new_in(dir),
        |t| t.path().to_path_buf(),
    )?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    crate::scratch::commit(|| tmp.persist(path).map_err(|e| e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        write_image(&[
            ("manifest", b"{}\n"),
            ("kernel", &[7u8; 5000]),
            ("initrd", b""),
        ])
        .unwrap_or_default()
    }

    #[test]
    fn layout_is_aligned_and_round_trips() {
        let img = sample();
        assert_eq!(img.len() as u64 % BLOCK, 0);
        let h = parse_header(&img[..BLOCK as usize], img.len() as u64)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let names: Vec<_> = h.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["manifest", "kernel", "initrd"]);
        assert_eq!(h.sections[1].offset, 2 * BLOCK);
        assert_eq!(h.sections[1].length, 5000);
    }

    #[test]
    fn verified_versions_are_remembered_and_a_change_in_place_is_verified_again() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.img");
        let img = sample();
        std::fs::write(&path, &img).expect("write");
        let cache = VerifiedCache::new(&dir.path().join("verified"));
        // Just written: verified in full, nothing remembered, no stamp to load by.
        let fresh = Image::open_cached(&path, &cache).expect("opens");
        assert!(fresh.stamp.is_none());
        std::thread::sleep(crate::stamp::SETTLE + std::time::Duration::from_millis(100));
        let first = Image::open_cached(&path, &cache).expect("opens");
        let stamp = first.stamp.expect("a settled, verified version");
        assert!(cache.lookup(&stamp).is_some(), "remembered");
        let again = Image::open_cached(&path, &cache).expect("opens from the record");
        assert_eq!(
            (again.id.as_str(), again.stamp),
            (first.id.as_str(), Some(stamp))
        );
        assert_eq!(again.id, fresh.id);
        // One byte of the kernel section changed in place: a new version, hashed, refused.
        let kernel = first.section("kernel").expect("kernel").offset;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing");
        f.write_all_at(&[8], kernel).expect("flip");
        let err = Image::open_cached(&path, &cache).expect_err("a changed section");
        assert!(err.to_string().contains("kernel"), "{err}");
        // A record whose header digest does not match the file is not believed.
        std::fs::write(&path, &img).expect("write back");
        std::thread::sleep(crate::stamp::SETTLE + std::time::Duration::from_millis(100));
        let stamp = Image::open_cached(&path, &cache)
            .expect("opens")
            .stamp
            .expect("settled");
        cache.record(&stamp, &"0".repeat(64), &[0; 32]);
        let checked = Image::open_cached(&path, &cache).expect("opens");
        assert_eq!(
            checked.id, fresh.id,
            "verified in full again, not the bogus record"
        );
    }

    #[test]
    fn damaged_headers_are_rejected() {
        let img = sample();
        let len = img.len() as u64;
        let mut bad = img.clone();
        bad[0] = b'X';
        assert!(parse_header(&bad, len).is_err_and(|e| e.1.contains("magic")));
        let mut bad = img.clone();
        bad[70] ^= 1;
        assert!(parse_header(&bad, len).is_err_and(|e| e.1.contains("header digest")));
        assert!(parse_header(&img[..100], len).is_err_and(|e| e.1.contains("truncated")));
        assert!(parse_header(&img, len - 1).is_err_and(|e| e.1.contains("truncated")));
    }

    #[test]
    fn every_flipped_header_byte_is_caught() {
        let img = sample();
        for i in 0..BLOCK as usize {
            let mut bad = img.clone();
            bad[i] ^= 0x40;
            assert!(
                parse_header(&bad, img.len() as u64).is_err(),
                "flip at {i} not caught"
            );
        }
    }

    #[test]
    fn bytes_after_a_name_and_unknown_sections_are_refused() {
        // A name with bytes after its NUL, the header digest made right again.
        let mut img = sample();
        img[TABLE + "manifest".len() + 1] = b'x';
        let digest: [u8; 32] = Sha256::digest(&img[..HEADER_DIGEST]).into();
        img[HEADER_DIGEST..BLOCK as usize].copy_from_slice(&digest);
        let err = parse_header(&img[..BLOCK as usize], img.len() as u64).expect_err("refused");
        assert!(err.1.contains("after its name's NUL"), "{err:?}");
        // A section no hostd writes: the image opens (every digest is right), its
        // manifest is not read.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.img");
        let extra = write_image(&[
            ("manifest", b"{}\n"),
            ("kernel", &[7u8; 5000]),
            ("initrd", b"x"),
            ("extra", b"carried along"),
        ])
        .expect("written");
        std::fs::write(&path, extra).expect("write");
        let image = Image::open(&path).expect("digests are right");
        let err = image.manifest().expect_err("refused").to_string();
        assert!(
            err.contains("section `extra`") && err.contains("not a section this hostd knows"),
            "{err}"
        );
    }
}
