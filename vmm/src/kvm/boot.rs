//! Loading a kernel for PVH direct boot: the ELF's segments, the initrd, the command
//! line, the memory map and `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::payload::{Payload, PayloadError};

use crate::layout::*;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Memory-map entry types (e820).
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is not a loadable ELF.
    #[error("cannot load kernel {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The ELF has no PVH entry point.
    #[error(
        "kernel {0} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
    )]
    NoPvh(String),
    /// The initrd does not fit.
    #[error("initrd of {size} bytes does not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the VM more memory")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// Top of low memory.
        limit: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing guest memory failed.
    #[error("writing guest memory: {0}")]
    Memory(String),
    /// A payload (kernel, initrd) could not be read or is not what the image records.
    #[error(transparent)]
    Payload(PayloadError),
}

/// Where to start the boot CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// 32-bit PVH entry point (EIP).
    pub rip: u64,
    /// Physical address of `hvm_start_info` (EBX).
    pub rbx: u64,
}

/// The memory map for `mem_size` bytes of RAM: (address, size, type).
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(mem_size) {
        let start = start.max(HIGH_MEMORY_START);
        let end = if start == HIGH_MEMORY_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::Memory(format!("at {addr:#x}: {e}")))
}

/// Most bytes of PT_NOTE segments kept while loading (a vmlinux has a few hundred).
const MAX_NOTES: u64 = 64 << 10;
/// ELF note type of the PVH 32-bit entry point, owner "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The Xen ELF note naming the guest's operating system.
const XEN_ELFNOTE_GUEST_OS: u32 = 6;

/// Takes a kernel's ELF pieces in file order and writes each PT_LOAD byte straight to
/// its guest-physical address; keeps only the (small) notes.
struct ElfSink<'m> {
    mem: &'m GuestMemoryMmap,
    /// Kernel segments must lie in [HIGH_MEMORY_START, limit).
    limit: u64,
    layout: Option<hostd_images::kernel::ElfLayout>,
    notes: Vec<(hostd_images::kernel::Segment, Vec<u8>)>,
}

