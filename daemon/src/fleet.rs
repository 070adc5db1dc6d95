//! The fleet file: the guests and functions a host should run (docs/daemon.md).
//!
//! ```toml
//! [guests.web]
//! image = "web.img"          # an image file (relative to the fleet file), or
//!                            # "sha256:<64 hex>" naming an image in the daemon's store
//! # spec = "web.toml"        # instead of `image`: built by hostd (cached by digest)
//! vmm = "builtin"            # or "qemu"
//! vcpus = 1                  # default: the image's
//! memory = "256M"            # default: the image's
//! autostart = true
//! restart = "on-failure"     # "always", "on-failure" or "never"
//! net = "tap=tap-web,ip=10.0.0.2/24,gw=10.0.0.1"   # as `hostd run --net`
//! trust = ["keys/release.pub"]
//! [guests.web.secrets]
//! db_password = "/run/keys/db"   # host file delivered as /run/secrets/db_password
//!
//! [functions.hello]          # exactly a `[functions.NAME]` table of fns.toml
//! component = "hello.wasm"
//! routes = ["/hello"]
//! ```
//!
//! Parsing checks names, paths and values; a function table is kept as TOML and
//! validated by the sandbox's own fns.toml parser where it is served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest fleet file read, in bytes.
pub const MAX_FLEET_BYTES: u64 = 4 << 20;

/// Why a fleet file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The file could not be read.
    #[error("cannot read fleet file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FLEET_BYTES`].
    #[error("fleet file {} is larger than {MAX_FLEET_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML of the fleet's shape.
    #[error("fleet file {}: {msg}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, what was expected).
        msg: String,
    },
    /// A well-formed entry with a bad value.
    #[error("fleet file {}: {what}: {msg}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which entry and field, e.g. `guests.web.memory`.
        what: String,
        /// What is wrong and what would be right.
        msg: String,
    },
}

/// Which monitor boots a guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    /// hostd's own VMM on KVM (`hostd run --vmm kvm`).
    #[default]
    Builtin,
    /// The QEMU runner (`hostd run --vmm qemu`).
    Qemu,
}

/// When a stopped guest is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whenever it stops, with backoff.
    Always,
    /// When it exits non-zero or is killed, with backoff.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// Where a guest's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// An image file (absolute after parsing).
    File(PathBuf),
    /// An image in the daemon's content-addressed store: 64 lowercase hex digits.
    Digest(String),
    /// A spec file (absolute after parsing), built by hostd.
    Spec(PathBuf),
}

/// [`ImageSource`] as the OpenAPI document describes it (paths are strings).
#[derive(utoipa::ToSchema)]
#[schema(as = ImageSource)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ImageSourceDoc {
    /// An image file (absolute).
    File(String),
    /// An image in the daemon's store: 64 lowercase hex digits.
    Digest(String),
    /// A spec file (absolute).
    Spec(String),
}

/// One declared guest, every path absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Guest {
    /// The image.
    #[schema(value_type = ImageSourceDoc)]
    pub image: ImageSource,
    /// The monitor.
    pub vmm: Vmm,
    /// vCPUs; `None`: the image's.
    pub vcpus: Option<u32>,
    /// Memory as `hostd run --mem` takes it (`256M`, `1G`); `None`: the image's.
    pub memory: Option<String>,
    /// Start when the fleet is applied (or the host boots).
    pub autostart: bool,
    /// Restart policy.
    pub restart: Restart,
    /// A network card, as `hostd run --net` takes it.
    pub net: Option<String>,
    /// Secrets: name -> host file (absolute).
    #[schema(value_type = BTreeMap<String, String>)]
    pub secrets: BTreeMap<String, PathBuf>,
    /// Public keys the image must be signed by (absolute); empty: no check.
    #[schema(value_type = Vec<String>)]
    pub trust: Vec<PathBuf>,
}

