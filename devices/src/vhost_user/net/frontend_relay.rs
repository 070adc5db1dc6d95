//! QEMU 7.2's `-netdev vhost-user` and vhost-user-backend disagree on message order.
//! QEMU (which will not start vhost-user-net without VHOST_USER_F_PROTOCOL_FEATURES)
//! sends SET_VRING_ENABLE when the guest acks its features, before SET_FEATURES, and
//! not again after it (traced here with strace); vhost-user-backend refuses
//! SET_VRING_ENABLE until SET_FEATURES acked the bit and ends the connection
//! ("inactive feature"). This relay sits between the frontend's connection and the
//! daemon's and passes frontend messages on whole, with their fds, except that
//! SET_VRING_ENABLE before the first SET_FEATURES is held back and replayed right after
//! it (when SET_FEATURES acked protocol features; otherwise the rings start enabled and
//! it is dropped, as is any later one). Messages that ask for a reply are always
//! forwarded, so the frontend is never left waiting. Replies flow back untouched.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 1 << 3;
const HDR: usize = 12;
/// vhost-user's largest message body.
const MAX_BODY: usize = 0x1000;
const MAX_FDS: usize = 32;
/// Early SET_VRING_ENABLE messages kept (two per queue pair is what QEMU sends).
const MAX_EARLY: usize = 64;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// A listening socket for the daemon and a connection to it, on an abstract unix
/// address: called inside the jail's private network namespace (before the seccomp
/// filter), where no other process can reach the address.
pub fn inner_pair(tag: &str) -> io::Result<(UnixListener, UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("hostd-{}-{tag}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let client = UnixStream::connect_addr(&addr)?;
    Ok((listener, client))
}

/// Receives up to `buf.len()` bytes and the fds that came with them.
fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, which may take any bytes; `fds` has room
    // for MAX_FDS descriptors.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let owned = fds
        .get(..nfds)
        .unwrap_or(&[])
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    Ok((n, owned))
}

/// Fills `buf` (recvmsg only: std's `Read` for sockets is recvfrom(2), which the
/// filter does not allow), adding any fds that arrive to `fds`. False on a clean
/// end of stream before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let (n, more) = recv(sock, buf.get_mut(done..).unwrap_or(&mut []))?;
        fds.extend(more);
        if n == 0 {
            if done == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(true)
}

/// Sends `data` with `fds` attached to the first byte; the rest without.
fn send(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let n = sock
        .send_with_fds(&[data], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut w = sock;
    w.write_all(data.get(n..).unwrap_or(&[]))
}

/// Copies `from` to `to`, fds included, until `from` ends.
fn copy(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; HDR + MAX_BODY];
    loop {
        let (n, fds) = recv(from, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        send(to, buf.get(..n).unwrap_or(&[]), &fds)?;
    }
}

/// Relays one frontend connection to the daemon (see the module docs) until either
/// side hangs up.
pub fn relay(frontend: UnixStream, daemon: UnixStream) -> io::Result<()> {
    let (back_from, back_to) = (daemon.try_clone()?, frontend.try_clone()?);
    let back = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let r = copy(&back_from, &back_to);
            let _ = back_to.shutdown(Shutdown::Both);
            r
        })?;
    let result = forward(&frontend, &daemon);
    let _ = daemon.shutdown(Shutdown::Both);
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = back.join();
    result
}

fn forward(frontend: &UnixStream, daemon: &UnixStream) -> io::Result<()> {
    // Whether SET_FEATURES came, and whether the last one acked
    // VHOST_USER_F_PROTOCOL_FEATURES.
    let mut features_seen = false;
    let mut protocol_acked = false;
    // SET_VRING_ENABLE messages held back until SET_FEATURES.
    let mut early: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut hdr = [0u8; HDR];
        let mut fds = Vec::new();
        if !recv_exact(frontend, &mut hdr, &mut fds)? {
            return Ok(());
        }
        let word = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(hdr.get(i..i + 4).unwrap_or(&[0; 4]));
            u32::from_le_bytes(w)
        };
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_BODY {
            return Err(io::Error::other(format!(
                "frontend message {code} of {size} bytes"
            )));
        }
        let mut body = vec![0u8; size];
        if !recv_exact(frontend, &mut body, &mut fds)? && size > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(&body);
        match code {
            SET_VRING_ENABLE if !features_seen && flags & NEED_REPLY == 0 => {
                if early.len() < MAX_EARLY {
                    early.push(msg);
                }
                continue;
            }
            SET_VRING_ENABLE if !protocol_acked && flags & NEED_REPLY == 0 => {
                tracing::debug!(
                    "vhost-user: SET_VRING_ENABLE without acked protocol features dropped"
                );
                continue;
            }
            SET_FEATURES => {
                send(daemon, &msg, &fds)?;
                features_seen = true;
                protocol_acked = <[u8; 8]>::try_from(body.as_slice())
                    .is_ok_and(|b| u64::from_le_bytes(b) & PROTOCOL_FEATURES != 0);
                for m in early.drain(..) {
                    if protocol_acked {
                        tracing::debug!("vhost-user: early SET_VRING_ENABLE replayed");
                        send(daemon, &m, &[])?;
                    }
                }
                continue;
            }
            _ => {}
        }
        send(daemon, &msg, &fds)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_F_VERSION_1;

    fn msg(code: u32, body: &[u8]) -> Vec<u8> {
        let mut m = code.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes()); // version 1
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_relay_replays_an_early_vring_enable_after_set_features() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (mut qemu, relay_front) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (relay_daemon, mut daemon) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let t = std::thread::spawn(move || relay(relay_front, relay_daemon));
        let mut enable_body = 0u32.to_le_bytes().to_vec();
        enable_body.extend_from_slice(&1u32.to_le_bytes());
        let enable = msg(18, &enable_body);
        let features = msg(2, &(VIRTIO_F_VERSION_1 | (1 << 30)).to_le_bytes());
        let get = msg(1, &[]);
        for m in [&enable, &features, &get] {
            qemu.write_all(m).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut got = vec![0u8; features.len() + enable.len() + get.len()];
        daemon
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<u8> = [features, enable, get].concat();
        assert_eq!(
            got, want,
            "SET_FEATURES, then the held-back enable, then the rest"
        );
        // Replies go back as they are.
        let reply = msg(1, &7u64.to_le_bytes());
        daemon.write_all(&reply).unwrap_or_else(|e| panic!("{e}"));
        let mut back = vec![0u8; reply.len()];
        qemu.read_exact(&mut back).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, reply);
        drop(qemu);
        assert!(t.join().is_ok_and(|r| r.is_ok()));
    }

    #[test]
    fn the_relay_drops_vring_enable_when_protocol_features_are_not_acked() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (mut qemu, relay_front) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (relay_daemon, mut daemon) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let t = std::thread::spawn(move || relay(relay_front, relay_daemon));
        let enable = msg(18, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = msg(2, &VIRTIO_F_VERSION_1.to_le_bytes());
        for m in [&enable, &features, &enable] {
            qemu.write_all(m).unwrap_or_else(|e| panic!("{e}"));
        }
        drop(qemu);
        let mut got = Vec::new();
        daemon
            .read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, features);
        assert!(t.join().is_ok_and(|r| r.is_ok()));
    }
}
