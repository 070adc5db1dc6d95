//! Crash safety: `kill -9` of the daemon while 2 guests run. The guests keep running
//! (their own sessions, no parent-death signal); a new daemon on the same state reports
//! the same guests, re-adopted with the same pids, not rebooted, and still supervises
//! them (their consoles keep flowing, stop works).

mod common;
mod daemon_harness;

use std::time::Duration;

use daemon_harness::{alive, create, running, wait_gone, Daemon, TICKER_SPEC};
use hostd_daemon::guests::record::{GuestState, GuestStatus};
use hostd_daemon::hyper::Method;

fn last_tick(console: &str) -> u32 {
    console
        .lines()
        .filter_map(|l| l.split("tick ").nth(1)?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn guests_survive_kill_9_of_the_daemon_and_are_re_adopted() {
    if !common::require_qemu_guest() {
        return;
    }
    let (_img_dir, image) = common::build(TICKER_SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    for n in ["one", "two"] {
        create(
            &d,
            serde_json::json!({"name": n, "image": image, "vmm": "qemu"}),
        );
    }
    // A third guest, stopped: it must come back stopped.
    create(
        &d,
        serde_json::json!({"name": "idle", "image": image, "vmm": "qemu", "start": false}),
    );
    let mut pids = Vec::new();
    for n in ["one", "two"] {
        let g = d.wait_guest(n, Duration::from_secs(60), running);
        d.wait_console(n, "tick 2", Duration::from_secs(180));
        pids.push(g.pid.expect("pid"));
    }

    d.kill9();
    for p in &pids {
        assert!(alive(*p), "guest process {p} died with the daemon");
    }
    std::thread::sleep(Duration::from_secs(2));

    let d2 = Daemon::start(dir.path(), &[]);
    let all: Vec<GuestStatus> = d2.get("/guests");
    assert_eq!(
        all.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["idle", "one", "two"]
    );
    for (n, pid) in ["one", "two"].iter().zip(&pids) {
        let g = d2.guest(n);
        assert_eq!(
            (g.state, g.pid, g.adopted, g.restarts),
            (GuestState::Running, Some(*pid), true, 0),
            "{g:?}\n{}",
            d2.logs()
        );
        // Not rebooted: one boot in the console, and it keeps ticking (followed from
        // the file the surviving process writes).
        let c = d2.console(n);
        assert_eq!(c.matches("guest says hello").count(), 1, "{c}");
        let t = last_tick(&c);
        d2.wait_console(n, &format!("tick {}", t + 2), Duration::from_secs(60));
    }
    let idle = d2.guest("idle");
    assert_eq!(
        (idle.state, idle.pid),
        (GuestState::Stopped, None),
        "{idle:?}"
    );

    // Still supervised: stop an adopted guest; its status is unknown to the new daemon.
    let g: GuestStatus = d2
        .client
        .json(Method::POST, "/guests/one/stop", None::<&()>)
        .expect("stop");
    assert_eq!(g.state, GuestState::Stopped, "{g:?}");
    assert_eq!(
        g.last_exit.as_deref(),
        Some("exited (adopted, status unknown)")
    );
    assert!(wait_gone(pids[0], Duration::from_secs(10)));
    assert!(alive(pids[1]));
}
