//! The manifest: the resolved, canonical description of an image that guest init
//! reads at boot. It is written as canonical JSON (struct fields in declaration order,
//! maps sorted) into both the image's `manifest` section and the initrd.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

use crate::names;

/// Why a manifest was refused.
#[derive(Debug)]
pub enum ManifestError {
    /// Not manifest JSON.
    Json(serde_json::Error),
    /// A field's value is not acceptable.
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ManifestError::Json(e) => write!(f, "not a valid manifest: {e}"),
            ManifestError::Invalid { field, message } => {
                write!(f, "manifest field `{field}`: {message}")
            }
        }
    }
}

impl std::error::Error for ManifestError {}

/// Where guest init finds the manifest inside the initrd.
pub const MANIFEST_PATH_IN_GUEST: &str = "/etc/hostd/manifest.json";

/// Version of the manifest schema; bumped on incompatible changes.
pub const MANIFEST_SCHEMA: u32 = 1;

/// The resolved description of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema version ([`MANIFEST_SCHEMA`]).
    pub schema: u32,
    /// The image's name, from the spec.
    pub name: String,
    /// Guest hostname.
    pub hostname: String,
    /// Default number of vCPUs.
    pub vcpus: u32,
    /// Default guest memory in MiB.
    pub memory_mib: u32,
    /// Extra kernel command line from the spec (appended to the runner's own).
    pub cmdline: String,
    /// The kernel that was packed into the image.
    pub kernel: KernelInfo,
    /// Debian packages unpacked into the root file system.
    pub packages: Vec<PackageInfo>,
    /// One-shot boot steps, run in order before any service starts.
    pub boot: Vec<Step>,
    /// Long-running services, by name.
    pub services: BTreeMap<String, Service>,
    /// Persistent volumes (attached by the device backends).
    pub volumes: Vec<Volume>,
    /// Seconds services get between SIGTERM and SIGKILL at shutdown.
    pub stop_timeout_secs: u32,
    /// The read-only root file system in the image's `rootfs` section, when the image
    /// has one (spec `root = "erofs"`). Absent (and not written) when the root file
    /// system is the initrd itself, so manifests of such images are unchanged and
    /// readers that predate this field still read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootInfo>,
    /// The OCI image the root file system starts from (spec `base`). Absent (and not
    /// written) for images without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInfo>,
    /// tmpfs mounts made at boot (spec `tmpfs`). Not written when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<Tmpfs>,
    /// Default name resolution (spec `network`); `hostd run --net dns=` overrides it.
    /// Not written when the spec gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
}

/// A tmpfs guest init mounts at boot, after the volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tmpfs {
    /// Absolute mount point (the builder creates the directory in the root).
    pub path: String,
    /// Size limit in MiB; none: the kernel's default (half the guest's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u32>,
    /// Mode of the mount's root directory.
    pub mode: u32,
    /// Owner of the mount's root directory.
    pub uid: u32,
    /// Group of the mount's root directory.
    pub gid: u32,
}

/// Where the guest's resolver looks names up (`/etc/resolv.conf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInfo {
    /// DNS servers, IP addresses.
    pub dns: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
}

/// An OCI image used as the base of the root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseInfo {
    /// The image manifest's digest, `sha256:…` (what `skopeo inspect` calls Digest).
    pub digest: String,
    /// How many layers were applied.
    pub layers: u32,
}

/// A read-only root file system packed as the image's `rootfs` section. Runners attach
/// that section as the guest's first virtio-blk disk ([`crate::abi::ROOT_DEVICE`]);
/// guest init mounts it read-only and switches to it before running anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootInfo {
    /// File system type, as mount(2) names it: `erofs`.
    pub fs: String,
    /// Length of the `rootfs` section in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Size of the blocks the `rootfs-hashes` section holds one sha256 for.
    pub block_size: u32,
    /// sha256 of the whole `rootfs` section, hex.
    pub sha256: String,
}

