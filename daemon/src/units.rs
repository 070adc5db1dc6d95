//! systemd units for a fleet, for hosts without the daemon or NixOS: one
//! `hostd-guest-NAME.service` per guest, a `hostd-guests.target` that wants the guests
//! that autostart, and a `hostd-daemon.service` serving the fleet's functions.
//! `hostd systemd generate` writes them; nix/units.nix renders the same units for the
//! NixOS module (docs/nixos.md).
//!
//! A guest unit is `Type=notify` (`hostd run` reports READY=1 once guest init has
//! started the image's services), stops with SIGTERM to `hostd run` alone
//! (`KillMode=mixed`: it shuts the guest down cleanly, then the rest of the VM's
//! processes go), within the image's `stop_timeout` plus the runner's margin, restarts
//! by the fleet's policy (a main service ended by SIGTERM, exit code 143, as on a clean
//! stop, counts as success), logs the guest console to the journal, receives secrets as
//! systemd credentials (`LoadCredential=`, read back from `%d`), and keeps volumes in a
//! state directory of its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::fleet::{Fleet, ImageSource, Restart, Vmm};

/// The target every guest unit belongs to.
pub const GUESTS_TARGET: &str = "hostd-guests.target";
/// The unit that serves the fleet's functions.
pub const DAEMON_UNIT: &str = "hostd-daemon.service";
/// The functions-only fleet file `hostd-daemon.service` reads, next to the units.
pub const DAEMON_FLEET: &str = "hostd-daemon.fleet.toml";
/// The list of what a generation wrote (one unit name a line), so that the next one
/// can tell which units vanished.
pub const MANIFEST: &str = "hostd-units.list";
/// Seconds added to an image's `stop_timeout` for `TimeoutStopSec=`: `hostd run`
/// waits `stop_timeout` + 15 s for the guest to power off before it kills it.
pub const STOP_MARGIN_SECS: u32 = 20;
/// `TimeoutStartSec=` of a guest unit: until READY=1 a unit may build its image (a first
/// build fetches packages) and boots the guest, which the built-in VMM on a nested (PVM)
/// host does slowly (30 s unloaded, several minutes on a loaded host), far past
/// systemd's default 90 s.
pub const START_TIMEOUT_SECS: u32 = 1800;
/// Seconds between a guest's end and its restart.
pub const RESTART_SEC: u32 = 2;

/// Why units could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum UnitsError {
    /// A value that cannot be written into a unit file.
    #[error("{what}: {msg}")]
    Value {
        /// Which entry, e.g. `guests.web.net`.
        what: String,
        /// What is wrong.
        msg: &'static str,
    },
    /// A guest whose image is named by digest: that store belongs to the daemon.
    #[error(
        "guests.{0}.image: a sha256: image lives in the daemon's store; for systemd units give \
         an image file or a spec"
    )]
    StoreImage(String),
    /// Functions but no address to serve them on.
    #[error("the fleet has functions: give the address hostd-daemon.service listens on")]
    NoListen,
}

/// How the units run hostd.
#[derive(Debug, Clone)]
pub struct UnitOptions {
    /// The hostd binary (absolute).
    pub hostd: PathBuf,
    /// `ip` from iproute2 (absolute), for TAP devices.
    pub ip: PathBuf,
    /// Where guests keep volumes and built images: `STATE/guests/NAME`. Under
    /// /var/lib, units get it as a `StateDirectory=`.
    pub state_dir: PathBuf,
    /// Where `hostd-daemon.service` listens (needed when the fleet has functions).
    pub listen: Option<String>,
    /// The directory the units are written to (the daemon's fleet file lives there).
    pub unit_dir: PathBuf,
}

/// What is known of a guest's image when its unit is rendered.
#[derive(Debug, Clone, Copy)]
pub struct GuestFacts {
    /// The image's `stop_timeout` (seconds between SIGTERM and SIGKILL in the guest).
    pub stop_timeout_secs: u32,
}

/// One rendered unit file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// File name, e.g. `hostd-guest-web.service`.
    pub name: String,
    /// Contents.
    pub text: String,
}

/// Everything a generation writes.
#[derive(Debug, Clone)]
pub struct Units {
    /// Unit files.
    pub files: Vec<UnitFile>,
    /// `(target, unit)`: symlinks `target.wants/unit` (what `systemctl enable` makes).
    pub wants: Vec<(String, String)>,
    /// The functions-only fleet file for hostd-daemon.service, if any.
    pub daemon_fleet: Option<String>,
}

