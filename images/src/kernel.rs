//! The compact `kernel` section: an ELF vmlinux without what a loader never reads.
//!
//! A stripped vmlinux is mostly padding: its PT_LOAD segments start on 2 MiB file
//! offsets and hold whole pages of zeros (the gap between `.text` and `.rodata`, zeroed
//! data). The image carries instead only the *extents* of the ELF file that matter: the
//! ELF and program headers (section headers dropped), and every 4 KiB page of a PT_LOAD
//! or PT_NOTE segment that is not all zero. Everything else of the file is zero.
//!
//! ```text
//! 0     magic "HOSTDKRN"
//! 8     encoding version (u32 LE) = 1
//! 12    extent count (u32 LE)
//! 16    length of the ELF file the extents come from (u64 LE)
//! 24    extent table, 16 bytes each: ELF file offset (u64 LE), length (u64 LE);
//!       sorted, not overlapping nor touching, none empty, the first at offset 0
//! then  the extents' bytes, in table order, back to back
//! ```
//!
//! A loader streams the section front to back ([`Unpacker`]) and writes each piece of
//! a PT_LOAD segment straight to its guest-physical address (the rest is zero in fresh
//! guest memory); the QEMU runner writes the pieces at their offsets into a sparse file,
//! which is the same ELF less its section headers. Packing is deterministic: the same
//! vmlinux gives the same bytes.

/// First bytes of a packed kernel section.
pub const MAGIC: &[u8; 8] = b"HOSTDKRN";
/// The encoding version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the extent table.
const FIXED: usize = 24;
/// Bytes per extent-table entry.
const ENTRY: usize = 16;
/// Most extents a packed kernel may have (a vmlinux has a few dozen).
pub const MAX_EXTENTS: usize = 4096;
/// Granule of zero elision: whole file pages.
const PAGE: u64 = 4096;
/// Most program headers accepted (a vmlinux has about 5).
const MAX_PHDRS: usize = 64;
/// Size of an ELF64 header and of one ELF64 program header.
const EHDR: usize = 64;
const PHDR: usize = 56;
/// Program header types.
pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;
/// ELF e_machine for x86-64.
const EM_X86_64: u16 = 62;

/// Why a kernel could not be packed, parsed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The ELF header or program headers are not what a 64-bit x86 vmlinux has.
    #[error("not a 64-bit little-endian x86-64 ELF kernel: {0}")]
    Elf(&'static str),
    /// The packed encoding is malformed.
    #[error("packed kernel section is malformed: {0}")]
    Packed(&'static str),
}

/// A loadable or note segment of the ELF: where its bytes are in the file and where
/// they go in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// PT_LOAD or PT_NOTE.
    pub kind: u32,
    /// Offset in the ELF file.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest after `filesz` is zero).
    pub memsz: u64,
    /// Guest-physical load address.
    pub paddr: u64,
}

/// What a loader needs from the ELF headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfLayout {
    /// e_entry.
    pub entry: u64,
    /// PT_LOAD and PT_NOTE segments, in header order.
    pub segments: Vec<Segment>,
    /// Where the program header table ends in the file (the headers' extent).
    pub headers_end: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
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

