//! Secrets delivered over vsock at boot (issue 4): a granted service reads the host's
//! value from /run/secrets/NAME, other services cannot, and the value appears nowhere in
//! the image file or the volumes. Also a vsock round trip through the backend's echo
//! port. Under QEMU and under hostd's own VMM (which then also carries the erofs root
//! and the volume over virtio-blk, and virtio-rng).
//!
//! Issue 11, as an attacker would try it (docs/security.md): a non-root service with no
//! grants opens an AF_VSOCK socket to the host's secrets port itself (guest init's own
//! binary in its `vsock-probe` mode: a real connect, from the service's own process) and
//! gets a reset and nothing else, while the same program does reach the echo port; a
//! service with the same uid as the granted one, and a root service, look for the
//! granted service's secret through /proc/PID/root of every process they can see and
//! through /proc/1/root, and find nothing (they do not even see its processes).

mod common;

use common::{
    build, build_with_files, kvm_usable, require, require_qemu_guest, run_image, run_image_with,
};
use std::path::Path;

/// Guest init as the build made it: its `vsock-probe` mode is the vsock client.
const PROBE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/guest-init/x86_64-unknown-linux-musl/release/hostd-init"
);

/// A shell function `r` that runs a command again (up to 5 times, saying so on stderr)
/// when a signal killed it: on a nested PVM host a freshly exec'd guest program now and
/// then dies of SIGSEGV in its C library's start-up (docs/pvm.md, "Guest programs that
/// crash"), which would leave a check below not done. The service shells themselves are
/// restarted by guest init (`restart = "on-failure"`) for the same reason.
const RETRY: &str = r#"r() { n=0; while \"$@\"; s=$?; [ $s -ge 128 ] && [ $n -lt 5 ]; do n=$((n+1)); echo \"RETRIED after signal $((s-128)): $*\" >&2; done; return $s; }"#;

/// What a service without the grant tries, as its own user; `LEAK` marks a success.
const SNOOP_FILES: &str = "r /bin/busybox cat /run/secrets/db_password && echo LEAK; \
r /bin/busybox cat /run/hostd/secrets/reader/db_password && echo LEAK";

/// And what it tries beyond the files (issue 11), `SNOOP_FILES` included.
const SNOOP_ATTACKS: &str = "r /bin/busybox cat /run/secrets/db_password && echo LEAK; \
r /bin/busybox cat /run/hostd/secrets/reader/db_password && echo LEAK; \
/bin/busybox cat /proc/1/root/run/secrets/db_password && echo LEAK; \
/bin/busybox cat /proc/1/root/run/hostd/secrets/reader/db_password && echo LEAK; \
for f in /proc/[0-9]*/root/run/secrets/db_password /proc/[0-9]*/root/run/hostd/secrets/reader/db_password; do /bin/busybox cat $f && echo LEAK; done; \
r=reader; /bin/busybox grep -l $r-done /proc/[0-9]*/cmdline && echo SEES-READER; \
echo processes=$(/bin/busybox ls -d /proc/[0-9]* | /bin/busybox wc -l); \
/usr/bin/vsock-probe vsock-probe 1025; /usr/bin/vsock-probe vsock-probe 1026";

/// The test image; with `attacks`, the services also try everything of issue 11, and
/// two more services check that stopping works inside the namespaces.
fn spec(attacks: bool) -> String {
    let services = if attacks {
        format!("{SERVICES}{STOPPED}")
            .replace("SNOOP", SNOOP_ATTACKS)
            .replace("ROOTPROBE", "/usr/bin/vsock-probe vsock-probe 1025 1022")
    } else {
        SERVICES
            .replace("SNOOP", SNOOP_FILES)
            .replace("ROOTPROBE", "true")
    };
    let services = services.replace("RETRY", RETRY);
    format!(
        r#"
name = "secrets"
root = "erofs"
packages = ["busybox-static"]

[[files]]
path = "/usr/bin/vsock-probe"
source = "vsock-probe"
mode = "0755"
{services}"#
    )
}

const SERVICES: &str = r#"
[[volumes]]
name = "data"
size = "16M"
mount = "/data"

