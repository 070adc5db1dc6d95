//! hostd's built-in VMM on real KVM (issue 21): inside a nested test host (Debian's
//! kernel and kvm_amd, under QEMU TCG with emulated SVM; tests/common/kvmhost.rs), where
//! `/dev/kvm` is the KVM users have rather than this machine's PVM. One boot of the test
//! host runs every case; each case's output comes back framed on its console:
//! the probe guest, hello on 1 vCPU, a 2-vCPU guest with the `host` CPU template (what
//! CPUID shows it), the erofs root with a volume and secrets, and net over a TAP with the
//! device backends' jail checked in /proc.

mod common;

use common::kvmhost::{self, Payload};
use common::{build, build_with_files};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// The probe guest, built by guest/probe/build.sh.
fn probe() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/probe/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run guest/probe/build.sh");
    assert!(
        out.status.success(),
        "guest/probe/build.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    )
}

/// Two vCPUs and the `host` CPU template: the guest says what it sees.
const CPU_SPEC: &str = r#"
name = "cpu"
memory = "128M"
packages = ["busybox-static"]

[[files]]
path = "/bin/sh"
symlink = "busybox"

[services.cpu]
command = "/bin/busybox"
args = ["sh", "-c", "echo hello from hostd; echo cpus=$(/bin/busybox nproc); /bin/busybox grep -m1 'vendor_id' /proc/cpuinfo; /bin/busybox grep -m1 'model name' /proc/cpuinfo; /bin/busybox grep -m1 '^flags' /proc/cpuinfo; /bin/busybox grep -m1 'hypervisor' /proc/cpuinfo >/dev/null && echo hypervisor-bit=1"]
main = true
"#;

/// The erofs root, a volume and a secret only `reader` may read.
const STORE_SPEC: &str = r#"
name = "store"
root = "erofs"
packages = ["busybox-static"]

[[files]]
path = "/bin/sh"
symlink = "busybox"

[[volumes]]
name = "data"
size = "16M"
mount = "/data"

# As root, before the services: the volume is root's.
[[boot]]
name = "note"
command = "/bin/busybox"
args = ["sh", "-c", "echo persisted > /data/note"]

[services.reader]
command = "/bin/busybox"
args = ["sh", "-c", "i=0; while [ ! -e /tmp/snoop-done ] && [ $i -lt 120 ]; do /bin/busybox sleep 1; i=$((i+1)); done; echo got=$(/bin/busybox cat /run/secrets/db_password); echo volume=$(/bin/busybox cat /data/note); /bin/busybox grep ' / ' /proc/mounts; /bin/busybox touch /rootfs-write-test 2>/dev/null || echo root-read-only; echo reader-done"]
user = "1000:1000"
secrets = ["db_password"]
main = true

[services.snoop]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox cat /run/secrets/db_password && echo LEAK; /bin/busybox cat /run/hostd/secrets/reader/db_password && echo LEAK; echo snoop-done; /bin/busybox touch /tmp/snoop-done"]
user = "1001:1001"
"#;

/// The test host's script: every case, framed.
const RUN_SH: &str = r#"
cd /kvmtest
export HOSTD_LOG=info
run() { ./hostd run --timeout 600 "$@"; }

framed probe run --timings --cmdline "console=ttyS0 probe.exit=42" --kernel ./probe
framed hello run --timings hello.img
framed cpu2 run --vcpus 2 --cpu-template host cpu.img
mkdir -p /tmp/state
framed store run --state-dir /tmp/state --secret db_password=@/kvmtest/secret.txt store.img

# Net over a TAP in the test host; the backends' jail read from /proc while it serves.
tunctl -t hostdtap0
ip addr add 10.0.2.1/24 dev hostdtap0
ip link set hostdtap0 up
./hostd run --timeout 600 --net tap=hostdtap0,ip=10.0.2.2/24,gw=10.0.2.1 web.img > /tmp/web.out 2>&1 &
web=$!
i=0
while ! grep -q "service httpd started" /tmp/web.out && kill -0 $web 2>/dev/null && [ $i -lt 600 ]; do
    sleep 1; i=$((i+1))
