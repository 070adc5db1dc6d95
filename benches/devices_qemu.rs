//! Block throughput inside a guest under QEMU (TCG on hosts whose KVM cannot carry
//! Linux): hostd's own jailed vhost-user block backend vs QEMU's built-in virtio-blk,
//! side by side in one run, same kernel, same guest, same volume file.
//!
//! The guest writes 64 MiB to its volume with `dd … conv=fsync`, drops its page cache
//! and reads the file back, timing each with busybox `time`. Medians of RUNS boots.
//!
//! TCP: the guest listens (busybox nc) on a TAP device in a network namespace the bench
//! creates; the host side sends 64 MiB (bash /dev/tcp) and times it; hostd's jailed
//! vhost-user net backend vs QEMU's built-in virtio-net on the same TAP. Needs root.
//!
//! `cargo bench --bench devices_qemu` — prints a table and writes
//! target/bench/devices_qemu.json.
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
args = ["sh", "-c", "echo listening; /bin/busybox nc -l -p 5001 > /dev/null; echo received"]
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

/// Starts `cmd` (a guest that listens on 10.0.2.2:5001), sends 64 MiB from the
/// namespace once it listens, and returns MB/s as seen by the sender.
fn tcp_run(mut cmd: Command) -> Option<f64> {
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
    let rate = ready
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
    for _ in lines {}
    let _ = child.wait();
    rate
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

    let mut rows = Vec::new();
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

    // TCP through a TAP in a namespace of our own.
    let mut tcp_rows = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let _ = ip(&["netns", "del", NS]);
    if root
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
                "{:<36} {:>12}",
                "network device (TCP, host -> guest)", "MB/s"
            );
            for (name, samples) in [
                (
                    "hostd vhost-user backend (jailed)",
                    (0..RUNS)
                        .filter_map(|_| tcp_run(hostd_cmd()))
                        .collect::<Vec<_>>(),
                ),
                (
                    "QEMU built-in virtio-net (tap)",
                    (0..RUNS)
                        .filter_map(|_| tcp_run(builtin_cmd()))
                        .collect::<Vec<_>>(),
                ),
            ] {
                if samples.is_empty() {
                    println!("{name:<36} failed");
                    continue;
                }
                let m = median(samples.clone());
                println!("{name:<36} {m:>12.1}");
                tcp_rows.push((name, m, samples.len()));
            }
            if tcp_rows.len() == 2 {
                println!("ratio hostd/QEMU: tcp {:.2}", tcp_rows[0].1 / tcp_rows[1].1);
            }
        }
        let _ = ip(&["netns", "del", NS]);
    } else {
        println!("TCP: skipped (needs root and iproute2 to make a network namespace with a TAP)");
    }
    let tcp_json: Vec<String> = tcp_rows
        .iter()
        .map(|(n, m, k)| format!("{{\"device\":\"{n}\",\"runs\":{k},\"median_tcp_mb_s\":{m:.2}}}"))
        .collect();
    let json: Vec<String> = rows
        .iter()
        .map(|(n, w, r, k)| format!("{{\"device\":\"{n}\",\"runs\":{k},\"median_write_mb_s\":{w:.2},\"median_read_mb_s\":{r:.2}}}"))
        .collect();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("devices_qemu.json");
    let body = format!(
        "{{\"bench\":\"devices_qemu\",\"accel\":\"tcg\",\"bytes\":67108864,\"block\":[{}],\"tcp\":[{}]}}\n",
        json.join(","),
        tcp_json.join(",")
    );
    match std::fs::write(&path, body) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
}
