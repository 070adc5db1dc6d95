//! hostd guest init: PID 1 inside every hostd guest.
//!
//! Mounts the basic file systems, reads the manifest, switches to the image's read-only
//! root file system when it has one, runs the boot steps, starts the
//! services in dependency order and supervises them (restart policies, zombie reaping),
//! relays their output to the console, and powers the VM off with the `main`
//! service's exit code. SIGTERM (or the host's shutdown request on the console) stops
//! every service with SIGTERM, then SIGKILL after the manifest's stop timeout.

mod caps;
mod console;
mod isolate;
mod net;
mod resume;
mod root;
mod secrets;
mod spawn;
mod sys;
mod tmpfs;
mod volumes;
mod vspawn;

use std::time::{Duration, Instant};

use console::log;
use hostd_images::abi::{self, marker};
use hostd_images::manifest::{Manifest, Restart, Service, MANIFEST_PATH_IN_GUEST};
use sys::Exit;

/// First restart delay; doubles per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A service that ran at least this long starts over at [`FIRST_BACKOFF`].
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How long an exit waits for the program's last output to reach the console.
const RELAY_DRAIN: Duration = Duration::from_millis(500);

fn main() {
    if std::process::id() != 1 {
        // Run as an ordinary program (the tests place this binary in a guest).
        let args: Vec<String> = std::env::args().collect();
        if let [_, mode, port, rest @ ..] = args.as_slice() {
            if mode == "vsock-probe" && rest.len() <= 1 {
                std::process::exit(secrets::probe(port, rest.first().map(String::as_str)));
            }
            if mode == "port-probe" && rest.is_empty() {
                std::process::exit(sys::port_probe(port));
            }
        }
    }
    if let Err(e) = sys::block_signals() {
        log(&format!("cannot block signals: {e}"));
    }
    let _ = sys::outb(abi::BOOT_MARKER_PORT, marker::INIT_STARTED);
    log(abi::LINE_STARTED);
    mount_basics();
    let manifest = match std::fs::read(MANIFEST_PATH_IN_GUEST)
        .map_err(|e| e.to_string())
        .and_then(|b| Manifest::from_json(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            log(&format!("cannot read {MANIFEST_PATH_IN_GUEST}: {e}"));
            finish(abi::EXIT_INIT_FAILED);
        }
    };
    if let Some(root) = &manifest.root {
        if let Err(e) = root::switch_to(root) {
            log(&e);
            finish(abi::EXIT_INIT_FAILED);
        }
        log(&format!(
            "root file system {} ({}, read-only) mounted",
            abi::ROOT_DEVICE,
            root.fs
        ));
    }
    // The same on every run, so before the snapshot point: a VM restored from it does not
    // redo them (each is guest kernel work: bringing the loopback up and starting a
    // thread cost 100-150 ms apiece on a nested PVM host).
    if let Err(e) = net::loopback_up() {
        log(&format!("network: {e}"));
    }
    console::watch_for_shutdown_request();
    console::start_relay_thread();
    // The snapshot point: nothing of this run's volumes, secrets or services is in the
    // VM yet (docs/snapshots.md).
    resume::snapshot_point();
    if let Err(e) = volumes::mount_all(&manifest.volumes) {
        log(&e);
        finish(abi::EXIT_INIT_FAILED);
    }
    let _ = MOUNTED_VOLUMES.set(manifest.volumes.clone());
    if let Err(e) = tmpfs::mount_all(&manifest.tmpfs) {
        log(&e);
        finish(abi::EXIT_INIT_FAILED);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match net::parse(&cmdline) {
        Ok(cfg) => {
            if let Err(e) = net::configure(cfg.as_ref()) {
                log(&format!("network: {e}"));
            } else if let Some(c) = cfg {
                log(&format!("network: eth0 {}/{}", c.addr, c.prefix));
            }
        }
        Err(e) => log(&format!("network: {e}")),
    }
    match net::resolver(&cmdline, manifest.network.as_ref()) {
        Ok(Some(conf)) => match net::write_resolv_conf(&conf) {
            Ok(()) => log(&format!("network: resolver {}", conf.summary())),
            Err(e) => log(&format!("network: {e}")),
        },
        Ok(None) => {}
        Err(e) => log(&format!("network: {e}")),
    }
    if let Err(e) = sys::sethostname(&manifest.hostname) {
        log(&format!("cannot set hostname: {e}"));
    }
    let mut secret_dirs = secrets::deliver(&manifest, &cmdline);
    let cap_dirs = caps::offer(&manifest);
    if cap_dirs.is_some() && secret_dirs.is_none() {
        // Capability sockets are per service: isolate services (with empty
        // /run/secrets) even when no secrets were delivered.
        if let Err(e) = secrets::empty_store() {
            log(&format!("secrets: {e}"));
        }
        secret_dirs = Some(Default::default());
    }
    let mut sup = Supervisor::new(&manifest);
    sup.secrets = secret_dirs;
    sup.caps = cap_dirs;
    if let Err(code) = sup.run_boot_steps(&manifest) {
        finish(code);
    }
    let code = sup.run();
    finish(code)
}

fn mount_basics() {
    const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 7] = [
        ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = sys::mount(src, target, fstype, flags, data) {
            log(&format!("cannot mount {fstype} on {target}: {e}"));
        }
    }
}

