//! hostd's own VMM on KVM: a real Linux kernel's early boot through our serial device,
//! and the freestanding probe guest (serial, boot marker, virtio-rng round trip, exit
//! code).

mod common;

use common::{build, hostd, kvm_usable, require, require_qemu_guest, run_with_deadline};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The kernel command line hostd logged that it passed.
fn hostd_cmdline(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.split("kernel command line: ").nth(1))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// images/examples/hello.toml, built.
fn hello_image() -> (tempfile::TempDir, PathBuf) {
    build(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/hello.toml"
        ))
        .expect("hello.toml"),
    )
}

/// The hello image, on a nested PVM host with KVM and the guest kernel; None (after
/// a SKIP line) elsewhere: the first test boots Linux fully on hardware KVM.
fn hello_image_on_a_pvm_host() -> Option<(tempfile::TempDir, PathBuf)> {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") || !require_qemu_guest() {
        return None;
    }
    if !is_pvm_host() {
        eprintln!("SKIP: not a PVM host; the first test boots Linux fully with the host template");
        return None;
    }
    Some(hello_image())
}

#[test]
fn linux_boots_through_our_vmm_with_our_cmdline_memory_map_and_cpus() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") || !require_qemu_guest() {
        return;
    }
    let (_dir, image) = hello_image();
    let mut cmd = hostd();
    // The `host` CPU template: no PVM workarounds, so on a PVM host the kernel stops at
    // the first instruction KVM's emulator lacks, and hostd must name it.
    cmd.args([
        "run",
        "--vcpus",
        "2",
        "--mem",
        "192M",
        "--cmdline",
        "loglevel=8",
    ])
    .args(["--cpu-template", "host", "--timeout", "300"])
    .arg(&image);
    let out = run_with_deadline(cmd, Duration::from_secs(400));
    let c = &out.stdout;
    assert!(c.contains("Linux version 6.1"), "{}", out.all());
    // The guest prints exactly the command line hostd says it passed: the image's, ours,
    // and the devices hostd attached.
    let passed = hostd_cmdline(&out.stderr);
    assert!(
        passed.starts_with("console=ttyS0 reboot=t panic=-1 no_timer_check quiet loglevel=8"),
        "{}",
        out.all()
    );
    assert!(
        passed.ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        out.all()
    );
    assert!(
        c.lines()
            .any(|l| l.trim_end() == format!("Kernel command line: {passed}")),
        "{}",
        out.all()
    );
    // 192 MiB: usable up to 0xbffffff, base memory up to the MP table.
    assert!(
        c.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000bffffff] usable"),
        "{}",
        out.all()
    );
    assert!(
        c.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{}",
        out.all()
    );
    assert!(c.contains("smpboot: Allowing 2 CPUs"), "{}", out.all());
    assert!(c.contains("Processors: 2"), "{}", out.all());
    if is_pvm_host() {
        // This host's KVM cannot carry Linux further: hostd must say exactly why.
        assert_ne!(out.code(), Some(0), "{}", out.all());
        assert!(
            out.stderr.contains("KVM_EXIT_INTERNAL_ERROR"),
            "{}",
            out.all()
        );
        assert!(
            out.stderr.contains("RIP 0x") && out.stderr.contains("instruction bytes: "),
            "{}",
            out.all()
        );
    } else {
        assert_eq!(out.code(), Some(0), "{}", out.all());
        assert!(c.contains("[hello] hello from hostd"), "{}", out.all());
    }
}

