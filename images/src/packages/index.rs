//! The package index: every binary package the build host's apt lists offer for the
//! guest's architecture (`amd64`) and `all`, read from the `Packages` files apt keeps
//! (found with `apt-get indextargets`, decompressed with apt's own `apt-helper
//! cat-file`, so whatever compression apt chose is handled by apt).

use std::collections::BTreeMap;
use std::process::Command;

use super::relation::{self, Relation};
use super::version;
use super::PackageError;
use crate::names;

/// The guest's Debian architecture.
pub const ARCH: &str = "amd64";

/// One binary package version from the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// `Pre-Depends`.
    pub pre_depends: Vec<Relation>,
    /// `Depends`.
    pub depends: Vec<Relation>,
    /// `Provides`: virtual names, each with an optional version.
    pub provides: Vec<(String, Option<String>)>,
    /// `Conflicts`: packages that must not be in the same image.
    pub conflicts: Vec<Relation>,
    /// `Breaks`: packages (at the versions given) this one breaks; refused in the same
    /// image too, since nothing is configured afterwards that could mend them.
    pub breaks: Vec<Relation>,
    /// Size of the .deb in bytes.
    pub size: u64,
    /// sha256 of the .deb, lower-case hex.
    pub sha256: String,
}

/// Every package version of the index, by name.
#[derive(Debug, Default)]
pub struct Index {
    /// Versions of each name, highest first.
    by_name: BTreeMap<String, Vec<Package>>,
    /// Providers of each virtual name: (provider name, provider version, provided version).
    providers: BTreeMap<String, Vec<(String, String, Option<String>)>>,
}