[services.reader]
command = "/bin/busybox"
args = ["sh", "-c", "RETRY; i=0; while [ ! -e /tmp/snoop-done -o ! -e /tmp/rootsnoop-done ] && [ $i -lt 120 ]; do /bin/busybox sleep 1; i=$((i+1)); done; echo got=$(r /bin/busybox cat /run/secrets/db_password); r /bin/busybox stat -c 'mode=%a uid=%u' /run/secrets/db_password; echo reader-done"]
user = "1000:1000"
secrets = ["db_password"]
main = true
restart = "on-failure"

[services.snoop]
command = "/bin/busybox"
args = ["sh", "-c", "RETRY; SNOOP; echo snoop-done; r /bin/busybox touch /tmp/snoop-done"]
user = "1000:1000"
restart = "on-failure"

[services.rootsnoop]
command = "/bin/busybox"
args = ["sh", "-c", "RETRY; SNOOP; ROOTPROBE; r /bin/busybox ls /run/hostd/secrets/reader && echo LEAK; echo rootsnoop-done; r /bin/busybox touch /tmp/rootsnoop-done"]
restart = "on-failure"
"#;

const STOPPED: &str = r#"
# Stopping still works inside the namespaces: init's SIGTERM reaches the program, and
# init sees how it ended (through the namespace's reaper and its stand-in).
[services.sleeper]
command = "/bin/busybox"
args = ["sleep", "1000"]

[services.trapper]
command = "/bin/busybox"
args = ["sh", "-c", "trap 'echo got-term; exit 7' TERM; while true; do /bin/busybox sleep 1; done"]
user = "1000:1000"
"#;

fn random_value() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(file: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).unwrap_or_default();
    bytes.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn only_granted_services_read_host_secrets_and_vsock_round_trips() {
    granted_secrets_and_vsock("qemu", true);
}

#[test]
fn only_granted_services_read_host_secrets_and_vsock_round_trips_with_the_built_in_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    // The attacks run under QEMU: on a nested PVM host (docs/pvm.md) every guest system
    // call of this runner is slow, and their dozens of programs exceed the time limit.
    // The namespaces are the same here: the granted service and the file checks run.
    granted_secrets_and_vsock("kvm", false);
}

fn granted_secrets_and_vsock(vmm: &str, attacks: bool) {
    if !require_qemu_guest() {
        return;
    }
    let (dir, image) = build_with_files(&spec(attacks), &[("vsock-probe", Path::new(PROBE))]);
    let value = format!("pw-{}", random_value());
    let secret = dir.path().join("db_password.txt");
    std::fs::write(&secret, &value).expect("write secret");
    let unused = dir.path().join("unused.txt");
    std::fs::write(&unused, "nobody-asked").expect("write secret");
    let state = tempfile::tempdir().expect("state dir");
    let run = || {
        run_image_with(
            vmm,
            &image,
            &[
                "--state-dir",
                state.path().to_str().expect("utf-8 path"),
                "--secret",
                &format!("db_password=@{}", secret.display()),
                "--secret",
                &format!("unused=@{}", unused.display()),
                "--cmdline",
                "hostd.vsock_selftest=1",
            ],
        )
    };
    let out = run();
    let checked = std::panic::catch_unwind(|| check_run(&out, &value, attacks));
    // A known fault of nested PVM hosts, not of hostd (docs/pvm.md, "Guest programs that
    // crash"): now and then a freshly exec'd guest program dies of SIGSEGV on a stale
    // translation. The services retry such a program and guest init restarts such a
    // service; should a crash still have left a check undone, the run is repeated once,
    // loudly, and the repeat must pass every check.
    let crashed = |out: &common::Output| {
        out.stdout.contains("(SIGSEGV)") || out.stdout.contains("Segmentation fault")
    };
    if let Err(e) = checked {
        let pvm = hostd_vmm::host::kvm_kind() == hostd_vmm::host::KvmKind::Pvm;
        if !(vmm == "kvm" && pvm && crashed(&out)) {
            std::panic::resume_unwind(e);
        }
        eprintln!(
            "SECRETS: a guest program crashed with SIGSEGV on this PVM host (docs/pvm.md) and \
             a check could not be made; running once more. The crashed run's console:\n{}",
            out.stdout
        );
        let again = run();
        check_run(&again, &value, attacks);
    } else if crashed(&out) {
        eprintln!(
            "SECRETS: guest programs crashed with SIGSEGV and were run again in the guest \
             (docs/pvm.md); every check was made:\n{}",
            out.stdout
        );
    }
    // The value is nowhere in the image or the volumes.
    assert!(
        !contains(&image, value.as_bytes()),
        "the image holds the secret"
    );
    let mut files = vec![];
    files_under(state.path(), &mut files);
    assert!(!files.is_empty(), "the volume exists");
    for f in files {
        assert!(
            !contains(&f, value.as_bytes()),
            "{} holds the secret",
            f.display()
        );
    }
}