/// A parsed, validated fleet file (also the body of `PUT /fleet`, as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Fleet {
    /// Guests by name.
    pub guests: BTreeMap<String, Guest>,
    /// Function tables by name, as in fns.toml (relative paths already made absolute
    /// for `component`, `dirs[].host` and `secrets.*.file`).
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, Object>)]
    pub functions: BTreeMap<String, toml::Table>,
    /// The fleet file's directory (what relative paths were resolved against).
    #[schema(value_type = String)]
    pub base: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    guests: BTreeMap<String, GuestDecl>,
    #[serde(default)]
    functions: BTreeMap<String, toml::Table>,
}

/// A guest as a fleet file's `[guests.NAME]` table (or `POST /guests`) declares it,
/// before validation.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestDecl {
    /// An image file, or `sha256:<64 hex>` naming an image in the daemon's store.
    pub image: Option<String>,
    /// A spec file to build (instead of `image`).
    #[schema(value_type = Option<String>)]
    pub spec: Option<PathBuf>,
    /// The monitor.
    #[serde(default)]
    pub vmm: Vmm,
    /// vCPUs (default: the image's).
    pub vcpus: Option<u32>,
    /// Memory, e.g. `256M` (default: the image's).
    pub memory: Option<String>,
    /// Start it now (and when the host boots).
    #[serde(default = "yes")]
    pub autostart: bool,
    /// Restart policy.
    #[serde(default)]
    pub restart: Restart,
    /// A network card, as `hostd run --net` takes it.
    pub net: Option<String>,
    /// Secrets: name -> host file.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub secrets: BTreeMap<String, PathBuf>,
    /// Public keys the image must be signed by.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub trust: Vec<PathBuf>,
}

/// A bad value in a guest declaration: which field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Which entry and field, e.g. `guests.web.memory`.
    pub what: String,
    /// What is wrong and what would be right.
    pub msg: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.msg)
    }
}

/// Validates one guest declaration named `name`; relative paths resolve against `base`.
pub fn validate_guest(name: &str, g: GuestDecl, base: &Path) -> Result<Guest, Invalid> {
    let at = |field: &str| format!("guests.{name}{field}");
    let invalid = |what: String, msg: &str| Invalid {
        what,
        msg: msg.to_owned(),
    };
    let abs = |p: &Path| base.join(p);
    if !valid_name(name) {
        return Err(invalid(
            at(""),
            "a guest name is 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit",
        ));
    }
    let image = match (g.image, g.spec) {
        (Some(_), Some(_)) => {
            return Err(invalid(at(""), "give `image` or `spec`, not both"));
        }
        (None, None) => {
            return Err(invalid(
                at(""),
                "no image: give `image` (a file or sha256:DIGEST) or `spec`",
            ));
        }
        (None, Some(spec)) => ImageSource::Spec(abs(&spec)),
        (Some(i), None) if i.starts_with("sha256:") => match parse_digest(&i) {
            Some(hex) => ImageSource::Digest(hex.to_owned()),
            None => {
                return Err(invalid(
                    at(".image"),
                    "`sha256:` must be followed by 64 lowercase hex digits",
                ));
            }
        },
        (Some(i), None) if i.is_empty() => {
            return Err(invalid(at(".image"), "empty path"));
        }
        (Some(i), None) => ImageSource::File(abs(Path::new(&i))),
    };
    let guest = Guest {
        image,
        vmm: g.vmm,
        vcpus: g.vcpus,
        memory: g.memory,
        autostart: g.autostart,
        restart: g.restart,
        net: g.net,
        secrets: g.secrets.into_iter().map(|(k, v)| (k, abs(&v))).collect(),
        trust: g.trust.iter().map(|p| abs(p)).collect(),
    };
    check_guest(name, &guest)?;
    Ok(guest)
}