done
net() {
    ping -c 1 -W 10 10.0.2.2 || return 1
    i=0
    # nc, not wget: Debian's static busybox wget crashes in glibc's static NSS lookups.
    while true; do
        resp=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 10.0.2.2 80)
        case "$resp" in *"hostd web ok"*) echo "$resp"; return 0 ;; esac
        i=$((i+1)); [ $i -ge 20 ] && return 1; sleep 1
    done
}
framed net net
jail() {
    own=$(readlink /proc/self/ns/mnt)
    n=0
    for p in /proc/[0-9]*; do
        set -- $(tr '\0' ' ' < $p/cmdline 2>/dev/null)
        [ "$2" = backend ] || continue
        n=$((n+1))
        # Every thread: a vring worker must be as jailed as the main thread.
        for t in $p/task/*; do
            if [ "$(readlink $t/ns/mnt)" = "$own" ]; then ns=host; else ns=own; fi
            echo "backend $3 pid ${p#/proc/} task ${t##*/}: $(grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp):' $t/status | tr '\t\n' '  ') MntNs: $ns NprocMax: $(awk '/^Max processes/ {print $3}' $p/limits) AsMax: $(awk '/^Max address space/ {print $4}' $p/limits) Cgroup: $(cat $p/cgroup) MemMax: $(cat /sys/fs/cgroup$(cut -d: -f3 $p/cgroup)/memory.max)"
        done
    done
    echo "backends=$n"
}
framed jail jail
kill -TERM $web
wait $web
echo "KVMOUT web BEGIN"; cat /tmp/web.out; echo "KVMOUT web END rc=0"
"#;

fn assert_ran(c: &kvmhost::Console, name: &str, code: i32) -> String {
    let (rc, out) = c.run(name);
    assert_eq!(*rc, code, "{name}: exit code {rc}:\n{out}");
    out.clone()
}

