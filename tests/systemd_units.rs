//! The units `hostd systemd generate` writes, run by a real systemd (issue 13): Debian's
//! systemd 252 as PID 1 of fresh namespaces (../shared/tools/systemd-ns). A guest unit
//! boots its image under QEMU and its console reaches the journal, it is `Type=notify`
//! (active once guest init started the services), `systemctl stop` shuts the guest down
//! cleanly, a crashing guest is restarted by its policy, secrets given as systemd
//! credentials reach only the guest services that declare them, an image given as a
//! spec is built once and then reused, and a guest dropped from the fleet is stopped by
//! the next `hostd systemd apply`. And `systemd-analyze verify` says nothing about any
//! unit generated.

mod common;

use common::{hostd, is_root, kernel, require, require_qemu_guest};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The systemd-ns tool: `$HOSTD_SYSTEMD_NS`, else `shared/tools/systemd-ns` beside the
/// checkout or beside one of its parent directories (`../shared/tools/systemd-ns` from a
/// checkout next to the shared folder).
fn systemd_ns_tool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HOSTD_SYSTEMD_NS") {
        return Some(PathBuf::from(p));
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .skip(1)
        .map(|d| d.join("shared/tools/systemd-ns"))
        .find(|p| p.is_file())
}
const HELLO_LOCK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/images/examples/hello.lock");

/// A long-running guest: `web` reads its secret and answers SIGTERM; `other` does not
/// declare the secret and looks for it anyway.
const WEB: &str = r#"
name = "web"
memory = "128M"
stop_timeout = 3
packages = ["busybox-static"]

[services.web]
command = "/bin/busybox"
args = ["sh", "-c", "echo web says hello; echo web got=$(/bin/busybox cat /run/secrets/token); trap 'echo web got SIGTERM; exit 0' TERM; while true; do /bin/busybox sleep 1 & wait $!; done"]
secrets = ["token"]
main = true

[services.other]
command = "/bin/busybox"
args = ["sh", "-c", "echo other sees=$(/bin/busybox cat /run/secrets/token 2>/dev/null || echo nothing)"]
"#;

/// A guest whose main service fails at once.
const CRASH: &str = r#"
name = "crash"
memory = "128M"
packages = ["busybox-static"]

[services.crash]
command = "/bin/busybox"
args = ["sh", "-c", "echo crash run; exit 3"]
main = true
"#;

/// A guest given as a spec, built by its unit (the kernel sits next to the spec).
const BUILT: &str = r#"
name = "built"
kernel = "vmlinux"
memory = "128M"
packages = ["busybox-static"]

[services.hello]
command = "/bin/busybox"
args = ["echo", "hello from a unit-built image"]
main = true
"#;

fn require_systemd_ns() -> bool {
    require(
        "root (systemd-ns makes namespaces and cgroups)",
        is_root(),
        "run the tests as root",
    ) && require(
        "Debian's systemd and ../shared/tools/systemd-ns",
        Path::new("/lib/systemd/systemd").exists() && systemd_ns_tool().is_some(),
        "apt-get install systemd; the tool is looked for as shared/tools/systemd-ns beside \
         the checkout or its parents, or set HOSTD_SYSTEMD_NS",
    )
}

/// Writes `spec` as DIR/NAME.toml with the hello example's lock (the same packages).
fn write_spec(dir: &Path, name: &str, spec: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).expect("write spec");
    std::fs::copy(HELLO_LOCK, dir.join(format!("{name}.lock"))).expect("copy lock");
    path
}