impl ElfSink<'_> {
    /// Where the ELF's bytes from `at` go unchanged, up to `len` of them: guest memory to
    /// read them into directly (pointer, length), when the layout is known and exactly
    /// one PT_LOAD segment holds them (else they come to [`piece`](Self::piece) read
    /// into a buffer, which checks and writes them).
    fn target(&self, at: u64, len: usize) -> Option<(*mut u8, usize)> {
        use hostd_images::kernel::PT_LOAD;
        let layout = self.layout.as_ref()?;
        let loads = layout
            .segments
            .iter()
            .filter(|s| s.kind == PT_LOAD && s.filesz > 0);
        let s = loads
            .clone()
            .find(|s| (s.offset..s.offset + s.filesz).contains(&at))?;
        let mut end = (s.offset + s.filesz).min(at.checked_add(len as u64)?);
        // Up to the next segment whose file bytes these are too (each gets its copy
        // through `piece`).
        for o in loads {
            if !std::ptr::eq(o, s) && o.offset + o.filesz > at && o.offset < end {
                if o.offset <= at {
                    return None;
                }
                end = o.offset;
            }
        }
        let n = usize::try_from(end - at).ok()?;
        let addr = GuestAddress(s.paddr.checked_add(at - s.offset)?);
        // Only where the whole range is in guest memory below `limit` (else `piece`
        // reports it).
        if addr.0.checked_add(n as u64)? > self.limit {
            return None;
        }
        let slice = self.mem.get_slice(addr, n).ok()?;
        Some((slice.ptr_guard_mut().as_ptr(), n))
    }

    /// The ELF's bytes at `at`, in file order. `placed`: read into guest memory where
    /// they belong already ([`target`](Self::target)); only the notes are taken.
    fn piece(&mut self, at: u64, bytes: &[u8], placed: bool) -> Result<(), String> {
        use hostd_images::kernel::{parse_elf, PT_LOAD, PT_NOTE};
        if self.layout.is_none() {
            if bytes.get(0x202..0x206) == Some(b"HdrS") {
                return Err(
                    "this is a bzImage; the built-in VMM boots the ELF vmlinux with a PVH note"
                        .into(),
                );
            }
            if at != 0 {
                return Err("the ELF headers are missing".into());
            }
            let layout = parse_elf(bytes, u64::MAX).map_err(|e| e.to_string())?;
            for s in &layout.segments {
                if s.kind == PT_LOAD
                    && (s.paddr < HIGH_MEMORY_START
                        || s.paddr
                            .checked_add(s.memsz)
                            .is_none_or(|end| end > self.limit))
                {
                    return Err(format!(
                        "a segment of {:#x} bytes at {:#x} does not fit guest memory between {HIGH_MEMORY_START:#x} and {:#x}; give the VM more memory",
                        s.memsz, s.paddr, self.limit
                    ));
                }
                if s.kind == PT_NOTE {
                    if s.filesz > MAX_NOTES {
                        return Err("a PT_NOTE segment is larger than 64 KiB".into());
                    }
                    self.notes.push((*s, vec![0; s.filesz as usize]));
                }
            }
            self.layout = Some(layout);
        }
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        let end = at + bytes.len() as u64;
        for s in &layout.segments {
            let (from, to) = (at.max(s.offset), end.min(s.offset + s.filesz));
            // Placed bytes are where they belong already.
            if placed || from >= to || s.kind != PT_LOAD {
                continue;
            }
            let part = &bytes[(from - at) as usize..(to - at) as usize];
            self.mem
                .write_slice(part, GuestAddress(s.paddr + (from - s.offset)))
                .map_err(|e| format!("writing guest memory at {:#x}: {e}", s.paddr))?;
        }
        for (s, buf) in &mut self.notes {
            let (from, to) = (at.max(s.offset), end.min(s.offset + s.filesz));
            if from < to {
                buf[(from - s.offset) as usize..(to - s.offset) as usize]
                    .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(())
    }

    /// Every note of the kernel's PT_NOTE segments: (name without its NUL, type,
    /// description). A note that runs past its segment ends that segment's list.
    fn each_note(&self) -> Vec<(&[u8], u32, &[u8])> {
        let mut out = Vec::new();
        for (_, n) in &self.notes {
            let mut at = 0usize;
            while at + 12 <= n.len() {
                let word = |o: usize| u32::from_le_bytes([n[o], n[o + 1], n[o + 2], n[o + 3]]);
                let (namesz, descsz, kind) =
                    (word(at) as usize, word(at + 4) as usize, word(at + 8));
                let name_at = at + 12;
                let Some(desc_at) = namesz
                    .checked_next_multiple_of(4)
                    .and_then(|n| name_at.checked_add(n))
                else {
                    break;
                };
                let Some(next) = descsz
                    .checked_next_multiple_of(4)
                    .and_then(|d| desc_at.checked_add(d))
                else {
                    break;
                };
                if next > n.len() {
                    break;
                }
                let name = &n[name_at..name_at + namesz];
                let name = name.strip_suffix(b"\0").unwrap_or(name);
                out.push((name, kind, &n[desc_at..desc_at + descsz]));
                at = next;
            }
        }
        out
    }

    /// The PVH entry point from the notes, if one is there.
    fn pvh_entry(&self) -> Option<u64> {
        self.each_note().into_iter().find_map(|(name, kind, desc)| {
            (kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen" && desc.len() >= 4)
                .then(|| u64::from(u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]])))
        })
    }

    /// Whether the kernel is Linux: it has a note named "Linux" (every vmlinux since
    /// 4.18 has its build salt there) or a Xen guest-OS note saying "linux".
    fn is_linux(&self) -> bool {
        self.each_note().into_iter().any(|(name, kind, desc)| {
            name == b"Linux"
                || (name == b"Xen"
                    && kind == XEN_ELFNOTE_GUEST_OS
                    && desc.strip_suffix(b"\0").unwrap_or(desc) == b"linux")
        })
    }
}

/// Loads `kernel` (an ELF with a PVH note, as it is or packed by the image builder)
/// straight into `mem` of `mem_size` bytes, then `initrd`, `cmdline`, the memory map
/// and the MP table for `cpus`; returns the entry state. Each payload is hashed while
/// it is read and checked before this returns; nothing of it is kept.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Payload,
    initrd: Option<&Payload>,
    cmdline: &str,
    cpus: u8,
) -> Result<Entry, BootError> {
    let loaded = load_payloads(mem, mem_size, kernel, initrd)?;
    write_tables(mem, mem_size, &loaded, cmdline, cpus)
}

/// What [`load_payloads`] put into guest memory, for [`write_tables`].
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The kernel's PVH entry point.
    entry: u64,
    /// Whether the kernel is Linux (its ELF notes say so): Linux's kernel parameters,
    /// such as the ones a nested PVM host needs, mean nothing to another kernel.
    pub linux: bool,
    /// The initrd's guest-physical address and size, if there is one.
    initrd: Option<(u64, u64)>,
}

