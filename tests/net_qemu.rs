//! Networking through hostd's own net backend (a jailed process on a TAP device), under
//! QEMU and under hostd's own VMM: the web example answers a real HTTP client on the
//! host side. Everything runs in a network namespace the test creates and deletes.

mod common;

use common::netns::{require_ip_and_curl, tool, Netns};
use common::{
    hostd, is_root, kvm_usable, require, require_qemu_guest, run_with_deadline, spawn_running,
};
use std::time::{Duration, Instant};

#[test]
fn web_example_answers_curl_over_a_tap() {
    web_example_answers_curl("qemu");
}

/// The same through hostd's own monitor (on a nested PVM host: with its PVM support,
/// docs/pvm.md).
#[test]
fn web_example_answers_curl_over_a_tap_with_the_built_in_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    web_example_answers_curl("kvm");
}

fn web_example_answers_curl(vmm: &str) {
    if !require_qemu_guest()
        || !require(
            "root (network namespaces, TAP)",
            is_root(),
            "run the tests as root",
        )
        || !require_ip_and_curl()
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("web.img");
    let mut build = hostd();
    build
        .arg("build")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/web.toml"
        ))
        .arg("-o")
        .arg(&image);
    let out = run_with_deadline(build, Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.all());

    let tap = "hostdtap0";
    let ns = Netns::new(tap, vmm);
    let mut cmd = ns.exec();
    cmd.arg(common::hostd_exe())
        .args([
            "run",
            "--vmm",
            vmm,
            "--timeout",
            "400",
            "--net",
            &format!("tap={tap},ip=10.0.2.2/24,gw=10.0.2.1"),
        ])
        .arg(&image);
    let run = spawn_running(cmd);
    let started = run.wait_for("service httpd started", Duration::from_secs(400));
    let answer = if started {
        ns.curl_until("http://10.0.2.2/", "hostd web ok")
    } else {
        String::new()
    };
    // A clean shutdown, as Ctrl-C would do it (ip netns exec execs hostd: same pid).
    run.signal(libc::SIGINT);
    let out = run.finish(Duration::from_secs(60));
    let status = out.status;
    let console = format!("{}\n--- host ---\n{}", out.stdout, out.stderr);
    assert!(started, "httpd never started:\n{console}");
    assert_eq!(answer.trim(), "hostd web ok", "console:\n{console}");
    assert!(console.contains("network: eth0 10.0.2.2/24"), "{console}");
    assert_eq!(status.code(), Some(0), "{console}");
}

#[test]
fn a_missing_tap_is_a_clear_error() {
    if !require_qemu_guest() || !require("root", is_root(), "run the tests as root") {
        return;
    }
    let mut cmd = hostd();
    cmd.args([
        "run",
        "--vmm",
        "qemu",
        "--timeout",
        "60",
        "--net",
        "tap=hostdnotap9",
    ])
    .arg("--kernel")
    .arg(common::kernel());
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert_ne!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stderr.contains("hostdnotap9") && out.stderr.contains("ip tuntap add"),
        "{}",
        out.all()
    );
}

/// The guest's side of [`a_large_transfer_is_intact_both_ways_with_offloads`]: receives
/// on port 5001 and prints the sha256 of what came, then sends random bytes of its own
/// to the host's port 5002 and prints their sha256; prints the virtio features the
/// driver acked and its TCP counters (checksum errors) at the end.
const XFER_SPEC: &str = r#"
name = "xfer"
packages = ["busybox-static"]
memory = "256M"

[[files]]
path = "/bin/sh"
symlink = "busybox"

[services.xfer]
command = "/bin/busybox"
args = ["sh", "-c", """
echo listening
echo "rx-sha256 $(busybox nc -l -p 5001 | busybox sha256sum)"
busybox head -c 8388608 /dev/urandom > /tmp/out
echo "tx-sha256 $(busybox sha256sum < /tmp/out)"
busybox nc 10.0.2.1 5002 < /tmp/out
echo "features $(busybox cat /sys/class/net/eth0/device/features)"
busybox grep 'eth0:' /proc/net/dev | busybox sed 's/^ */eth0-counters /'
busybox grep '^Tcp:' /proc/net/snmp | busybox tail -1 | busybox sed 's/^/tcp-counters /'
echo done
"""]
main = true
"#;

/// 8 MiB each way, as the offloads make it travel: large TSO segments and partial
/// checksums from the guest, GSO frames over mergeable buffers to it.
const XFER_BYTES: usize = 8 << 20;

/// Runs `f` on a thread that joined the network namespace at `/run/netns/NAME` (the
/// sockets it makes stay there; the test's own threads stay where they are).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network
        // namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value after `key` on the console line that has it.
fn console_value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
}

/// The receive errors, drops and frame errors of an `eth0:` line of /proc/net/dev
/// (bytes packets errs drop fifo frame ...).
fn rx_errors(values: &str) -> Option<[u64; 3]> {
    let v: Vec<u64> = values
        .split_whitespace()
        .filter(|w| *w != "eth0:")
        .take(6)
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    Some([*v.get(2)?, *v.get(3)?, *v.get(5)?])
}