/// The unit name of guest `name`.
pub fn guest_unit(name: &str) -> String {
    format!("hostd-guest-{name}.service")
}

/// The state directory of guest `name`.
pub fn guest_state(opts: &UnitOptions, name: &str) -> PathBuf {
    opts.state_dir.join("guests").join(name)
}

/// One argument of an `ExecStart=` line: `%` and `$` escaped, quoted when it holds
/// anything but plain path characters. Control characters cannot be written.
fn arg(what: &str, s: &str) -> Result<String, UnitsError> {
    if s.is_empty() || s.chars().any(|c| c.is_control()) {
        return Err(UnitsError::Value {
            what: what.to_owned(),
            msg: "empty or holds a control character",
        });
    }
    let escaped = s.replace('%', "%%").replace('$', "$$");
    let plain = escaped
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=,:@%$".contains(c));
    if plain {
        Ok(escaped)
    } else {
        Ok(format!(
            "\"{}\"",
            escaped.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    }
}

fn path_arg(what: &str, p: &Path) -> Result<String, UnitsError> {
    arg(what, &p.to_string_lossy())
}

/// A value of a setting that takes the rest of the line (`LoadCredential=`,
/// `Description=`): no control characters, `%` escaped.
fn value(what: &str, s: &str) -> Result<String, UnitsError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(UnitsError::Value {
            what: what.to_owned(),
            msg: "holds a control character",
        });
    }
    Ok(s.replace('%', "%%"))
}

/// `StateDirectory=REL` for a directory under /var/lib (systemd creates it before the
/// unit starts), else nothing.
fn state_directory(dir: &Path) -> Result<String, UnitsError> {
    Ok(match dir.strip_prefix("/var/lib") {
        Ok(rel) if !rel.as_os_str().is_empty() => format!(
            "StateDirectory={}\n",
            value("state", &rel.to_string_lossy())?
        ),
        _ => String::new(),
    })
}

/// The TAP device named in a `net` string (`tap=NAME,...`).
pub fn tap_name(net: &str) -> Option<&str> {
    net.split(',').find_map(|p| p.strip_prefix("tap="))
}

/// The first line of every unit. It names no fleet file: the same guest from a fleet
/// moved elsewhere is the same unit (and is not restarted).
const HEADER: &str = "# Generated by `hostd systemd generate`; do not edit (regenerate instead).\n";

/// Renders the units of `fleet`. `facts` holds each guest's image facts (guests missing
/// from it get the image default, 5 s).
pub fn render(
    fleet: &Fleet,
    facts: &BTreeMap<String, GuestFacts>,
    opts: &UnitOptions,
) -> Result<Units, UnitsError> {
    let mut files = Vec::new();
    let mut wants = Vec::new();
    let mut target = HEADER.to_string();
    target.push_str("[Unit]\nDescription=hostd guests\n\n[Install]\nWantedBy=multi-user.target\n");
    files.push(UnitFile {
        name: GUESTS_TARGET.into(),
        text: target,
    });
    wants.push(("multi-user.target".into(), GUESTS_TARGET.into()));
    for (name, guest) in &fleet.guests {
        let unit = guest_unit(name);
        let text = guest_text(name, guest, facts.get(name), opts)?;
        if guest.autostart {
            wants.push((GUESTS_TARGET.into(), unit.clone()));
        }
        files.push(UnitFile { name: unit, text });
    }
    let mut daemon_fleet = None;
    if !fleet.functions.is_empty() {
        let listen = opts.listen.as_deref().ok_or(UnitsError::NoListen)?;
        let fleet_path = opts.unit_dir.join(DAEMON_FLEET);
        let mut t = HEADER.to_string();
        writeln!(
            t,
            "[Unit]\nDescription=hostd daemon (functions)\nAfter=network.target\n\n[Service]\nType=notify\nNotifyAccess=main\nExecStart={} daemon --fleet {} --listen {} --state-dir {}\n{}Restart=on-failure\nRestartSec={RESTART_SEC}\n\n[Install]\nWantedBy=multi-user.target",
            path_arg("hostd", &opts.hostd)?,
            path_arg("fleet", &fleet_path)?,
            arg("listen", listen)?,
            path_arg("state", &opts.state_dir)?,
            state_directory(&opts.state_dir)?,
        )
        .ok();
        files.push(UnitFile {
            name: DAEMON_UNIT.into(),
            text: t,
        });
        wants.push(("multi-user.target".into(), DAEMON_UNIT.into()));
        daemon_fleet = Some(fleet.functions_toml());
    }
    Ok(Units {
        files,
        wants,
        daemon_fleet,
    })
}