fn build_image(dir: &Path, name: &str, spec: &str) {
    let spec = write_spec(dir, name, spec);
    let out = hostd()
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(dir.join(format!("{name}.img")))
        .output()
        .expect("hostd build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs systemd-ns on `units` starting `sysinit.target`; returns its output. The first
/// command makes the mount tree shared, as on a host booted by systemd (systemd-ns's
/// namespace is private, and systemd hands credentials over through mount propagation).
fn systemd_ns(units: &Path, commands: &[String]) -> String {
    systemd_ns_within(units, commands, std::time::Duration::from_secs(600))
}

/// [`systemd_ns`] with a deadline for the whole run.
fn systemd_ns_within(units: &Path, commands: &[String], limit: std::time::Duration) -> String {
    let mut c =
        Command::new(systemd_ns_tool().expect("systemd-ns (checked by require_systemd_ns)"));
    c.arg(units).arg("sysinit.target");
    c.arg("mount --make-rshared /");
    c.args(commands);
    let out = common::run_with_deadline(c, limit);
    let text = out.all();
    eprintln!("{text}");
    text
}

/// Two bash loops (systemd-ns gives each command 60 s) waiting up to 50 s each for
/// `cond`, printing `what: ok` once it holds or `what: TIMEOUT`.
fn wait(what: &str, cond: &str) -> [String; 2] {
    let one = format!(
        "for i in $(seq 100); do if {cond}; then echo '{what}: ok'; exit 0; fi; sleep 0.5; done; echo '{what}: TIMEOUT'"
    );
    [one.clone(), one]
}

/// Like [`wait`], for up to `secs` seconds (in loops of 50 s), and each loop that
/// still waits runs `sample` once a second (its output is kept).
fn wait_long(what: &str, cond: &str, sample: &str, secs: u32) -> Vec<String> {
    let one = format!(
        "for i in $(seq 50); do if {cond}; then echo '{what}: ok'; exit 0; fi; {sample}; sleep 1; done; echo '{what}: TIMEOUT'"
    );
    vec![one; secs.div_ceil(50) as usize]
}

/// The lines of `text` between `### marker` and the next `(rc=`.
fn section<'a>(text: &'a str, marker: &str) -> &'a str {
    let start = text
        .find(&format!("### {marker}"))
        .unwrap_or_else(|| panic!("no section {marker}"));
    let rest = &text[start..];
    &rest[..rest.find("\n(rc=").unwrap_or(rest.len())]
}

#[test]
fn guest_units_run_under_systemd() {
    if !require_qemu_guest() || !require_systemd_ns() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    build_image(d, "web", WEB);
    build_image(d, "crash", CRASH);
    // The hello example itself, as shipped.
    let hello = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/images/examples/hello.toml"
    ))
    .expect("hello example");
    build_image(d, "hello", &hello);
    write_spec(d, "built", BUILT);
    std::fs::copy(kernel(), d.join("vmlinux")).expect("copy kernel");
    std::fs::write(d.join("token"), "s3cret-value\n").expect("token");
    let fleet_all = r#"
[guests.hello]
image = "hello.img"
vmm = "qemu"
restart = "never"

[guests.web]
image = "web.img"
vmm = "qemu"
secrets = { token = "token" }

[guests.keep]
image = "web.img"
vmm = "qemu"
memory = "128M"

[guests.crash]
image = "crash.img"
vmm = "qemu"
restart = "on-failure"