/// Every check of one run of the secrets image: exit code, the vsock round trip, the
/// granted service's value, and nothing for the others (whose attempts all happened).
fn check_run(out: &common::Output, value: &str, attacks: bool) {
    let all = out.all();
    assert_eq!(out.code(), Some(0), "{all}");
    // The vsock round trip through the backend's echo port.
    assert!(
        out.stdout
            .contains("hostd-init: vsock echo: hostd-vsock-ping"),
        "{all}"
    );
    assert!(
        out.stdout
            .contains("hostd-init: secrets received over vsock (1)"),
        "only declared secrets are delivered: {all}"
    );
    assert!(
        all.contains("unused is provided but no service of the image declares it"),
        "{all}"
    );
    // The granted service reads the value, 0400 and its own.
    assert!(
        out.stdout.contains(&format!("[reader] got={value}")),
        "{all}"
    );
    assert!(out.stdout.contains("[reader] mode=400 uid=1000"), "{all}");
    // The others cannot, as another user or as root.
    assert!(out.stdout.contains("[snoop] snoop-done"), "{all}");
    assert!(out.stdout.contains("[rootsnoop] rootsnoop-done"), "{all}");
    assert!(!out.stdout.contains("LEAK"), "{all}");
    // And each of them tried: every check above was made.
    for who in ["snoop", "rootsnoop"] {
        for path in [
            "/run/secrets/db_password",
            "/run/hostd/secrets/reader/db_password",
        ] {
            let tried = format!("[{who}] cat: can't open '{path}': No such file or directory");
            assert!(out.stdout.contains(&tried), "{tried}: {all}");
        }
    }
    assert!(
        out.stdout
            .contains("[rootsnoop] ls: /run/hostd/secrets/reader: No such file or directory"),
        "{all}"
    );
    if attacks {
        issue_11_attacks_failed(out, value);
    }
    let leaked_lines: Vec<&str> = all
        .lines()
        .filter(|l| l.contains(value) && !l.contains("[reader] got="))
        .collect();
    assert!(leaked_lines.is_empty(), "{leaked_lines:?}");
}

/// What the snooping services of [`SNOOP_ATTACKS`] got: nothing.
fn issue_11_attacks_failed(out: &common::Output, value: &str) {
    let all = out.all();
    assert!(
        out.stdout
            .contains("service sleeper was killed by signal 15 (SIGTERM)"),
        "{all}"
    );
    assert!(out.stdout.contains("[trapper] got-term"), "{all}");
    assert!(
        out.stdout.contains("service trapper exited with code 7"),
        "{all}"
    );
    // Neither sees the reader's processes: only its own namespace's few.
    assert!(!out.stdout.contains("SEES-READER"), "{all}");
    for who in ["snoop", "rootsnoop"] {
        let n: usize = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("[{who}] processes=")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{who} counted its processes: {all}"));
        assert!(n <= 6, "{who} sees {n} processes: {all}");
    }
    // The non-root service's own vsock connection to the secrets port: reset, nothing
    // received, and a line on the host; the same program reaches the echo port.
    assert!(
        out.stdout
            .contains("[snoop] vsock-probe: port 1025: connect failed:"),
        "{all}"
    );
    assert!(
        out.stdout
            .contains("[snoop] vsock-probe: port 1026: received 18 bytes: hostd-vsock-probe\\n"),
        "{all}"
    );
    assert!(
        all.contains("refused a connection from guest port")
            && all.contains("to the secrets port: not a privileged port"),
        "{all}"
    );
    // Root can bind a privileged port, but the port was used up by guest init.
    assert!(
        out.stdout
            .contains("[rootsnoop] vsock-probe: port 1025: connect failed:"),
        "{all}"
    );
    assert!(
        all.contains("refused a connection from guest port 1022 to the secrets port: the secrets were handed out once this boot"),
        "{all}"
    );
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    // Not even in the wire form (hex) the host sends.
    let leaked_lines: Vec<&str> = all.lines().filter(|l| l.contains(&hex)).collect();
    assert!(leaked_lines.is_empty(), "{leaked_lines:?}");
}

