//! The TAP device: opened before the jail with a virtio-net header in front of every
//! frame (`IFF_VNET_HDR`), then only read, written and told, when the driver acks its
//! features, the header size and the offloads it may deliver (two ioctls, the only ones
//! the net backend's seccomp filter allows).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::frames::NET_HDR_LEN;
use crate::jail;

/// Linux's IFNAMSIZ, including the terminating NUL.
const IFNAMSIZ: usize = 16;
/// TUNSETIFF = _IOW('T', 202, int).
const TUNSETIFF: u64 = 0x4004_54ca;
/// TUNSETOFFLOAD = _IOW('T', 208, unsigned int): which offloads the TAP may hand us.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// TUNSETVNETHDRSZ = _IOW('T', 216, int): the size of the header before each frame.
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
/// IFF_VNET_HDR: frames carry a `virtio_net_hdr` both ways.
const IFF_VNET_HDR: libc::c_int = 0x4000;

/// TUN_F_CSUM: the TAP may hand us frames whose checksum is still to be done.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUN_F_TSO4: ... TCP/IPv4 segments larger than the MTU.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUN_F_TSO6: ... TCP/IPv6 segments larger than the MTU.
pub const TUN_F_TSO6: u32 = 0x04;
/// TUN_F_TSO_ECN: ... with the ECN bit (CWR) to be set on the segments.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// The syscalls virtio-net needs beyond every backend's: ioctl, for
/// [`TUNSETOFFLOAD`] and [`TUNSETVNETHDRSZ`] only (see [`net_filter`]). read(2) and
/// write(2) on the TAP fd are in the common list, and epoll_ctl (registering the TAP)
/// in [`super::super::BACKEND_SYSCALLS`]; the TAP is opened before the filter.
pub const NET_SYSCALLS: &[i64] = &[];

/// The ioctl requests the net backend makes after the jail.
pub const NET_IOCTLS: &[u64] = &[TUNSETOFFLOAD, TUNSETVNETHDRSZ];

/// The net backend's filter: every backend's syscalls ([`super::super::backend_filter`])
/// plus ioctl with [`NET_IOCTLS`] only.
pub fn net_filter() -> Result<seccompiler::BpfProgram, jail::JailError> {
    let mut syscalls = jail::seccomp::COMMON_SYSCALLS.to_vec();
    syscalls.extend_from_slice(super::super::BACKEND_SYSCALLS);
    syscalls.extend_from_slice(NET_SYSCALLS);
    jail::seccomp::filter(&syscalls, NET_IOCTLS)
}

/// What went wrong setting up the net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface of that name.
    #[error(
        "TAP device {0:?} does not exist: create it first, e.g. `ip tuntap add {0} mode tap && ip link set {0} up`"
    )]
    NoSuchTap(String),
    /// A name the kernel cannot take.
    #[error("invalid TAP device name {0:?}: 1 to 15 characters, no '/', no NUL")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are we root?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to TAP device {name:?} (is it a TAP device, created with `ip tuntap add {name} mode tap`, and not in use by another process?)")]
    Attach {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ or TUNSETOFFLOAD failed on a freshly opened TAP.
    #[error("cannot set up the virtio-net header of TAP device {name:?}")]
    Header {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A MAC address that does not parse.
    #[error("invalid MAC address {0:?}: expected six hex bytes such as 52:54:00:12:34:56")]
    BadMac(String),
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Opens the existing TAP interface `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
/// non-blocking and close-on-exec, with a [`NET_HDR_LEN`]-byte header and no offloads
/// until a driver acks some ([`set_offloads`]). A missing interface is an error naming
/// it: attaching to a name that does not exist would otherwise create a fresh,
/// unconfigured TAP.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('/') || name.contains('\0') {
        return Err(NetError::BadName(name.to_string()));
    }
    let cname = std::ffi::CString::new(name).map_err(|_| NetError::BadName(name.to_string()))?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(NetError::NoSuchTap(name.to_string()));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    // struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member we use
    // is `short ifr_flags`; 40 bytes in all on x86_64.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | IFF_VNET_HDR) as i16;
    ifr[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) a struct ifreq; `ifr` is a properly
    // sized, writable buffer that outlives the call, and the fd is ours.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(NetError::Attach {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    let header = |source| NetError::Header {
        name: name.to_string(),
        source,
    };
    set_vnet_hdr_len(&tun, NET_HDR_LEN).map_err(header)?;
    set_offloads(&tun, 0).map_err(header)?;
    Ok(tun)
}

/// TUNSETVNETHDRSZ: the TAP puts (and expects) a `len`-byte header before each frame.
pub fn set_vnet_hdr_len(tap: &File, len: usize) -> io::Result<()> {
    let len = libc::c_int::try_from(len).map_err(io::Error::other)?;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live
    // local; the fd is ours.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            TUNSETVNETHDRSZ as _,
            &len as *const libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TUNSETOFFLOAD: which `TUN_F_*` offloads the TAP may hand us (checksums left to do,
/// segments larger than the MTU). Zero: every frame arrives whole and checksummed.
pub fn set_offloads(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            TUNSETOFFLOAD as _,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:ab").ok(),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0xab])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_tap_is_named_with_how_to_create_it() {
        let e = open_tap("hostdnope0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("\"hostdnope0\" does not exist")
                && e.contains("ip tuntap add hostdnope0 mode tap"),
            "{e}"
        );
        assert!(matches!(open_tap("a/b"), Err(NetError::BadName(_))));
        assert!(matches!(
            open_tap("0123456789abcdef"),
            Err(NetError::BadName(_))
        ));
    }

    #[test]
    fn the_ioctl_numbers_are_linuxs() {
        // _IOW('T', nr, int): direction write (1 << 30), size 4 (<< 16), type 'T' (<< 8).
        let iow = |nr: u64| (1 << 30) | (4 << 16) | (u64::from(b'T') << 8) | nr;
        assert_eq!(TUNSETIFF, iow(202));
        assert_eq!(TUNSETOFFLOAD, iow(208));
        assert_eq!(TUNSETVNETHDRSZ, iow(216));
    }
}