/// On a nested PVM host, plain `hostd run` (the `pvm` template, chosen by default there)
/// boots the hello image to its service and exit code: the kernel command line keeps
/// the guest off instructions the host cannot run, hostd's kernel patch completes the
/// system calls the host leaves half done, and the assist completes `int3` and `fwait`
/// (docs/pvm.md).
#[test]
fn on_pvm_hosts_hostd_run_boots_hello_to_its_service_and_exit_code() {
    let Some((_dir, image)) = hello_image_on_a_pvm_host() else {
        return;
    };
    let mut cmd = hostd();
    cmd.args(["run", "--timings", "--timeout", "600"])
        .arg(&image);
    let out = run_with_deadline(cmd, Duration::from_secs(700));
    let passed = hostd_cmdline(&out.stderr);
    assert!(
        passed.contains("syscall_via_fault") && passed.contains("noxsave clearcpuid="),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("hostd-init: started"), "{}", out.all());
    assert!(
        out.stdout.contains("[hello] hello from hostd"),
        "{}",
        out.all()
    );
    assert!(
        out.stdout
            .contains("hostd-init: powering off (exit code 0)"),
        "{}",
        out.all()
    );
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // What needed the assist, and how often: reported, not asserted beyond being there.
    let assists = out
        .stderr
        .lines()
        .find(|l| l.contains("instructions completed by the PVM assist: "))
        .unwrap_or_else(|| panic!("no assist summary:\n{}", out.all()));
    assert!(assists.contains("int3 1"), "{}", out.all());
    eprintln!("{assists}");
    if let Some(t) = out.stderr.lines().find(|l| l.contains("timings")) {
        eprintln!("{t}");
    }
}

/// With two vCPUs on a nested PVM host: both come up (the guest must not send IPIs by
/// hypercall there, so hostd adds `nopv`) and the service runs to its exit code.
#[test]
fn on_pvm_hosts_hostd_run_brings_up_two_vcpus() {
    let Some((_dir, image)) = hello_image_on_a_pvm_host() else {
        return;
    };
    let mut cmd = hostd();
    cmd.args([
        "run",
        "--vcpus",
        "2",
        "--cmdline",
        "loglevel=7",
        "--timeout",
        "600",
    ])
    .arg(&image);
    let out = run_with_deadline(cmd, Duration::from_secs(700));
    assert!(
        hostd_cmdline(&out.stderr).contains(" nopv"),
        "{}",
        out.all()
    );
    assert!(
        out.stdout.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        out.all()
    );
    assert!(
        out.stdout.contains("[hello] hello from hostd"),
        "{}",
        out.all()
    );
    assert_eq!(out.code(), Some(0), "{}", out.all());
}

/// The probe guest, built by guest/probe/build.sh (cached by cargo).
fn probe() -> Option<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/probe/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .ok()?;
    if !out.status.success() {
        panic!(
            "guest/probe/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()?
            .to_string(),
    );
    path.exists().then_some(path)
}

/// `hostd run FLAGS --cmdline CMDLINE --kernel probe`, within 120 s (200 s to the test).
fn run_probe(flags: &[&str], cmdline: &str) -> common::Output {
    let probe = probe().expect("probe built");
    let mut cmd = hostd();
    cmd.arg("run")
        .args(flags)
        .args(["--timeout", "120", "--cmdline", cmdline, "--kernel"])
        .arg(&probe);
    run_with_deadline(cmd, Duration::from_secs(200))
}

#[test]
fn probe_guest_round_trips_virtio_rng_and_exits_with_its_code() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    let out = run_probe(&["--timings"], "console=ttyS0 probe.exit=42");
    let c = &out.stdout;
    assert_eq!(out.code(), Some(42), "{}", out.all());
    assert!(c.contains("probe: started"), "{}", out.all());
    let passed = hostd_cmdline(&out.stderr);
    assert!(
        passed.starts_with("console=ttyS0 probe.exit=42")
            && passed.ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        out.all()
    );
    assert!(
        c.lines()
            .any(|l| l.trim_end() == format!("probe: cmdline: {passed}")),
        "{}",
        out.all()
    );
    assert!(c.contains("device-id 4"), "{}", out.all());
    assert!(
        c.contains("probe: virtio-rng round trip ok: 16 bytes: "),
        "{}",
        out.all()
    );
    // Sixteen random bytes are not all zero (probability 2^-128).
    let hex = c
        .lines()
        .find_map(|l| l.split("16 bytes: ").nth(1))
        .unwrap_or_default();
    assert!(
        hex.chars().any(|ch| ch.is_ascii_hexdigit() && ch != '0'),
        "{hex}"
    );
    let timings = out
        .stderr
        .lines()
        .find(|l| l.contains("timings"))
        .unwrap_or_default();
    assert!(
        timings.contains("vm started")
            && timings.contains("guest init")
            && !timings.contains("guest init -"),
        "{}",
        out.all()
    );
}

