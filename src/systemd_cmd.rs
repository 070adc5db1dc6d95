//! `hostd systemd …`: a fleet's guests as systemd units on hosts without NixOS
//! (rendering in hostd_daemon::units; docs/nixos.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use hostd_daemon::fleet::{Fleet, ImageSource};
use hostd_daemon::units::{self, GuestFacts, UnitOptions, Units};

/// Subcommands of `hostd systemd`.
#[derive(Debug, clap::Subcommand)]
pub enum SystemdCommand {
    /// Write a unit per guest of the fleet (`hostd-guest-NAME.service`), a
    /// `hostd-guests.target` wanting those that autostart, and `hostd-daemon.service`
    /// for the functions, into DIR (e.g. /etc/systemd/system). Units of an earlier
    /// generation that the fleet no longer has are removed (DIR/hostd-units.list
    /// records what was written).
    Generate(GenerateArgs),
    /// Generate, `systemctl daemon-reload`, stop the units whose guests were removed,
    /// restart the running ones that changed, and start hostd-guests.target (and the
    /// daemon). Unchanged guests keep running.
    Apply(GenerateArgs),
    /// Build a spec into an image unless the image was built from the same spec and
    /// lock file already (used by units of guests given as a spec).
    #[command(hide = true)]
    BuildImage {
        /// The spec.
        spec: PathBuf,
        /// The image.
        image: PathBuf,
    },
}

/// Arguments of `hostd systemd generate` and `apply`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Directory the units are written to.
    dir: PathBuf,
    /// The fleet file (docs/daemon.md).
    #[arg(long, value_name = "FILE")]
    fleet: PathBuf,
    /// Where guests keep volumes and built images (DIR/guests/NAME).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/hostd")]
    state_dir: PathBuf,
    /// Where hostd-daemon.service serves the fleet's functions.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The hostd binary the units run [default: this one].
    #[arg(long, value_name = "FILE")]
    hostd: Option<PathBuf>,
}

/// `hostd systemd`.
pub fn run(cmd: SystemdCommand) -> Result<i32> {
    match cmd {
        SystemdCommand::Generate(a) => {
            let g = generate(&a)?;
            for u in &g.removed {
                eprintln!("hostd: removed {u} (its guest left the fleet; `hostd systemd apply` also stops it)");
            }
            eprintln!(
                "hostd: wrote {} unit(s) to {}; run `systemctl daemon-reload`",
                g.written.len(),
                a.dir.display()
            );
            Ok(0)
        }
        SystemdCommand::Apply(a) => apply(&a),
        SystemdCommand::BuildImage { spec, image } => build_image(&spec, &image),
    }
}

/// What a generation did.
struct Generated {
    /// Units written, with whether an earlier text of theirs changed.
    written: BTreeMap<String, bool>,
    /// Units of the previous generation that are gone.
    removed: Vec<String>,
    /// Units the target or multi-user.target want.
    wanted: BTreeSet<String>,
}

fn find_ip() -> PathBuf {
    for d in [
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
        "/run/current-system/sw/bin",
    ] {
        let p = Path::new(d).join("ip");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/ip")
}

/// The image facts the units need: `stop_timeout` from the image's manifest, or from
/// the spec for images built when the unit starts.
fn facts(fleet: &Fleet) -> Result<BTreeMap<String, GuestFacts>> {
    let mut out = BTreeMap::new();
    for (name, g) in &fleet.guests {
        let stop_timeout_secs = match &g.image {
            ImageSource::File(p) => {
                let image = hostd_images::format::Image::open(p)
                    .with_context(|| format!("guests.{name}.image"))?;
                image
                    .manifest()
                    .with_context(|| format!("guests.{name}.image"))?
                    .stop_timeout_secs
            }
            ImageSource::Spec(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("guests.{name}.spec: cannot read {}", p.display()))?;
                let spec: toml::Table = text
                    .parse()
                    .with_context(|| format!("guests.{name}.spec: {}", p.display()))?;
                spec.get("stop_timeout")
                    .and_then(|v| v.as_integer())
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(5)
            }
            ImageSource::Digest(_) => continue,
        };
        out.insert(name.clone(), GuestFacts { stop_timeout_secs });
    }
    Ok(out)
}

