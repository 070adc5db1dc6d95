//! Loading a kernel for PVH direct boot: the ELF's segments, the initrd, the command
//! line, the memory map and `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// Loads `kernel` (ELF with a PVH note), `initrd` and `cmdline` into `mem` of
/// `mem_size` bytes, writes the MP table for `cpus`, and returns the entry state.
pub fn load_file(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    file: &mut File,
    name: &str,
    initrd: Option<&[u8]>,
    cmdline: &str,
    cpus: u8,
) -> Result<Entry, BootError> {
    let path = name.to_string();
    let loaded =
        Elf::load(mem, None, file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|e| {
            let mut head = [0u8; 0x206];
            let is_bzimage = file.seek(SeekFrom::Start(0)).is_ok()
                && file.read_exact(&mut head).is_ok()
                && &head[0x202..0x206] == b"HdrS";
            let hint = if is_bzimage {
                " (this is a bzImage; the built-in VMM boots the ELF vmlinux with a PVH note)"
                    .to_string()
            } else {
                String::new()
            };
            BootError::Load {
                path: path.clone(),
                message: format!("{e}{hint}"),
            }
        })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvh(path));
    };

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

    // Initrd: at the top of low memory, page-aligned.
    let mut nr_modules = 0u32;
    if let Some(initrd) = initrd {
        let limit = mem_size.min(MMIO_GAP_START);
        let size = initrd.len() as u64;
        let kernel_end = loaded.kernel_end;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or(BootError::InitrdTooLarge {
                size,
                kernel_end,
                limit,
            })?;
        put(mem, addr, initrd)?;
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
        rip: entry.0,
        rbx: PVH_INFO_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
