//! Images booted for real: our kernel, guest init and busybox under QEMU (TCG on this
//! kind of host). Each test asserts on what a user sees: the console and the exit code.

mod common;

use common::{build, hostd, line_of, require_qemu_guest, run_image, spawn_running};
use std::time::Duration;

#[test]
fn hello_example_prints_and_exits_zero_with_timings() {
    if !require_qemu_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("hello.img");
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/images/examples/hello.toml");
    let out = common::run_with_deadline(
        {
            let mut c = hostd();
            c.arg("build").arg(spec).arg("-o").arg(&image);
            c
        },
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.all());
    let out = run_image(&image, &["--timings"]);
    assert_eq!(out.code(), Some(0), "{}", out.all());
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
    let timings = out
        .stderr
        .lines()
        .find(|l| l.contains("timings"))
        .unwrap_or_default();
    assert!(
        timings.contains("guest init") && !timings.contains("guest init -"),
        "{}",
        out.all()
    );
}

#[test]
fn main_service_exit_code_is_hostds_exit_code() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "exit7"
packages = ["busybox-static"]
[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "echo about to exit 7; exit 7"]
main = true
"#,
    );
    let out = run_image(&image, &[]);
    assert_eq!(out.code(), Some(7), "{}", out.all());
    assert!(
        out.stdout.contains("[main] about to exit 7"),
        "{}",
        out.all()
    );
}

/// A root service outside the secrets namespaces is started without a fork
/// (guest/init/src/vspawn.rs): it must still get exactly its environment, working
/// directory, /dev/null as stdin, a process group of its own and no blocked or ignored
/// signals, and a program that cannot be executed must still fail as before.
#[test]
fn a_root_service_gets_its_environment_directory_and_signals() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "spawnenv"
packages = ["busybox-static"]

[services.broken]
command = "/etc/passwd"

[services.main]
command = "/bin/busybox"
args = ["sh", "-c", """
echo "cwd $(pwd) home $HOME x $X path $PATH"
echo "env $(env | /bin/busybox wc -l)"
/bin/busybox grep -E '^Sig(Blk|Ign)' /proc/self/status
echo "stdin $(/bin/busybox wc -c)"
echo "group $(/bin/busybox cut -d' ' -f5 /proc/$$/stat) pid $$"
"""]
workdir = "/tmp"
env = { X = "y" }
main = true
"#,
    );
    let out = run_image(&image, &[]);
    let c = &out.stdout;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        c.contains("[main] cwd /tmp home /root x y path /usr/local/sbin:"),
        "{c}"
    );
    // PATH, HOME, X (and the PWD and SHLVL the shell sets itself).
    assert!(c.contains("[main] env "), "{c}");
    assert!(c.contains("[main] SigBlk:\t0000000000000000"), "{c}");
    // A shell may ignore a few signals itself; SIGPIPE (bit 12) and SIGTERM (bit 14)
    // reach a service with their default action.
    let ignored = c
        .split("[main] SigIgn:\t")
        .nth(1)
        .and_then(|s| s.get(..16))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("SigIgn line");
    assert_eq!(ignored & ((1 << 12) | (1 << 14)), 0, "{c}");
    assert!(c.contains("[main] stdin 0"), "{c}");
    let group = c
        .split("[main] group ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or_default();
    let mut it = group.split(" pid ");
    assert_eq!(it.next(), it.next(), "own process group: {c}");
    assert!(
        c.contains("service broken cannot start: cannot start /etc/passwd: Permission denied"),
        "{c}"
    );
}

#[test]
fn services_start_in_dependency_order_and_failures_restart() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "order"
hostname = "order-test"
packages = ["busybox-static"]

[[boot]]
name = "prepare"
command = "/bin/busybox"
args = ["sh", "-c", "echo boot step ran > /run/boot-step"]

[services.db]
command = "/bin/busybox"
args = ["sh", "-c", "echo db up; exec /bin/busybox sleep 1000"]

[services.cache]
command = "/bin/busybox"
args = ["sh", "-c", "echo cache up; exec /bin/busybox sleep 1000"]
depends_on = ["db"]

[services.app]
command = "/bin/busybox"
args = ["sh", "-c", """
cat /run/boot-step
echo "hostname $(hostname)"
if [ -e /tmp/crashed-once ]; then echo second run ok; exit 0; fi
touch /tmp/crashed-once
echo first run, crashing
exit 3
"""]
depends_on = ["cache", "db"]
restart = "on-failure"
main = true
"#,
    );
    let out = run_image(&image, &[]);
    let c = &out.stdout;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    let db = line_of(c, "service db started").expect("db started");
    let cache = line_of(c, "service cache started").expect("cache started");
    let app = line_of(c, "service app started").expect("app started");
    assert!(db < cache && cache < app, "wrong start order:\n{c}");
    assert!(
        line_of(c, "boot step prepare done").is_some_and(|b| b < db),
        "{c}"
    );
    assert!(
        c.contains("[app] boot step ran") && c.contains("[app] hostname order-test"),
        "{c}"
    );
    let crash = line_of(c, "[app] first run, crashing").expect("first run");
    let restart = line_of(c, "restarting service app").expect("restart logged");
    let second = line_of(c, "[app] second run ok").expect("second run");
    assert!(crash < restart && restart < second, "{c}");
    assert!(c.contains("service app exited with code 3"), "{c}");
    // The other services were stopped with SIGTERM when main finished.
    assert!(
        c.contains("sending SIGTERM to service db")
            && c.contains("service db was killed by signal 15"),
        "{c}"
    );
}

#[test]
fn ctrl_c_stops_services_with_sigterm_and_powers_off() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "shutdown"
packages = ["busybox-static"]
stop_timeout = 2

[services.server]
command = "/bin/busybox"
args = ["sh", "-c", "trap 'echo got SIGTERM, cleaning up; exit 0' TERM; echo ready; while true; do /bin/busybox sleep 1; done"]
main = true

[services.stubborn]
command = "/bin/busybox"
args = ["sh", "-c", "trap '' TERM; echo ready; while true; do /bin/busybox sleep 1; done"]
"#,
    );
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", "qemu", "--timeout", "240"])
        .arg(&image);
    let run = spawn_running(cmd);
    // Both traps are set once both services said so.
    let ready = run.wait_for_all(
        &["[server] ready", "[stubborn] ready"],
        Duration::from_secs(240),
    );
    // What a terminal's Ctrl-C does.
    run.signal(libc::SIGINT);
    let out = run.finish(Duration::from_secs(120));
    let (status, console) = (out.status, out.stdout);
    assert!(ready, "the services never became ready:\n{console}");
    assert_eq!(status.code(), Some(0), "{console}");
    assert!(
        console.contains("shutdown requested by the host"),
        "{console}"
    );
    assert!(
        console.contains("[server] got SIGTERM, cleaning up"),
        "{console}"
    );
    assert!(
        console.contains("service server exited with code 0"),
        "{console}"
    );
    assert!(
        console.contains("service stubborn did not stop in 2s; sending SIGKILL"),
        "{console}"
    );
    assert!(
        console.contains("hostd-init: powering off (exit code 0)"),
        "{console}"
    );
}
