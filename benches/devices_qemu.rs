//! Block throughput inside a guest under QEMU (TCG on hosts whose KVM cannot carry
//! Linux): hostd's own jailed vhost-user block backend vs QEMU's built-in virtio-blk,
//! side by side in one run, same kernel, same guest, same volume file.
//!
//! The guest writes 64 MiB to its volume with `dd … conv=fsync`, drops its page cache
//! and reads the file back, timing each with busybox `time`. Medians of RUNS boots.
//!
//! `cargo bench --bench devices_qemu` — prints a table and writes
//! target/bench/devices_qemu.json. (TCP throughput is not measured yet.)

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

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
    let json: Vec<String> = rows
        .iter()
        .map(|(n, w, r, k)| format!("{{\"device\":\"{n}\",\"runs\":{k},\"median_write_mb_s\":{w:.2},\"median_read_mb_s\":{r:.2}}}"))
        .collect();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("devices_qemu.json");
    let body = format!(
        "{{\"bench\":\"devices_qemu\",\"accel\":\"tcg\",\"bytes\":67108864,\"results\":[{}]}}\n",
        json.join(",")
    );
    match std::fs::write(&path, body) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
}
