//! Block throughput inside a guest under QEMU (TCG on hosts whose KVM cannot carry
//! Linux): hostd's own jailed vhost-user block backend vs QEMU's built-in virtio-blk,
//! side by side in one run, same kernel, same guest, same volume file.
//!
//! The guest writes 64 MiB to its volume with `dd … conv=fsync`, drops its page cache
//! and reads the file back, timing each with busybox `time`. Medians of RUNS boots.
//!
//! TCP: the guest listens (busybox nc) on a TAP device in a network namespace the bench
//! creates; the host side sends 64 MiB (bash /dev/tcp) and times it (host -> guest);
//! then the host fetches a 64 MiB file from the guest's busybox httpd (sendfile(2)) and
//! times it from connect to the last byte (guest -> host). hostd's
//! jailed vhost-user net backend vs QEMU's built-in virtio-net (with its own vnet-header
//! TAP offloads) on the same TAP. Needs root.
//!
//! TCP runs alternate between the two (hostd first in even rounds, QEMU first in odd
//! ones), so that load from elsewhere on the host falls on both alike.
//!
//! `cargo bench --bench devices_qemu` — prints a table and writes
//! target/bench/devices_qemu.json. `DEVICES_QEMU_ONLY=block` or `=tcp` runs one half;
//! `HOSTD_BIN=/path/to/hostd` runs another build's `hostd run` (and its backends, next to
//! it) for the hostd rows, e.g. to compare before and after a change in one run;
//! `DEVICES_QEMU_DEBUG=1` prints each TCP run's command, stderr and early console.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

use std::path::Path;
use std::process::{Command, Stdio};

use hostd_images::format::{sections, Image};
use hostd_vmm::{BootSpec, BASE_CMDLINE};

const RUNS: usize = 5;
/// TCP rounds: a 64 MiB transfer takes about a second under TCG, so each sample is
/// noisy (TCP's start, the host's load); more of them steady the median.
const TCP_RUNS: usize = 7;

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
args = ["sh", "-c", "/bin/busybox mkdir -p /tmp/www; /bin/busybox head -c 67108864 /dev/zero > /tmp/www/f; /bin/busybox httpd -p 8080 -h /tmp/www; echo listening; /bin/busybox nc -l -p 5001 > /dev/null; echo received; /bin/busybox nc -l -p 5002 > /dev/null; echo fetched"]
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

/// Runs `f` on a thread that joined network namespace `ns` (sockets it makes stay
/// there; the bench's own threads stay where they are).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Option<T> + Send + 'static,
) -> Option<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).ok()?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network
        // namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        f()
    })
    .join()
    .ok()
    .flatten()
}

const TCP_BYTES: usize = 64 << 20;

/// Guest -> host: fetches the guest's 64 MiB file from its busybox httpd (which sends
/// it with sendfile(2), so the guest's user space costs little), MB/s from connect to
/// the last byte; then tells the guest it may end (port 5002).
fn fetch() -> Option<f64> {
    use std::io::{Read, Write};
    in_netns(NS, || {
        let start = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect("10.0.2.2:8080").ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .ok()?;
        s.write_all(b"GET /f HTTP/1.0\r\n\r\n").ok()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return None,
            }
        }
        let rate = 64.0 / start.elapsed().as_secs_f64();
        let _ = std::net::TcpStream::connect("10.0.2.2:5002");
        (got >= TCP_BYTES).then_some(rate)
    })
}

/// Starts `cmd` (a guest that listens on 10.0.2.2:5001 and serves a 64 MiB file on
/// 10.0.2.2:8080), sends 64 MiB from the namespace once it listens, fetches the file,
/// and returns MB/s (host -> guest as seen by the sender, guest -> host as seen by the
/// receiver).
fn tcp_run(mut cmd: Command) -> Option<(f64, f64)> {
    use std::io::{BufRead, BufReader};
    let debug = std::env::var_os("DEVICES_QEMU_DEBUG").is_some();
    if debug {
        println!("  running {cmd:?}");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if debug {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdin(Stdio::piped())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut lines = BufReader::new(out).lines().map_while(Result::ok);
    let mut early = Vec::new();
    let ready = lines.any(|l| {
        if early.len() < 400 {
            early.push(l.clone());
        }
        l.contains("[sink] listening")
    });
    if !ready && debug {
        println!("  guest never listened:\n{}", early.join("\n"));
    }
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
    let g2h = h2g.and_then(|_| fetch());
    if g2h.is_none() {
        let _ = child.kill();
    }
    for _ in lines {}
    let _ = child.wait();
    if h2g.is_none() || g2h.is_none() {
        println!("  (a run failed: host->guest {h2g:?}, guest->host {g2h:?})");
    }
    Some((h2g?, g2h?))
}

use hostd_bench::median;

/// The `hostd` that runs guests for the hostd rows: `HOSTD_BIN`, else this build's.
fn hostd_exe() -> String {
    std::env::var("HOSTD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hostd").to_string())
}

fn run_hostd(image: &Path, state: &Path) -> Option<(f64, f64)> {
    let out = Command::new(hostd_exe())
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
    // The kernel section may be packed: unpack it into the ELF QEMU loads.
    let packed = dir.path().join("kernel.section");
    std::fs::write(&packed, img.read_section(sections::KERNEL).expect("kernel")).expect("write");
    let payload = hostd_vmm::payload::Payload::from_file(
        std::fs::File::open(&packed).expect("kernel section"),
        "kernel",
    )
    .expect("kernel payload");
    let elf = std::fs::File::create(&kernel).expect("kernel file");
    payload
        .stream_kernel(|at, bytes| {
            use std::os::unix::fs::FileExt;
            elf.write_all_at(bytes, at).map_err(|e| e.to_string())
        })
        .expect("unpack the kernel");
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
        if let Some(img) = Image::open(&tcp_image).ok().filter(|_| built) {
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
                    &hostd_exe(),
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
            // Alternating runs (the order flipped every round), so that load from
            // elsewhere on the host falls on both alike.
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..TCP_RUNS {
                if round % 2 == 0 {
                    ours.extend(tcp_run(hostd_cmd()));
                    theirs.extend(tcp_run(builtin_cmd()));
                } else {
                    theirs.extend(tcp_run(builtin_cmd()));
                    ours.extend(tcp_run(hostd_cmd()));
                }
            }
            for (name, samples) in [
                ("hostd vhost-user backend (jailed)", ours),
                ("QEMU built-in virtio-net (tap)", theirs),
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
