//! The image spec: the TOML file a user writes (`hostd build app.toml`).
//! Documented field by field in docs/spec.md. Parsing is strict: unknown fields are
//! errors, and every error names the file and the field.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::manifest::Restart;

/// An error in a spec file: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{file}: cannot read spec")]
    Read {
        /// The spec file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type/unknown name.
    #[error("{file}: field `{field}`: {message}")]
    Parse {
        /// The spec file.
        file: PathBuf,
        /// Dotted path of the offending field (`.` for the document itself).
        field: String,
        /// What was wrong, with the line and column when known.
        message: String,
    },
    /// The document parsed but a value is not acceptable.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        /// The spec file.
        file: PathBuf,
        /// Dotted path of the offending field.
        field: String,
        /// What was wrong and what is expected.
        message: String,
    },
}

/// A size such as `"256M"`, `"1G"`, `"512MiB"` or a plain number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeMib(pub u32);

impl<'de> Deserialize<'de> for SizeMib {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeMib;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"256M\", \"1G\" or a number of MiB")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeMib, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|v| *v > 0)
                    .map(SizeMib)
                    .ok_or_else(|| E::custom(format!("size {v} MiB is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeMib, E> {
                parse_size_mib(v).map(SizeMib).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"256M"`, `"256MiB"`, `"1G"`, `"1GiB"`, `"64"` (MiB) into MiB.
pub fn parse_size_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; expected e.g. \"256M\" or \"1G\""))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        // "1.5G", "0x80M": a number the parse above stopped in.
        u if u.starts_with(['.', ','])
            || u.contains(|c: char| c.is_ascii_digit())
            || (num == "0" && u.starts_with('x')) =>
        {
            return Err(format!(
                "`{s}` is not a size: a whole decimal number of M or G, e.g. \"1536M\" \
                 rather than \"1.5G\""
            ))
        }
        _ => return Err(format!("`{s}` has an unknown unit; use M or G")),
    };
    n.checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size `{s}` is out of range"))
}

/// The top level of a spec file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Image name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Guest hostname; defaults to `name`.
    pub hostname: Option<String>,
    /// `"default"` (hostd's own kernel) or a path to a vmlinux/bzImage, relative to the spec.
    pub kernel: Option<String>,
    /// Extra kernel command line, appended to the runner's.
    #[serde(default)]
    pub cmdline: String,
    /// Default vCPU count (1..=32).
    pub vcpus: Option<u32>,
    /// Default memory.
    pub memory: Option<SizeMib>,
    /// Seconds between SIGTERM and SIGKILL at shutdown (default 5).
    pub stop_timeout: Option<u32>,
    /// An OCI image the root file system starts from: `oci-archive:FILE` or
    /// `oci:DIR` (an OCI image layout), relative to the spec, inside the build context.
    pub base: Option<String>,
    /// Debian packages to unpack, as `name` or `name=version`, with everything they
    /// depend on (see docs/spec.md, "Packages").
    #[serde(default)]
    pub packages: Vec<String>,
    /// Packages never pulled in by the dependency closure.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Accounts written into /etc/passwd and /etc/shadow.
    #[serde(default)]
    pub users: Vec<UserSpec>,
    /// Groups written into /etc/group.
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
    /// Files to place in the root file system.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// One-shot boot steps.
    #[serde(default)]
    pub boot: Vec<StepSpec>,
    /// Services, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Persistent volumes.
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// Writable, empty-at-boot directories (tmpfs) for what a package writes at run
    /// time (logs, caches, state) on a read-only root.
    #[serde(default)]
    pub tmpfs: Vec<TmpfsSpec>,
    /// Name resolution defaults for the guest (`/etc/resolv.conf`).
    #[serde(default)]
    pub network: NetworkSpec,
    /// Where the root file system (packages and files) goes; unset, by its size
    /// (see [`crate::builder::EROFS_THRESHOLD`]).
    pub root: Option<RootKind>,
}

/// An account (what a package's maintainer script would have made with `adduser`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id [default: the same as `uid`].
    pub gid: Option<u32>,
    /// Home directory [default: `/nonexistent`].
    pub home: Option<String>,
    /// Login shell [default: `/usr/sbin/nologin`].
    pub shell: Option<String>,
}

/// A group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Supplementary members (user names).
    #[serde(default)]
    pub members: Vec<String>,
}

/// Where an image's root file system (its packages and files) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RootKind {
    /// In the initrd: unpacked into RAM at boot, writable, hashed as one section.
    /// What an unset `root` gives for a small root file system.
    #[default]
    Initrd,
    /// A read-only erofs file system in the image's `rootfs` section, attached as a
    /// virtio-blk disk, with a sha256 per 4 KiB block in the `rootfs-hashes` section.
    Erofs,
}

/// A file, directory or symlink placed in the image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path in the guest.
    pub path: String,
    /// Host file to copy, relative to the spec's directory.
    pub source: Option<PathBuf>,
    /// Inline contents.
    pub contents: Option<String>,
    /// Make a symlink pointing here instead of a file.
    pub symlink: Option<String>,
    /// Make a directory.
    #[serde(default)]
    pub directory: bool,
    /// Octal permission bits, e.g. `"0755"` (default 0644, 0755 for directories).
    pub mode: Option<String>,
    /// Owner as `uid:gid` (default `0:0`).
    pub owner: Option<String>,
}

/// A one-shot boot step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Name shown on the console.
    pub name: String,
    /// Absolute path of the program.
    pub command: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// User to run as.
    pub user: Option<String>,
}

/// A supervised service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Absolute path of the program.
    pub command: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// User to run as (default root).
    pub user: Option<String>,
    /// Working directory (default `/`).
    pub workdir: Option<String>,
    /// `no` (default), `on-failure` or `always`.
    #[serde(default)]
    pub restart: Restart,
    /// Services that must be started first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// This service's exit ends the VM with its exit code.
    #[serde(default)]
    pub main: bool,
    /// Secrets this service may receive.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Capabilities this service may use, by the name the host holds them under
    /// (`hostd cap add NAME …`): each appears in the guest as the Unix socket
    /// `/run/hostd/caps/NAME` (docs/capabilities.md, "From a guest service").
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// A persistent volume.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Name (letters, digits, `-`, `_`).
    pub name: String,
    /// Size when first created.
    pub size: SizeMib,
    /// Absolute mount point.
    pub mount: String,
}

/// A tmpfs mounted at boot.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsSpec {
    /// Absolute mount point (not `/`).
    pub path: String,
    /// Largest size [default: the kernel's, half the guest's memory].
    pub size: Option<SizeMib>,
    /// Octal mode of the mount's root [default: the directory's in the image, else 0755].
    pub mode: Option<String>,
    /// `uid:gid` of the mount's root [default: the directory's in the image, else 0:0].
    pub owner: Option<String>,
}

/// The guest's name resolution (written to `/etc/resolv.conf` at boot).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// DNS servers (IPv4 or IPv6 addresses), at most 3.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Search domains, at most 6.
    #[serde(default)]
    pub search: Vec<String>,
}

use crate::names::{self, is_dotted_name, is_plain_name};
pub use crate::names::{is_guest_path, parse_owner, GUEST_PATH};

impl Spec {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let read = |source| SpecError::Read {
            file: path.to_path_buf(),
            source,
        };
        let bytes = crate::input::read_regular(path, crate::input::MAX_SPEC).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "is not UTF-8 text",
            ))
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates spec text; `file` is used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Spec, SpecError> {
        let de = toml::Deserializer::new(text);
        let spec: Spec = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut field = e.path().to_string();
            let inner = e.into_inner();
            let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
            let location = inner
                .span()
                .map(|span| format!(" (line {})", line_of(span.start)))
                .unwrap_or_default();
            // No path (a value the parser itself refused, or broken syntax): the key on
            // the error's line names the field, else it is the syntax.
            if field == "." {
                let key = inner.span().and_then(|span| {
                    let line = text.lines().nth(line_of(span.start) - 1)?;
                    let (k, _) = line.split_once('=')?;
                    let k = k.trim();
                    (!k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.\"".contains(&b)))
                    .then(|| k.trim_matches('"').to_owned())
                });
                field = key.unwrap_or_else(|| "(syntax)".into());
            }
            SpecError::Parse {
                file: file.to_path_buf(),
                field,
                message: format!("{}{location}", inner.message().trim_end()),
            }
        })?;
        spec.validate(file)?;
        Ok(spec)
    }

    fn validate(&self, file: &Path) -> Result<(), SpecError> {
        let bad = |field: String, message: String| SpecError::Invalid {
            file: file.to_path_buf(),
            field,
            message,
        };
        if !is_dotted_name(&self.name) {
            return Err(bad(
                "name".into(),
                "expected 1-64 letters, digits, `-`, `_` or `.`".into(),
            ));
        }
        if let Some(h) = &self.hostname {
            if !is_dotted_name(h) {
                return Err(bad(
                    "hostname".into(),
                    "expected 1-64 letters, digits, `-`, `_` or `.`".into(),
                ));
            }
        }
        if let Some(v) = self.vcpus {
            if !names::VCPUS.contains(&v) {
                return Err(bad(
                    "vcpus".into(),
                    format!("{v} is out of range; expected 1 to 32"),
                ));
            }
        }
        if let Some(SizeMib(m)) = self.memory {
            if !names::MEMORY_MIB.contains(&m) {
                return Err(bad(
                    "memory".into(),
                    format!("{m} MiB is out of range; expected 32M to 64G"),
                ));
            }
        }
        if let Some(t) = self.stop_timeout.filter(|t| *t > names::MAX_STOP_TIMEOUT) {
            return Err(bad(
                "stop_timeout".into(),
                format!(
                    "{t} seconds is too long; at most {}",
                    names::MAX_STOP_TIMEOUT
                ),
            ));
        }
        names::check_cmdline(self.cmdline.trim()).map_err(|m| bad("cmdline".into(), m))?;
        for (i, p) in self.packages.iter().enumerate() {
            let (name, version) = match p.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (p.as_str(), None),
            };
            if !names::is_debian_package(name) || !version.is_none_or(names::is_debian_version) {
                return Err(bad(
                    format!("packages[{i}]"),
                    format!(
                        "`{p}` is not a Debian package name (`name` or `name=version`: lower-case \
                         letters, digits, `+`, `-`, `.`, starting with a letter or digit)"
                    ),
                ));
            }
        }
        if let Some(b) = &self.base {
            if base_source(b).is_none() {
                return Err(bad(
                    "base".into(),
                    format!("`{b}` is not `oci-archive:FILE` or `oci:DIR` (an OCI image layout)"),
                ));
            }
        }
        for (i, p) in self.exclude.iter().enumerate() {
            if !names::is_debian_package(p) {
                return Err(bad(
                    format!("exclude[{i}]"),
                    format!("`{p}` is not a Debian package name"),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let field = |k: &str| format!("users[{i}].{k}");
            if !names::is_account_name(&u.name) {
                return Err(bad(
                    field("name"),
                    format!(
                        "`{}` is not an account name (1-32 lower-case letters, digits, `_`, `-`, \
                         starting with a letter or `_`)",
                        u.name
                    ),
                ));
            }
            if !seen.insert(u.name.as_str()) {
                return Err(bad(
                    field("name"),
                    format!("user `{}` is declared twice", u.name),
                ));
            }
            for (k, id) in [("uid", Some(u.uid)), ("gid", u.gid)] {
                if id.is_some_and(|id| id == u32::MAX) {
                    return Err(bad(field(k), "4294967295 is not a valid id".into()));
                }
            }
            for (k, path) in [("home", &u.home), ("shell", &u.shell)] {
                if let Some(p) = path {
                    if !is_guest_path(p) || p.contains([':', '\n']) {
                        return Err(bad(
                            field(k),
                            format!("`{p}` must be {GUEST_PATH}, without `:` or newlines"),
                        ));
                    }
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            let field = |k: &str| format!("groups[{i}].{k}");
            if !names::is_account_name(&g.name) {
                return Err(bad(
                    field("name"),
                    format!("`{}` is not a group name", g.name),
                ));
            }
            if !seen.insert(g.name.as_str()) {
                return Err(bad(
                    field("name"),
                    format!("group `{}` is declared twice", g.name),
                ));
            }
            if g.gid == u32::MAX {
                return Err(bad(field("gid"), "4294967295 is not a valid id".into()));
            }
            for m in &g.members {
                if !names::is_account_name(m) {
                    return Err(bad(field("members"), format!("`{m}` is not a user name")));
                }
            }
        }
        let mut paths: BTreeSet<String> = BTreeSet::new();
        for (i, f) in self.files.iter().enumerate() {
            let field = |k: &str| format!("files[{i}].{k}");
            if !is_guest_path(&f.path) || f.path == "/" {
                return Err(bad(
                    field("path"),
                    format!("`{}` must be {GUEST_PATH}", f.path),
                ));
            }
            let p = f.path.trim_end_matches('/');
            // What hostd writes itself after the files: an entry there was dropped
            // without a word.
            if let Some(r) = ["/init", "/etc/hostd", "/dev", "/proc", "/sys"]
                .into_iter()
                .find(|r| at_or_under(p, r))
            {
                return Err(bad(
                    field("path"),
                    format!("`{}` is at or under {r}, which hostd fills itself", f.path),
                ));
            }
            if !paths.insert(p.to_owned()) {
                return Err(bad(
                    field("path"),
                    format!("`{}` is given twice in [[files]]", f.path),
                ));
            }
            let kinds = [
                f.source.is_some(),
                f.contents.is_some(),
                f.symlink.is_some(),
                f.directory,
            ]
            .iter()
            .filter(|k| **k)
            .count();
            if kinds != 1 {
                return Err(bad(
                    format!("files[{i}]"),
                    "give exactly one of `source`, `contents`, `symlink` or `directory = true`"
                        .into(),
                ));
            }
            check_mode_owner(f.mode.as_deref(), f.owner.as_deref(), "0644")
                .map_err(|(k, m)| bad(field(k), m))?;
            if let Some(t) = &f.symlink {
                if t.is_empty() || t.len() > names::MAX_GUEST_PATH || t.contains('\0') {
                    return Err(bad(
                        field("symlink"),
                        "expected a non-empty target without NUL bytes".into(),
                    ));
                }
            }
        }
        for (i, s) in self.boot.iter().enumerate() {
            if !is_plain_name(&s.name) {
                return Err(bad(
                    format!("boot[{i}].name"),
                    "expected 1-64 letters, digits, `-` or `_`".into(),
                ));
            }
            if !is_guest_path(&s.command) {
                return Err(bad(
                    format!("boot[{i}].command"),
                    format!("`{}` must be {GUEST_PATH}", s.command),
                ));
            }
            check_program(&s.command, &s.args, &s.env, s.user.as_deref())
                .map_err(|m| bad(format!("boot[{i}]"), m))?;
        }
        // The manifest's limit, checked here so an image this builds also opens.
        let caps: BTreeSet<&String> = self
            .services
            .values()
            .flat_map(|s| s.capabilities.iter())
            .collect();
        if caps.len() > crate::abi::MAX_CAPABILITIES {
            return Err(bad(
                "services".into(),
                format!(
                    "{} distinct capabilities are declared; an image may have at most {}",
                    caps.len(),
                    crate::abi::MAX_CAPABILITIES
                ),
            ));
        }
        let mut mains = Vec::new();
        for (name, s) in &self.services {
            let field = |k: &str| format!("services.{name}.{k}");
            if !is_plain_name(name) {
                return Err(bad(
                    format!("services.{name}"),
                    "service names are 1-64 letters, digits, `-` or `_`".into(),
                ));
            }
            if !is_guest_path(&s.command) {
                return Err(bad(
                    field("command"),
                    format!("`{}` must be {GUEST_PATH}", s.command),
                ));
            }
            check_program(&s.command, &s.args, &s.env, s.user.as_deref())
                .map_err(|m| bad(format!("services.{name}"), m))?;
            if let Some(w) = &s.workdir {
                if !is_guest_path(w) {
                    return Err(bad(field("workdir"), format!("`{w}` must be {GUEST_PATH}")));
                }
            }
            for d in &s.depends_on {
                if !self.services.contains_key(d) {
                    return Err(bad(field("depends_on"), format!("no service named `{d}`")));
                }
            }
            for (what, list) in [
                ("depends_on", &s.depends_on),
                ("secrets", &s.secrets),
                ("capabilities", &s.capabilities),
            ] {
                let mut seen = BTreeSet::new();
                if let Some(d) = list.iter().find(|x| !seen.insert(x.as_str())) {
                    return Err(bad(field(what), format!("`{d}` is listed twice")));
                }
            }
            for sec in &s.secrets {
                if !is_dotted_name(sec) {
                    return Err(bad(
                        field("secrets"),
                        format!("`{sec}` is not a secret name (letters, digits, `-`, `_`, `.`)"),
                    ));
                }
            }
            for cap in &s.capabilities {
                if !crate::abi::is_capability_name(cap) {
                    return Err(bad(
                        field("capabilities"),
                        format!(
                            "`{cap}` is not a capability name (1 to 64 letters, digits, `-` or `_`, as `hostd cap add` takes)"
                        ),
                    ));
                }
            }
            if s.main {
                mains.push(name.clone());
            }
        }
        if mains.len() > 1 {
            return Err(bad(
                format!("services.{}.main", mains[1]),
                format!("only one service can be `main`; `{}` already is", mains[0]),
            ));
        }
        if let Some(cycle) = find_cycle(&self.services) {
            return Err(bad(
                format!("services.{cycle}.depends_on"),
                "dependency cycle".into(),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !is_plain_name(&v.name) {
                return Err(bad(
                    format!("volumes[{i}].name"),
                    "expected 1-64 letters, digits, `-` or `_`".into(),
                ));
            }
            if !names::VOLUME_MIB.contains(&v.size.0) {
                return Err(bad(
                    format!("volumes[{i}].size"),
                    format!("{} MiB is out of range; expected 8M to 1024G", v.size.0),
                ));
            }
            if !names.insert(&v.name) {
                return Err(bad(
                    format!("volumes[{i}].name"),
                    format!("volume `{}` is declared twice", v.name),
                ));
            }
            if !is_guest_path(&v.mount) || v.mount == "/" {
                return Err(bad(
                    format!("volumes[{i}].mount"),
                    format!("`{}` must be {GUEST_PATH}, other than `/`", v.mount),
                ));
            }
            if let Some(why) = reserved_mount(&v.mount) {
                return Err(bad(format!("volumes[{i}].mount"), why));
            }
        }
        let mut mounts: BTreeSet<&str> = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !mounts.insert(v.mount.as_str()) {
                return Err(bad(
                    format!("volumes[{i}].mount"),
                    format!(
                        "`{}` is already another volume's mount point (one would hide the other)",
                        v.mount
                    ),
                ));
            }
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            let field = |k: &str| format!("tmpfs[{i}].{k}");
            if !is_guest_path(&t.path) || t.path == "/" {
                return Err(bad(
                    field("path"),
                    format!("`{}` must be {GUEST_PATH}, other than `/`", t.path),
                ));
            }
            if let Some(why) = reserved_mount(&t.path) {
                return Err(bad(field("path"), why));
            }
            if !mounts.insert(&t.path) {
                return Err(bad(
                    field("path"),
                    format!(
                        "`{}` is already a volume's or a tmpfs's mount point",
                        t.path
                    ),
                ));
            }
            if let Some(SizeMib(m)) = t.size {
                if m > *names::MEMORY_MIB.end() {
                    return Err(bad(
                        field("size"),
                        format!("{m} MiB is out of range; expected at most 64G"),
                    ));
                }
            }
            check_mode_owner(t.mode.as_deref(), t.owner.as_deref(), "0755")
                .map_err(|(k, m)| bad(field(k), m))?;
        }
        names::check_resolver(&self.network.dns, &self.network.search)
            .map_err(|(k, m)| bad(format!("network.{k}"), m))?;
        Ok(())
    }
}

/// Whether guest path `p` is `dir` or below it (`/devices` is neither of `/dev`).
fn at_or_under(p: &str, dir: &str) -> bool {
    p == dir
        || p.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Why a mount point is guest init's own: /proc, /sys, /dev, /run and what it keeps in
/// /run (secrets, capabilities) are set up by guest init, and a volume or tmpfs there
/// would hide them. Other directories under /run are free.
fn reserved_mount(path: &str) -> Option<String> {
    let p = path.trim_end_matches('/');
    [
        "/proc",
        "/sys",
        "/dev",
        crate::abi::SECRETS_DIR,
        "/run/hostd",
    ]
    .into_iter()
    .find(|r| at_or_under(p, r))
    .or((p == "/run").then_some("/run"))
    .map(|r| format!("`{path}` is at or under {r}, which guest init sets up itself"))
}

/// Splits a spec's `base` into its kind and path.
pub fn base_source(base: &str) -> Option<(crate::oci::Source, &str)> {
    let (kind, path) = if let Some(p) = base.strip_prefix("oci-archive:") {
        (crate::oci::Source::Archive, p)
    } else if let Some(p) = base.strip_prefix("oci:") {
        (crate::oci::Source::Layout, p)
    } else {
        return None;
    };
    (!path.is_empty() && !path.contains('\0')).then_some((kind, path))
}

/// Checks an entry's `mode` (octal, at most 0o7777; `example` is shown in the error) and
/// `owner` (`uid:gid`); the error names the field (`mode` or `owner`) and what is wrong.
fn check_mode_owner(
    mode: Option<&str>,
    owner: Option<&str>,
    example: &str,
) -> Result<(), (&'static str, String)> {
    if let Some(m) = mode {
        if u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .is_none()
        {
            return Err((
                "mode",
                format!("`{m}` is not an octal mode such as \"{example}\""),
            ));
        }
    }
    if let Some(o) = owner {
        if parse_owner(o).is_none() {
            return Err((
                "owner",
                format!("`{o}` is not `uid:gid` (numbers from 0 to 4294967294)"),
            ));
        }
    }
    Ok(())
}

/// The checks a manifest's program gets ([`names::check_program`]), on a spec's
/// `command`, `args`, `env` and `user`.
fn check_program(
    command: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    user: Option<&str>,
) -> Result<(), String> {
    let argv: Vec<String> = std::iter::once(command.to_string())
        .chain(args.iter().cloned())
        .collect();
    names::check_program(&argv, env, user.unwrap_or("root"))
}

fn find_cycle(services: &BTreeMap<String, ServiceSpec>) -> Option<String> {
    // Depth-first search with colours; returns a service on a cycle.
    fn visit<'a>(
        n: &'a str,
        services: &'a BTreeMap<String, ServiceSpec>,
        state: &mut BTreeMap<&'a str, u8>,
    ) -> Option<String> {
        match state.get(n) {
            Some(1) => return Some(n.to_string()),
            Some(2) => return None,
            _ => {}
        }
        state.insert(n, 1);
        if let Some(s) = services.get(n) {
            for d in &s.depends_on {
                if let Some(c) = visit(d, services, state) {
                    return Some(c);
                }
            }
        }
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    services.keys().find_map(|n| visit(n, services, &mut state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Spec, SpecError> {
        Spec::parse(s, Path::new("app.toml"))
    }

    fn err(s: &str) -> String {
        match parse(s) {
            Ok(_) => panic!("spec should have been rejected:\n{s}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_capability_token_is_no_secret_a_service_can_declare() {
        let e = err(&format!(
            "name = \"x\"\n[services.a]\ncommand = \"/bin/a\"\nsecrets = [\"{}\"]\n",
            crate::abi::CAPS_TOKEN_SECRET
        ));
        // Its leading dot makes it no secret name (the manifest's check is the same).
        assert!(e.contains("is not a secret name"), "{e}");
    }

    #[test]
    fn minimal_spec_parses() {
        let s = parse("name = \"x\"\n[services.a]\ncommand = \"/bin/a\"\nmain = true\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.services["a"].restart, Restart::No);
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            err("name = \"x\"\n[services.web]\ncommand = \"/bin/a\"\nrestart = \"sometimes\"\n");
        assert!(
            e.contains("app.toml") && e.contains("services.web.restart") && e.contains("line 4"),
            "{e}"
        );
        let e = err("name = \"x\"\n[services.web]\ncommand = \"/bin/a\"\nrestrat = \"no\"\n");
        assert!(e.contains("restrat"), "{e}");
        let e = err("name = \"x\"\nmemory = \"12X\"\n");
        assert!(e.contains("`memory`") && e.contains("unit"), "{e}");
        let e = err("name = \"x\"\n[services.a]\ncommand = \"bin/a\"\n");
        assert!(e.contains("services.a.command"), "{e}");
        let e = err("name = \"x\"\n[services.a]\ncommand = \"/a\"\ndepends_on = [\"b\"]\n");
        assert!(
            e.contains("services.a.depends_on") && e.contains("`b`"),
            "{e}"
        );
        let e = err("name = \"x\"\n[services.a]\ncommand = \"/a\"\ndepends_on = [\"b\"]\n[services.b]\ncommand = \"/b\"\ndepends_on = [\"a\"]\n");
        assert!(e.contains("cycle"), "{e}");
        let e = err("name = \"x\"\n[[files]]\npath = \"/etc/../x\"\ncontents = \"\"\n");
        assert!(e.contains("files[0].path"), "{e}");
        let e = err("name = \"x\"\n[[files]]\npath = \"/x\"\n");
        assert!(e.contains("files[0]"), "{e}");
        let e = err("name = \"x\"\n[services.a]\ncommand = \"/a\"\nmain = true\n[services.b]\ncommand = \"/b\"\nmain = true\n");
        assert!(e.contains("only one service"), "{e}");
        let e = err("name = \"x\"\nvcpus = 0\n");
        assert!(e.contains("vcpus"), "{e}");
        let e = err("name = \"x\"\nname = \"y\"\n");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn tmpfs_and_network_are_checked() {
        let s = parse(
            "name = \"x\"\n[[tmpfs]]\npath = \"/var/log/x\"\nsize = \"16M\"\n\
             [network]\ndns = [\"10.0.2.1\", \"fd00::1\"]\nsearch = [\"hostd.test\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.tmpfs[0].size, Some(SizeMib(16)));
        assert_eq!(s.network.dns.len(), 2);
        for (spec, field) in [
            ("[[tmpfs]]\npath = \"/\"", "tmpfs[0].path"),
            ("[[tmpfs]]\npath = \"/a\"\nmode = \"999\"", "tmpfs[0].mode"),
            (
                "[[tmpfs]]\npath = \"/a\"\nowner = \"www\"",
                "tmpfs[0].owner",
            ),
            (
                "[[tmpfs]]\npath = \"/a\"\n[[tmpfs]]\npath = \"/a\"",
                "tmpfs[1].path",
            ),
            ("[network]\ndns = [\"dns.example\"]", "network.dns"),
            ("[network]\nsearch = [\"a b\"]", "network.search"),
        ] {
            let e = err(&format!("name = \"x\"\n{spec}\n"));
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn root_defaults_to_the_initrd_and_names_bad_values() {
        let s = parse("name = \"x\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.root, None);
        let s = parse("name = \"x\"\nroot = \"erofs\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.root, Some(RootKind::Erofs));
        let s = parse("name = \"x\"\nroot = \"initrd\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.root, Some(RootKind::Initrd));
        let e = err("name = \"x\"\nroot = \"squashfs\"\n");
        assert!(e.contains("`root`") && e.contains("erofs"), "{e}");
    }

    #[test]
    fn values_that_would_be_cut_wrapped_or_read_as_options_are_refused() {
        for (spec, field) in [
            ("packages = [\"--config-file=/tmp/x\"]", "packages[0]"),
            ("packages = [\"-oAPT::Foo=1\"]", "packages[0]"),
            ("packages = [\"busybox=--x\"]", "packages[0]"),
            ("packages = [\"busybox/bookworm\"]", "packages[0]"),
            ("exclude = [\"-x\"]", "exclude[0]"),
            ("base = \"docker://debian\"", "base"),
            ("base = \"oci:\"", "base"),
            ("[[users]]\nname = \"root:x\"\nuid = 1", "users[0].name"),
            ("[[users]]\nname = \"Redis\"\nuid = 1", "users[0].name"),
            (
                "[[users]]\nname = \"r\"\nuid = 1\nhome = \"x\"",
                "users[0].home",
            ),
            (
                "[[users]]\nname = \"r\"\nuid = 1\nshell = \"/bin/sh\\n\"",
                "users[0].shell",
            ),
            ("[[users]]\nname = \"r\"\nuid = 4294967295", "users[0].uid"),
            (
                "[[users]]\nname = \"r\"\nuid = 1\n[[users]]\nname = \"r\"\nuid = 2",
                "users[1].name",
            ),
            (
                "[[groups]]\nname = \"g\"\ngid = 1\nmembers = [\"a,b\"]",
                "groups[0].members",
            ),
            ("stop_timeout = 4000000000", "stop_timeout"),
            (
                "[[files]]\npath = \"/x\"\ncontents = \"\"\nowner = \"4294967295:0\"",
                "files[0].owner",
            ),
            (
                "[[volumes]]\nname = \"d\"\nsize = \"4000G\"\nmount = \"/d\"",
                "volumes[0].size",
            ),
            (
                "[[volumes]]\nname = \"-d\"\nsize = \"8M\"\nmount = \"/d\"",
                "volumes[0].name",
            ),
            (
                "[services.a]\ncommand = \"/a\"\nenv = { \"A=B\" = \"x\" }",
                "services.a",
            ),
            (
                "[services.a]\ncommand = \"/a\"\nuser = \"4294967295\"",
                "services.a",
            ),
            (
                "[services.a]\ncommand = \"/a\"\nargs = [\"a\\u0000b\"]",
                "services.a",
            ),
            (
                "[[volumes]]\nname = \"a\"\nsize = \"8M\"\nmount = \"/d\"\n\
                 [[volumes]]\nname = \"b\"\nsize = \"8M\"\nmount = \"/d\"",
                "volumes[1].mount",
            ),
            (
                "[[volumes]]\nname = \"a\"\nsize = \"8M\"\nmount = \"/proc\"",
                "volumes[0].mount",
            ),
            ("[[tmpfs]]\npath = \"/dev\"", "tmpfs[0].path"),
            (
                "[services.a]\ncommand = \"/a\"\nsecrets = [\"s\", \"s\"]",
                "services.a.secrets",
            ),
            (
                "[services.a]\ncommand = \"/a\"\ncapabilities = [\"c\", \"c\"]",
                "services.a.capabilities",
            ),
            (
                "[services.a]\ncommand = \"/a\"\n[services.b]\ncommand = \"/b\"\ndepends_on = [\"a\", \"a\"]",
                "services.b.depends_on",
            ),
            ("[[files]]\npath = \"/x\"\ncontents = \"\"\nowner = \"+1:1\"", "files[0].owner"),
            ("[[files]]\npath = \"/init\"\ncontents = \"x\"", "files[0].path"),
            (
                "[[files]]\npath = \"/etc/hostd/manifest.json\"\ncontents = \"x\"",
                "files[0].path",
            ),
            ("[[files]]\npath = \"/dev/console\"\ncontents = \"x\"", "files[0].path"),
            (
                "[[files]]\npath = \"/a\"\ncontents = \"x\"\n[[files]]\npath = \"/a\"\ncontents = \"y\"",
                "files[1].path",
            ),
            ("[[tmpfs]]\npath = \"/run\"", "tmpfs[0].path"),
            ("[[tmpfs]]\npath = \"/run/secrets/x\"", "tmpfs[0].path"),
        ] {
            let e = err(&format!("name = \"x\"\n{spec}\n"));
            assert!(e.contains(&format!("`{field}`")), "{spec}: {e}");
        }
        let long = format!("name = \"x\"\ncmdline = \"{}\"\n", "a".repeat(3000));
        assert!(err(&long).contains("`cmdline`"));
        // More distinct capabilities than a manifest may hold (two services, 40 each).
        let caps = |from: usize| {
            (from..from + 40)
                .map(|i| format!("\"c{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let many = format!(
            "name = \"x\"\n[services.a]\ncommand = \"/a\"\ncapabilities = [{}]\n\
             [services.b]\ncommand = \"/b\"\ncapabilities = [{}]\n",
            caps(0),
            caps(40)
        );
        assert!(err(&many).contains("`services`"), "{}", err(&many));
        // A tmpfs elsewhere under /run is free.
        assert!(Spec::parse(
            "name = \"x\"\n[[tmpfs]]\npath = \"/run/app\"\n",
            Path::new("x.toml")
        )
        .is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("64"), Ok(64));
        assert!(parse_size_mib("0").is_err());
        assert!(parse_size_mib("1T").is_err());
        assert!(parse_size_mib("99999999999G").is_err());
        for odd in ["1.5G", "0x80M", "0xffM", "1,5G", "1e3M", "12 34M"] {
            let e = parse_size_mib(odd).expect_err(odd);
            assert!(e.contains("whole decimal number"), "{odd}: {e}");
        }
        for unit in ["1T", "12X", "12E", "5 KB"] {
            let e = parse_size_mib(unit).expect_err(unit);
            assert!(e.contains("unknown unit"), "{unit}: {e}");
        }
    }
}
