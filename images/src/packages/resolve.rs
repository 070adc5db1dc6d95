//! The dependency closure, as apt would compute it for a fresh system.
//!
//! - Each requested package is taken at the version asked (`name=version`) or at its
//!   candidate, the highest version in the index.
//! - Every `Pre-Depends` and `Depends` relation of every selected package is
//!   satisfied, in a fixed order (requests in spec order, then breadth first, each
//!   package's relations in index order), so the result depends only on the index and
//!   the spec:
//!   - a relation already satisfied by a selected package (or one it provides) needs
//!     nothing more;
//!   - otherwise its alternatives are tried left to right and the first satisfiable
//!     one wins: a real package at its highest version allowed by the constraint, else
//!     a provider of that virtual name, the first by name (reported as a choice);
//!   - excluded packages are never selected; a relation whose every alternative is
//!     excluded is dropped (and reported).
//! - `Conflicts` and `Breaks` of every selected package are checked against the whole
//!   closure once it is complete (a real package at a version the relation names, or
//!   another package providing that virtual name); a match is an error naming both
//!   packages. There is no backtracking to find another choice, as apt would try.
//! - `Recommends` and `Suggests` are not considered, and
//!   Essential packages are not added unless something depends on them (apt assumes
//!   they are installed; an image has only what it asks for).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::index::{Index, Package};
use super::relation::{Alternative, Relation};
use super::PackageError;

/// The result: the packages to unpack, sorted by name, and what was decided on the way.
#[derive(Debug)]
pub struct Closure {
    /// Selected packages, by name.
    pub packages: Vec<Package>,
    /// Choices worth reporting: virtual packages and the provider taken, dropped
    /// relations.
    pub notes: Vec<String>,
}

/// Resolves `requests` (`name` or `name=version`) against `index`, never selecting a
/// package named in `exclude`.
pub fn resolve(
    index: &Index,
    requests: &[String],
    exclude: &[String],
) -> Result<Closure, PackageError> {
    let excluded: BTreeSet<&str> = exclude.iter().map(String::as_str).collect();
    let mut r = Resolver {
        index,
        excluded,
        selected: BTreeMap::new(),
        provided: BTreeMap::new(),
        queue: VecDeque::new(),
        notes: Vec::new(),
        dropped: BTreeMap::new(),
    };
    for req in requests {
        let (name, version) = match req.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (req.as_str(), None),
        };
        if r.excluded.contains(name) {
            return Err(PackageError::RequestExcluded { name: name.into() });
        }
        let pkg = match version {
            Some(v) => index
                .get(name, v)
                .ok_or_else(|| PackageError::NoSuchVersion {
                    name: name.into(),
                    version: v.into(),
                    available: index
                        .versions(name)
                        .iter()
                        .map(|p| p.version.clone())
                        .collect(),
                })?,
            None => match index.versions(name).first() {
                Some(p) => p,
                None => {
                    let alt = Alternative {
                        name: name.into(),
                        constraint: None,
                    };
                    match r.provider(&alt) {
                        Some(p) => p,
                        None => return Err(PackageError::Unknown { name: name.into() }),
                    }
                }
            },
        };
        if let Some(have) = r.selected.get(&pkg.name) {
            if have.version != pkg.version {
                return Err(PackageError::Conflict {
                    name: pkg.name.clone(),
                    have: have.version.clone(),
                    want: req.clone(),
                    by: "the spec".into(),
                });
            }
            continue;
        }
        r.select(pkg);
    }
    while let Some(pkg) = r.queue.pop_front() {
        for rel in pkg.pre_depends.iter().chain(&pkg.depends) {
            r.satisfy(pkg, rel)?;
        }
    }
    r.check_clashes()?;
    let mut notes = r.notes;
    for (relation, by) in r.dropped {
        let shown: Vec<&str> = by.iter().take(4).map(String::as_str).collect();
        let more = if by.len() > shown.len() { ", …" } else { "" };
        notes.push(format!(
            "excluded: dropped the dependency on `{relation}` of {} package(s) ({}{more})",
            by.len(),
            shown.join(", ")
        ));
    }
    Ok(Closure {
        packages: r.selected.into_values().cloned().collect(),
        notes,
    })
}

struct Resolver<'a> {
    index: &'a Index,
    excluded: BTreeSet<&'a str>,
    selected: BTreeMap<String, &'a Package>,
    /// Virtual names provided by selected packages: (provider, provided version).
    provided: BTreeMap<String, Vec<(&'a str, Option<&'a str>)>>,
    queue: VecDeque<&'a Package>,
    notes: Vec<String>,
    /// Relations dropped because every alternative is excluded (by the names they
    /// name), with the packages that had them.
    dropped: BTreeMap<String, Vec<String>>,
}

impl<'a> Resolver<'a> {
    fn select(&mut self, p: &'a Package) {
        self.selected.insert(p.name.clone(), p);
        for (virt, v) in &p.provides {
            self.provided
                .entry(virt.clone())
                .or_default()
                .push((p.name.as_str(), v.as_deref()));
        }
        self.queue.push_back(p);
    }