[guests.built]
spec = "built.toml"
vmm = "qemu"
restart = "never"
"#;
    // Without hello and web, and with keep changed.
    let fleet_without_web = fleet_all
        .split("[guests.keep]")
        .nth(1)
        .map(|rest| format!("[guests.keep]{rest}").replacen("128M", "160M", 1))
        .expect("split fleet");
    std::fs::write(d.join("fleet.toml"), fleet_all).expect("fleet");
    std::fs::write(d.join("fleet-2.toml"), fleet_without_web).expect("fleet 2");
    let units = d.join("units");
    std::fs::create_dir(&units).expect("units dir");
    let state = d.join("state");
    let apply = |fleet: &str| {
        format!(
            "{} systemd apply {} --fleet {} --state-dir {}",
            common::hostd_exe().display(),
            units.display(),
            d.join(fleet).display(),
            state.display()
        )
    };
    let journal = |u: &str| format!("journalctl -u hostd-guest-{u} -o cat --no-pager");
    let web_up = format!("{} | grep -q 'web got='", journal("web"));
    let built_ran = |n: u32| {
        format!(
            "[ $({} | grep -c 'hello from a unit-built image') -ge {n} ]",
            journal("built")
        )
    };
    let mut commands = vec![apply("fleet.toml")];
    commands.extend(wait("web up", &web_up));
    commands.extend(wait(
        "hello ran",
        &format!(
            "{} | grep -q 'hostd-init: powering off (exit code 0)'",
            journal("hello")
        ),
    ));
    commands.push(format!(
        "echo JOURNAL-HELLO; {}; systemctl show -p ActiveState,Result hostd-guest-hello",
        journal("hello")
    ));
    commands.push(
        "echo web:; systemctl show -p ActiveState,SubState,StatusText hostd-guest-web".into(),
    );
    commands.extend(wait(
        "crash restarted",
        "[ $(systemctl show -p NRestarts --value hostd-guest-crash) -ge 2 ]",
    ));
    commands.extend(wait("built ran", &built_ran(1)));
    commands.push("systemctl start --no-block hostd-guest-built".into());
    commands.extend(wait("built ran twice", &built_ran(2)));
    commands.extend([
        format!("echo JOURNAL-BUILT; {}", journal("built")),
        "systemctl stop hostd-guest-web; echo stopped:; systemctl show -p ActiveState,Result hostd-guest-web".into(),
        format!("echo JOURNAL-WEB; {}", journal("web")),
        "systemctl start hostd-guest-web".into(),
    ]);
    // The service's SIGTERM trap is set once it printed its secret.
    commands.extend(wait(
        "web up again",
        &format!("[ $({} | grep -c 'web got=') -ge 2 ]", journal("web")),
    ));
    commands.extend([
        "echo keep-before: $(systemctl show -p MainPID --value hostd-guest-keep)".into(),
        apply("fleet-2.toml"),
        "echo keep-changed: $(systemctl show -p MainPID --value hostd-guest-keep) $(systemctl is-active hostd-guest-keep)".into(),
        apply("fleet-2.toml"),
        "echo keep-unchanged: $(systemctl show -p MainPID --value hostd-guest-keep) $(systemctl is-active hostd-guest-keep)".into(),
        format!("echo after-apply:; systemctl show -p ActiveState hostd-guest-web; ls {}", units.display()),
        format!("echo JOURNAL-WEB-2; {}", journal("web")),
    ]);
    let out = systemd_ns(&units, &commands);
    // Type=notify: active (running) once guest init reported the services started.
    assert!(out.contains("web up: ok"), "web never came up");
    let web = section(&out, "echo web:");
    assert!(
        web.contains("ActiveState=active")
            && web.contains("SubState=running")
            && web.contains("StatusText=guest services started"),
        "{web}"
    );
    // The hello example's console in the journal; it ended well.
    let h = section(&out, "echo JOURNAL-HELLO;");
    assert!(h.contains("[hello] hello from hostd"), "{h}");
    assert!(
        h.contains("ActiveState=inactive") && h.contains("Result=success"),
        "{h}"
    );
    // The console in the journal, and the secret only where it is declared.
    let j = section(&out, "echo JOURNAL-WEB;");
    assert!(j.contains("[web] web says hello"), "{j}");
    assert!(j.contains("[web] web got=s3cret-value"), "{j}");
    assert!(j.contains("[other] other sees=nothing"), "{j}");
    assert!(!j.contains("other sees=s3cret"), "{j}");
    // A clean stop: the guest's services got SIGTERM and init powered off with 0.
    assert!(
        j.contains("hostd-init: sending SIGTERM to service web"),
        "{j}"
    );
    assert!(j.contains("[web] web got SIGTERM"), "{j}");
    assert!(j.contains("hostd-init: powering off (exit code 0)"), "{j}");
    let stopped = section(&out, "systemctl stop hostd-guest-web");
    assert!(
        stopped.contains("ActiveState=inactive") && stopped.contains("Result=success"),
        "{stopped}"
    );
    // Restarted per policy.
    assert!(
        out.contains("crash restarted: ok"),
        "crash was not restarted"
    );
    // Built on first start, reused on the second.
    assert!(
        out.contains("built ran twice: ok"),
        "built did not run twice"
    );
    let b = section(&out, "echo JOURNAL-BUILT;");
    assert_eq!(b.matches("hostd: built image").count(), 1, "{b}");
    assert!(b.contains("is up to date (spec and lock unchanged"), "{b}");
    // Dropped from the fleet: stopped (cleanly) by the next apply, its unit gone.
    let after = section(&out, "echo after-apply:");
    assert!(after.contains("ActiveState=inactive"), "{after}");
    assert!(!after.contains("hostd-guest-web.service"), "{after}");
    assert!(after.contains("hostd-guest-crash.service"), "{after}");
    let j2 = section(&out, "echo JOURNAL-WEB-2;");
    assert!(out.contains("web up again: ok"), "web did not start again");
    assert_eq!(j2.matches("[web] web got SIGTERM").count(), 2, "{j2}");
    assert_eq!(
        j2.matches("hostd-init: powering off (exit code 0)").count(),
        2,
        "{j2}"
    );
    assert!(out.contains("stopping hostd-guest-web.service (its guest left the fleet)"));
    // A changed guest is restarted by apply, an unchanged one is not.
    let pid = |marker: &str| -> (String, String) {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(marker))
            .unwrap_or_else(|| panic!("no {marker}"));
        let mut w = line.split_whitespace();
        (
            w.next().unwrap_or_default().to_string(),
            w.next().unwrap_or_default().to_string(),
        )
    };
    let before = pid("keep-before: ").0;
    let (changed, state) = pid("keep-changed: ");
    let (unchanged, state2) = pid("keep-unchanged: ");
    assert!(before != "0" && changed != before, "{before} -> {changed}");
    assert_eq!((state.as_str(), state2.as_str()), ("active", "active"));
    assert_eq!(unchanged, changed, "an unchanged guest was restarted");
    assert_eq!(
        out.matches("restarting changed unit(s) that run: hostd-guest-keep.service\n")
            .count(),
        1,
        "only keep changed, once"
    );
}

