//! Block throughput inside a guest under QEMU (TCG on hosts whose KVM cannot carry
//! Linux): hostd's own jailed vhost-user block backend vs QEMU's built-in virtio-blk,
//! side by side in one run, same kernel, same guest, same volume file.
//!
//! The guest writes 64 MiB to its volume with `dd … conv=fsync`, drops its page cache
//! and reads the file back, timing each with busybox `time`. Medians of RUNS boots.
//!
//! TCP: the guest listens (busybox nc) on a TAP device in a network namespace the bench
//! creates; the host side sends 64 MiB (bash /dev/tcp) and times it (host -> guest);
//! then the guest sends 64 MiB (busybox nc) to a listener of the bench's in the
//! namespace, which times it from accept to the last byte (guest -> host). hostd's
//! jailed vhost-user net backend vs QEMU's built-in virtio-net (with its own vnet-header
//! TAP offloads) on the same TAP. Needs root.
//!
//! `cargo bench --bench devices_qemu` — prints a table and writes
//! target/bench/devices_qemu.json. `DEVICES_QEMU_ONLY=block` or `=tcp` runs one half.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

use std::path::Path;
use std::process::{Command, Stdio};

use hostd_images::format::{sections, Image};
use hostd_vmm::{BootSpec, BASE_CMDLINE};

const RUNS: usize = 5;

const SPEC: &str = r#"
name = "blkbench"
packages = ["busybox-static"]
memory = "256M"

[[volumes]]
name = "bench"
size = "256M"
mount = "/data"

[services.bench]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox time -f \"write-seconds %e\" /bin/busybox dd if=/dev/zero of=/data/f bs=1M count=64 conv=fsync 2>&1; sync; echo 3 > /proc/sys/vm/drop_caches; /bin/busybox time -f \"read-seconds %e\" /bin/busybox dd if=/data/f of=/dev/null bs=1M 2>&1; rm /data/f; sync"]
main = true
"#;

/// (write MB/s, read MB/s) of the 64 MiB from the guest's `write-seconds S` and
/// `read-seconds S` lines (busybox `time -f %e`).
fn parse(console: &str) -> Option<(f64, f64)> {
    let secs = |key: &str| -> Option<f64> {
        console
            .lines()
            .find_map(|l| l.split(key).nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
    };
    Some((
        64.0 / secs("write-seconds ")?,
        64.0 / secs("read-seconds ")?,
    ))
}

const TCP_SPEC: &str = r#"
name = "tcpbench"
packages = ["busybox-static"]
memory = "256M"

[services.sink]
command = "/bin/busybox"
args = ["sh", "-c", "echo listening; /bin/busybox nc -l -p 5001 > /dev/null; echo received; /bin/busybox head -c 67108864 /dev/zero | /bin/busybox nc 10.0.2.1 5002; echo sent"]
main = true
"#;

const NS: &str = "hostdbench";
const TAP: &str = "hbtap0";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A TCP listener on `addr` inside network namespace `ns` (made on a thread that joins
/// it; the socket stays there).
fn listen_in(ns: &str, addr: &str) -> Option<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).ok()?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network
        // namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        std::net::TcpListener::bind(&addr).ok()
    })
    .join()
    .ok()
    .flatten()
}

const TCP_BYTES: u64 = 64 << 20;

/// Accepts the guest's connection on `listener` (waiting while `child` runs) and reads
/// [`TCP_BYTES`] from it; MB/s from accept to the last byte.
fn receive(listener: &std::net::TcpListener, child: &mut std::process::Child) -> Option<f64> {
    use std::io::Read;
    listener.set_nonblocking(true).ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline || child.try_wait().ok()?.is_some() {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    };
    let start = std::time::Instant::now();
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut s = stream.take(TCP_BYTES);
    while got < TCP_BYTES {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n as u64,
        }
    }
    Some(64.0 / start.elapsed().as_secs_f64())
}

/// Starts `cmd` (a guest that listens on 10.0.2.2:5001, then sends to 10.0.2.1:5002),
/// sends 64 MiB from the namespace once it listens, receives its 64 MiB on `listener`,
/// and returns MB/s (host -> guest as seen by the sender, guest -> host as seen by the
/// receiver).
fn tcp_run(mut cmd: Command, listener: &std::net::TcpListener) -> Option<(f64, f64)> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::piped())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut lines = BufReader::new(out).lines().map_while(Result::ok);
    let ready = lines.any(|l| l.contains("[sink] listening"));
    let h2g = ready
        .then(|| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let start = std::time::Instant::now();
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    NS,
                    "bash",
                    "-c",
                    "head -c 67108864 /dev/zero > /dev/tcp/10.0.2.2/5001",
                ])
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| 64.0 / start.elapsed().as_secs_f64())
        })
        .flatten();
    let g2h = h2g.and_then(|_| receive(listener, &mut child));
    for _ in lines {}
    let _ = child.wait();
    Some((h2g?, g2h?))
}

