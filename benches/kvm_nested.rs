//! hostd's built-in VMM against Firecracker on real KVM (issue 21), inside the nested
//! test host (tests/kvmhost, tests/common/kvmhost.rs: Debian's kernel and kvm_amd under
//! QEMU TCG with emulated SVM). Both monitors pay the same emulation, so the ratio is the
//! measure, not the absolute times.
//!
//! Measured inside the test host (busybox sh's `$EPOCHREALTIME`: microseconds, read
//! without starting a process, so the clock itself adds no fork to a run), alternating
//! runs: the hello image (hostd) or its kernel and initrd sections (Firecracker), start →
//! `[hello] hello from hostd`, → guest init powering off and → exit; the probe guest,
//! start → `probe: started` and → `probe: exiting with code` (Firecracker ignores the
//! probe's exit port, so it is killed there; its own log goes to a file, as its lines
//! on the console could split the guest's). Medians and the fastest run (some runs there
//! stall 100-300 ms, which moves a median of few rounds),
//! hostd/Firecracker ratios of both (and the median of each round's own ratio, the two
//! runs of a round being closest in time), JSON in target/bench/kvm_nested.json. hostd's own
//! `--timings` lines (when its VM started, i.e. the first KVM_RUN) are printed too.
//!
//! `FIRECRACKER=/path/to/firecracker cargo bench --bench kvm_nested` (a static binary);
//! without FIRECRACKER only hostd's figures. Rows: hostd (jailed, its default), `nosb`
//! (hostd --no-sandbox), `fc` (Firecracker alone) and, when its jailer is there
//! (FC_JAILER, else `jailer` beside FIRECRACKER), `fcj` (Firecracker under its jailer);
//! ratios hostd/fc, and both isolated (hostd/fcj) and neither (nosb/fc). KVM_NESTED_RUNS sets the rounds (default 3).
//! HOSTD_BASELINE=/path/to/hostd (with its hostd-backend beside it) adds another build's
//! runs to the same rounds (`base-…`; the two take turns at going first), for a
//! comparison inside one boot of the test host.
//! KVM_NESTED_STRACE=1 adds one untimed `strace -f` run of hostd (this machine's strace,
//! with its libraries) and prints its trace up to the first KVM_RUN, stamped with
//! seconds since the epoch: where hostd's time before the guest runs goes.
//! KVM_NESTED_LAB=script.sh runs that shell script in /kvmtest after the rounds (with
//! KVM_NESTED_RUNS=0, alone) and prints its output as `KVMLAB` lines: for an
//! investigation's own commands in the test host; KVM_NESTED_LAB_PROGRAMS=/a:/b copies
//! those programs (with their libraries) there too, by name.
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
# Warnings and errors only, as Firecracker runs with `--level Error` (its log to a file):
# hostd's info lines would otherwise each wake the reading loop below.
export HOSTD_LOG=warn
# The clock: microseconds since the epoch in $now, from busybox sh's $EPOCHREALTIME
# ("SECONDS.MICROS", six digits after the point), read without a subshell: a `$(...)`
# clock would fork the shell at each reading, a few ms under TCG.
now() { t=$EPOCHREALTIME; now=${t%.*}${t#*.}; }
# ms NAME WHAT: prints the time since $t0 in ms, to 0.1 ms, and the round ($r).
ms() { now; el=$((now - t0)); echo "KVMBENCH $1 $2 $((el / 1000)).$((el % 1000 / 100)) $r"; }
# measure NAME WANT DONE KILL CMD…: times from start to the first line containing WANT
# ("first"), to the first containing DONE ("done"; with KILL=1 the monitor is killed
# there: Firecracker does not end a probe that halts after its exit port write), and
# to the command's end ("exit"). A run that never printed WANT counts for nothing and
# shows its last lines.
measure() {
    name=$1; want=$2; done=$3; kill=$4; shift 4
    rm -f /tmp/m.fifo /tmp/m.out
    mkfifo /tmp/m.fifo
    now; t0=$now
    timeout 300 "$@" > /tmp/m.fifo 2>&1 &
    pid=$!
    seen=0
    while IFS= read -r line; do
        echo "$line" >> /tmp/m.out
        case "$line" in
            *"$want"*) [ $seen = 1 ] || ms $name first; seen=1 ;;
        esac
        case "$line" in
            *"$done"*)
                ms $name done
                [ "$kill" = 1 ] && kill $pid ;;
            *timings*|*start-up*) echo "KVMBENCH-INFO $name $line" ;;
        esac
    done < /tmp/m.fifo
    wait $pid
    if [ $seen = 1 ]; then ms $name exit
    else tail -n 12 /tmp/m.out | sed "s/^/KVMBENCH-FAIL $name /"; fi
}
# Firecracker under its jailer (when ./jailer is here): the isolation Firecracker is
# deployed with (a chroot with its own copy of firecracker, device nodes, a cgroup with
# memory and pids limits, an unprivileged uid; not its new PID namespace or a network
# namespace, which hostd's jail has, nor cpu.max, which hostd writes). Each run's jail
# is made before the timed run (the guest's files linked in) and removed after it.
jprep() {
    d=/srv/jailer/firecracker/$1/root; mkdir -p $d
    for f in $2; do ln -f /kvmtest/$f $d/$f; done
    cp /kvmtest/$3 $d/fc.json; : > $d/fc.log; chown -R 1000:1000 /srv/jailer/firecracker/$1
}
jclean() { rm -rf /srv/jailer/firecracker/$1; rmdir /sys/fs/cgroup/firecracker/$1 2>/dev/null; }
# The jailer's arguments but its id (then `--` and Firecracker's).
J="--exec-file /kvmtest/firecracker --uid 1000 --gid 1000 --cgroup-version 2 --cgroup memory.max=201326592 --cgroup pids.max=32"
F="--no-api --config-file /fc.json --level Error --log-path /fc.log"
r=0
while [ $r -lt RUNS ]; do
    r=$((r+1))
    # With a baseline, the two builds take turns at running first: the run right after
    # Firecracker's hello stalls more often (its guest memory being given back).
    if [ $((r % 2)) = 0 ] && [ -x ./base/hostd ]; then first=./base/hostd; fn=base; second=./hostd; sn=hostd
    else first=./hostd; fn=hostd; second=./base/hostd; sn=base; fi
    measure $fn-hello "hello from hostd" "powering off" 0 $first run --timings hello.img
    [ -x ./firecracker ] && measure fc-hello "hello from hostd" "powering off" 0 ./firecracker --no-api --log-path /tmp/fc.log --config-file fc-hello.json
    [ -x $second ] && measure $sn-hello "hello from hostd" "powering off" 0 $second run --timings hello.img
    # The probe with Firecracker's guest memory (fc_config: 128 MiB; hostd's default
    # for a bare kernel is 256).
    measure $fn-probe "probe: started" "probe: exiting with code" 0 $first run --timings --mem 128M --cmdline "console=ttyS0 probe.exit=0" --kernel ./probe
    [ -x $second ] && measure $sn-probe "probe: started" "probe: exiting with code" 0 $second run --timings --mem 128M --cmdline "console=ttyS0 probe.exit=0" --kernel ./probe
    [ -x ./firecracker ] && measure fc-probe "probe: started" "probe: exiting with code" 1 ./firecracker --no-api --log-path /tmp/fc.log --config-file fc-probe.json
    # Without isolation on either side: hostd --no-sandbox against bare Firecracker (above).
    measure nosb-hello "hello from hostd" "powering off" 0 ./hostd run --no-sandbox --timings hello.img
    measure nosb-probe "probe: started" "probe: exiting with code" 0 ./hostd run --no-sandbox --timings --mem 128M --cmdline "console=ttyS0 probe.exit=0" --kernel ./probe
    if [ -x ./jailer ]; then
        jprep h$r "vmlinux initrd" fc-hello-jailed.json
        measure fcj-hello "hello from hostd" "powering off" 0 ./jailer --id h$r $J -- $F
        jclean h$r
        jprep p$r probe fc-probe-jailed.json
        measure fcj-probe "probe: started" "probe: exiting with code" 1 ./jailer --id p$r $J -- $F
        jclean p$r
    fi