/// `systemd-analyze verify` on every unit a fleet with every kind of entry generates:
/// any output at all fails (it warns without failing).
#[test]
fn generated_units_verify_clean() {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require("systemd-analyze", ok, "apt-get install systemd") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    common::fake_kernel(d);
    std::fs::write(
        d.join("tiny.toml"),
        "name = \"tiny\"\nkernel = \"vmlinux\"\nstop_timeout = 9\n",
    )
    .expect("spec");
    let out = hostd()
        .arg("build")
        .arg(d.join("tiny.toml"))
        .arg("-o")
        .arg(d.join("tiny.img"))
        .output()
        .expect("hostd build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        d.join("fleet.toml"),
        r#"
[guests.web]
image = "tiny.img"
vmm = "qemu"
vcpus = 2
memory = "256M"
restart = "always"
net = "tap=tap-web,ip=10.0.0.2/24,gw=10.0.0.1"
trust = ["keys/release.pub"]
secrets = { db_password = "keys/db", token = "keys/token" }

[guests.batch]
spec = "tiny.toml"
autostart = false
restart = "never"

[functions.hello]
component = "hello.wasm"
routes = ["/hello"]
"#,
    )
    .expect("fleet");
    let units = d.join("units");
    let out = hostd()
        .args(["systemd", "generate"])
        .arg(&units)
        .arg("--fleet")
        .arg(d.join("fleet.toml"))
        .args(["--listen", "127.0.0.1:8080"])
        .output()
        .expect("generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&units)
        .expect("units")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "target")
        })
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    assert_eq!(
        names,
        [
            "hostd-daemon.service",
            "hostd-guest-batch.service",
            "hostd-guest-web.service",
            "hostd-guests.target"
        ]
    );
    let web = std::fs::read_to_string(units.join("hostd-guest-web.service")).expect("web");
    assert!(web.contains("TimeoutStopSec=29\n"), "{web}");
    for f in &files {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(f)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {}:\n{said}\n{}",
            f.display(),
            std::fs::read_to_string(f).unwrap_or_default()
        );
    }
    // A second generation without `web` removes its unit and says so.
    std::fs::write(
        d.join("fleet.toml"),
        "[guests.batch]\nspec = \"tiny.toml\"\n",
    )
    .expect("fleet");
    let out = hostd()
        .args(["systemd", "generate"])
        .arg(&units)
        .arg("--fleet")
        .arg(d.join("fleet.toml"))
        .output()
        .expect("generate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("removed hostd-guest-web.service"), "{err}");
    assert!(err.contains("removed hostd-daemon.service"), "{err}");
    assert!(!units.join("hostd-guest-web.service").exists());
    assert!(!units
        .join("hostd-guests.target.wants/hostd-guest-web.service")
        .exists());
    assert!(units
        .join("hostd-guests.target.wants/hostd-guest-batch.service")
        .exists());
}