/// Parses the ELF header and program headers at the start of `head` (which must hold
/// them whole). Bounds are checked against `file_len`.
pub fn parse_elf(head: &[u8], file_len: u64) -> Result<ElfLayout, KernelError> {
    let e = KernelError::Elf;
    if head.len() < EHDR || &head[..4] != b"\x7fELF" {
        return Err(e("no ELF magic"));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(e("not ELFCLASS64 little-endian"));
    }
    if u16_at(head, 18) != EM_X86_64 {
        return Err(e("e_machine is not x86-64"));
    }
    let phoff = u64_at(head, 32);
    let phentsize = usize::from(u16_at(head, 54));
    let phnum = usize::from(u16_at(head, 56));
    if phentsize != PHDR {
        return Err(e("e_phentsize is not 56"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(e("no program headers, or more than 64"));
    }
    let headers_end = phoff
        .checked_add((phnum * PHDR) as u64)
        .filter(|end| *end <= head.len() as u64 && *end <= file_len)
        .ok_or(e("program headers lie outside the headers read"))?;
    if phoff < EHDR as u64 {
        return Err(e("program headers overlap the ELF header"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let p = phoff as usize + i * PHDR;
        let kind = u32_at(head, p);
        if kind != PT_LOAD && kind != PT_NOTE {
            continue;
        }
        let s = Segment {
            kind,
            offset: u64_at(head, p + 8),
            paddr: u64_at(head, p + 24),
            filesz: u64_at(head, p + 32),
            memsz: u64_at(head, p + 40),
        };
        if s.offset
            .checked_add(s.filesz)
            .is_none_or(|end| end > file_len)
        {
            return Err(e("a segment runs past the end of the file"));
        }
        if s.kind == PT_LOAD && (s.filesz > s.memsz || s.paddr.checked_add(s.memsz).is_none()) {
            return Err(e("a PT_LOAD segment's sizes or address are inconsistent"));
        }
        segments.push(s);
    }
    if !segments.iter().any(|s| s.kind == PT_LOAD) {
        return Err(e("no PT_LOAD segment"));
    }
    Ok(ElfLayout {
        entry: u64_at(head, 24),
        segments,
        headers_end,
    })
}

/// Whether a kernel section starts like a packed one.
pub fn is_packed(section_start: &[u8]) -> bool {
    section_start.starts_with(MAGIC)
}

/// Packs an ELF vmlinux (see the module doc). Deterministic.
pub fn pack(elf: &[u8]) -> Result<Vec<u8>, KernelError> {
    let layout = parse_elf(elf, elf.len() as u64)?;
    // Byte ranges to keep, as (start, end): the headers, then every non-zero page of
    // every segment's file bytes.
    let mut keep: Vec<(u64, u64)> = vec![(0, layout.headers_end)];
    for s in &layout.segments {
        let end = s.offset + s.filesz;
        let mut at = s.offset;
        while at < end {
            let page_end = ((at / PAGE) + 1) * PAGE;
            let stop = page_end.min(end);
            if elf[at as usize..stop as usize].iter().any(|b| *b != 0) {
                keep.push((at, stop));
            }
            at = stop;
        }
    }
    keep.sort_unstable();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for (start, end) in keep {
        match extents.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => extents.push((start, end)),
        }
    }
    if extents.len() > MAX_EXTENTS {
        return Err(KernelError::Packed("more than 4096 extents"));
    }
    let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
    let mut out = Vec::with_capacity(FIXED + extents.len() * ENTRY + data as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    out.extend_from_slice(&(elf.len() as u64).to_le_bytes());
    for (s, e) in &extents {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&(e - s).to_le_bytes());
    }
    // The header extent with the section headers dropped (offset, count, string index).
    let header_at = out.len();
    for (s, e) in &extents {
        out.extend_from_slice(&elf[*s as usize..*e as usize]);
    }
    out[header_at + 40..header_at + 48].fill(0); // e_shoff
    out[header_at + 60..header_at + 64].fill(0); // e_shnum, e_shstrndx
    Ok(out)
}

/// Streams a packed section back into ELF file pieces: feed it the section's bytes
/// front to back in chunks of any size; it returns each chunk's data as (ELF file
/// offset, bytes) pieces, in increasing offset order.
#[derive(Debug)]
pub struct Unpacker {
    section_len: u64,
    /// Section bytes consumed so far.
    pos: u64,
    /// The fixed part and table, until complete.
    table: Vec<u8>,
    /// Parsed once the table is complete: the extents and the ELF length.
    extents: Vec<(u64, u64)>,
    elf_len: u64,
    /// Current extent and bytes of it already given out.
    current: usize,
    done_in_current: u64,
}

impl Unpacker {
    /// For a section of `section_len` bytes.
    pub fn new(section_len: u64) -> Unpacker {
        Unpacker {
            section_len,
            pos: 0,
            table: Vec::new(),
            extents: Vec::new(),
            elf_len: 0,
            current: 0,
            done_in_current: 0,
        }
    }

    /// The length of the ELF file, once the table has been read.
    pub fn elf_len(&self) -> Option<u64> {
        (!self.extents.is_empty()).then_some(self.elf_len)
    }

    /// Where the section's next byte goes once the table has been read: its ELF file
    /// offset, and how many bytes of the current extent are left from there.
    pub fn next_run(&self) -> Option<(u64, u64)> {
        let &(offset, length) = self.extents.get(self.current)?;
        Some((offset + self.done_in_current, length - self.done_in_current))
    }

    /// Consumes `bytes`, the next part of the section; appends the ELF pieces they hold.
    pub fn push<'a>(
        &mut self,
        mut bytes: &'a [u8],
        pieces: &mut Vec<(u64, &'a [u8])>,
    ) -> Result<(), KernelError> {
        let bad = KernelError::Packed;
        if self
            .pos
            .checked_add(bytes.len() as u64)
            .is_none_or(|end| end > self.section_len)
        {
            return Err(bad("more bytes than the section's length"));
        }
        self.pos += bytes.len() as u64;
        // The fixed part first, then the table whose size it gives.
        while self.extents.is_empty() {
            let want = if self.table.len() < FIXED {
                FIXED
            } else {
                FIXED + u32_at(&self.table, 12) as usize * ENTRY
            };
            let take = (want - self.table.len()).min(bytes.len());
            self.table.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.table.len() < want {
                return Ok(());
            }
            if want == FIXED {
                self.check_fixed()?;
            } else {
                self.extents = self.parse_table()?;
            }
        }
        while !bytes.is_empty() {
            let Some(&(offset, length)) = self.extents.get(self.current) else {
                return Err(bad("data after the last extent"));
            };
            let take = ((length - self.done_in_current) as usize).min(bytes.len());
            pieces.push((offset + self.done_in_current, &bytes[..take]));
            bytes = &bytes[take..];
            self.done_in_current += take as u64;
            if self.done_in_current == length {
                self.current += 1;
                self.done_in_current = 0;
            }
        }
        Ok(())
    }

    fn check_fixed(&mut self) -> Result<(), KernelError> {
        let bad = KernelError::Packed;
        if &self.table[..8] != MAGIC {
            return Err(bad("wrong magic"));
        }
        if u32_at(&self.table, 8) != VERSION {
            return Err(bad("unknown encoding version"));
        }
        let count = u32_at(&self.table, 12) as usize;
        if count == 0 || count > MAX_EXTENTS {
            return Err(bad("extent count is 0 or above 4096"));
        }
        self.elf_len = u64_at(&self.table, 16);
        if self.elf_len > crate::input::MAX_KERNEL {
            return Err(bad("ELF length above the kernel size limit"));
        }
        Ok(())
    }

    fn parse_table(&self) -> Result<Vec<(u64, u64)>, KernelError> {
        let bad = KernelError::Packed;
        let count = u32_at(&self.table, 12) as usize;
        let mut extents = Vec::with_capacity(count);
        let mut end_of_previous: Option<u64> = None;
        let mut data = 0u64;
        for i in 0..count {
            let e = FIXED + i * ENTRY;
            let offset = u64_at(&self.table, e);
            let length = u64_at(&self.table, e + 8);
            if length == 0 {
                return Err(bad("an empty extent"));
            }
            match end_of_previous {
                None if offset != 0 => return Err(bad("the first extent is not at offset 0")),
                Some(prev) if offset <= prev => {
                    return Err(bad("extents are not sorted, or overlap or touch"))
                }
                _ => {}
            }
            let end = offset
                .checked_add(length)
                .filter(|end| *end <= self.elf_len)
                .ok_or(bad("an extent runs past the ELF length"))?;
            end_of_previous = Some(end);
            data += length;
            extents.push((offset, length));
        }
        if (FIXED + count * ENTRY) as u64 + data != self.section_len {
            return Err(bad("the extents' lengths do not add up to the section's"));
        }
        Ok(extents)
    }

    /// Checks that the whole section was consumed; returns the ELF length.
    pub fn finish(&self) -> Result<u64, KernelError> {
        if self.extents.is_empty()
            || self.current != self.extents.len()
            || self.pos != self.section_len
        {
            return Err(KernelError::Packed(
                "the section ends before its last extent",
            ));
        }
        Ok(self.elf_len)
    }
}

/// Unpacks a whole packed section into the ELF it stands for (zeros where nothing was
/// kept). For tests and tools; loaders stream with [`Unpacker`] instead.
pub fn unpack(section: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut u = Unpacker::new(section.len() as u64);
    let mut pieces = Vec::new();
    u.push(section, &mut pieces)?;
    let len = u.finish()?;
    let mut elf = vec![0u8; len as usize];
    for (at, bytes) in pieces {
        elf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small ELF: headers, one PT_LOAD of 3 pages with a zero page in the middle and
    /// a PT_NOTE inside it, 2 MiB-aligned like a vmlinux, and section headers at the end.
    pub(crate) fn sample_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x200000 + 3 * 4096 + 256];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x1000000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[40..48].copy_from_slice(&(0x200000u64 + 3 * 4096).to_le_bytes()); // e_shoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        f[60..62].copy_from_slice(&4u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, pa: u64, fs: u64, ms: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&pa.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&fs.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&ms.to_le_bytes());
        };
        ph(&mut f, 64, PT_LOAD, 0x200000, 0x1000000, 3 * 4096, 5 * 4096);
        ph(
            &mut f,
            120,
            PT_NOTE,
            0x200000 + 2 * 4096 + 16,
            0x1002010,
            24,
            24,
        );
        for (i, b) in f[0x200000..0x201000].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        f[0x202000 + 16..0x202000 + 40].fill(9);
        let len = f.len();
        f[len - 256..].fill(0xee); // section headers: not carried
        f
    }

    #[test]
    fn packs_without_padding_and_round_trips() {
        let elf = sample_elf();
        let packed = pack(&elf).expect("pack");
        assert!(is_packed(&packed));
        // Headers (176 bytes), page 0, the note's page part: no zero page, no padding.
        assert!(packed.len() < 2 * 4096 + 300, "{}", packed.len());
        assert_eq!(pack(&elf), Ok(packed.clone()), "deterministic");
        let back = unpack(&packed).expect("unpack");
        assert_eq!(back.len(), elf.len());
        let mut want = elf.clone();
        want[40..48].fill(0);
        want[60..64].fill(0);
        let len = want.len();
        want[len - 256..].fill(0);
        assert_eq!(back, want);
        assert_eq!(
            parse_elf(&back, back.len() as u64).map(|l| l.segments),
            parse_elf(&elf, elf.len() as u64).map(|l| l.segments)
        );
    }

    #[test]
    fn streaming_in_any_chunking_gives_the_same_pieces() {
        let packed = pack(&sample_elf()).expect("pack");
        let whole = unpack(&packed).expect("unpack");
        for chunk in [1, 7, 24, 25, 40, 4096, packed.len()] {
            let mut u = Unpacker::new(packed.len() as u64);
            let mut elf = vec![0u8; whole.len()];
            let mut last_end = 0;
            for c in packed.chunks(chunk) {
                let mut pieces = Vec::new();
                u.push(c, &mut pieces).expect("push");
                for (at, b) in pieces {
                    assert!(at >= last_end, "pieces in order");
                    last_end = at + b.len() as u64;
                    elf[at as usize..last_end as usize].copy_from_slice(b);
                }
            }
            assert_eq!(u.finish(), Ok(whole.len() as u64), "chunk {chunk}");
            assert_eq!(elf, whole, "chunk {chunk}");
        }
    }

    #[test]
    fn damaged_tables_are_refused() {
        let packed = pack(&sample_elf()).expect("pack");
        let run = |bytes: &[u8]| -> Result<u64, KernelError> {
            let mut u = Unpacker::new(bytes.len() as u64);
            u.push(bytes, &mut Vec::new())?;
            u.finish()
        };
        assert!(run(&packed).is_ok());
        // Truncated anywhere: refused.
        for cut in [0, 10, 24, 30, packed.len() - 1] {
            assert!(run(&packed[..cut]).is_err(), "cut at {cut}");
        }
        // Each field of the fixed part and the first two entries, flipped.
        for at in (0..FIXED + 2 * ENTRY).step_by(4) {
            let mut bad = packed.clone();
            bad[at + 3] ^= 0x80;
            assert!(run(&bad).is_err(), "flip at {at}");
        }
        assert!(parse_elf(&packed, packed.len() as u64).is_err());
    }
}
