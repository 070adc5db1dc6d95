//! Console output without a VM exit per byte: KVM's coalesced port I/O.
//!
//! A guest that prints on the 8250 UART by polling its line status (Linux's console and
//! early console, the probe) costs two exits per byte: the status read and the write to
//! the transmit register. While such a write does nothing but output its byte
//! ([`Console::transmit_is_output_only`]), the transmit port is registered as a
//! coalesced zone: KVM appends each write to a ring page shared with this process and
//! lets the guest run on, one exit per byte fewer. The ring is played back onto the
//! port bus, in order, before any exit is handled (so the guest never observes the UART
//! ahead of its own writes), by the control thread every few milliseconds (a guest that
//! writes and then idles), and when the VM stops. When the guest turns the "THR empty"
//! interrupt on, opens the divisor latch or loops back, the register write that does it
//! is a normal exit: the ring is played back, the write handled, and the zone removed
//! before the guest runs on.
//!
//! [`Console::transmit_is_output_only`]: hostd_devices::serial::Console::transmit_is_output_only

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use hostd_devices::bus::Bus;
use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_zone};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

/// `KVM_REGISTER_COALESCED_MMIO`: `_IOW(KVMIO, 0x67, struct kvm_coalesced_mmio_zone)`.
pub const KVM_REGISTER_COALESCED_MMIO: u64 = 0x4010_ae67;
/// `KVM_UNREGISTER_COALESCED_MMIO`: `_IOW(KVMIO, 0x68, struct kvm_coalesced_mmio_zone)`.
pub const KVM_UNREGISTER_COALESCED_MMIO: u64 = 0x4010_ae68;

const PAGE_SIZE: usize = 4096;
/// Ring slots: the page after its two indices, as KVM sizes it.
const SLOTS: u32 = ((PAGE_SIZE - 8) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;

/// The VM's coalesced I/O ring, mapped from a vCPU file.
#[derive(Debug)]
pub struct Ring {
    page: std::ptr::NonNull<u8>,
    /// One consumer at a time: vCPU threads and the control thread all play it back.
    consumer: Mutex<()>,
}

// SAFETY: the page is shared memory whose indices are accessed atomically and whose
// entries are read only by the one consumer holding `consumer`.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps the ring of `vcpu`'s VM, if this KVM coalesces port I/O.
    pub fn map(kvm: &Kvm, vcpu: &VcpuFd) -> Option<Ring> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return None;
        }
        // KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) answers with the ring's page offset
        // in the vCPU mapping.
        let offset = kvm.check_extension_int(Cap::CoalescedMmio);
        if offset <= 0 {
            return None;
        }
        // SAFETY: maps one page of the vCPU file at the offset KVM gave; the result is
        // checked and unmapped on drop. The mapping holds its own reference to the file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t * PAGE_SIZE as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::debug!(
                "coalesced I/O ring: mmap: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Ring {
            page: std::ptr::NonNull::new(p.cast())?,
            consumer: Mutex::new(()),
        })
    }

    fn index(&self, which: usize) -> &AtomicU32 {
        let p = self
            .page
            .as_ptr()
            .cast::<AtomicU32>()
            .wrapping_add(which.min(1));
        // SAFETY: the page starts with the two u32 indices `first` and `last`, aligned,
        // and lives as long as `self`.
        unsafe { &*p }
    }

    /// Plays back every write in the ring onto `pio` (port writes) or `mmio`, in the
    /// order the guest made them.
    pub fn drain(&self, pio: &Bus, mmio: &Bus) {
        let (first, last) = (self.index(0), self.index(1));
        if first.load(Ordering::Relaxed) == last.load(Ordering::Acquire) {
            return;
        }
        let _consumer = self.consumer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let head = first.load(Ordering::Relaxed);
            // Acquire: the entry KVM filled before it moved `last` is visible.
            if head == last.load(Ordering::Acquire) {
                break;
            }
            if head >= SLOTS {
                // Only the guest's host kernel writes the page; an index out of range
                // would be a KVM bug. Reset rather than read outside the ring.
                first.store(last.load(Ordering::Acquire) % SLOTS, Ordering::Release);
                break;
            }
            let slot = self
                .page
                .as_ptr()
                .wrapping_add(8)
                .cast::<kvm_coalesced_mmio>()
                .wrapping_add(head as usize);
            // SAFETY: entries follow the 8-byte header; `head` < SLOTS keeps the read
            // inside the page. KVM does not write an entry between `first` and `last`.
            let entry: kvm_coalesced_mmio = unsafe { std::ptr::read_volatile(slot) };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: `pio` is the member of the union KVM writes for its entries.
            if unsafe { entry.__bindgen_anon_1.pio } != 0 {
                pio.write(entry.phys_addr, &entry.data[..len]);
            } else {
                mmio.write(entry.phys_addr, &entry.data[..len]);
            }
            // Release: the slot is free for KVM only after it was read.
            first.store((head + 1) % SLOTS, Ordering::Release);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this size and is not used after.
        unsafe { libc::munmap(self.page.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// Adds or removes the coalesced zone of one port (the UART's transmit register).
#[derive(Debug)]
pub struct PortZone {
    /// The VM's file, duplicated: the zone can change on a vCPU thread as long as it runs.
    vm: OwnedFd,
    port: u64,
}

impl PortZone {
    /// The zone for `port` of `vm`.
    pub fn new(vm: &VmFd, port: u64) -> std::io::Result<PortZone> {
        // SAFETY: the VM file is open for the duration of this call.
        let vm = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }.try_clone_to_owned()?;
        Ok(PortZone { vm, port })
    }

    /// Coalesces writes to the port (`true`) or makes each an exit again.
    pub fn set(&self, coalesced: bool) {
        let mut zone = kvm_coalesced_mmio_zone {
            addr: self.port,
            size: 1,
            ..Default::default()
        };
        zone.__bindgen_anon_1.pio = 1;
        let request = if coalesced {
            KVM_REGISTER_COALESCED_MMIO
        } else {
            KVM_UNREGISTER_COALESCED_MMIO
        };
        // SAFETY: a VM file and a pointer to a zone that lives across the call; KVM only
        // reads it.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), request as _, &zone) };
        if r != 0 {
            tracing::debug!(
                "coalesced port {:#x} ({coalesced}): {}",
                self.port,
                std::io::Error::last_os_error()
            );
        }
    }
}