/// Volumes to unmount at power-off.
static MOUNTED_VOLUMES: std::sync::OnceLock<Vec<hostd_images::manifest::Volume>> =
    std::sync::OnceLock::new();

/// Prints the last line, drains the relays, unmounts volumes and powers off.
fn finish(code: u8) -> ! {
    console::drain(Duration::from_secs(1));
    if let Some(v) = MOUNTED_VOLUMES.get() {
        volumes::unmount_all(v);
    }
    log(&format!("{}{code})", abi::LINE_POWER_OFF));
    sys::power_off(code)
}

/// Clamps a process exit code to the byte the exit port carries.
fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

#[derive(Debug)]
struct Svc {
    name: String,
    spec: Service,
    pid: Option<i32>,
    relay: console::Relay,
    started_at: Option<Instant>,
    failures: u32,
    restart_at: Option<Instant>,
    last_exit: Option<Exit>,
}

#[derive(Debug)]
struct Supervisor {
    /// Services in start order.
    services: Vec<Svc>,
    stop_timeout: Duration,
    /// Set once shutdown began: the exit code and when to SIGKILL.
    stopping: Option<(u8, Instant)>,
    /// Once secrets were delivered: each granted service's store directory.
    secrets: Option<std::collections::BTreeMap<String, String>>,
    /// Once capability sockets were offered: each granted service's socket directory.
    caps: Option<std::collections::BTreeMap<String, String>>,
}

impl Supervisor {
    fn new(m: &Manifest) -> Self {
        // The builder validated the graph; fall back to name order if it did not.
        let order = m
            .start_order()
            .unwrap_or_else(|| m.services.keys().cloned().collect());
        let services = order
            .into_iter()
            .filter_map(|name| {
                let spec = m.services.get(&name)?.clone();
                Some(Svc {
                    name,
                    spec,
                    pid: None,
                    relay: console::Relay::default(),
                    started_at: None,
                    failures: 0,
                    restart_at: None,
                    last_exit: None,
                })
            })
            .collect();
        Supervisor {
            services,
            stop_timeout: Duration::from_secs(u64::from(m.stop_timeout_secs)),
            stopping: None,
            secrets: None,
            caps: None,
        }
    }

    /// Runs the boot steps in order; a failing step fails the boot.
    fn run_boot_steps(&mut self, m: &Manifest) -> Result<(), u8> {
        for step in &m.boot {
            log(&format!("boot step {} running", step.name));
            let view = self.secrets.as_ref().map(|_| None);
            let caps = self.caps.as_ref().map(|_| None);
            let (pid, relay) = spawn::spawn(
                &step.name, &step.argv, &step.env, &step.user, "/", view, caps,
            )
            .map_err(|e| {
                log(&format!("boot step {} failed: {e}", step.name));
                abi::EXIT_INIT_FAILED
            })?;
            let exit = loop {
                match sys::wait_signal(Duration::from_secs(1)) {
                    Some(libc::SIGCHLD) | None => {}
                    Some(_) => {
                        log(&format!(
                            "shutdown requested during boot step {}",
                            step.name
                        ));
                        sys::kill_group(pid, libc::SIGKILL);
                        return Err(0);
                    }
                }
                if let Some(exit) = reap_until(pid) {
                    break exit;
                }
            };
            relay.wait(RELAY_DRAIN);
            if !exit.success() {
                log(&format!("boot step {} {exit}; stopping", step.name));
                return Err(abi::EXIT_INIT_FAILED);
            }
            log(&format!("boot step {} done", step.name));
        }
        Ok(())
    }

    fn run(&mut self) -> u8 {
        if self.services.is_empty() {
            log("no services; waiting for a shutdown request");
        }
        for i in 0..self.services.len() {
            self.start(i);
        }
        let _ = sys::outb(abi::BOOT_MARKER_PORT, marker::SERVICES_STARTED);
        loop {
            let sig = sys::wait_signal(self.next_timeout());
            match sig {
                Some(libc::SIGCHLD) | None => {}
                Some(_) => self.begin_stop(self.main_code().unwrap_or(0), "shutdown requested"),
            }
            while let Some((pid, exit)) = sys::reap_one() {
                self.on_exit(pid, exit);
            }
            if let Some((code, kill_at)) = self.stopping {
                if self.services.iter().all(|s| s.pid.is_none()) {
                    // Anything left (daemons a service forked off) goes now.
                    sys::kill_all(libc::SIGKILL);
                    while sys::reap_one().is_some() {}
                    return code;
                }
                if Instant::now() >= kill_at {
                    for s in &self.services {
                        if let Some(pid) = s.pid {
                            log(&format!(
                                "service {} did not stop in {:?}; sending SIGKILL",
                                s.name, self.stop_timeout
                            ));
                            sys::kill_group(pid, libc::SIGKILL);
                        }
                    }
                    self.stopping = Some((code, Instant::now() + Duration::from_secs(3600)));
                }
                continue;
            }
            let now = Instant::now();
            for i in 0..self.services.len() {
                if self.services[i].restart_at.is_some_and(|t| t <= now) {
                    self.services[i].restart_at = None;
                    self.start(i);
                }
            }
        }
    }

