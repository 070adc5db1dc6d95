//! hostd's built-in VMM against Firecracker on real KVM (issue 21), inside the nested
//! test host (tests/kvmhost, tests/common/kvmhost.rs: Debian's kernel and kvm_amd under
//! QEMU TCG with emulated SVM). Both monitors pay the same emulation, so the ratio is the
//! measure, not the absolute times.
//!
//! Measured inside the test host (from /proc/uptime, 10 ms resolution), alternating
//! runs: the hello image (hostd) or its kernel and initrd sections (Firecracker), start →
//! `[hello] hello from hostd` and → exit; the probe guest, start → exit. Medians,
//! hostd/Firecracker ratios, JSON in target/bench/kvm_nested.json. hostd's own
//! `--timings` lines (when its VM started, i.e. the first KVM_RUN) are printed too.
//!
//! `FIRECRACKER=/path/to/firecracker cargo bench --bench kvm_nested` (a static binary);
//! without FIRECRACKER only hostd's figures. KVM_NESTED_RUNS sets the rounds (default 3).
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;
#[path = "../tests/common/mod.rs"]
mod tcommon;

use common::{median, write_json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcommon::kvmhost::{self, Payload};

/// The test host's script: RUNS rounds, each monitor and guest in turn.
const BENCH_SH: &str = r#"
cd /kvmtest
ms() { read up _ < /proc/uptime; c=${up%.*}${up#*.}; echo $((c * 10)); }
measure() {
    name=$1; want=$2; shift 2
    t0=$(ms)
    "$@" 2>&1 | while IFS= read -r line; do
        case "$line" in
            *"$want"*) echo "KVMBENCH $name first $(( $(ms) - t0 ))" ;;
            *timings*) echo "KVMBENCH-INFO $name $line" ;;
        esac
    done
    echo "KVMBENCH $name exit $(( $(ms) - t0 ))"
}
fc() {
    rm -f /tmp/fc.sock
    ./firecracker --no-api --config-file "$1"
}
r=0
while [ $r -lt RUNS ]; do
    r=$((r+1))
    measure hostd-hello "hello from hostd" ./hostd run --timings hello.img
    [ -x ./firecracker ] && measure fc-hello "hello from hostd" fc fc-hello.json
    measure hostd-probe "probe: started" ./hostd run --timings --cmdline "console=ttyS0 probe.exit=0" --kernel ./probe
    [ -x ./firecracker ] && measure fc-probe "probe: started" fc fc-probe.json
done
"#;

fn fc_config(kernel: &str, initrd: Option<&str>, args: &str) -> String {
    let initrd = initrd
        .map(|i| format!(",\"initrd_path\":\"{i}\""))
        .unwrap_or_default();
    format!(
        "{{\"boot-source\":{{\"kernel_image_path\":\"{kernel}\",\"boot_args\":\"{args}\"{initrd}}},\
         \"drives\":[],\"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":128}}}}"
    )
}

fn section(image: &[u8], name: &str) -> Vec<u8> {
    let (_, off, len) = tcommon::sections(image)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} section"));
    image[off..off + len].to_vec()
}

fn probe() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/guest/probe/build.sh"))
        .output()
        .expect("guest/probe/build.sh");
    assert!(out.status.success(), "guest/probe/build.sh failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    )
}

fn main() {
    let Some(base) = kvmhost::base() else {
        return;
    };
    if !tcommon::require_qemu_guest() {
        return;
    }
    let runs: u32 = std::env::var("KVM_NESTED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let firecracker = std::env::var_os("FIRECRACKER").map(PathBuf::from);
    let hello_spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/images/examples/hello.toml"
    ))
    .expect("hello.toml");
    let (_h, hello) = tcommon::build(&hello_spec);
    let p = Payload::new();
    p.program("hostd", Path::new(env!("CARGO_BIN_EXE_hostd")))
        .program(
            "hostd-backend",
            Path::new(env!("CARGO_BIN_EXE_hostd-backend")),
        )
        .file("probe", &probe())
        .file("hello.img", &hello)
        .bytes(
            "run.sh",
            format!("#!/bin/sh\n{}", BENCH_SH.replace("RUNS", &runs.to_string())).as_bytes(),
            0o755,
        );
    if let Some(fc) = &firecracker {
        let image = std::fs::read(&hello).expect("read hello.img");
        p.file("firecracker", fc)
            .bytes("vmlinux", &section(&image, "kernel"), 0o644)
            .bytes("initrd", &section(&image, "initrd"), 0o644)
            .bytes(
                "fc-hello.json",
                fc_config(
                    "/kvmtest/vmlinux",
                    Some("/kvmtest/initrd"),
                    "console=ttyS0 reboot=t panic=-1 no_timer_check quiet",
                )
                .as_bytes(),
                0o644,
            )
            .bytes(
                "fc-probe.json",
                fc_config("/kvmtest/probe", None, "console=ttyS0 probe.exit=0").as_bytes(),
                0o644,
            );
    } else {
        println!("FIRECRACKER not set: hostd's figures only");
    }
    let c = kvmhost::boot(&base, &p, 2, 2048, Duration::from_secs(3600));
    let mut samples: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for line in c.text.lines() {
        if let Some(rest) = line.strip_prefix("KVMBENCH ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [name, what, ms] = w[..] {
                if let Ok(ms) = ms.parse::<f64>() {
                    samples
                        .entry((name.to_string(), what.to_string()))
                        .or_default()
                        .push(ms);
                }
            }
        } else if line.starts_with("KVMBENCH-INFO") {
            println!("{line}");
        }
    }
    let med = |name: &str, what: &str| {
        samples
            .get(&(name.to_string(), what.to_string()))
            .map(|v| median(v.clone()))
    };
    println!("inside the nested test host, ms from start, medians of {runs} alternating runs:");
    println!("{:<14} {:>14} {:>10}", "run", "first output", "exit");
    let mut json = Vec::new();
    for name in ["hostd-hello", "fc-hello", "hostd-probe", "fc-probe"] {
        let (first, exit) = (med(name, "first"), med(name, "exit"));
        if first.is_none() && exit.is_none() {
            continue;
        }
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!("{name:<14} {:>14} {:>10}", show(first), show(exit));
        json.push(format!(
            "{{\"run\":\"{name}\",\"first_output_ms\":{},\"exit_ms\":{}}}",
            first.map_or("null".into(), |v| format!("{v:.0}")),
            exit.map_or("null".into(), |v| format!("{v:.0}"))
        ));
    }
    let mut extra = format!("\"runs\":{runs},");
    for (label, h, f, what) in [
        ("hello_first_output", "hostd-hello", "fc-hello", "first"),
        ("hello_exit", "hostd-hello", "fc-hello", "exit"),
        ("probe_exit", "hostd-probe", "fc-probe", "exit"),
    ] {
        if let (Some(h), Some(f)) = (med(h, what), med(f, what)) {
            let ratio = h / f;
            println!("hostd/Firecracker {label}: {ratio:.2}");
            extra.push_str(&format!("\"ratio_{label}\":{ratio:.3},"));
        }
    }
    write_json("kvm_nested", &extra, &json);
}