/// The part of [`load`] that reads files: the kernel and the initrd into `mem`, each
/// hashed while it is read and checked before this returns. What the VM's devices
/// decide (the command line) comes later, in [`write_tables`], so that a VMM can load
/// while its device backends start.
pub fn load_payloads(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Payload,
    initrd: Option<&Payload>,
) -> Result<Loaded, BootError> {
    let path = kernel.name().to_string();
    // Asked where bytes go (`target`) and handed them (`piece`) by one stream.
    let sink = std::cell::RefCell::new(ElfSink {
        mem,
        limit: mem_size.min(MMIO_GAP_START),
        layout: None,
        notes: Vec::new(),
    });
    let failed = |e: &dyn std::fmt::Display| BootError::Load {
        path: path.clone(),
        message: e.to_string(),
    };
    // SAFETY: `target` names guest memory through `mem`, which outlives the call;
    // nothing else touches it before the VM runs (no vCPU yet, no backend has it).
    let elf_len = unsafe {
        kernel.stream_kernel_placed(
            |at, len| sink.borrow().target(at, len),
            |at, bytes, placed| sink.borrow_mut().piece(at, bytes, placed),
        )
    }
    .map_err(|e| match e {
        PayloadError::Sink { message, .. } => failed(&message),
        e => BootError::Payload(e),
    })?;
    let sink = sink.into_inner();
    let Some(layout) = &sink.layout else {
        return Err(failed(&"the file is empty"));
    };
    if layout
        .segments
        .iter()
        .any(|s| s.offset + s.filesz > elf_len)
    {
        return Err(failed(&"a segment runs past the end of the file"));
    }
    let Some(entry) = sink.pvh_entry() else {
        return Err(BootError::NoPvh(path));
    };
    let kernel_end = layout
        .segments
        .iter()
        .filter(|s| s.kind == hostd_images::kernel::PT_LOAD)
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(HIGH_MEMORY_START);

    // Initrd: at the top of low memory, page-aligned.
    let mut placed = None;
    if let Some(initrd) = initrd {
        let limit = mem_size.min(MMIO_GAP_START);
        let size = initrd.len();
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or(BootError::InitrdTooLarge {
                size,
                kernel_end,
                limit,
            })?;
        // Read straight into guest memory (no copy through a buffer); where that cannot
        // be had, through the buffer and written there.
        let place = |at: u64, len: usize| {
            let slice = mem.get_slice(GuestAddress(addr + at), len).ok()?;
            Some((slice.ptr_guard_mut().as_ptr(), len))
        };
        // SAFETY: `place` names guest memory through `mem`, which outlives the call;
        // nothing else touches it before the VM runs.
        unsafe {
            initrd.stream_placed(place, |at, bytes, placed| {
                if placed {
                    return Ok(());
                }
                mem.write_slice(bytes, GuestAddress(addr + at))
                    .map_err(|e| format!("writing guest memory at {:#x}: {e}", addr + at))
            })
        }
        .map_err(BootError::Payload)?;
        placed = Some((addr, size));
    }
    Ok(Loaded {
        entry,
        linux: sink.is_linux(),
        initrd: placed,
    })
}