use hostd_bench::median;

fn run_hostd(image: &Path, state: &Path) -> Option<(f64, f64)> {
    let out = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args([
            "run",
            "--vmm",
            "qemu",
            "--accel",
            "tcg",
            "--timeout",
            "600",
            "--state-dir",
        ])
        .arg(state)
        .arg(image)
        .env("HOSTD_LOG", "warn")
        .output()
        .ok()?;
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn run_builtin(kernel: &Path, initrd: &Path, volume: &Path) -> Option<(f64, f64)> {
    let boot = BootSpec {
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: BASE_CMDLINE.to_string(),
        vcpus: 1,
        memory_mib: 256,
        devices: vec![],
        sandbox_devices: true,
    };
    let devices = vec![
        "-drive".to_string(),
        format!(
            "file={},format=raw,if=none,id=vol0,cache=writeback",
            volume.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=vol0,serial=vol0".into(),
        "-device".into(),
        "virtio-rng-device".into(),
    ];
    let args = hostd_vmm::qemu::command_line(&boot, "tcg", &devices);
    // command_line adds memory-backend=mem when devices are given; built-ins need no
    // shared memory, so drop it.
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.replace(",memory-backend=mem", ""))
        .collect();
    let out = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::piped())
        .output()
        .ok()?;
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bench.toml"), SPEC).expect("spec");
    let image = dir.path().join("bench.img");
    let st = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(dir.path().join("bench.toml"))
        .arg("-o")
        .arg(&image)
        .status()
        .expect("hostd build");
    assert!(
        st.success(),
        "hostd build failed (kernel built? run .ci/setup)"
    );
    let img = Image::open(&image).expect("image");
    let kernel = dir.path().join("kernel");
    let initrd = dir.path().join("initrd");
    std::fs::write(&kernel, img.read_section(sections::KERNEL).expect("kernel")).expect("write");
    std::fs::write(&initrd, img.read_section(sections::INITRD).expect("initrd")).expect("write");
    let state_hostd = dir.path().join("state-hostd");
    let state_builtin = dir.path().join("state-builtin");
    let volume = hostd_vmm::volumes::ensure(&state_builtin, "bench", 256).expect("volume");

    let only = std::env::var("DEVICES_QEMU_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    if only != "tcp" {
        println!(
        "devices_qemu: guest dd of 64 MiB to/from a volume, {RUNS} boots each, medians (QEMU TCG)"
    );
        println!(
            "{:<36} {:>12} {:>12}",
            "block device", "write MB/s", "read MB/s"
        );
        for (name, samples) in [
            (
                "hostd vhost-user backend (jailed)",
                (0..RUNS)
                    .filter_map(|_| run_hostd(&image, &state_hostd))
                    .collect::<Vec<_>>(),
            ),
            (
                "QEMU built-in virtio-blk",
                (0..RUNS)
                    .filter_map(|_| run_builtin(&kernel, &initrd, &volume))
                    .collect::<Vec<_>>(),
            ),
        ] {
            if samples.is_empty() {
                println!("{name:<36} failed");
                continue;
            }
            let w = median(samples.iter().map(|s| s.0).collect());
            let r = median(samples.iter().map(|s| s.1).collect());
            println!("{name:<36} {w:>12.1} {r:>12.1}");
            rows.push((name, w, r, samples.len()));
        }
        if rows.len() == 2 {
            println!(
                "ratio hostd/QEMU: write {:.2}, read {:.2}",
                rows[0].1 / rows[1].1,
                rows[0].2 / rows[1].2
            );
        }
    }

    // TCP through a TAP in a namespace of our own.
    let mut tcp_rows = Vec::new();
    let mut tcp_ratio: Option<(f64, f64)> = None;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let _ = ip(&["netns", "del", NS]);
    if only == "block" {
        println!("TCP: skipped (DEVICES_QEMU_ONLY=block)");
    } else if root
        && ip(&["netns", "add", NS])
        && ip(&["netns", "exec", NS, "ip", "link", "set", "lo", "up"])
        && ip(&[
            "netns", "exec", NS, "ip", "tuntap", "add", TAP, "mode", "tap",
        ])
        && ip(&[
            "netns",
            "exec",
            NS,
            "ip",
            "addr",
            "add",
            "10.0.2.1/24",
            "dev",
            TAP,
        ])
        && ip(&["netns", "exec", NS, "ip", "link", "set", TAP, "up"])
    {
        std::fs::write(dir.path().join("tcp.toml"), TCP_SPEC).expect("spec");
        let tcp_image = dir.path().join("tcp.img");
        let built = Command::new(env!("CARGO_BIN_EXE_hostd"))
            .arg("build")
            .arg(dir.path().join("tcp.toml"))
            .arg("-o")
            .arg(&tcp_image)
            .status()
            .is_ok_and(|s| s.success());
        let listener = listen_in(NS, "10.0.2.1:5002");
        if let (Some(img), Some(listener)) =
            (Image::open(&tcp_image).ok().filter(|_| built), listener)
        {
            let initrd2 = dir.path().join("initrd-tcp");
            std::fs::write(
                &initrd2,
                img.read_section(sections::INITRD).expect("initrd"),
            )
            .expect("write");
            let hostd_cmd = || {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    NS,
                    env!("CARGO_BIN_EXE_hostd"),
                    "run",
                    "--vmm",
                    "qemu",
                    "--accel",
                    "tcg",
                ])
                .args([
                    "--timeout",
                    "300",
                    "--net",
                    &format!("tap={TAP},ip=10.0.2.2/24"),
                ])
                .arg(&tcp_image)
                .env("HOSTD_LOG", "warn");
                c
            };
            let builtin_cmd = || {
                let boot = BootSpec {
                    kernel: kernel.clone(),
                    initrd: Some(initrd2.clone()),
                    cmdline: format!("{BASE_CMDLINE} hostd.ip=10.0.2.2/24"),
                    vcpus: 1,
                    memory_mib: 256,
                    devices: vec![],
                    sandbox_devices: true,
                };
                let devices = vec![
                    "-netdev".to_string(),
                    format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
                    "-device".into(),
                    "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56".into(),
                    "-device".into(),
                    "virtio-rng-device".into(),
                ];
                let args: Vec<String> = hostd_vmm::qemu::command_line(&boot, "tcg", &devices)
                    .into_iter()
                    .map(|a| a.replace(",memory-backend=mem", ""))
                    .collect();
                let mut c = Command::new("ip");
                c.args(["netns", "exec", NS, "qemu-system-x86_64"])
                    .args(args);
                c
            };
            println!(
                "{:<36} {:>12} {:>12}",
                "network device (TCP MB/s)", "host->guest", "guest->host"
            );
            for (name, samples) in [
                (
                    "hostd vhost-user backend (jailed)",
                    (0..RUNS)
                        .filter_map(|_| tcp_run(hostd_cmd(), &listener))
                        .collect::<Vec<_>>(),
                ),
                (
                    "QEMU built-in virtio-net (tap)",
                    (0..RUNS)
                        .filter_map(|_| tcp_run(builtin_cmd(), &listener))
                        .collect::<Vec<_>>(),
                ),
            ] {
                if samples.is_empty() {
                    println!("{name:<36} failed");
                    continue;
                }
                let h2g = median(samples.iter().map(|s| s.0).collect());
                let g2h = median(samples.iter().map(|s| s.1).collect());
                println!("{name:<36} {h2g:>12.1} {g2h:>12.1}");
                tcp_rows.push((name, h2g, g2h, samples.len()));
            }
            if tcp_rows.len() == 2 {
                let (h, g) = (tcp_rows[0].1 / tcp_rows[1].1, tcp_rows[0].2 / tcp_rows[1].2);
                println!("ratio hostd/QEMU: tcp host->guest {h:.2}, guest->host {g:.2}");
                tcp_ratio = Some((h, g));
            }
        }
        let _ = ip(&["netns", "del", NS]);
    } else {
        println!("TCP: skipped (needs root and iproute2 to make a network namespace with a TAP)");
    }
    let tcp_json: Vec<String> = tcp_rows
        .iter()
        .map(|(n, h, g, k)| format!("{{\"device\":\"{n}\",\"runs\":{k},\"median_tcp_mb_s\":{h:.2},\"median_tcp_guest_to_host_mb_s\":{g:.2}}}"))
        .collect();
    let json: Vec<String> = rows
        .iter()
        .map(|(n, w, r, k)| format!("{{\"device\":\"{n}\",\"runs\":{k},\"median_write_mb_s\":{w:.2},\"median_read_mb_s\":{r:.2}}}"))
        .collect();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("devices_qemu.json");
    let body = format!(
        "{{\"bench\":\"devices_qemu\",\"accel\":\"tcg\",\"bytes\":67108864,\"block\":[{}],\"tcp\":[{}],\"tcp_ratio\":{}}}\n",
        json.join(","),
        tcp_json.join(","),
        tcp_ratio.map_or("null".to_string(), |(h, g)| format!(
            "{{\"host_to_guest\":{h:.3},\"guest_to_host\":{g:.3}}}"
        ))
    );
    match std::fs::write(&path, body) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
}