#[test]
fn a_declared_secret_the_host_does_not_provide_is_a_warning() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build_with_files(&spec(true), &[("vsock-probe", Path::new(PROBE))]);
    let state = tempfile::tempdir().expect("state dir");
    let out = run_image_with(
        "qemu",
        &image,
        &["--state-dir", state.path().to_str().expect("utf-8 path")],
    );
    let all = out.all();
    assert!(
        all.contains("secret db_password is declared by the image but not provided"),
        "{all}"
    );
    assert!(
        out.stdout
            .contains("service reader declares db_password but the host did not provide it"),
        "{all}"
    );
    assert!(out.stdout.contains("[reader] got="), "{all}");
    assert!(!out.stdout.contains("LEAK"), "{all}");
}

#[test]
fn exit_codes_and_signals_pass_through_the_namespaces() {
    if !require_qemu_guest() {
        return;
    }
    // Every service runs in namespaces of its own because one declares a secret.
    let (dir, image) = build(
        r#"
name = "exits"
packages = ["busybox-static"]

[services.three]
command = "/bin/busybox"
args = ["sh", "-c", "exit 3"]
secrets = ["token"]
user = "1000:1000"

[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox sleep 1; echo pid=$$; kill -USR1 $$"]
main = true
"#,
    );
    let token = dir.path().join("token.txt");
    std::fs::write(&token, "t").expect("write secret");
    let out = run_image(
        &image,
        &["--secret", &format!("token=@{}", token.display())],
    );
    let all = out.all();
    // The program is PID 2 of its namespace, under the reaper.
    assert!(out.stdout.contains("[main] pid=2"), "{all}");
    assert!(
        out.stdout.contains("service three exited with code 3"),
        "{all}"
    );
    assert!(
        out.stdout.contains("service main was killed by signal 10"),
        "{all}"
    );
    assert_eq!(out.code(), Some(128 + 10), "{all}");
}

/// No service may touch the VMM's I/O ports (boot marker, snapshot, exit): the kernel
/// copies a thread's I/O permission bitmap into what it forks or spawns and an exec
/// keeps it, so guest init holds port access only around its own port I/O
/// (guest/init/src/sys.rs, `Ports`). Guest init's binary in its `port-probe` mode reads
/// the boot-marker port as an ordinary program: it must die of SIGSEGV, as a root
/// service started without a fork, as a non-root one, and as a service in the secrets
/// namespaces, never print "readable".
#[test]
fn services_cannot_reach_the_vmms_io_ports() {
    if !require_qemu_guest() {
        return;
    }
    let probe = "/usr/bin/port-probe port-probe 0x505";
    for (secrets, user) in [(false, "root"), (false, "nobody"), (true, "nobody")] {
        let spec = format!(
            r#"
name = "ports"
packages = ["busybox-static"]

[[files]]
path = "/usr/bin/port-probe"
source = "port-probe"
mode = "0755"

[services.probe]
command = "/usr/bin/port-probe"
args = ["port-probe", "0x505"]
user = "{user}"
{secret_line}

[services.main]
command = "/bin/busybox"
args = ["sleep", "2"]
main = true
"#,
            secret_line = if secrets { "secrets = [\"token\"]" } else { "" },
        );
        let (dir, image) = build_with_files(&spec, &[("port-probe", Path::new(PROBE))]);
        let token = dir.path().join("token.txt");
        std::fs::write(&token, "t").expect("write secret");
        let secret = format!("token=@{}", token.display());
        let args: Vec<&str> = if secrets {
            vec!["--secret", &secret]
        } else {
            Vec::new()
        };
        let out = run_image(&image, &args);
        let c = &out.stdout;
        assert_eq!(out.code(), Some(0), "{probe} as {user}: {}", out.all());
        assert!(
            c.contains("[probe] port-probe: reading port 0x505"),
            "{probe} as {user} (secrets {secrets}) did not run: {c}"
        );
        assert!(
            !c.contains("readable"),
            "a service could read the VMM's port (as {user}, secrets {secrets}): {c}"
        );
        assert!(
            c.contains("service probe was killed by signal 11"),
            "{probe} as {user} (secrets {secrets}): {c}"
        );
    }
}