/// TCP's InCsumErrors from a `Tcp:` value line of /proc/net/snmp.
fn in_csum_errors(values: &str) -> Option<u64> {
    // Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails
    // EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
    values
        .split_whitespace()
        .filter(|w| *w != "Tcp:")
        .nth(14)
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_large_transfer_is_intact_both_ways_with_offloads() {
    use std::io::{Read, Write};
    if !require_qemu_guest()
        || !require(
            "root (network namespaces, TAP)",
            is_root(),
            "run the tests as root",
        )
        || !require("ip", tool("ip"), "apt-get install iproute2")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("xfer.toml"), XFER_SPEC).expect("spec");
    let image = dir.path().join("xfer.img");
    let mut build = hostd();
    build
        .arg("build")
        .arg(dir.path().join("xfer.toml"))
        .arg("-o")
        .arg(&image);
    let out = run_with_deadline(build, Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.all());

    let tap = "hostdxfer0";
    let ns = Netns::new(tap, "xfer");
    let ns_name = ns.name().to_string();
    let listener = in_netns(&ns_name, || {
        std::net::TcpListener::bind("10.0.2.1:5002").expect("bind 10.0.2.1:5002")
    });
    let snmp_before = ns.exec().args(["cat", "/proc/net/snmp"]).output();
    let mut cmd = ns.exec();
    cmd.arg(common::hostd_exe())
        .args([
            "run",
            "--vmm",
            "qemu",
            "--timeout",
            "400",
            "--net",
            &format!("tap={tap},ip=10.0.2.2/24,gw=10.0.2.1"),
        ])
        .arg(&image);
    let run = spawn_running(cmd);
    let listening = run.wait_for("listening", Duration::from_secs(300));

    // Host -> guest: random bytes (a fixed xorshift stream: incompressible, no
    // dependency), sent once the guest's nc accepts.
    let mut sent = vec![0u8; XFER_BYTES];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in sent.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sent_sha = sha256_hex(&sent);
    let sender = listening.then(|| {
        let data = sent.clone();
        std::thread::spawn(move || {
            let stream = in_netns(&ns_name, || {
                let end = Instant::now() + Duration::from_secs(60);
                loop {
                    match std::net::TcpStream::connect("10.0.2.2:5001") {
                        Ok(s) => return Some(s),
                        Err(_) if Instant::now() < end => {
                            std::thread::sleep(Duration::from_millis(200))
                        }
                        Err(_) => return None,
                    }
                }
            });
            let mut s = stream?;
            s.write_all(&data).ok()?;
            s.shutdown(std::net::Shutdown::Write).ok()?;
            Some(())
        })
    });
    let sent_ok = sender.and_then(|t| t.join().ok().flatten()).is_some();

    // Guest -> host: exactly XFER_BYTES, then the host closes.
    let mut received = Vec::with_capacity(XFER_BYTES);
    if sent_ok {
        listener.set_nonblocking(false).expect("blocking listener");
        let accepted = std::thread::spawn(move || {
            let (s, _) = listener.accept().ok()?;
            s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
            let mut got = Vec::with_capacity(XFER_BYTES);
            s.take(XFER_BYTES as u64).read_to_end(&mut got).ok()?;
            Some(got)
        });
        received = accepted.join().ok().flatten().unwrap_or_default();
    }
    let snmp_after = ns.exec().args(["cat", "/proc/net/snmp"]).output();
    let out = run.finish(Duration::from_secs(300));
    let console = format!("{}\n--- host ---\n{}", out.stdout, out.stderr);
    assert!(listening, "the guest never listened:\n{console}");
    assert!(sent_ok, "sending to the guest failed:\n{console}");
    assert_eq!(
        console_value(&out.stdout, "rx-sha256 ").map(|v| v.trim_end_matches(" -").trim()),
        Some(sent_sha.as_str()),
        "host -> guest bytes differ:\n{console}"
    );
    assert_eq!(received.len(), XFER_BYTES, "guest -> host:\n{console}");
    assert_eq!(
        console_value(&out.stdout, "tx-sha256 ").map(|v| v.trim_end_matches(" -").trim()),
        Some(sha256_hex(&received).as_str()),
        "guest -> host bytes differ:\n{console}"
    );
    // The driver acked the offloads: CSUM (0), GUEST_CSUM (1), GUEST_TSO4/6 (7, 8),
    // HOST_TSO4/6 (11, 12), MRG_RXBUF (15); the sysfs string has one digit per bit.
    let features = console_value(&out.stdout, "features ").unwrap_or_default();
    for bit in [0, 1, 7, 8, 11, 12, 15] {
        assert_eq!(
            features.as_bytes().get(bit),
            Some(&b'1'),
            "feature bit {bit} not acked ({features}):\n{console}"
        );
    }
    // Every frame the driver took was whole: a merged frame whose buffers it did not
    // find together on the used ring counts as a length (frame) error and a drop.
    assert_eq!(
        console_value(&out.stdout, "eth0-counters ").and_then(rx_errors),
        Some([0, 0, 0]),
        "guest rx errors, drops, frame errors:\n{console}"
    );
    // Checksums right both ways: neither TCP stack counted a checksum error.
    let guest_errors = console_value(&out.stdout, "tcp-counters ").and_then(in_csum_errors);
    assert_eq!(
        guest_errors,
        Some(0),
        "guest TCP checksum errors:\n{console}"
    );
    let host_errors = |o: std::io::Result<std::process::Output>| {
        let text = String::from_utf8_lossy(&o.expect("cat /proc/net/snmp").stdout).into_owned();
        text.lines()
            .filter(|l| l.starts_with("Tcp:"))
            .nth(1)
            .and_then(in_csum_errors)
    };
    assert_eq!(
        host_errors(snmp_before),
        host_errors(snmp_after),
        "host TCP checksum errors during the transfer"
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
}