/// Checks the values of a guest (what a fleet sent as JSON may get wrong).
pub fn check_guest(name: &str, g: &Guest) -> Result<(), Invalid> {
    let at = |field: &str| format!("guests.{name}{field}");
    let invalid = |what: String, msg: &str| Invalid {
        what,
        msg: msg.to_owned(),
    };
    if !valid_name(name) {
        return Err(invalid(
            at(""),
            "a guest name is 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit",
        ));
    }
    let has_nul = |p: &Path| p.as_os_str().as_encoded_bytes().contains(&0);
    match &g.image {
        ImageSource::File(p) | ImageSource::Spec(p) if has_nul(p) => {
            return Err(invalid(at(".image"), "a path may not hold a NUL byte"));
        }
        ImageSource::Digest(d) if parse_digest(d) != Some(d.as_str()) => {
            return Err(invalid(at(".image"), "a digest is 64 lowercase hex digits"));
        }
        ImageSource::File(p) | ImageSource::Spec(p) if !p.is_absolute() => {
            return Err(invalid(at(".image"), "an image path must be absolute"));
        }
        _ => {}
    }
    if g.vcpus.is_some_and(|v| v == 0 || v > 64) {
        return Err(invalid(at(".vcpus"), "between 1 and 64"));
    }
    if g.memory.as_deref().is_some_and(|m| !valid_memory(m)) {
        return Err(invalid(
            at(".memory"),
            "a size like 256M or 2G, between 16M and 64G",
        ));
    }
    for (s, file) in &g.secrets {
        if !valid_name(s) {
            return Err(invalid(
                at(&format!(".secrets.{s}")),
                "a secret name is 1-63 of a-z, 0-9, `-`, `_`",
            ));
        }
        if !file.is_absolute() || has_nul(file) {
            return Err(invalid(
                at(&format!(".secrets.{s}")),
                "a path must be absolute, without NUL bytes",
            ));
        }
    }
    if g.trust.iter().any(|p| !p.is_absolute() || has_nul(p)) {
        return Err(invalid(
            at(".trust"),
            "a path must be absolute, without NUL bytes",
        ));
    }
    // The parser `hostd run --net` uses, so a bad card is refused here, not at boot.
    if let Some(Err(e)) = g.net.as_deref().map(hostd_vmm::plan::NetConfig::parse) {
        return Err(invalid(
            at(".net"),
            &format!("{e} (tap=NAME[,ip=ADDR/PREFIX][,gw=GW][,mac=MAC][,dns=ADDR])"),
        ));
    }
    Ok(())
}

fn yes() -> bool {
    true
}

/// Whether `name` may name a guest, a function or a secret: 1-63 of `a-z 0-9 - _`,
/// starting with a letter or digit. Such a name is safe in a path, a unit name and a
/// URL path segment.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// Whether `s` is a sha256 digest as the store names images: 64 lowercase hex digits,
/// optionally after `sha256:`.
pub fn parse_digest(s: &str) -> Option<&str> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
    .then_some(hex)
}

/// Whether `s` is a memory size `hostd run --mem` takes: digits then `M` or `G`,
/// between 16 MiB and 64 GiB.
fn valid_memory(s: &str) -> bool {
    // By characters, not bytes: the last one may be any character (a multi-byte one
    // split at a byte index panicked).
    let mut chars = s.chars();
    let unit = chars.next_back();
    let mib = match (chars.as_str().parse::<u64>(), unit) {
        (Ok(n), Some('M')) => n,
        (Ok(n), Some('G')) => n.saturating_mul(1024),
        _ => return false,
    };
    (16..=64 << 10).contains(&mib)
}