/// The kernel packed into an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// Format of the kernel section: `elf` (vmlinux, PVH entry) or `bzimage`.
    pub format: String,
    /// sha256 of the kernel bytes, hex.
    pub sha256: String,
}

/// A Debian package unpacked into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageInfo {
    /// Package name.
    pub name: String,
    /// Exact Debian version that was unpacked.
    pub version: String,
    /// sha256 of the .deb file, hex.
    pub sha256: String,
}

/// A one-shot boot step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Name shown on the console.
    pub name: String,
    /// argv: program path first.
    pub argv: Vec<String>,
    /// Environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// User to run as (`root`, a name from /etc/passwd, or `uid[:gid]`).
    pub user: String,
}

/// When a service is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Never restarted.
    #[default]
    No,
    /// Restarted when it exits non-zero or is killed by a signal.
    OnFailure,
    /// Always restarted (a `main` service with this policy never ends the VM by itself).
    Always,
}

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// argv: program path first.
    pub argv: Vec<String>,
    /// Environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// User to run as (`root`, a name from /etc/passwd, or `uid[:gid]`).
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// Restart policy.
    pub restart: Restart,
    /// Services that must have started before this one.
    pub depends_on: Vec<String>,
    /// Whether this service's exit ends the VM with its exit code.
    pub main: bool,
    /// Names of the secrets this service may receive under /run/secrets.
    pub secrets: Vec<String>,
    /// Names of the host-held capabilities this service may use, as the Unix sockets
    /// `/run/hostd/caps/NAME`. Left out of the JSON when empty, so images built before
    /// the field existed keep their bytes (and digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// A persistent volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Volume name; the same name on the host means the same data.
    pub name: String,
    /// Size in MiB, used when the volume is first created.
    pub size_mib: u32,
    /// Absolute mount point in the guest.
    pub mount: String,
}

