//! The snapshot point (docs/snapshots.md): guest init tells the VMM it may snapshot
//! the VM now, before volumes, secrets and services, and learns whether this VM booted
//! or was restored from such a snapshot. A restored guest takes the host's clock and
//! fresh entropy from the VMM, so that no two guests restored from one snapshot share
//! their random state or a stale time.

use hostd_images::abi::{self, snapshot};

use crate::console::log;
use crate::sys;

/// RNDADDENTROPY: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Offers the snapshot point; after a restore, sets the clock and reseeds the kernel's
/// random number generator. Returns whether this VM was restored.
pub fn snapshot_point() -> bool {
    // The snapshot port and the resume information after it, in one grant.
    let span = abi::RESUME_INFO_PORT - abi::SNAPSHOT_PORT + 4;
    let Ok(ports) = sys::Ports::grant(abi::SNAPSHOT_PORT, span) else {
        return false;
    };
    ports.outb(abi::SNAPSHOT_PORT, snapshot::TAKE);
    // The VMM has taken its snapshot (or declined) by the time `out` returns.
    if ports.inb(abi::SNAPSHOT_PORT) != snapshot::RESTORED {
        return false;
    }
    let mut info = [0u8; snapshot::RESUME_INFO_LEN];
    for chunk in info.chunks_mut(4) {
        let word = ports.inl(abi::RESUME_INFO_PORT).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    drop(ports);
    let (clock, entropy) = info.split_at(16);
    let secs = u64::from_le_bytes(clock[..8].try_into().unwrap_or_default());
    let nanos = u32::from_le_bytes(clock[8..12].try_into().unwrap_or_default());
    let clock_note = match set_clock(secs, nanos) {
        Ok(()) => "clock set".to_string(),
        Err(e) => format!("cannot set the clock: {e}"),
    };
    let entropy_note = match reseed(entropy) {
        Ok(()) => "random number generator reseeded".to_string(),
        Err(e) => format!("cannot reseed the random number generator: {e}"),
    };
    log(&format!(
        "restored from a snapshot; {clock_note}, {entropy_note}"
    ));
    true
}

fn set_clock(secs: u64, nanos: u32) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: libc::c_long::from(nanos.min(999_999_999)),
    };
    // SAFETY: a valid timespec; clock_settime reads it only.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Credits `entropy` to the kernel's pool and makes the CRNG reseed from it at once.
fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req = Vec::with_capacity(8 + entropy.len());
    req.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    req.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    req.extend_from_slice(entropy);
    // SAFETY: `req` holds a rand_pool_info whose buffer has exactly buf_size bytes.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, req.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