/// One `probe: cpuid LEAF.0x0: eax=.. ebx=.. ecx=.. edx=..` line of the probe's output,
/// as four registers.
fn probe_cpuid(stdout: &str, leaf: &str) -> Option<[u32; 4]> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("probe: cpuid {leaf}.0x0: ")))?;
    let mut regs = [0u32; 4];
    for (i, name) in ["eax=", "ebx=", "ecx=", "edx="].iter().enumerate() {
        let v = line.split(name).nth(1)?.split_whitespace().next()?;
        regs[i] = u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()?;
    }
    Some(regs)
}

/// What the guest's CPUID instruction returns where the VMM sets it, on every KVM (this
/// nested PVM host forces the host's feature bits on the guest, not these; docs/pvm.md):
/// leaf 1 EBX holds the boot vCPU's APIC id 0 and the VM's vCPU count, and the hypervisor
/// leaf names KVM.
#[test]
fn probe_sees_the_monitors_cpuid_leaves() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    let out = run_probe(
        &["--vcpus", "2"],
        "console=ttyS0 probe.cpuid=1 probe.cpuid=0x40000000",
    );
    assert_eq!(out.code(), Some(0), "{}", out.all());
    let leaf1 = probe_cpuid(&out.stdout, "0x1").unwrap_or_else(|| panic!("{}", out.all()));
    assert_eq!(leaf1[1] >> 24, 0, "APIC id of vCPU 0: {}", out.all());
    assert_eq!(
        (leaf1[1] >> 16) & 0xff,
        2,
        "logical CPU count: {}",
        out.all()
    );
    assert_ne!(leaf1[2] & (1 << 31), 0, "hypervisor bit: {}", out.all());
    let hv = probe_cpuid(&out.stdout, "0x40000000").unwrap_or_else(|| panic!("{}", out.all()));
    let signature: Vec<u8> = hv[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
    assert_eq!(&signature, b"KVMKVMKVM\0\0\0", "{}", out.all());
    assert!(hv[0] >= 0x4000_0001, "max hypervisor leaf: {}", out.all());
}

/// KVM's supported CPUID is asked once per boot and kept in /run/hostd/kvm-cpuid (root
/// only, vmm/src/kvm/cpuid_cache.rs): a run without it writes it, a run with it gives the
/// guest the same CPUID as one that asked KVM, and a damaged file is asked anew and
/// replaced. Other tests' runs may write the file meanwhile; each writes it whole.
#[test]
fn the_cpuid_cache_gives_the_guest_what_kvm_gives() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM")
        || !require("root", common::is_root(), "run the tests as root")
    {
        return;
    }
    let cache = Path::new("/run/hostd/kvm-cpuid");
    let cmdline = "console=ttyS0 probe.cpuid=1 probe.cpuid=7.0 probe.cpuid=0xd.0 \
                   probe.cpuid=0x80000001 probe.cpuid=0x40000001";
    let leaves = |out: &common::Output| -> Vec<[u32; 4]> {
        ["0x1", "0x7", "0xd", "0x80000001", "0x40000001"]
            .iter()
            .map(|l| probe_cpuid(&out.stdout, l).unwrap_or_else(|| panic!("{}", out.all())))
            .collect()
    };
    let _ = std::fs::remove_file(cache);
    let asked = run_probe(&[], cmdline);
    assert_eq!(asked.code(), Some(0), "{}", asked.all());
    let written = std::fs::read(cache).expect("the run wrote /run/hostd/kvm-cpuid");
    let cached = run_probe(&[], cmdline);
    assert_eq!(cached.code(), Some(0), "{}", cached.all());
    assert_eq!(leaves(&cached), leaves(&asked));
    let mut damaged = written.clone();
    damaged[100] ^= 0xff;
    std::fs::write(cache, &damaged).expect("damage the cache");
    let again = run_probe(&[], cmdline);
    assert_eq!(again.code(), Some(0), "{}", again.all());
    assert_eq!(leaves(&again), leaves(&asked));
    assert_ne!(
        std::fs::read(cache).expect("the cache is still there"),
        damaged,
        "a damaged cache is replaced"
    );
}