impl Index {
    /// Reads the build host's apt lists.
    pub fn load_host() -> Result<Index, PackageError> {
        let out = run(Command::new("apt-get").env_remove("APT_CONFIG").args([
            "indextargets",
            "--format",
            "$(FILENAME)",
            "Created-By: Packages",
        ]))?;
        let mut files: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && std::path::Path::new(l).is_file())
            .map(str::to_string)
            .collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(PackageError::NoLists);
        }
        let mut index = Index::default();
        for f in &files {
            let text = run(Command::new("/usr/lib/apt/apt-helper")
                .env_remove("APT_CONFIG")
                .args(["cat-file", "--"])
                .arg(f))?;
            index.add_text(&String::from_utf8_lossy(&text), f);
        }
        index.finish();
        Ok(index)
    }

    /// An index of `Packages` text (for tests, and what [`Index::load_host`] builds on).
    pub fn parse(text: &str) -> Index {
        let mut index = Index::default();
        index.add_text(text, "(text)");
        index.finish();
        index
    }

    fn add_text(&mut self, text: &str, origin: &str) {
        for stanza in text.split("\n\n") {
            if stanza.trim().is_empty() {
                continue;
            }
            match parse_stanza(stanza) {
                Ok(Some(p)) => {
                    let versions = self.by_name.entry(p.name.clone()).or_default();
                    // The same version in two lists (a suite and its updates) is one
                    // package; the first list read wins.
                    if !versions
                        .iter()
                        .any(|q| q.version == p.version && q.architecture == p.architecture)
                    {
                        versions.push(p);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let name = stanza
                        .lines()
                        .find_map(|l| l.strip_prefix("Package:"))
                        .unwrap_or("?")
                        .trim();
                    tracing::warn!("{origin}: skipping package `{name}`: {e}");
                }
            }
        }
    }

    fn finish(&mut self) {
        self.providers.clear();
        for versions in self.by_name.values_mut() {
            // Highest first; `amd64` before `all` for equal versions (never both in
            // practice), so the order is total.
            versions.sort_by(|a, b| {
                version::compare(&b.version, &a.version)
                    .then_with(|| a.architecture.cmp(&b.architecture))
            });
            for p in versions.iter() {
                for (virt, v) in &p.provides {
                    self.providers.entry(virt.clone()).or_default().push((
                        p.name.clone(),
                        p.version.clone(),
                        v.clone(),
                    ));
                }
            }
        }
        for list in self.providers.values_mut() {
            list.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| version::compare(&b.1, &a.1)));
        }
    }

    /// The versions of a real package, highest first.
    pub fn versions(&self, name: &str) -> &[Package] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// One exact version.
    pub fn get(&self, name: &str, version: &str) -> Option<&Package> {
        self.versions(name).iter().find(|p| p.version == version)
    }

    /// Packages providing a virtual name: (name, version, provided version), by name,
    /// highest version first.
    pub fn providers(&self, name: &str) -> &[(String, String, Option<String>)] {
        self.providers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// How many package versions the index holds.
    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, PackageError> {
    let program = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|source| PackageError::Apt {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(PackageError::AptFailed {
            program,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Parses one stanza; `None` for another architecture.
fn parse_stanza(stanza: &str) -> Result<Option<Package>, String> {
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    let mut last: Option<&str> = None;
    for line in stanza.lines() {
        if line.starts_with([' ', '\t']) {
            // A continuation line: kept only for the fields read here.
            if let Some(k) = last {
                if let Some(v) = fields.get_mut(k) {
                    v.push(' ');
                    v.push_str(line.trim());
                }
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("line `{line}` is not `Field: value`"));
        };
        last = None;
        if matches!(
            k,
            "Package"
                | "Version"
                | "Architecture"
                | "Pre-Depends"
                | "Depends"
                | "Provides"
                | "Conflicts"
                | "Breaks"
                | "Size"
                | "SHA256"
        ) {
            fields.insert(k, v.trim().to_string());
            last = Some(k);
        }
    }
    let field = |k: &str| fields.get(k).map(String::as_str);
    let arch = field("Architecture").ok_or("no Architecture")?;
    if arch != ARCH && arch != "all" {
        return Ok(None);
    }
    let name = field("Package").ok_or("no Package")?;
    if !names::is_debian_package(name) {
        return Err("not a Debian package name".into());
    }
    let version = field("Version").ok_or("no Version")?;
    if !names::is_debian_version(version) {
        return Err(format!("`{version}` is not a Debian version"));
    }
    let sha256 = field("SHA256").ok_or("no SHA256")?.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err("SHA256 is not 64 hex digits".into());
    }
    let size = field("Size")
        .ok_or("no Size")?
        .parse()
        .map_err(|_| "Size is not a number")?;
    let rel = |k: &str| {
        field(k)
            .map(relation::parse_relations)
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(|e| format!("{k}: {e}"))
    };
    Ok(Some(Package {
        name: name.to_string(),
        version: version.to_string(),
        architecture: arch.to_string(),
        pre_depends: rel("Pre-Depends")?,
        depends: rel("Depends")?,
        provides: field("Provides")
            .map(relation::parse_provides)
            .transpose()
            .map_err(|e| format!("Provides: {e}"))?
            .unwrap_or_default(),
        conflicts: rel("Conflicts")?,
        breaks: rel("Breaks")?,
        size,
        sha256,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_other_arches_duplicates_and_bad_entries() {
        let h = "0".repeat(64);
        let text = format!(
            "Package: aa\nVersion: 1.0-1\nArchitecture: amd64\nDepends: bb (>= 2),\n cc\nSize: 10\nSHA256: {h}\nDescription: x\n more\n\n\
             Package: aa\nVersion: 1.10-1\nArchitecture: amd64\nSize: 10\nSHA256: {h}\n\n\
             Package: aa\nVersion: 1.10-1\nArchitecture: amd64\nSize: 10\nSHA256: {h}\n\n\
             Package: aa\nVersion: 9\nArchitecture: arm64\nSize: 10\nSHA256: {h}\n\n\
             Package: --evil\nVersion: 1\nArchitecture: all\nSize: 1\nSHA256: {h}\n\n\
             Package: mm\nVersion: 1\nArchitecture: all\nProvides: mta (= 2), x-mail\nSize: 1\nSHA256: {h}\n"
        );
        let index = Index::parse(&text);
        let a = index.versions("aa");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].version, "1.10-1");
        assert_eq!(
            a[1].depends.len(),
            2,
            "continuation line read: {:?}",
            a[1].depends
        );
        assert!(index.versions("--evil").is_empty());
        assert_eq!(
            index.providers("mta"),
            &[("mm".to_string(), "1".to_string(), Some("2".to_string()))]
        );
        assert_eq!(index.len(), 3);
    }
}
