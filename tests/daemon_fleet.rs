//! Reconcile through a real daemon: `hostd apply` of a fleet of 3 QEMU guests; applying
//! it again restarts nothing (same pids); removing one stops and deletes it; changing one
//! replaces it (new pid) and leaves the others alone. A guest made by hand is untouched.

mod common;
mod daemon_harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use daemon_harness::{alive, create, running, wait_gone, Daemon, TICKER_SPEC};
use hostd_daemon::guests::record::{GuestStatus, Origin};
use hostd_daemon::hyper::Method;

fn apply(d: &Daemon, fleet: &Path) -> BTreeMap<String, Vec<String>> {
    let out = common::run_with_deadline(
        {
            let mut c = d.cli();
            c.arg("apply").arg(fleet);
            c
        },
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "{}\n{}", out.all(), d.logs());
    let mut r: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in out.stdout.lines() {
        let mut w = l.split_whitespace();
        if let (Some(what), Some(name)) = (w.next(), w.next()) {
            r.entry(what.to_owned()).or_default().push(name.to_owned());
        }
    }
    r
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn pids(d: &Daemon) -> BTreeMap<String, u32> {
    d.get::<Vec<GuestStatus>>("/guests")
        .into_iter()
        .filter_map(|g| Some((g.name, g.pid?)))
        .collect()
}

#[test]
fn apply_creates_is_idempotent_removes_and_replaces() {
    if !common::require_qemu_guest() {
        return;
    }
    let (img_dir, _image) = common::build(TICKER_SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    // A guest made by hand, not in the fleet: apply must leave it alone.
    let manual = create(
        &d,
        serde_json::json!({"name": "manual", "image": img_dir.path().join("app.img"), "vmm": "qemu", "start": false}),
    );
    assert_eq!(manual.origin, Origin::Manual);

    let fleet = img_dir.path().join("fleet.toml");
    let guest = |name: &str, extra: &str| {
        format!(
            "[guests.{name}]\nimage = \"app.img\"\nvmm = \"qemu\"\nmemory = \"256M\"\n{extra}\n"
        )
    };
    std::fs::write(
        &fleet,
        guest("a", "") + &guest("b", "") + &guest("c", "restart = \"always\""),
    )
    .expect("write fleet");
    let r = apply(&d, &fleet);
    assert_eq!(r.get("created"), Some(&names(&["a", "b", "c"])), "{r:?}");
    for n in ["a", "b", "c"] {
        d.wait_guest(n, Duration::from_secs(60), running);
        d.wait_console(n, "guest says hello", Duration::from_secs(180));
    }
    let before = pids(&d);
    assert_eq!(before.len(), 3, "{before:?}");
    // (A first boot that failed under load may have been restarted by policy already;
    // what counts is that the second apply restarts nothing.)
    let restarts: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|n| d.guest(n).restarts)
        .collect();
    let hellos: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|n| d.console(n).matches("guest says hello").count())
        .collect();

    // Again: nothing changes, nothing restarts.
    let r = apply(&d, &fleet);
    assert_eq!(r.get("unchanged"), Some(&names(&["a", "b", "c"])), "{r:?}");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(pids(&d), before);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let g = d.guest(n);
        assert_eq!(
            g.restarts,
            restarts[i],
            "{g:?}\n--- console ---\n{}\n--- daemon ---\n{}",
            d.console(n),
            d.logs()
        );
        let c = d.console(n);
        assert_eq!(
            c.matches("guest says hello").count(),
            hellos[i],
            "{n} rebooted:\n{c}"
        );
    }

    // Remove c: stopped and deleted.
    std::fs::write(&fleet, guest("a", "") + &guest("b", "")).expect("write fleet");
    let r = apply(&d, &fleet);
    assert_eq!(r.get("removed"), Some(&names(&["c"])), "{r:?}");
    assert_eq!(r.get("unchanged"), Some(&names(&["a", "b"])), "{r:?}");
    assert_eq!(
        d.req(Method::GET, "/guests/c", "application/json", Vec::new())
            .status,
        404
    );
    assert!(wait_gone(before["c"], Duration::from_secs(10)));

    // Change b (its memory): replaced, with a new process; a untouched.
    std::fs::write(
        &fleet,
        guest("a", "") + &guest("b", "").replace("256M", "192M"),
    )
    .expect("write fleet");
    let r = apply(&d, &fleet);
    assert_eq!(r.get("replaced"), Some(&names(&["b"])), "{r:?}");
    assert_eq!(r.get("unchanged"), Some(&names(&["a"])), "{r:?}");
    let b = d.wait_guest("b", Duration::from_secs(60), running);
    assert_ne!(b.pid, Some(before["b"]));
    assert_eq!(b.spec.memory.as_deref(), Some("192M"));
    assert!(wait_gone(before["b"], Duration::from_secs(10)));
    assert_eq!(d.guest("a").pid, Some(before["a"]));
    assert!(alive(before["a"]));

    // The hand-made guest was never touched.
    let m = d.guest("manual");
    assert_eq!((m.origin, m.pid), (Origin::Manual, None));
}

/// A guest renamed in the fleet (the old name removed, the new one created from the
/// same image in one apply): the removal must not collect the image the new guest
/// needs, and a collection afterwards keeps it.
#[test]
fn a_guest_renamed_in_the_fleet_keeps_its_image() {
    if !common::require_qemu_guest() {
        return;
    }
    let (img_dir, _image) = common::build(TICKER_SPEC);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let fleet = img_dir.path().join("rename.toml");
    let guest = |name: &str| {
        format!("[guests.{name}]\nimage = \"app.img\"\nvmm = \"qemu\"\nautostart = false\n")
    };
    std::fs::write(&fleet, guest("old")).expect("write fleet");
    assert_eq!(apply(&d, &fleet).get("created"), Some(&names(&["old"])));
    let digest = d.guest("old").image_digest;
    std::fs::write(&fleet, guest("new")).expect("write fleet");
    let r = apply(&d, &fleet);
    assert_eq!(r.get("removed"), Some(&names(&["old"])), "{r:?}");
    assert_eq!(r.get("created"), Some(&names(&["new"])), "{r:?}");
    assert_eq!(d.guest("new").image_digest, digest);
    let image = |d: &Daemon| {
        d.req(
            Method::GET,
            &format!("/images/sha256:{digest}"),
            "application/json",
            Vec::new(),
        )
        .status
    };
    assert_eq!(image(&d), 200, "{}", d.logs());
    d.req(Method::POST, "/images/gc", "application/json", Vec::new());
    assert_eq!(image(&d), 200, "{}", d.logs());
}