/// Writes `text` to `path` through a temporary file; returns whether it changed.
fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// Units rendered for a fleet, not yet written.
struct Plan {
    dir: PathBuf,
    units: Units,
    /// Units the previous generation wrote (its manifest).
    previous: BTreeSet<String>,
}

impl Plan {
    /// Units of the previous generation that this one does not have.
    fn stale(&self) -> Vec<String> {
        self.previous
            .iter()
            .filter(|p| !self.units.files.iter().any(|f| &f.name == *p))
            .cloned()
            .collect()
    }
}

fn plan(a: &GenerateArgs) -> Result<Plan> {
    // Absolute first: Fleet::load cannot resolve against the empty parent of `fleet.toml`.
    let fleet = Fleet::load(&std::path::absolute(&a.fleet)?)?;
    let hostd = match &a.hostd {
        Some(h) => std::path::absolute(h)?,
        None => crate::hostd_exe().context("cannot find this hostd binary")?,
    };
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let opts = UnitOptions {
        hostd,
        ip: find_ip(),
        state_dir: std::path::absolute(&a.state_dir)?,
        listen: a.listen.clone(),
        unit_dir: dir.clone(),
    };
    let units = units::render(&fleet, &facts(&fleet)?, &opts)?;
    let previous = std::fs::read_to_string(dir.join(units::MANIFEST))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .collect();
    Ok(Plan {
        dir,
        units,
        previous,
    })
}

fn generate(a: &GenerateArgs) -> Result<Generated> {
    write(plan(a)?)
}

fn write(plan: Plan) -> Result<Generated> {
    let Plan {
        dir,
        units,
        previous,
    } = plan;
    let Units {
        files,
        wants,
        daemon_fleet,
    } = units;
    let manifest = dir.join(units::MANIFEST);
    let mut written = BTreeMap::new();
    for f in &files {
        let path = dir.join(&f.name);
        // A new unit is not a changed one (nothing of it runs yet).
        let existed = path.exists();
        let changed = write_if_changed(&path, &f.text)? && existed;
        written.insert(f.name.clone(), changed);
    }
    let fleet_file = dir.join(units::DAEMON_FLEET);
    match &daemon_fleet {
        Some(text) => {
            // The daemon's fleet changing is the daemon's unit changing.
            let existed = fleet_file.exists();
            if write_if_changed(&fleet_file, text)? && existed {
                written.insert(units::DAEMON_UNIT.into(), true);
            }
        }
        None => {
            let _ = std::fs::remove_file(&fleet_file);
        }
    }
    // The wants links are made again from scratch.
    let wanted: BTreeSet<String> = wants.iter().map(|w| w.1.clone()).collect();
    for target in ["multi-user.target", units::GUESTS_TARGET] {
        let wdir = dir.join(format!("{target}.wants"));
        for name in previous.iter().chain(written.keys()) {
            let _ = std::fs::remove_file(wdir.join(name));
        }
    }
    for (target, unit) in &wants {
        let wdir = dir.join(format!("{target}.wants"));
        std::fs::create_dir_all(&wdir)?;
        std::os::unix::fs::symlink(format!("../{unit}"), wdir.join(unit))
            .with_context(|| format!("cannot link {unit} into {}", wdir.display()))?;
    }
    let removed: Vec<String> = previous
        .iter()
        .filter(|p| !written.contains_key(*p))
        .cloned()
        .collect();
    for r in &removed {
        let _ = std::fs::remove_file(dir.join(r));
    }
    let list: String = written.keys().map(|k| format!("{k}\n")).collect();
    write_if_changed(&manifest, &list)?;
    Ok(Generated {
        written,
        removed,
        wanted,
    })
}