#[test]
fn built_in_vmm_on_real_nested_kvm() {
    let Some(base) = kvmhost::base() else {
        return;
    };
    if !common::require_qemu_guest() {
        return;
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/images/examples");
    let (_h, hello) =
        build(&std::fs::read_to_string(format!("{examples}/hello.toml")).expect("hello.toml"));
    let (_w, web) =
        build(&std::fs::read_to_string(format!("{examples}/web.toml")).expect("web.toml"));
    let (_c, cpu) = build(CPU_SPEC);
    let (_s, store) = build_with_files(STORE_SPEC, &[]);
    let secret = format!("pw-{}", std::process::id() ^ 0x5eed);

    let p = Payload::new();
    p.program("hostd", common::hostd_exe())
        .program(
            "hostd-backend",
            &common::hostd_exe().with_file_name("hostd-backend"),
        )
        .file("probe", &probe())
        .file("hello.img", &hello)
        .file("web.img", &web)
        .file("cpu.img", &cpu)
        .file("store.img", &store)
        .host_tool("mkfs.ext4")
        .bytes("secret.txt", secret.as_bytes(), 0o600)
        .bytes(
            "run.sh",
            format!("#!/bin/sh\n{}{RUN_SH}", kvmhost::framed_sh()).as_bytes(),
            0o755,
        );
    let c = kvmhost::boot(&base, &p, 2, 2048, Duration::from_secs(1800));
    for line in c.text.lines().filter(|l| l.starts_with("KVMHOST")) {
        eprintln!("{line}");
    }

    // The probe: serial, boot marker, virtio-rng round trip, its exit code.
    let out = assert_ran(&c, "probe", 42);
    assert!(
        out.contains("probe: virtio-rng round trip ok: 16 bytes: "),
        "{out}"
    );
    // --timings breaks the start-up down, from the VM's own process through its jail to
    // the first KVM_RUN.
    let steps = out
        .lines()
        .find(|l| l.contains("hostd: start-up (ms from hostd start): "))
        .unwrap_or_else(|| panic!("no start-up steps: {out}"));
    for step in [
        "cgroup",
        "vm process",
        "backends spawned",
        "KVM_CREATE_VM",
        "jailed",
        "first KVM_RUN",
    ] {
        assert!(steps.contains(step), "{step} missing: {steps}");
    }
    eprintln!(
        "KVMTEST probe PASS {}\nKVMTEST {}",
        timings(&out),
        steps.trim()
    );

    // hello, one vCPU: the `host` template is what `auto` picks on real KVM.
    let out = assert_ran(&c, "hello", 0);
    assert!(out.contains("[hello] hello from hostd"), "{out}");
    assert!(
        out.contains("hostd-init: powering off (exit code 0)"),
        "{out}"
    );
    eprintln!("KVMTEST hello PASS {}", timings(&out));

    // Two vCPUs with the host template: both up, and what the guest's CPUID says.
    let out = assert_ran(&c, "cpu2", 0);
    assert!(out.contains("[cpu] hello from hostd"), "{out}");
    assert!(out.contains("[cpu] cpus=2"), "{out}");
    assert!(out.contains("[cpu] vendor_id\t: AuthenticAMD"), "{out}");
    assert!(out.contains("[cpu] hypervisor-bit=1"), "{out}");
    for l in out.lines().filter(|l| l.starts_with("[cpu] ")) {
        eprintln!("KVMTEST cpu2 guest sees: {l}");
    }
    eprintln!("KVMTEST cpu2 PASS");

    // erofs root, a volume, a secret only its grantee reads.
    let out = assert_ran(&c, "store", 0);
    assert!(out.contains(&format!("[reader] got={secret}")), "{out}");
    assert!(out.contains("[reader] volume=persisted"), "{out}");
    assert!(out.contains("[reader] root-read-only"), "{out}");
    assert!(out.contains("[snoop] snoop-done"), "{out}");
    assert!(!out.contains("LEAK"), "{out}");
    eprintln!("KVMTEST store (erofs root, volume, secrets) PASS");

    // Net over a TAP: ping and HTTP from the test host.
    let out = assert_ran(&c, "net", 0);
    assert!(out.contains("1 packets received"), "{out}");
    assert!(out.contains(" 200 OK"), "{out}");
    assert!(out.contains("hostd web ok"), "{out}");
    eprintln!("KVMTEST net PASS");

    // The backends, jailed as on the host (tests/jail.rs, tests/backends.rs): every
    // thread of each, an unprivileged uid of its own, no groups, no capabilities,
    // no_new_privs, a seccomp filter, a mount namespace of its own, small rlimits.
    let out = assert_ran(&c, "jail", 0);
    let tasks: Vec<(String, BTreeMap<String, String>)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("backend "))
        .map(|l| {
            let (head, fields) = l.split_once(": ").unwrap_or((l, ""));
            (head.to_string(), status_fields(fields))
        })
        .collect();
    let names: BTreeSet<&str> = tasks
        .iter()
        .filter_map(|(h, _)| h.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["net", "rng"]),
        "web's backends (net, rng) not both seen:\n{out}\nweb:\n{}",
        c.run("web").1
    );
    let mut uids = BTreeMap::new();
    for (head, f) in &tasks {
        let field = |k: &str| f.get(k).map(String::as_str).unwrap_or("?");
        let uid: Vec<&str> = field("Uid").split_whitespace().collect();
        assert!(
            uid.len() == 4 && uid.iter().all(|u| *u != "0"),
            "{head}: runs as root: {f:?}"
        );
        assert!(
            field("Gid").split_whitespace().all(|g| g != "0"),
            "{head}: {f:?}"
        );
        assert_eq!(field("Groups"), "", "{head}: {f:?}");
        assert_eq!(field("Seccomp"), "2", "{head}: {f:?}");
        assert_eq!(field("CapEff"), "0000000000000000", "{head}: {f:?}");
        assert_eq!(field("CapBnd"), "0000000000000000", "{head}: {f:?}");
        assert_eq!(field("NoNewPrivs"), "1", "{head}: {f:?}");
        assert_eq!(field("MntNs"), "own", "{head}: {f:?}");
        assert_eq!(field("NprocMax"), "16", "{head}: {f:?}");
        // web's 128 MiB of guest memory plus the backend's own 512 MiB.
        assert_eq!(
            field("AsMax"),
            ((128u64 + 512) << 20).to_string(),
            "{head}: {f:?}"
        );
        // The VM's cgroup v2 (the VM's process is forked straight into it, and its
        // backends are its children): guest memory plus 512 MiB.
        assert!(
            field("Cgroup").starts_with("0::/") && field("Cgroup").contains("/hostd-vm-"),
            "{head}: {f:?}"
        );
        assert_eq!(
            field("MemMax"),
            ((128u64 + 512) << 20).to_string(),
            "{head}: {f:?}"
        );
        let name = head.split_whitespace().next().unwrap_or_default();
        let prev = uids.insert(uid[0].to_string(), name);
        assert!(
            prev.is_none_or(|p| p == name),
            "{head}: shares uid {} with {prev:?}",
            uid[0]
        );
        eprintln!("KVMTEST jail backend {head}: {f:?}");
    }
    eprintln!(
        "KVMTEST jail PASS ({} backends, {} threads)",
        names.len(),
        tasks.len()
    );
}

/// `Uid: 1 1 1 1 Seccomp: 2 …` (a /proc status line the script flattened) as a map.
fn status_fields(s: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut key: Option<String> = None;
    for w in s.split_whitespace() {
        if let Some(k) = w.strip_suffix(':') {
            map.insert(k.to_string(), String::new());
            key = Some(k.to_string());
        } else if let Some(v) = key.as_ref().and_then(|k| map.get_mut(k)) {
            if !v.is_empty() {
                v.push(' ');
            }
            v.push_str(w);
        }
    }
    map
}

/// hostd's `--timings` line, if any.
fn timings(out: &str) -> String {
    out.lines()
        .find(|l| l.contains("timings"))
        .unwrap_or_default()
        .trim()
        .to_string()
}