done
# Where hostd's time before the first KVM_RUN goes (KVM_NESTED_STRACE=1; untimed run):
# its processes, execs, namespaces, files and KVM ioctls up to the first KVM_RUN.
if [ -x ./strace ]; then
    ./strace -f -ttt -o /tmp/hostd.strace \
        -e trace=execve,clone,clone3,unshare,pivot_root,mount,openat,ioctl,pread64,connect,accept4,sendmsg,recvmsg,seccomp,setresuid,memfd_create,landlock_restrict_self \
        ./hostd run --timings hello.img > /tmp/strace-run.out 2>&1
    grep timings /tmp/strace-run.out | sed 's/^/KVMTRACE-INFO /'
    awk '{ print "KVMTRACE " $0 } /KVM_RUN/ { exit }' /tmp/hostd.strace
fi
# KVM_NESTED_LAB=script.sh: an investigation's own commands, after the rounds.
if [ -f ./lab.sh ]; then sh ./lab.sh 2>&1 | sed 's/^/KVMLAB /'; fi
"#;

fn fc_config(kernel: &str, initrd: Option<&str>, args: &str) -> String {
    let initrd = initrd
        .map(|i| format!(",\"initrd_path\":\"{i}\""))
        .unwrap_or_default();
    format!(
        "{{\"boot-source\":{{\"kernel_image_path\":\"{kernel}\",\"boot_args\":\"{args}\"{initrd}}},\
         \"drives\":[],\"entropy\":{{}},\"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":128}}}}"
    )
}