    fn satisfied(&self, alt: &Alternative) -> bool {
        if self
            .selected
            .get(&alt.name)
            .is_some_and(|p| alt.allows(&p.version))
        {
            return true;
        }
        self.provided.get(&alt.name).is_some_and(|list| {
            list.iter().any(|(_, v)| match (&alt.constraint, v) {
                (None, _) => true,
                (Some(c), Some(v)) => c.allows(v),
                (Some(_), None) => false,
            })
        })
    }

    /// The highest allowed version of a real package that does not clash with one
    /// already selected.
    fn real(&self, alt: &Alternative) -> Option<&'a Package> {
        if self.excluded.contains(alt.name.as_str()) {
            return None;
        }
        self.index
            .versions(&alt.name)
            .iter()
            .find(|p| alt.allows(&p.version) && !self.selected.contains_key(&p.name))
    }

    /// The first provider (by name) of a virtual name that satisfies `alt`.
    fn provider(&self, alt: &Alternative) -> Option<&'a Package> {
        self.index
            .providers(&alt.name)
            .iter()
            .filter(|(name, _, provided)| {
                !self.excluded.contains(name.as_str())
                    && !self.selected.contains_key(name)
                    && match (&alt.constraint, provided) {
                        (None, _) => true,
                        (Some(c), Some(v)) => c.allows(v),
                        (Some(_), None) => false,
                    }
            })
            .find_map(|(name, version, _)| self.index.get(name, version))
    }

    /// Every `Conflicts` and `Breaks` of the closure, in name order: the first that
    /// matches another selected package is the error.
    fn check_clashes(&self) -> Result<(), PackageError> {
        for p in self.selected.values() {
            for (field, rels) in [("Conflicts", &p.conflicts), ("Breaks", &p.breaks)] {
                for alt in rels.iter().flat_map(|r| &r.0) {
                    let clash = |q: &str, qv: &str| PackageError::Clash {
                        a: format!("{} {}", p.name, p.version),
                        field,
                        relation: alt.to_string(),
                        b: format!("{q} {qv}"),
                    };
                    if let Some(q) = self.selected.get(&alt.name) {
                        if q.name != p.name && alt.allows(&q.version) {
                            return Err(clash(&q.name, &q.version));
                        }
                    }
                    // A virtual name: every other provider, unless the relation has a
                    // version the provided one does not meet (policy 7.5).
                    for (q, provided) in self.provided.get(&alt.name).into_iter().flatten() {
                        let meets = match (&alt.constraint, provided) {
                            (None, _) => true,
                            (Some(c), Some(v)) => c.allows(v),
                            (Some(_), None) => false,
                        };
                        if *q != p.name && meets {
                            let qv = self.selected.get(*q).map(|x| x.version.as_str());
                            return Err(clash(q, qv.unwrap_or("")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn satisfy(&mut self, by: &'a Package, rel: &Relation) -> Result<(), PackageError> {
        if rel.0.iter().any(|a| self.satisfied(a)) {
            return Ok(());
        }
        for alt in &rel.0 {
            if let Some(p) = self.real(alt) {
                self.select(p);
                return Ok(());
            }
            if self.excluded.contains(alt.name.as_str()) {
                continue;
            }
            if let Some(p) = self.provider(alt) {
                let others = self.index.providers(&alt.name).len();
                self.notes.push(format!(
                    "{} needs `{alt}` (virtual): took {}, the first by name of {others} \
                     provider(s)",
                    by.name, p.name
                ));
                self.select(p);
                return Ok(());
            }
        }
        if rel
            .0
            .iter()
            .all(|a| self.excluded.contains(a.name.as_str()))
        {
            let names: Vec<&str> = rel.0.iter().map(|a| a.name.as_str()).collect();
            self.dropped
                .entry(names.join(" | "))
                .or_default()
                .push(by.name.clone());
            return Ok(());
        }
        // Name a clash with a selected version when that is why.
        for alt in &rel.0 {
            if let Some(have) = self.selected.get(&alt.name) {
                return Err(PackageError::Conflict {
                    name: alt.name.clone(),
                    have: have.version.clone(),
                    want: alt.to_string(),
                    by: format!("{} {}", by.name, by.version),
                });
            }
        }
        Err(PackageError::Unsatisfiable {
            by: format!("{} {}", by.name, by.version),
            relation: rel.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(stanzas: &[&str]) -> Index {
        let h = "a".repeat(64);
        let text: Vec<String> = stanzas
            .iter()
            .map(|s| format!("{s}\nSize: 1\nSHA256: {h}\n"))
            .collect();
        Index::parse(&text.join("\n"))
    }

    fn names(c: &Closure) -> Vec<String> {
        c.packages
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect()
    }

    fn req(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn closure_with_constraints_alternatives_and_virtuals() {
        let idx = index(&[
            "Package: app\nVersion: 1\nArchitecture: amd64\nPre-Depends: libc (>= 2)\nDepends: lib1 | lib2, mta, libold (<< 2)",
            "Package: libc\nVersion: 1\nArchitecture: amd64",
            "Package: libc\nVersion: 3\nArchitecture: amd64",
            "Package: libc\nVersion: 2.5\nArchitecture: amd64",
            "Package: lib2\nVersion: 1\nArchitecture: all",
            "Package: zmail\nVersion: 1\nArchitecture: amd64\nProvides: mta\nDepends: libc",
            "Package: amail\nVersion: 1\nArchitecture: amd64\nProvides: mta\nDepends: libc (>= 9)",
            "Package: bmail\nVersion: 1\nArchitecture: amd64\nProvides: mta",
            "Package: libold\nVersion: 1.5\nArchitecture: amd64",
            "Package: libold\nVersion: 2\nArchitecture: amd64",
        ]);
        // lib1 does not exist: lib2 is taken. `mta` is virtual: amail is first by name
        // (and, as with apt without backtracking, would be taken and then fail on its
        // libc >= 9); excluded, the next provider by name is taken.
        let c = resolve(&idx, &req(&["app"]), &req(&["amail"])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            names(&c),
            ["app=1", "bmail=1", "lib2=1", "libc=3", "libold=1.5"]
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("`mta`") && n.contains("bmail")),
            "{:?}",
            c.notes
        );
        // Deterministic: the same again.
        let c2 = resolve(&idx, &req(&["app"]), &req(&["amail"])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), names(&c2));
        // Without the exclusion amail's own dependency cannot be met.
        let e = resolve(&idx, &req(&["app"]), &[])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("libc (>= 9)")),
            "{e:?}"
        );
        // An already selected provider satisfies the virtual name.
        let c = resolve(&idx, &req(&["zmail", "app"]), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(names(&c).contains(&"zmail=1".to_string()));
        assert!(!names(&c)
            .iter()
            .any(|n| n.starts_with("amail") || n.starts_with("bmail")));
        // An exact request.
        let c = resolve(&idx, &req(&["libc=1"]), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["libc=1"]);
        // A pinned version that clashes with a constraint is named.
        let e = resolve(&idx, &req(&["libc=1", "app"]), &req(&["amail"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("libc") && e.contains("app"), "{e}");
    }

    #[test]
    fn conflicts_and_breaks_name_both_packages() {
        let idx = index(&[
            "Package: app\nVersion: 1\nArchitecture: amd64\nDepends: mta, old-lib",
            "Package: amail\nVersion: 1\nArchitecture: amd64\nProvides: mta\nConflicts: mta",
            "Package: bmail\nVersion: 2\nArchitecture: amd64\nProvides: mta\nConflicts: mta",
            "Package: old-lib\nVersion: 1.0\nArchitecture: amd64",
            "Package: new-lib\nVersion: 2\nArchitecture: amd64\nBreaks: old-lib (<< 1.5)",
            "Package: other\nVersion: 1\nArchitecture: amd64\nConflicts: old-lib (>= 2)",
        ]);
        // A package conflicting with the virtual name it provides is fine alone.
        let c = resolve(&idx, &req(&["app", "other"]), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["amail=1", "app=1", "old-lib=1.0", "other=1"]);
        // Two providers of a name both conflict with it.
        let e = resolve(&idx, &req(&["amail", "bmail"]), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("amail 1") && e.contains("bmail 2") && e.contains("Conflicts: mta"),
            "{e}"
        );
        // Breaks with a version.
        let e = resolve(&idx, &req(&["app", "new-lib"]), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("new-lib 2")
                && e.contains("old-lib 1.0")
                && e.contains("Breaks: old-lib (<< 1.5)"),
            "{e}"
        );
    }

    #[test]
    fn exclusions_drop_relations_and_unknowns_are_named() {
        let idx = index(&[
            "Package: app\nVersion: 1\nArchitecture: amd64\nDepends: debconf | debconf-2.0, perl",
            "Package: debconf\nVersion: 1\nArchitecture: all",
            "Package: cdebconf\nVersion: 1\nArchitecture: amd64\nProvides: debconf-2.0",
            "Package: perl\nVersion: 1\nArchitecture: amd64",
        ]);
        let c = resolve(&idx, &req(&["app"]), &req(&["debconf", "perl"]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["app=1", "cdebconf=1"]);
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("`perl`") && n.contains("excluded") && n.contains("(app)")),
            "{:?}",
            c.notes
        );
        let c = resolve(&idx, &req(&["app"]), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["app=1", "debconf=1", "perl=1"]);
        let e = resolve(&idx, &req(&["nope"]), &[])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("`nope`")));
        let e = resolve(&idx, &req(&["app=2"]), &[])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("available: 1")));
        assert!(resolve(&idx, &req(&["app"]), &req(&["app"])).is_err());
        // A virtual name requested directly resolves to its provider.
        let c = resolve(&idx, &req(&["debconf-2.0"]), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["cdebconf=1"]);
    }
}