impl Manifest {
    /// Canonical JSON bytes of the manifest (the exact bytes stored in the image).
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serialising plain structs, Strings, Vecs and BTreeMaps cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses manifest JSON and checks every value ([`Manifest::validate`]): a manifest
    /// comes from an image file, which anyone can make by hand with correct digests.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every name, path and number against the rules a spec is held to
    /// ([`crate::names`]), so that nothing a hand-made manifest says can reach a host
    /// path, an option or an out-of-range resource.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |field: String, message: String| Err(ManifestError::Invalid { field, message });
        if self.schema != MANIFEST_SCHEMA {
            return bad(
                "schema".into(),
                format!(
                    "schema {}; this hostd reads schema {MANIFEST_SCHEMA}",
                    self.schema
                ),
            );
        }
        if let Some(b) = &self.base {
            let ok = b.digest.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            });
            if !ok {
                return bad(
                    "base.digest".into(),
                    "expected `sha256:` and 64 lower-case hex digits".into(),
                );
            }
        }
        for (field, v) in [("name", &self.name), ("hostname", &self.hostname)] {
            if !names::is_dotted_name(v) {
                return bad(field.into(), format!("`{v}` is not a valid name"));
            }
        }
        if !names::VCPUS.contains(&self.vcpus) {
            return bad(
                "vcpus".into(),
                format!("{} is out of range; expected 1 to 32", self.vcpus),
            );
        }
        if !names::MEMORY_MIB.contains(&self.memory_mib) {
            return bad(
                "memory_mib".into(),
                format!(
                    "{} MiB is out of range; expected 32 to 65536",
                    self.memory_mib
                ),
            );
        }
        if self.stop_timeout_secs > names::MAX_STOP_TIMEOUT {
            return bad(
                "stop_timeout_secs".into(),
                format!(
                    "{} is more than {}",
                    self.stop_timeout_secs,
                    names::MAX_STOP_TIMEOUT
                ),
            );
        }
        if let Err(m) = names::check_cmdline(&self.cmdline) {
            return bad("cmdline".into(), m);
        }
        for (i, p) in self.packages.iter().enumerate() {
            if !names::is_debian_package(&p.name) || !names::is_debian_version(&p.version) {
                return bad(
                    format!("packages[{i}]"),
                    format!(
                        "`{}={}` is not a Debian package and version",
                        p.name, p.version
                    ),
                );
            }
        }
        let programs = self
            .boot
            .iter()
            .map(|s| {
                (
                    format!("boot.{}", s.name),
                    &s.name,
                    &s.argv,
                    &s.env,
                    &s.user,
                )
            })
            .chain(
                self.services
                    .iter()
                    .map(|(n, s)| (format!("services.{n}"), n, &s.argv, &s.env, &s.user)),
            );
        for (field, name, argv, env, user) in programs {
            if !names::is_plain_name(name) {
                return bad(field, "not a valid name".into());
            }
            if let Err(m) = names::check_program(argv, env, user) {
                return bad(field, m);
            }
        }
        for (n, s) in &self.services {
            if !names::is_guest_path(&s.workdir) {
                return bad(
                    format!("services.{n}.workdir"),
                    "not an absolute path".into(),
                );
            }
            if let Some(d) = s
                .depends_on
                .iter()
                .find(|d| !self.services.contains_key(*d))
            {
                return bad(
                    format!("services.{n}.depends_on"),
                    format!("no service `{d}`"),
                );
            }
            if let Some(x) = s.secrets.iter().find(|x| !names::is_dotted_name(x)) {
                return bad(
                    format!("services.{n}.secrets"),
                    format!("`{x}` is not a secret name"),
                );
            }
            if let Some(x) = s
                .capabilities
                .iter()
                .find(|x| !crate::abi::is_capability_name(x))
            {
                return bad(
                    format!("services.{n}.capabilities"),
                    format!("`{x}` is not a capability name"),
                );
            }
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            if !names::is_guest_path(&t.path) || t.path == "/" {
                return bad(
                    format!("tmpfs[{i}].path"),
                    "not an absolute path other than `/`".into(),
                );
            }
            if t.mode > 0o7777 || t.uid == u32::MAX || t.gid == u32::MAX {
                return bad(
                    format!("tmpfs[{i}]"),
                    "mode above 07777 or an id of 4294967295".into(),
                );
            }
            if t.size_mib
                .is_some_and(|m| m == 0 || m > *names::MEMORY_MIB.end())
            {
                return bad(format!("tmpfs[{i}].size_mib"), "out of range".into());
            }
        }
        if let Some(n) = &self.network {
            if let Err((k, m)) = names::check_resolver(&n.dns, &n.search) {
                return bad(format!("network.{k}"), m);
            }
        }
        if self.services.values().filter(|s| s.main).count() > 1 {
            return bad("services".into(), "more than one `main` service".into());
        }
        if crate::abi::capability_names(self).len() > crate::abi::MAX_CAPABILITIES {
            return bad(
                "services".into(),
                format!(
                    "more than {} distinct capabilities declared",
                    crate::abi::MAX_CAPABILITIES
                ),
            );
        }
        if self.start_order().is_none() {
            return bad("services".into(), "dependency cycle".into());
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !names::is_plain_name(&v.name) {
                return bad(
                    format!("volumes[{i}].name"),
                    format!(
                        "`{}` is not a volume name (letters, digits, `-`, `_`)",
                        v.name
                    ),
                );
            }
            if self.volumes[..i].iter().any(|o| o.name == v.name) {
                return bad(
                    format!("volumes[{i}].name"),
                    format!("`{}` appears twice", v.name),
                );
            }
            if !names::VOLUME_MIB.contains(&v.size_mib) {
                return bad(
                    format!("volumes[{i}].size_mib"),
                    format!("{} MiB is out of range (8 MiB to 1 TiB)", v.size_mib),
                );
            }
            if !names::is_guest_path(&v.mount) || v.mount == "/" {
                return bad(
                    format!("volumes[{i}].mount"),
                    "not an absolute path other than `/`".into(),
                );
            }
        }
        Ok(())
    }

    /// Service names in an order where every service comes after its dependencies.
    /// Ties are broken by name so the order is stable. Returns `None` on a cycle or
    /// an unknown dependency (the spec validator rejects both before this point).
    pub fn start_order(&self) -> Option<Vec<String>> {
        let mut order: Vec<String> = Vec::with_capacity(self.services.len());
        let mut remaining: Vec<&String> = self.services.keys().collect();
        while !remaining.is_empty() {
            let ready = remaining.iter().position(|name| {
                self.services[*name]
                    .depends_on
                    .iter()
                    .all(|d| order.iter().any(|o| o == d))
            })?;
            order.push(remaining.remove(ready).clone());
        }
        Some(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(deps: &[&str]) -> Service {
        Service {
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            user: "root".into(),
            workdir: "/".into(),
            restart: Restart::No,
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            main: false,
            secrets: vec![],
            capabilities: vec![],
        }
    }

    fn manifest(services: &[(&str, &[&str])]) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            name: "t".into(),
            hostname: "t".into(),
            vcpus: 1,
            memory_mib: 128,
            cmdline: String::new(),
            kernel: KernelInfo {
                format: "elf".into(),
                sha256: "00".into(),
            },
            packages: vec![],
            boot: vec![],
            services: services
                .iter()
                .map(|(n, d)| (n.to_string(), svc(d)))
                .collect(),
            volumes: vec![],
            stop_timeout_secs: 5,
            root: None,
            base: None,
            tmpfs: vec![],
            network: None,
        }
    }

    #[test]
    fn capabilities_get_ports_in_name_order_and_bad_names_are_refused() {
        let mut m = manifest(&[("a", &[]), ("b", &[])]);
        if let Some(s) = m.services.get_mut("a") {
            s.capabilities = vec!["zeta".into(), "billing".into()];
        }
        if let Some(s) = m.services.get_mut("b") {
            s.capabilities = vec!["billing".into()];
        }
        assert!(m.validate().is_ok());
        assert_eq!(crate::abi::capability_names(&m), ["billing", "zeta"]);
        // Empty lists stay out of the canonical JSON (older images keep their bytes).
        let json = String::from_utf8(m.to_canonical_json()).unwrap_or_default();
        assert_eq!(json.matches("\"capabilities\"").count(), 2);
        if let Some(s) = m.services.get_mut("b") {
            s.capabilities = vec!["../x".into()];
        }
        assert!(m.validate().is_err());
    }

    #[test]
    fn start_order_respects_dependencies() {
        let m = manifest(&[("web", &["db", "cache"]), ("db", &[]), ("cache", &["db"])]);
        assert_eq!(
            m.start_order(),
            Some(vec!["db".into(), "cache".into(), "web".into()])
        );
    }

    #[test]
    fn start_order_rejects_cycles() {
        let m = manifest(&[("a", &["b"]), ("b", &["a"])]);
        assert_eq!(m.start_order(), None);
    }

    #[test]
    fn canonical_json_round_trips() {
        let m = manifest(&[("a", &[])]);
        let bytes = m.to_canonical_json();
        assert_eq!(Manifest::from_json(&bytes).ok(), Some(m.clone()));
        assert_eq!(bytes, m.to_canonical_json());
    }

    #[test]
    fn root_is_optional_and_omitted_when_absent() {
        let mut m = manifest(&[("a", &[])]);
        let without = String::from_utf8_lossy(&m.to_canonical_json()).into_owned();
        assert!(!without.contains("\"root\":"), "{without}");
        m.root = Some(RootInfo {
            fs: "erofs".into(),
            size: 8192,
            block_size: 4096,
            sha256: "00".into(),
        });
        let bytes = m.to_canonical_json();
        assert_eq!(Manifest::from_json(&bytes).ok(), Some(m));
    }
}