    /// How long to wait for a signal: until the next restart or SIGKILL is due. With
    /// neither, an hour: every event (a service's end, a shutdown request) comes as a
    /// signal, so an idle guest's init wakes for nothing (it used to look every second).
    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        for s in &self.services {
            if let Some(t) = s.restart_at {
                next = next.min(t);
            }
        }
        if let Some((_, kill_at)) = self.stopping {
            next = next.min(kill_at);
        }
        next.saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    fn main_code(&self) -> Option<u8> {
        self.services
            .iter()
            .find(|s| s.spec.main)
            .and_then(|s| s.last_exit)
            .map(|e| exit_byte(e.code()))
    }

    fn start(&mut self, i: usize) {
        let s = &mut self.services[i];
        let view = self
            .secrets
            .as_ref()
            .map(|dirs| dirs.get(&s.name).map(String::as_str));
        let caps = self
            .caps
            .as_ref()
            .map(|dirs| dirs.get(&s.name).map(String::as_str));
        match spawn::spawn(
            &s.name,
            &s.spec.argv,
            &s.spec.env,
            &s.spec.user,
            &s.spec.workdir,
            view,
            caps,
        ) {
            Ok((pid, relay)) => {
                s.relay = relay;
                log(&format!(
                    "{}{} started (pid {pid})",
                    abi::LINE_SERVICE_STARTED,
                    s.name
                ));
                s.pid = Some(pid);
                s.started_at = Some(Instant::now());
            }
            Err(e) => {
                log(&format!("service {} cannot start: {e}", s.name));
                // A program that cannot be started behaves like one that exited 127.
                self.after_exit(i, Exit::Code(127));
            }
        }
    }

    fn on_exit(&mut self, pid: i32, exit: Exit) {
        let Some(i) = self.services.iter().position(|s| s.pid == Some(pid)) else {
            return; // an orphan we inherited as PID 1: reaped, nothing else to do
        };
        let s = &mut self.services[i];
        s.pid = None;
        s.relay.wait(RELAY_DRAIN);
        log(&format!("service {} {exit}", s.name));
        // Whatever else is left in its process group goes with it.
        sys::kill_group(pid, libc::SIGKILL);
        self.after_exit(i, exit);
    }

    fn after_exit(&mut self, i: usize, exit: Exit) {
        let s = &mut self.services[i];
        s.last_exit = Some(exit);
        if self.stopping.is_some() {
            return;
        }
        let restart = match s.spec.restart {
            Restart::No => false,
            Restart::OnFailure => !exit.success(),
            Restart::Always => true,
        };
        if restart {
            if s.started_at.is_some_and(|t| t.elapsed() >= HEALTHY_RUN) {
                s.failures = 0;
            }
            let delay = FIRST_BACKOFF
                .saturating_mul(1 << s.failures.min(6))
                .min(MAX_BACKOFF);
            s.failures += 1;
            log(&format!(
                "restarting service {} in {} ms (restart = {:?}, restart #{})",
                s.name,
                delay.as_millis(),
                s.spec.restart,
                s.failures
            ));
            s.restart_at = Some(Instant::now() + delay);
        } else if s.spec.main {
            let code = exit_byte(exit.code());
            let name = s.name.clone();
            self.begin_stop(code, &format!("main service {name} finished"));
        }
    }

    fn begin_stop(&mut self, code: u8, why: &str) {
        if self.stopping.is_some() {
            return;
        }
        log(&format!("{why}; stopping services"));
        self.stopping = Some((code, Instant::now() + self.stop_timeout));
        for s in self.services.iter_mut().rev() {
            s.restart_at = None;
            if let Some(pid) = s.pid {
                log(&format!("sending SIGTERM to service {}", s.name));
                sys::kill_group(pid, libc::SIGTERM);
            }
        }
    }
}

/// Reaps children until `pid` is among them; other children that exit meanwhile are
/// boot-time orphans and are simply reaped.
fn reap_until(pid: i32) -> Option<Exit> {
    while let Some((p, exit)) = sys::reap_one() {
        if p == pid {
            return Some(exit);
        }
    }
    None
}