fn section(image: &[u8], name: &str) -> Vec<u8> {
    let (_, off, len) = tcommon::sections(image)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} section"));
    image[off..off + len].to_vec()
}

/// The ELF vmlinux the image's `kernel` section was packed from (images/src/kernel.rs:
/// only the non-zero extents of the ELF are kept, which Firecracker cannot load): the
/// guest kernel hostd builds images with, checked extent by extent against the section
/// (all but the ELF header, whose section-header fields packing clears).
fn vmlinux(section: &[u8]) -> Vec<u8> {
    if section.starts_with(b"\x7fELF") {
        return section.to_vec();
    }
    let elf = std::fs::read(tcommon::kernel()).expect("read the guest kernel's vmlinux");
    let u64_at = |b: &[u8], at: usize| {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes")) as usize
    };
    assert!(
        section.starts_with(b"HOSTDKRN"),
        "an unknown kernel section"
    );
    assert_eq!(
        u64_at(section, 16),
        elf.len(),
        "not the guest kernel's vmlinux"
    );
    let count = u32::from_le_bytes(section[12..16].try_into().expect("4 bytes")) as usize;
    let mut data = 24 + 16 * count;
    for i in 0..count {
        let (off, len) = (u64_at(section, 24 + 16 * i), u64_at(section, 32 + 16 * i));
        // The ELF header (64 bytes) differs: the packed one has no section headers.
        let skip = if off == 0 { 64.min(len) } else { 0 };
        assert_eq!(
            section[data + skip..data + len],
            elf[off + skip..off + len],
            "the image's kernel is not the guest kernel's vmlinux (extent {i})"
        );
        data += len;
    }
    elf
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
    // hostd as shipped: the VM path built for musl (tests/common's hostd_exe).
    let hostd = tcommon::hostd_exe();
    p.program("hostd", hostd)
        .program("hostd-backend", &hostd.with_file_name("hostd-backend"))
        .file("probe", &probe())
        .file("hello.img", &hello)
        .bytes(
            "run.sh",
            format!("#!/bin/sh\n{}", BENCH_SH.replace("RUNS", &runs.to_string())).as_bytes(),
            0o755,
        );
    if let Some(base) = std::env::var_os("HOSTD_BASELINE").map(PathBuf::from) {
        // Another build, with the hostd-backend beside it, in the same rounds.
        p.program("base/hostd", &base)
            .program("base/hostd-backend", &base.with_file_name("hostd-backend"));
    }
    if let Some(lab) = std::env::var_os("KVM_NESTED_LAB") {
        p.file("lab.sh", Path::new(&lab));
        // KVM_NESTED_LAB_PROGRAMS=/usr/bin/perf:…: programs (with their libraries) the
        // lab script runs, in /kvmtest by name.
        for prog in std::env::var("KVM_NESTED_LAB_PROGRAMS")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
        {
            let path = Path::new(prog);
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a program's name");
            p.program(name, path);
        }
    }
    if std::env::var_os("KVM_NESTED_STRACE").is_some() {
        p.program("strace", Path::new("/usr/bin/strace"));
    }
    if let Some(fc) = &firecracker {
        let image = std::fs::read(&hello).expect("read hello.img");
        p.file("firecracker", fc)
            .bytes("vmlinux", &vmlinux(&section(&image, "kernel")), 0o644)
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
            )
            // The same under the jailer, whose chroot holds them at its root.
            .bytes(
                "fc-hello-jailed.json",
                fc_config(
                    "/vmlinux",
                    Some("/initrd"),
                    "console=ttyS0 reboot=t panic=-1 no_timer_check quiet",
                )
                .as_bytes(),
                0o644,
            )
            .bytes(
                "fc-probe-jailed.json",
                fc_config("/probe", None, "console=ttyS0 probe.exit=0").as_bytes(),
                0o644,
            );
        // Its jailer: FC_JAILER, else `jailer` beside it.
        let jailer = std::env::var_os("FC_JAILER")
            .map(PathBuf::from)
            .unwrap_or_else(|| fc.with_file_name("jailer"));
        if jailer.is_file() {
            p.file("jailer", &jailer);
        } else {
            println!(
                "no jailer at {}: Firecracker runs without it only",
                jailer.display()
            );
        }
    } else {
        println!("FIRECRACKER not set: hostd's figures only");
    }
    let c = kvmhost::boot(&base, &p, 2, 2048, Duration::from_secs(3600));
    // Per run and step, (round, ms).
    let mut samples: BTreeMap<(String, String), Vec<(u32, f64)>> = BTreeMap::new();
    for line in c.text.lines() {
        if let Some(rest) = line.strip_prefix("KVMBENCH ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [name, what, ms, round] = w[..] {
                if let (Ok(ms), Ok(round)) = (ms.parse::<f64>(), round.parse::<u32>()) {
                    samples
                        .entry((name.to_string(), what.to_string()))
                        .or_default()
                        .push((round, ms));
                }
            }
        } else if line.starts_with("KVMBENCH-")
            || line.starts_with("KVMTRACE")
            || line.starts_with("KVMLAB")
        {
            println!("{line}");
        }
    }
    let med = |name: &str, what: &str| {
        samples
            .get(&(name.to_string(), what.to_string()))
            .map(|v| median(v.iter().map(|s| s.1).collect()))
    };
    // The fastest run too: this host stalls 100-300 ms in some runs (docs/startup.md),
    // which moves a median of a few rounds; the fastest run shows each monitor's path
    // without them.
    let fastest = |name: &str, what: &str| {
        samples
            .get(&(name.to_string(), what.to_string()))
            .and_then(|v| v.iter().map(|s| s.1).reduce(f64::min))
    };
    // The ratio round by round (the two runs of a round are minutes closer than the
    // rounds are to each other: a slow spell of the test host hits both), its median.
    let paired = |h: &str, f: &str, what: &str| {
        let (hs, fs) = (
            samples.get(&(h.to_string(), what.to_string()))?,
            samples.get(&(f.to_string(), what.to_string()))?,
        );
        let ratios: Vec<f64> = hs
            .iter()
            .filter_map(|(round, a)| fs.iter().find(|(r, _)| r == round).map(|(_, b)| a / b))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    };
    println!("inside the nested test host, ms from start, medians of {runs} alternating runs:");
    println!(
        "{:<14} {:>13} {:>13} {:>10} {:>15}",
        "run", "first output", "guest done", "exit", "fastest first"
    );
    let mut json = Vec::new();
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let js = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
    for name in [
        "hostd-hello",
        "base-hello",
        "fc-hello",
        "nosb-hello",
        "fcj-hello",
        "hostd-probe",
        "base-probe",
        "fc-probe",
        "nosb-probe",
        "fcj-probe",
    ] {
        let (first, done, exit) = (med(name, "first"), med(name, "done"), med(name, "exit"));
        if first.is_none() && done.is_none() {
            continue;
        }
        // Firecracker is killed once the probe asked to exit: its "exit" is ours.
        let exit = if name.starts_with("fc") && name.ends_with("-probe") {
            None
        } else {
            exit
        };
        let fast = fastest(name, "first");
        println!(
            "{name:<14} {:>13} {:>13} {:>10} {:>15}",
            show(first),
            show(done),
            show(exit),
            show(fast)
        );
        json.push(format!(
            "{{\"run\":\"{name}\",\"first_output_ms\":{},\"guest_done_ms\":{},\"exit_ms\":{},\"fastest_first_output_ms\":{}}}",
            js(first),
            js(done),
            js(exit),
            js(fast)
        ));
    }
    let mut extra = format!("\"runs\":{runs},");
    for (label, h, f, what) in [
        ("hello_first_output", "hostd-hello", "fc-hello", "first"),
        ("hello_guest_done", "hostd-hello", "fc-hello", "done"),
        ("hello_exit", "hostd-hello", "fc-hello", "exit"),
        ("probe_first_output", "hostd-probe", "fc-probe", "first"),
        ("probe_guest_done", "hostd-probe", "fc-probe", "done"),
        // Both isolated: hostd (jailed, its default) against Firecracker under its jailer.
        (
            "jailed_hello_first_output",
            "hostd-hello",
            "fcj-hello",
            "first",
        ),
        (
            "jailed_probe_first_output",
            "hostd-probe",
            "fcj-probe",
            "first",
        ),
        (
            "jailed_probe_guest_done",
            "hostd-probe",
            "fcj-probe",
            "done",
        ),
        // Neither isolated: hostd --no-sandbox against bare Firecracker.
        (
            "unjailed_hello_first_output",
            "nosb-hello",
            "fc-hello",
            "first",
        ),
        (
            "unjailed_probe_first_output",
            "nosb-probe",
            "fc-probe",
            "first",
        ),
        (
            "baseline_hello_first_output",
            "base-hello",
            "fc-hello",
            "first",
        ),
        (
            "baseline_probe_first_output",
            "base-probe",
            "fc-probe",
            "first",
        ),
    ] {
        if let (Some(h_med), Some(f_med)) = (med(h, what), med(f, what)) {
            let ratio = h_med / f_med;
            let fast = match (fastest(h, what), fastest(f, what)) {
                (Some(a), Some(b)) => a / b,
                _ => f64::NAN,
            };
            let round = paired(h, f, what).unwrap_or(f64::NAN);
            println!(
                "hostd/Firecracker {label}: {ratio:.2} (fastest runs: {fast:.2}; median of the rounds' own ratios: {round:.2})"
            );
            extra.push_str(&format!(
                "\"ratio_{label}\":{ratio:.3},\"fastest_ratio_{label}\":{fast:.3},\"round_ratio_{label}\":{round:.3},"
            ));
        }
    }
    write_json("kvm_nested", &extra, &json);
}