/// A device backend that dies before it serves (here: a `hostd-backend` that exits at
/// once, next to a hard link of hostd) is named in hostd's error, with how it ended, and
/// its device never works: the VMM connects to the socket it bound for the backend, the
/// handshake (run while the guest boots) breaks when the backend's end goes away, and
/// the run ends with that error even if the guest got further.
#[test]
fn a_backend_that_dies_at_start_is_named_in_the_error() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    let (_dir, mut cmd) = probe_with_backend(
        "#!/bin/sh\necho 'backend: cannot start' >&2\nexit 3\n",
        "60",
    );
    cmd.arg("console=ttyS0");
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("device backend rng (pid ")
            && out.stderr.contains("exited with status 3"),
        "{}",
        out.all()
    );
    // The VM boots while its backends start; the probe's driver waits for the rng
    // backend's handshake, which fails, so the device never works.
    assert!(
        !out.stdout.contains("virtio-rng round trip ok"),
        "{}",
        out.all()
    );
}

/// `hostd run --timeout SECONDS --kernel probe --cmdline …` (the command line to be
/// added) with a hard link of hostd next to `script` as its `hostd-backend`.
fn probe_with_backend(script: &str, timeout: &str) -> (tempfile::TempDir, std::process::Command) {
    let probe = probe().expect("probe built");
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("hostd");
    std::fs::hard_link(common::hostd_exe(), &exe)
        .or_else(|_| std::fs::copy(common::hostd_exe(), &exe).map(|_| ()))
        .expect("hostd next to the backend");
    let backend = dir.path().join("hostd-backend");
    std::fs::write(&backend, script).expect("write backend");
    std::fs::set_permissions(
        &backend,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut cmd = std::process::Command::new(&exe);
    cmd.env("HOSTD_KERNEL", common::kernel())
        .args(["run", "--timeout", timeout, "--kernel"])
        .arg(&probe)
        .arg("--cmdline");
    (dir, cmd)
}

/// The VM does not wait for its device backends to start: a backend that takes a second
/// longer (here: the real `hostd-backend` behind a `sleep 1`) only delays its own device,
/// whose driver gets the backend's answers when they come, and the device works.
#[test]
fn a_backend_that_starts_late_still_serves_its_device() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    let script = format!(
        "#!/bin/sh\nsleep 1\nexec {} \"$@\"\n",
        common::hostd_exe()
            .with_file_name("hostd-backend")
            .display()
    );
    let (_dir, mut cmd) = probe_with_backend(&script, "60");
    cmd.arg("console=ttyS0 probe.exit=42");
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(out.code(), Some(42), "{}", out.all());
    assert!(
        out.stdout
            .contains("probe: virtio-rng round trip ok: 16 bytes: "),
        "{}",
        out.all()
    );
}

/// A backend that never answers (here: one that sleeps instead of serving) holds up only
/// its device's driver: the VMM's control loop still runs, so `--timeout` ends the run
/// with its error and nothing is left waiting.
#[test]
fn a_backend_that_never_answers_still_lets_the_timeout_end_the_run() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    let (_dir, mut cmd) = probe_with_backend("#!/bin/sh\nexec sleep 1000\n", "5");
    cmd.arg("console=ttyS0");
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr
            .contains("the guest did not finish within 5s (--timeout)"),
        "{}",
        out.all()
    );
    assert!(
        !out.stdout.contains("virtio-rng round trip ok"),
        "{}",
        out.all()
    );
}