/// The rest of [`load`], once the payloads are in: `cmdline`, the initrd's module
/// entry, the memory map, the MP table for `cpus` and the PVH start info; returns the
/// entry state.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    loaded: &Loaded,
    cmdline: &str,
    cpus: u8,
) -> Result<Entry, BootError> {
    // Command line.
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    if cmd.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmd.len() - 1,
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    put(mem, CMDLINE_START, &cmd)?;

    let mut nr_modules = 0u32;
    if let Some((addr, size)) = loaded.initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&[0; 16]); // module cmdline, reserved
        put(mem, PVH_MODLIST_START, &m)?;
        nr_modules = 1;
    }

    // Memory map.
    let map = memory_map(mem_size);
    let mut mm = Vec::with_capacity(map.len() * 24);
    for (addr, size, kind) in &map {
        mm.extend_from_slice(&addr.to_le_bytes());
        mm.extend_from_slice(&size.to_le_bytes());
        mm.extend_from_slice(&kind.to_le_bytes());
        mm.extend_from_slice(&0u32.to_le_bytes());
    }
    put(mem, PVH_MEMMAP_START, &mm)?;

    // MP table, for SMP without ACPI.
    put(
        mem,
        MPTABLE_START,
        &super::mptable::build(MPTABLE_START, cpus),
    )?;

    // hvm_start_info, version 1.
    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&nr_modules.to_le_bytes());
    si.extend_from_slice(&(if nr_modules > 0 { PVH_MODLIST_START } else { 0 }).to_le_bytes());
    si.extend_from_slice(&CMDLINE_START.to_le_bytes());
    si.extend_from_slice(&0u64.to_le_bytes()); // no ACPI RSDP
    si.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    put(mem, PVH_INFO_START, &si)?;
    Ok(Entry {
        rip: loaded.entry,
        rbx: PVH_INFO_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A small PVH kernel: one PT_LOAD of three pages at 16 MiB (the middle one zero,
    /// 2 MiB-aligned in the file like a vmlinux) whose last page holds the Xen
    /// PHYS32_ENTRY note, also described by a PT_NOTE.
    fn pvh_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x200000 + 3 * 4096];
        f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        f[16] = 2;
        f[18] = 62;
        f[32] = 64; // e_phoff
        f[54] = 56; // e_phentsize
        f[56] = 2; // e_phnum
        let ph = |f: &mut Vec<u8>, at: usize, v: [u64; 6]| {
            f[at..at + 4].copy_from_slice(&(v[0] as u32).to_le_bytes());
            for (i, x) in v[1..].iter().enumerate() {
                let o = at + [8, 16, 24, 32, 40][i];
                f[o..o + 8].copy_from_slice(&x.to_le_bytes());
            }
        };
        // kind, offset, vaddr, paddr, filesz, memsz
        ph(
            &mut f,
            64,
            [1, 0x200000, 0x1000000, 0x1000000, 3 * 4096, 4 * 4096],
        );
        ph(&mut f, 120, [4, 0x202000, 0x1002000, 0x1002000, 20, 20]);
        for (i, b) in f[0x200000..0x201000].iter_mut().enumerate() {
            *b = (i % 13) as u8 + 1;
        }
        let note = 0x202000;
        f[note..note + 4].copy_from_slice(&4u32.to_le_bytes());
        f[note + 4..note + 8].copy_from_slice(&4u32.to_le_bytes());
        f[note + 8..note + 12].copy_from_slice(&18u32.to_le_bytes());
        f[note + 12..note + 16].copy_from_slice(b"Xen\0");
        f[note + 16..note + 20].copy_from_slice(&0x1000040u32.to_le_bytes());
        f
    }

    fn payload(bytes: &[u8]) -> Payload {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(bytes).expect("write");
        Payload::from_file(f, "test kernel").expect("payload")
    }

    fn guest(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).expect("memory")
    }

    /// [`pvh_elf`] with one more note after the Xen one (its PT_NOTE grown to cover it).
    fn with_note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut f = pvh_elf();
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        note.extend_from_slice(&kind.to_le_bytes());
        note.extend_from_slice(name);
        note.resize(note.len().next_multiple_of(4), 0);
        note.extend_from_slice(desc);
        note.resize(note.len().next_multiple_of(4), 0);
        let at = 0x202000 + 20;
        f[at..at + note.len()].copy_from_slice(&note);
        let size = (20 + note.len()) as u64;
        f[120 + 32..120 + 40].copy_from_slice(&size.to_le_bytes());
        f[120 + 40..120 + 48].copy_from_slice(&size.to_le_bytes());
        f
    }

    #[test]
    fn a_kernel_is_linux_when_its_notes_say_so() {
        let linux = |elf: &[u8]| {
            load_payloads(&guest(32), 32 << 20, &payload(elf), None)
                .expect("loads")
                .linux
        };
        assert!(!linux(&pvh_elf()), "the probe-like kernel is not Linux");
        let salt = with_note(b"Linux\0", 0x100, &[0; 4]);
        assert!(linux(&salt), "a Linux build-salt note");
        let packed = hostd_images::kernel::pack(&salt).expect("pack");
        assert!(
            linux(&packed),
            "packed by the image builder, the notes stay"
        );
        assert!(linux(&with_note(b"Xen\0", 6, b"linux\0")), "Xen guest OS");
        assert!(!linux(&with_note(b"Xen\0", 6, b"freebsd\0")));
        assert!(!linux(&with_note(b"Linuxish\0", 0x100, &[0; 4])));
    }

    #[test]
    fn a_packed_kernel_loads_the_same_memory_as_the_elf_it_packs() {
        let elf = pvh_elf();
        let packed = hostd_images::kernel::pack(&elf).expect("pack");
        assert!(packed.len() < 2 * 4096 + 256, "{}", packed.len());
        let initrd = payload(b"initrd bytes");
        let (a, b) = (guest(32), guest(32));
        let ea = load(&a, 32 << 20, &payload(&elf), Some(&initrd), "x", 1).expect("elf");
        let eb = load(&b, 32 << 20, &payload(&packed), Some(&initrd), "x", 1).expect("packed");
        assert_eq!(ea, eb);
        assert_eq!(ea.rip, 0x1000040);
        let mut ma = vec![0u8; 32 << 20];
        let mut mb = vec![0u8; 32 << 20];
        a.read_slice(&mut ma, GuestAddress(0)).expect("read");
        b.read_slice(&mut mb, GuestAddress(0)).expect("read");
        assert!(ma == mb, "guest memory differs");
        // The whole segment, read straight into guest memory (its first 64 KiB chunk of
        // the ELF, the headers, through the buffer).
        assert_eq!(&ma[0x1000000..0x1003000], &elf[0x200000..0x203000]);
        // The initrd at the top of memory, page-aligned.
        let top = (32 << 20) - 4096;
        assert_eq!(&ma[top..top + 12], b"initrd bytes");
    }

    #[test]
    fn a_payload_that_changed_since_it_was_verified_is_refused() {
        let elf = pvh_elf();
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&elf).expect("write");
        let wrong = Payload::section(f.path(), 0, elf.len() as u64, [7; 32], None, "k".into())
            .expect("payload");
        let r = load(&guest(32), 32 << 20, &wrong, None, "x", 1);
        assert!(
            matches!(r, Err(BootError::Payload(PayloadError::Digest { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn a_verified_payload_is_not_hashed_again_unless_its_file_changed() {
        use std::os::unix::fs::FileExt;
        let elf = pvh_elf();
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&elf).expect("write");
        std::thread::sleep(hostd_images::stamp::SETTLE + std::time::Duration::from_millis(100));
        let stamp = hostd_images::stamp::FileStamp::settled(f.as_file())
            .expect("stat")
            .expect("settled");
        // The digest given is wrong on purpose: while the stamp holds it is not needed.
        let p = Payload::section(
            f.path(),
            0,
            elf.len() as u64,
            [7; 32],
            Some(stamp),
            "k".into(),
        )
        .expect("payload");
        load(&guest(32), 32 << 20, &p, None, "x", 1).expect("loads without hashing");
        // Rewritten (the same bytes): a new version, hashed, and the digest is wrong.
        f.as_file().write_all_at(&elf, 0).expect("rewrite");
        let p = Payload::section(
            f.path(),
            0,
            elf.len() as u64,
            [7; 32],
            Some(stamp),
            "k".into(),
        )
        .expect("payload");
        let r = load(&guest(32), 32 << 20, &p, None, "x", 1);
        assert!(
            matches!(r, Err(BootError::Payload(PayloadError::Digest { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn kernels_outside_guest_memory_or_without_pvh_are_refused() {
        let elf = pvh_elf();
        // 16 MiB of memory: the kernel at 16 MiB does not fit.
        let r = load(&guest(16), 16 << 20, &payload(&elf), None, "x", 1);
        assert!(matches!(r, Err(BootError::Load { .. })), "{r:?}");
        let mut no_note = elf.clone();
        no_note[0x202008] = 17;
        let r = load(&guest(32), 32 << 20, &payload(&no_note), None, "x", 1);
        assert!(matches!(r, Err(BootError::NoPvh(_))), "{r:?}");
        let r = load(
            &guest(32),
            32 << 20,
            &payload(b"not a kernel"),
            None,
            "x",
            1,
        );
        assert!(matches!(r, Err(BootError::Load { .. })), "{r:?}");
    }

    #[test]
    fn memory_map_matches_the_size() {
        let m = memory_map(256 << 20);
        assert_eq!(m[0], (0, MPTABLE_START, E820_RAM));
        assert_eq!(
            m.last().copied(),
            Some((HIGH_MEMORY_START, (256 << 20) - HIGH_MEMORY_START, E820_RAM))
        );
        let m = memory_map(4 << 30);
        assert_eq!(m.last().copied(), Some((MMIO_GAP_END, 1 << 30, E820_RAM)));
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIGH_MEMORY_START - MPTABLE_START));
    }
}
