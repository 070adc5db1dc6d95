//! Guests through a real daemon on a temporary socket: create, start, stop and delete
//! under the QEMU runner and the built-in VMM, follow the console, and restart on failure
//! with backoff. Each asserts on what a user sees: the console, the status, the process.

mod common;
mod daemon_harness;

use std::time::Duration;

use daemon_harness::{alive, create, running, wait_gone, Daemon, TICKER_SPEC};
use hostd_daemon::guests::record::{Desired, GuestState};
use hostd_daemon::hyper::Method;
use serde_json::json;

#[test]
fn qemu_guest_create_follow_stop_start_delete_through_the_cli() {
    if !common::require_qemu_guest() {
        return;
    }
    let (_img_dir, image) = common::build(TICKER_SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);

    let out = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.args(["up", "--vmm", "qemu", "--name", "web"]).arg(&image);
            c
        },
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}\n{}", out.all(), d.logs());
    let g = d.wait_guest("web", Duration::from_secs(30), running);
    let pid1 = g.pid.expect("pid");
    d.wait_console("web", "guest says hello", Duration::from_secs(120));
    // Its boot timings: the service printed, so every point was passed.
    let boot = d
        .guest("web")
        .boot
        .expect("boot timings of a guest this daemon started");
    let (vm, init, service) = (
        boot.vm_started_ms.expect("vm started"),
        boot.init_started_ms.expect("init started"),
        boot.first_service_ms.expect("first service"),
    );
    assert!(vm <= init && init <= service, "{boot:?}");

    // `hostd logs -f` streams new lines as they come.
    let follow = common::spawn_running({
        let mut c = d.cli();
        c.args(["logs", "-f", "web"]);
        c
    });
    let now = d.console("web");
    let last_tick: u32 = now
        .lines()
        .filter_map(|l| l.split("tick ").nth(1)?.trim().parse().ok())
        .max()
        .unwrap_or(0);
    let later = format!("tick {}", last_tick + 3);
    assert!(
        follow.wait_for(&later, Duration::from_secs(60)),
        "`hostd logs -f` never showed `{later}`\n{}",
        d.logs()
    );
    follow.signal(libc::SIGTERM);
    let _ = follow.finish(Duration::from_secs(10));

    let ps = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.arg("ps");
            c
        },
        Duration::from_secs(30),
    );
    assert!(
        ps.stdout.lines().any(|l| l.starts_with("web ")
            && l.contains("running")
            && l.contains(&pid1.to_string())
            && l.contains(&format!("{vm}ms/{init}ms/{service}ms"))),
        "{}",
        ps.all()
    );

    // Stop: a clean shutdown of the guest (SIGTERM to hostd run), the process is gone.
    let out = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.args(["stop", "web"]);
            c
        },
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.all());
    let g = d.guest("web");
    assert_eq!(g.state, GuestState::Stopped, "{g:?}");
    assert_eq!(g.desired, Desired::Stopped);
    assert_eq!(g.pid, None);
    assert!(
        wait_gone(pid1, Duration::from_secs(10)),
        "pid {pid1} still runs"
    );
    assert!(
        d.console("web").contains("powering off"),
        "the guest did not shut down cleanly:\n{}",
        d.console("web")
    );

    // Start again: a new process, the console keeps the old lines and gets new ones.
    let out = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.args(["start", "web"]);
            c
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.all());
    let g = d.wait_guest("web", Duration::from_secs(30), running);
    let pid2 = g.pid.expect("pid");
    assert_ne!(pid1, pid2);
    let end = std::time::Instant::now() + Duration::from_secs(120);
    while d.console("web").matches("guest says hello").count() < 2 {
        assert!(
            std::time::Instant::now() < end,
            "the restarted guest never greeted:\n{}",
            d.console("web")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Delete: stopped, gone from the API, its process gone.
    let out = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.args(["rm", "web"]);
            c
        },
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.all());
    assert_eq!(
        d.req(Method::GET, "/guests/web", "application/json", Vec::new())
            .status,
        404
    );
    assert!(
        wait_gone(pid2, Duration::from_secs(10)),
        "pid {pid2} still runs"
    );
    assert!(!d.state.join("guests/web").exists());
}