/// A guest whose one service runs until SIGTERM, for the built-in VMM.
const PROBE: &str = r#"
name = "probe"
memory = "128M"
stop_timeout = 3
packages = ["busybox-static"]

[services.probe]
command = "/bin/busybox"
args = ["sh", "-c", "echo probe service running; trap 'echo probe got SIGTERM; exit 0' TERM; while true; do /bin/busybox sleep 1 & wait $!; done"]
main = true
"#;

/// `Type=notify` under hostd's own VMM (`vmm = "builtin"`, KVM): the unit stays
/// `activating` while the guest boots and becomes `active` only once guest init reported
/// the services started (READY=1 from the VMM's control thread, with its status text),
/// and stops cleanly. The built-in VMM boots slowly on this nested host (30 s and more),
/// so the wait is long (up to 1800 s); one guest.
///
/// Ignored: on the loaded nested-PVM host it was written on, the guest had not reached
/// init after 30 minutes (the unit stayed `activating`, as it should, until
/// TimeoutStartSec), so it has not passed yet. Run it with `--ignored` on an idle host.
#[test]
#[ignore = "takes up to 30 min; not yet seen passing (the built-in VMM did not boot on a loaded nested-PVM host)"]
fn builtin_vmm_unit_is_active_once_guest_services_started() {
    if !require_qemu_guest()
        || !require("/dev/kvm", common::kvm_usable(), "a host with KVM")
        || !require_systemd_ns()
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    build_image(d, "probe", PROBE);
    std::fs::write(
        d.join("fleet.toml"),
        "[guests.probe]\nimage = \"probe.img\"\nvmm = \"builtin\"\nrestart = \"never\"\n",
    )
    .expect("fleet");
    let units = d.join("units");
    let out = hostd()
        .args(["systemd", "generate"])
        .arg(&units)
        .arg("--fleet")
        .arg(d.join("fleet.toml"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .output()
        .expect("generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = "hostd-guest-probe";
    let journal = format!("journalctl -u {unit} -o cat --no-pager");
    // One sample a second while it is not yet active: the unit's state, and whether
    // guest init had reported its services (the hostd-init "service ... started" line).
    let sample = format!(
        "echo \"SAMPLE $(systemctl show -p ActiveState --value {unit}) $(systemctl show -p SubState --value {unit}) services=$({journal} | grep -c 'hostd-init: service probe started')\""
    );
    let mut commands = vec![format!("systemctl start --no-block {unit}")];
    commands.extend(wait_long(
        "probe active",
        &format!("systemctl is-active -q {unit}"),
        &sample,
        1800,
    ));
    commands.extend([
        format!(
            "echo ACTIVE: $(systemctl show -p ActiveState,SubState,StatusText,NRestarts {unit}); echo STARTED-LINES: $({journal} | grep -c 'hostd-init: service probe started')"
        ),
        format!("systemctl stop {unit}; echo STOPPED: $(systemctl show -p ActiveState,Result {unit})"),
        format!("echo JOURNAL; {journal}"),
    ]);
    let out = systemd_ns_within(&units, &commands, std::time::Duration::from_secs(2400));
    assert!(out.contains("probe active: ok"), "never became active");
    // It waited: sampled as activating (start) before it was active.
    let samples: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("SAMPLE "))
        .collect();
    assert!(
        samples.iter().any(|s| s.starts_with("activating start ")),
        "never seen activating: {samples:?}"
    );
    assert!(
        samples.iter().all(|s| !s.starts_with("active ")),
        "{samples:?}"
    );
    let active = out
        .lines()
        .find(|l| l.starts_with("ACTIVE: "))
        .expect("ACTIVE line");
    assert!(
        active.contains("ActiveState=active")
            && active.contains("SubState=running")
            && active.contains("StatusText=guest services started")
            && active.contains("NRestarts=0"),
        "{active}"
    );
    // Once active, guest init has reported the service started.
    let started = out
        .lines()
        .find_map(|l| l.strip_prefix("STARTED-LINES: "))
        .expect("STARTED-LINES");
    assert_ne!(started.trim(), "0", "active before the service started");
    let j = section(&out, "echo JOURNAL;");
    assert!(j.contains("[probe] probe service running"), "{j}");
    assert!(j.contains("[probe] probe got SIGTERM"), "{j}");
    assert!(j.contains("hostd-init: powering off (exit code 0)"), "{j}");
    let stopped = out
        .lines()
        .find(|l| l.starts_with("STOPPED: "))
        .expect("STOPPED line");
    assert!(
        stopped.contains("ActiveState=inactive") && stopped.contains("Result=success"),
        "{stopped}"
    );
}

/// The functions' `hostd-daemon.service` (a fleet with functions and `--listen`) under
/// systemd: `hostd systemd apply` starts it, it is `Type=notify` (active once the daemon
/// reported READY=1), the fleet's function answers on the `--listen` address, and
/// `systemctl stop` ends it cleanly.
#[test]
fn daemon_unit_serves_the_fleet_functions() {
    if !require_systemd_ns()
        || !require(
            "curl",
            Command::new("curl")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "apt-get install curl",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let wasm = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sandbox/examples/wasm/hello.wasm"
    );
    std::fs::write(
        d.join("fleet.toml"),
        format!("[functions.hello]\ncomponent = \"{wasm}\"\nroutes = [\"/hello\"]\n"),
    )
    .expect("fleet");
    let units = d.join("units");
    std::fs::create_dir(&units).expect("units");
    let state = d.join("state");
    // Generated outside, started with --no-block inside: a debug build compiling the
    // component under load may take longer than one systemd-ns command may.
    let out = hostd()
        .args(["systemd", "generate"])
        .arg(&units)
        .arg("--fleet")
        .arg(d.join("fleet.toml"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:8080"])
        .output()
        .expect("generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = std::fs::read_to_string(units.join("hostd-daemon.service")).expect("daemon unit");
    assert!(
        daemon.contains(&format!(
            " --listen 127.0.0.1:8080 --state-dir {}\n",
            state.display()
        )),
        "{daemon}"
    );
    let mut commands = vec!["systemctl start --no-block multi-user.target".to_string()];
    commands.extend(wait_long(
        "daemon active",
        "systemctl is-active -q hostd-daemon",
        "systemctl show -p ActiveState,SubState --value hostd-daemon | tr '\\n' ' '; echo",
        600,
    ));
    commands.extend([
        "echo DAEMON: $(systemctl show -p Type,ActiveState,SubState,NRestarts hostd-daemon)".into(),
        "echo ANSWER: $(curl -sS -m 20 http://127.0.0.1:8080/hello)".into(),
        "systemctl stop hostd-daemon; echo STOPPED: $(systemctl show -p ActiveState,Result hostd-daemon)".into(),
        "echo JOURNAL; journalctl -u hostd-daemon -o cat --no-pager".into(),
    ]);
    let out = systemd_ns_within(&units, &commands, std::time::Duration::from_secs(900));
    assert!(
        out.contains("daemon active: ok"),
        "the daemon never became active"
    );
    let line = |p: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_else(|| panic!("no {p} line"))
            .to_string()
    };
    let status = line("DAEMON: ");
    assert!(
        status.contains("Type=notify")
            && status.contains("ActiveState=active")
            && status.contains("SubState=running")
            && status.contains("NRestarts=0"),
        "{status}"
    );
    assert_eq!(line("ANSWER: "), "hello from a nanoservice");
    let stopped = line("STOPPED: ");
    assert!(
        stopped.contains("ActiveState=inactive") && stopped.contains("Result=success"),
        "{stopped}"
    );
    let j = section(&out, "echo JOURNAL;");
    assert!(
        j.contains("function front listening on http://127.0.0.1:8080"),
        "{j}"
    );
    // Its state went where the unit said, not to /var/lib/hostd.
    assert!(state.join("functions").is_dir(), "{j}");
}