impl Fleet {
    /// Reads and validates a fleet file; relative paths resolve against its directory.
    pub fn load(path: &Path) -> Result<Fleet, FleetError> {
        use std::io::Read;
        let read = |source| FleetError::Read {
            path: path.to_owned(),
            source,
        };
        // A regular file only (a FIFO named by mistake would block the apply).
        let file = hostd_images::input::open_regular(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_FLEET_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_FLEET_BYTES {
            return Err(FleetError::TooLarge {
                path: path.to_owned(),
            });
        }
        // `fleet.toml`'s parent is "", which is the current directory.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let base = std::path::absolute(dir).map_err(read)?;
        // A file that declares no `[guests]` or `[functions]` at all (empty, truncated by
        // a failed write, the wrong file) would remove every workload of the fleet:
        // refused. An empty `[guests]` table says "none" on purpose.
        let declares_nothing = toml::from_str::<toml::Table>(&text)
            .is_ok_and(|t| !t.contains_key("guests") && !t.contains_key("functions"));
        if declares_nothing {
            return Err(FleetError::Invalid {
                path: path.to_owned(),
                what: "fleet".into(),
                msg: "it declares no [guests] or [functions]: applying it would remove every \
                      guest and function of the fleet; to mean that, write an empty `[guests]` \
                      table"
                    .into(),
            });
        }
        Self::parse(&text, &base, path)
    }

    /// Parses fleet text; `base` (absolute) resolves relative paths, `path` names the
    /// file in errors.
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Fleet, FleetError> {
        let raw: RawFleet = toml::from_str(text).map_err(|e| FleetError::Syntax {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        let invalid = |what: String, msg: &str| FleetError::Invalid {
            path: path.to_owned(),
            what,
            msg: msg.to_owned(),
        };
        let mut guests = BTreeMap::new();
        for (name, g) in raw.guests {
            let guest = validate_guest(&name, g, base).map_err(|i| invalid(i.what, &i.msg))?;
            guests.insert(name, guest);
        }
        let mut functions = BTreeMap::new();
        for (name, mut table) in raw.functions {
            if !valid_name(&name) {
                return Err(invalid(
                    format!("functions.{name}"),
                    "a function name is 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit",
                ));
            }
            absolutize_function(&mut table, base);
            functions.insert(name, table);
        }
        Ok(Fleet {
            guests,
            functions,
            base: base.to_owned(),
        })
    }

    /// Checks a fleet that arrived as JSON (`PUT /fleet`): every name and value as
    /// [`Fleet::parse`] checks them, every path absolute.
    pub fn check(&self) -> Result<(), Invalid> {
        for (name, g) in &self.guests {
            check_guest(name, g)?;
        }
        for name in self.functions.keys() {
            if !valid_name(name) {
                return Err(Invalid {
                    what: format!("functions.{name}"),
                    msg: "a function name is 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit".into(),
                });
            }
        }
        Ok(())
    }

    /// The functions as an fns.toml document (for the sandbox's parser).
    pub fn functions_toml(&self) -> String {
        let mut doc = toml::Table::new();
        let fns: toml::Table = self
            .functions
            .iter()
            .map(|(k, v)| (k.clone(), toml::Value::Table(v.clone())))
            .collect();
        doc.insert("functions".into(), toml::Value::Table(fns));
        doc.to_string()
    }
}

/// Makes the relative paths of an fns.toml function table (`component`, `dirs[].host`,
/// `secrets.*.file`) absolute against `base`.
pub fn absolutize_function(table: &mut toml::Table, base: &Path) {
    let fix = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v {
            if Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).to_string_lossy().into_owned();
            }
        }
    };
    if let Some(c) = table.get_mut("component") {
        fix(c);
    }
    if let Some(toml::Value::Array(dirs)) = table.get_mut("dirs") {
        for d in dirs {
            if let Some(h) = d.get_mut("host") {
                fix(h);
            }
        }
    }
    if let Some(toml::Value::Table(secrets)) = table.get_mut("secrets") {
        for (_, s) in secrets.iter_mut() {
            if let Some(f) = s.get_mut("file") {
                fix(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Fleet, FleetError> {
        Fleet::parse(
            text,
            Path::new("/srv/fleet"),
            Path::new("/srv/fleet/fleet.toml"),
        )
    }

    #[test]
    fn memory_sizes() {
        for good in ["16M", "512M", "1G", "64G"] {
            assert!(valid_memory(good), "{good}");
        }
        for bad in [
            "", "M", "1", "15M", "65G", "1é", "é", "1€", "-1M", "1 M", "1m",
        ] {
            assert!(!valid_memory(bad), "{bad}");
        }
    }

    #[test]
    fn a_full_guest_and_a_function() {
        let f = parse(
            r#"
            [guests.web]
            image = "web.img"
            vmm = "qemu"
            vcpus = 2
            memory = "512M"
            restart = "always"
            net = "tap=tap-web,ip=10.0.0.2/24"
            secrets = { db = "keys/db" }
            [guests.db]
            image = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            autostart = false
            [functions.hello]
            component = "hello.wasm"
            routes = ["/hello"]
            dirs = [{ host = "data", guest = "/data" }]
            "#,
        )
        .expect("valid fleet");
        let web = &f.guests["web"];
        assert_eq!(web.image, ImageSource::File("/srv/fleet/web.img".into()));
        assert_eq!(web.vmm, Vmm::Qemu);
        assert_eq!(web.restart, Restart::Always);
        assert!(web.autostart);
        assert_eq!(web.secrets["db"], PathBuf::from("/srv/fleet/keys/db"));
        let db = &f.guests["db"];
        assert!(matches!(&db.image, ImageSource::Digest(d) if d.starts_with("0123")));
        assert!(!db.autostart);
        assert_eq!(db.restart, Restart::OnFailure);
        let text = f.functions_toml();
        assert!(text.contains("/srv/fleet/hello.wasm"), "{text}");
        assert!(text.contains("/srv/fleet/data"), "{text}");
    }

    #[test]
    fn bad_entries_are_named() {
        for (text, what) in [
            ("[guests.\"../x\"]\nimage = \"a.img\"", "guests.../x"),
            ("[guests.a]\n", "guests.a"),
            ("[guests.a]\nimage = \"a\"\nspec = \"b\"", "guests.a"),
            ("[guests.a]\nimage = \"sha256:abc\"", "guests.a.image"),
            (
                "[guests.a]\nimage = \"a\"\nmemory = \"lots\"",
                "guests.a.memory",
            ),
            ("[guests.a]\nimage = \"a\"\nvcpus = 0", "guests.a.vcpus"),
            (
                "[guests.a]\nimage = \"a\"\nnet = \"tap=t0,ip=10.0.0.300\"",
                "guests.a.net",
            ),
            (
                "[guests.a]\nimage = \"a\"\nsecrets = { \"A/B\" = \"x\" }",
                "guests.a.secrets.A/B",
            ),
            (
                "[functions.\"Bad Name\"]\ncomponent = \"x\"",
                "functions.Bad Name",
            ),
        ] {
            match parse(text) {
                Err(FleetError::Invalid { what: w, .. }) => assert_eq!(w, what, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[guests.a]\nimage = \"a\"\nbogus = 1"),
            Err(FleetError::Syntax { .. })
        ));
    }

    #[test]
    fn a_fleet_survives_json_and_is_checked_again() {
        let f = parse(
            "[guests.web]\nimage = \"web.img\"\nmemory = \"256M\"\n[functions.hello]\ncomponent = \"h.wasm\"\nroutes = [\"/h\"]\n",
        )
        .expect("valid");
        let json = serde_json::to_string(&f).expect("json");
        let back: Fleet = serde_json::from_str(&json).expect("back");
        assert_eq!(back, f);
        assert!(back.check().is_ok());
        let mut bad = back.clone();
        bad.guests.get_mut("web").expect("web").memory = Some("lots".into());
        assert_eq!(
            bad.check().map_err(|i| i.what),
            Err("guests.web.memory".into())
        );
        let mut bad = back.clone();
        bad.guests.get_mut("web").expect("web").image = ImageSource::File("rel.img".into());
        assert_eq!(
            bad.check().map_err(|i| i.what),
            Err("guests.web.image".into())
        );
        let mut bad = back;
        let g = bad.guests.remove("web").expect("web");
        bad.guests.insert("../x".into(), g);
        assert_eq!(bad.check().map_err(|i| i.what), Err("guests.../x".into()));
    }

    #[test]
    fn names() {
        assert!(valid_name("web-1_a"));
        for bad in ["", "-a", "A", "a/b", "..", "a.b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