#[test]
fn a_failing_guest_is_restarted_with_growing_backoff() {
    if !common::require_qemu_guest() {
        return;
    }
    let (_img_dir, image) = common::build(
        r#"
name = "crasher"
packages = ["busybox-static"]
[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "echo crashing now; exit 3"]
main = true
"#,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    create(
        &d,
        json!({"name": "crash", "image": image, "vmm": "qemu", "restart": "on-failure"}),
    );
    create(
        &d,
        json!({"name": "once", "image": image, "vmm": "qemu", "restart": "never"}),
    );
    // Watch the backoff the daemon reports between restarts.
    let mut seen: Vec<u64> = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let g = d.guest("crash");
        if let Some(b) = g.backoff_ms {
            if seen.last() != Some(&b) {
                seen.push(b);
            }
        }
        if g.restarts >= 3 && seen.len() >= 3 {
            assert_eq!(g.exit_code.or(Some(3)), Some(3), "{g:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "{g:?} backoffs {seen:?}\n{}\n{}",
            d.console("crash"),
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(&seen[..3], &[1000, 2000, 4000], "backoffs seen: {seen:?}");
    let console = d.console("crash");
    assert!(console.matches("crashing now").count() >= 3, "{console}");
    let g = d.guest("crash");
    assert_eq!(g.last_exit.as_deref(), Some("exited with code 3"), "{g:?}");

    // restart = "never": it exits once and stays down, exit code kept.
    let g = d.wait_guest("once", Duration::from_secs(120), |g| {
        g.state == GuestState::Exited
    });
    assert_eq!((g.exit_code, g.restarts), (Some(3), 0), "{g:?}");

    // Stopping a guest that is backing off cancels the pending restart.
    let stopped: hostd_daemon::guests::record::GuestStatus = d
        .client
        .json(Method::POST, "/guests/crash/stop", None::<&()>)
        .expect("stop");
    if let Some(pid) = stopped.pid {
        assert!(wait_gone(pid, Duration::from_secs(30)));
    }
    let restarts = d.guest("crash").restarts;
    std::thread::sleep(Duration::from_secs(5));
    let g = d.guest("crash");
    assert_eq!(
        (g.state, g.restarts),
        (GuestState::Stopped, restarts),
        "{g:?}"
    );
}

#[test]
fn builtin_vmm_guest_runs_stops_and_is_deleted() {
    if !common::require_qemu_guest()
        || !common::require("/dev/kvm", common::kvm_usable(), "a host with KVM")
    {
        return;
    }
    let (_img_dir, image) = common::build(TICKER_SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let g = create(&d, json!({"name": "kvm", "image": image, "vmm": "builtin"}));
    let pid = g.pid.expect("pid");
    assert!(alive(pid));
    // A boot on a nested PVM host takes seconds of emulated kernel code (docs/pvm.md),
    // many more on a loaded host (packages_qemu.rs allows 1800 s as well).
    d.wait_console("kvm", "tick 2", Duration::from_secs(1800));
    let g = d.guest("kvm");
    assert_eq!((g.state, g.pid), (GuestState::Running, Some(pid)), "{g:?}");
    let stopped: hostd_daemon::guests::record::GuestStatus = d
        .client
        .json(Method::POST, "/guests/kvm/stop", None::<&()>)
        .expect("stop");
    assert_eq!(stopped.state, GuestState::Stopped, "{stopped:?}");
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let a = d.req(
        Method::DELETE,
        "/guests/kvm",
        "application/json",
        Vec::new(),
    );
    assert_eq!(a.status, 204, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        d.req(Method::GET, "/guests/kvm", "application/json", Vec::new())
            .status,
        404
    );
}

/// Two guests of one image that declares a volume: each has its own, so both run at
/// once (daemons that gave every guest the same state directory shared the volume: its
/// lock let one run, the other backed off). A volume of that shared layout is moved to
/// the first guest that starts (the same file: its inode is kept), not made anew.
#[test]
fn guests_of_one_image_have_volumes_of_their_own_and_shared_ones_move_to_the_first() {
    use std::os::unix::fs::MetadataExt;
    if !common::require_qemu_guest() {
        return;
    }
    const SPEC: &str = r#"
name = "keeper"
memory = "128M"
packages = ["busybox-static"]

[[volumes]]
name = "data"
size = "16M"
mount = "/data"

[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "echo volume holds $(/bin/busybox ls /data | /bin/busybox wc -l) names; echo kept > /data/mark; /bin/busybox sync; echo mark written; /bin/busybox sleep 600"]
main = true
"#;
    let (_img_dir, image) = common::build(SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    // The shared layout of older daemons: STATE/volumes was every guest's state dir.
    let shared = dir.path().join("state/volumes");
    let old = hostd_vmm::volumes::ensure(&shared, "data", 16).expect("shared volume");
    let old_ino = std::fs::metadata(&old).expect("stat").ino();
    let d = Daemon::start(dir.path(), &[]);
    for name in ["a", "b"] {
        create(&d, json!({"name": name, "image": image, "vmm": "qemu"}));
    }
    for name in ["a", "b"] {
        d.wait_console(name, "mark written", Duration::from_secs(600));
    }
    for name in ["a", "b"] {
        let g = d.guest(name);
        assert!(running(&g), "{g:?}\n{}", d.logs());
    }
    let own = |name: &str| {
        std::fs::metadata(
            d.state
                .join(format!("guest-volumes/{name}/volumes/data.ext4")),
        )
        .unwrap_or_else(|e| panic!("guest {name}'s volume: {e}"))
        .ino()
    };
    assert_eq!(own("a"), old_ino, "a took the shared volume");
    assert_ne!(own("b"), old_ino, "b has one of its own");
    assert!(!old.exists(), "moved, not copied");
    assert!(
        d.logs()
            .contains("guest a: volume data moved from the shared"),
        "{}",
        d.logs()
    );
    for name in ["a", "b"] {
        let a = d.req(
            Method::DELETE,
            &format!("/guests/{name}"),
            "application/json",
            Vec::new(),
        );
        assert_eq!(a.status, 204, "{}", String::from_utf8_lossy(&a.body));
    }
    // Deleting a guest keeps its volumes.
    assert_eq!(own("a"), old_ino);
}