fn systemctl(args: &[&str]) -> Result<()> {
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .context("cannot run systemctl")?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `hostd systemd apply`.
fn apply(a: &GenerateArgs) -> Result<i32> {
    let plan = plan(a)?;
    // Stopped while their unit files still say how (KillMode=mixed: SIGTERM to hostd
    // run alone, which shuts the guest down); a unit whose file is gone would be killed
    // with systemd's defaults.
    for u in plan.stale() {
        eprintln!("hostd: stopping {u} (its guest left the fleet)");
        // A unit that is not loaded is not running either.
        let _ = systemctl(&["stop", &u]);
    }
    let g = write(plan)?;
    systemctl(&["daemon-reload"])?;
    let changed: Vec<&str> = g
        .written
        .iter()
        .filter(|(name, changed)| **changed && name.ends_with(".service"))
        .map(|(n, _)| n.as_str())
        .collect();
    if !changed.is_empty() {
        eprintln!(
            "hostd: restarting changed unit(s) that run: {}",
            changed.join(" ")
        );
        let mut args = vec!["try-restart"];
        args.extend(&changed);
        systemctl(&args)?;
    }
    let mut start = vec!["start", units::GUESTS_TARGET];
    if g.wanted.contains(units::DAEMON_UNIT) {
        start.push(units::DAEMON_UNIT);
    }
    systemctl(&start)?;
    eprintln!(
        "hostd: applied {} unit(s) from {}",
        g.written.len(),
        a.fleet.display()
    );
    Ok(0)
}

/// The digest an image built from `spec` is cached by: hostd's version, the spec and
/// its lock file (absent counts as empty).
fn inputs_digest(spec: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(concat!("hostd ", env!("CARGO_PKG_VERSION"), "\n"));
    let text =
        std::fs::read(spec).with_context(|| format!("cannot read spec {}", spec.display()))?;
    h.update((text.len() as u64).to_le_bytes());
    h.update(&text);
    let lock = hostd_images::lock::path_for(spec);
    let lock = std::fs::read(&lock).unwrap_or_default();
    h.update((lock.len() as u64).to_le_bytes());
    h.update(&lock);
    Ok(format!("{:x}", h.finalize()))
}

/// `hostd systemd build-image`.
fn build_image(spec: &Path, image: &Path) -> Result<i32> {
    let stamp = image.with_extension("inputs");
    let digest = inputs_digest(spec)?;
    if image.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest) {
        eprintln!(
            "hostd: {} is up to date (spec and lock unchanged: {})",
            image.display(),
            &digest[..12]
        );
        return Ok(0);
    }
    if let Some(parent) = image.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(&stamp);
    let code = crate::image_cmd::build(spec, image, None, None, None, false)?;
    if code == 0 {
        // Digest again: a first build may have written the lock file.
        std::fs::write(&stamp, format!("{}\n", inputs_digest(spec)?))
            .with_context(|| format!("cannot write {}", stamp.display()))?;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_cache_key_follows_the_spec_and_its_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = dir.path().join("app.toml");
        std::fs::write(&spec, "name = \"app\"\n").expect("spec");
        let no_lock = inputs_digest(&spec).expect("digest");
        assert_eq!(inputs_digest(&spec).expect("digest"), no_lock);
        std::fs::write(dir.path().join("app.lock"), "lock").expect("lock");
        let locked = inputs_digest(&spec).expect("digest");
        assert_ne!(locked, no_lock);
        std::fs::write(&spec, "name = \"app2\"\n").expect("spec");
        assert_ne!(inputs_digest(&spec).expect("digest"), locked);
        // Lengths are part of the key: moving bytes between spec and lock changes it.
        std::fs::write(&spec, "name = \"app\"\nl").expect("spec");
        std::fs::write(dir.path().join("app.lock"), "ock").expect("lock");
        assert_ne!(inputs_digest(&spec).expect("digest"), locked);
    }
}