fn guest_text(
    name: &str,
    g: &crate::fleet::Guest,
    facts: Option<&GuestFacts>,
    opts: &UnitOptions,
) -> Result<String, UnitsError> {
    let at = |f: &str| format!("guests.{name}.{f}");
    let state = guest_state(opts, name);
    let hostd = path_arg("hostd", &opts.hostd)?;
    let stop_timeout = facts.map(|f| f.stop_timeout_secs).unwrap_or(5) + STOP_MARGIN_SECS;
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let image = match &g.image {
        ImageSource::File(p) => path_arg(&at("image"), p)?,
        ImageSource::Spec(spec) => {
            let img = state.join("image.img");
            pre.push(format!(
                "ExecStartPre={hostd} systemd build-image {} {}",
                path_arg(&at("spec"), spec)?,
                path_arg(&at("spec"), &img)?
            ));
            path_arg(&at("spec"), &img)?
        }
        ImageSource::Digest(_) => return Err(UnitsError::StoreImage(name.to_owned())),
    };
    let mut run = format!("{hostd} run {image}");
    run.push_str(match g.vmm {
        Vmm::Builtin => " --vmm kvm",
        Vmm::Qemu => " --vmm qemu",
    });
    if let Some(v) = g.vcpus {
        write!(run, " --vcpus {v}").ok();
    }
    if let Some(m) = &g.memory {
        write!(run, " --mem {}", arg(&at("memory"), m)?).ok();
    }
    if let Some(net) = &g.net {
        write!(run, " --net {}", arg(&at("net"), net)?).ok();
        let tap = tap_name(net).ok_or(UnitsError::Value {
            what: at("net"),
            msg: "no tap=NAME",
        })?;
        let tap = arg(&at("net"), tap)?;
        let ip = path_arg("ip", &opts.ip)?;
        // `-`: a TAP left over from a run that was killed is reused.
        pre.push(format!("ExecStartPre=-{ip} tuntap add {tap} mode tap"));
        pre.push(format!("ExecStartPre={ip} link set {tap} up"));
        post.push(format!("ExecStopPost=-{ip} link del {tap}"));
    }
    write!(run, " --state-dir {}", path_arg(&at("state"), &state)?).ok();
    for key in &g.trust {
        write!(run, " --trust {}", path_arg(&at("trust"), key)?).ok();
    }
    let mut creds = String::new();
    if !g.secrets.is_empty() {
        run.push_str(" --secret-dir %d");
        for (secret, file) in &g.secrets {
            writeln!(
                creds,
                "LoadCredential={secret}:{}",
                value(&at("secrets"), &file.to_string_lossy())?
            )
            .ok();
        }
    }
    let state_directory = state_directory(&state)?;
    let restart = match g.restart {
        Restart::Always => "always",
        Restart::OnFailure => "on-failure",
        Restart::Never => "no",
    };
    let mut t = HEADER.to_string();
    writeln!(
        t,
        "[Unit]\nDescription=hostd guest {name}\nPartOf={GUESTS_TARGET}\nAfter=network.target\nStartLimitIntervalSec=60\nStartLimitBurst=5\n\n[Service]\nType=notify\nNotifyAccess=all"
    )
    .ok();
    for l in &pre {
        writeln!(t, "{l}").ok();
    }
    writeln!(t, "ExecStart={run}").ok();
    for l in &post {
        writeln!(t, "{l}").ok();
    }
    write!(
        t,
        "{creds}{state_directory}Delegate=yes\nKillMode=mixed\nKillSignal=SIGTERM\nSuccessExitStatus=143\nTimeoutStartSec={START_TIMEOUT_SECS}\nTimeoutStopSec={stop_timeout}\nRestart={restart}\nRestartSec={RESTART_SEC}\nStandardOutput=journal\nStandardError=journal\n\n[Install]\nWantedBy={GUESTS_TARGET}\n"
    )
    .ok();
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> UnitOptions {
        UnitOptions {
            hostd: "/usr/bin/hostd".into(),
            ip: "/usr/sbin/ip".into(),
            state_dir: "/var/lib/hostd".into(),
            listen: Some("127.0.0.1:8080".into()),
            unit_dir: "/etc/systemd/system".into(),
        }
    }

    fn fleet(text: &str) -> Fleet {
        Fleet::parse(text, Path::new("/srv/f"), Path::new("/srv/f/fleet.toml")).expect("fleet")
    }

    #[test]
    fn a_guest_unit() {
        let f = fleet(
            r#"
            [guests.web]
            image = "web img.img"
            vmm = "qemu"
            memory = "512M"
            restart = "always"
            net = "tap=tap-web,ip=10.0.0.2/24"
            secrets = { db = "keys/db%1" }
            [guests.off]
            spec = "off.toml"
            autostart = false
            restart = "never"
            "#,
        );
        let facts = BTreeMap::from([(
            "web".to_string(),
            GuestFacts {
                stop_timeout_secs: 7,
            },
        )]);
        let u = render(&f, &facts, &opts()).expect("render");
        let web = &u
            .files
            .iter()
            .find(|f| f.name == "hostd-guest-web.service")
            .expect("web")
            .text;
        assert!(web.contains("ExecStart=/usr/bin/hostd run \"/srv/f/web img.img\" --vmm qemu --mem 512M --net tap=tap-web,ip=10.0.0.2/24 --state-dir /var/lib/hostd/guests/web --secret-dir %d\n"), "{web}");
        assert!(
            web.contains("LoadCredential=db:/srv/f/keys/db%%1\n"),
            "{web}"
        );
        assert!(web.contains("StateDirectory=hostd/guests/web\n"), "{web}");
        assert!(web.contains("TimeoutStopSec=27\n"), "{web}");
        assert!(web.contains("TimeoutStartSec=1800\n"), "{web}");
        assert!(web.contains("Restart=always\n"), "{web}");
        assert!(
            web.contains("ExecStartPre=-/usr/sbin/ip tuntap add tap-web mode tap\n"),
            "{web}"
        );
        let off = &u
            .files
            .iter()
            .find(|f| f.name == "hostd-guest-off.service")
            .expect("off")
            .text;
        assert!(off.contains("ExecStartPre=/usr/bin/hostd systemd build-image /srv/f/off.toml /var/lib/hostd/guests/off/image.img\n"), "{off}");
        assert!(
            off.contains("Restart=no\n") && off.contains("TimeoutStopSec=25\n"),
            "{off}"
        );
        assert!(!off.contains("--secret-dir"), "{off}");
        assert!(u
            .wants
            .contains(&(GUESTS_TARGET.into(), "hostd-guest-web.service".into())));
        assert!(!u.wants.iter().any(|w| w.1 == "hostd-guest-off.service"));
        assert!(u.daemon_fleet.is_none());
    }

    #[test]
    fn functions_need_an_address_and_store_images_are_refused() {
        let f = fleet("[functions.hello]\ncomponent = \"h.wasm\"\nroutes = [\"/h\"]\n");
        let mut o = opts();
        let u = render(&f, &BTreeMap::new(), &o).expect("render");
        let d = &u
            .files
            .iter()
            .find(|f| f.name == DAEMON_UNIT)
            .expect("daemon")
            .text;
        assert!(
            d.contains(
                "--fleet /etc/systemd/system/hostd-daemon.fleet.toml --listen 127.0.0.1:8080 \
                 --state-dir /var/lib/hostd\nStateDirectory=hostd\n"
            ),
            "{d}"
        );
        assert!(u
            .daemon_fleet
            .as_deref()
            .is_some_and(|t| t.contains("/srv/f/h.wasm")));
        o.listen = None;
        assert!(matches!(
            render(&f, &BTreeMap::new(), &o),
            Err(UnitsError::NoListen)
        ));
        let s = fleet("[guests.a]\nimage = \"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"");
        assert!(matches!(
            render(&s, &BTreeMap::new(), &opts()),
            Err(UnitsError::StoreImage(_))
        ));
    }

    #[test]
    fn arguments_are_escaped() {
        assert_eq!(arg("x", "/a/b").ok().as_deref(), Some("/a/b"));
        assert_eq!(arg("x", "a b\"c").ok().as_deref(), Some("\"a b\\\"c\""));
        assert_eq!(arg("x", "$HOME%").ok().as_deref(), Some("$$HOME%%"));
        assert!(arg("x", "a\nb").is_err());
        assert!(arg("x", "").is_err());
    }
}
