//! Debian packages for an image: the index of what the build host's apt lists offer
//! ([`index`]), dependency fields ([`relation`]), version comparison ([`version`]) and
//! the dependency closure ([`resolve`]). Fetching and unpacking the .debs is
//! [`crate::debs`]; pinning the closure is [`crate::lock`].

pub mod index;
pub mod relation;
pub mod resolve;
pub mod version;

/// Why the package closure could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// apt could not be run.
    #[error("cannot run {program} (is this a Debian host with apt?)")]
    Apt {
        /// The program.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// apt failed.
    #[error("{program} failed: {stderr}")]
    AptFailed {
        /// The program.
        program: String,
        /// What it printed.
        stderr: String,
    },
    /// No Packages lists on the host.
    #[error("the build host has no apt package lists; run `apt-get update`")]
    NoLists,
    /// A requested package is not in the index.
    #[error(
        "no package `{name}` in the build host's apt lists (a typo? else run `apt-get update`)"
    )]
    Unknown {
        /// The name.
        name: String,
    },
    /// A requested version is not in the index.
    #[error("package `{name}` has no version {version} in the apt lists (available: {})", available.join(", "))]
    NoSuchVersion {
        /// The name.
        name: String,
        /// The version asked for.
        version: String,
        /// What there is.
        available: Vec<String>,
    },
    /// A package is both requested and excluded.
    #[error("package `{name}` is both in `packages` and in `exclude`")]
    RequestExcluded {
        /// The name.
        name: String,
    },
    /// Two versions of one package are needed.
    #[error("{by} needs `{want}`, but {name} {have} is already selected")]
    Conflict {
        /// The package.
        name: String,
        /// The selected version.
        have: String,
        /// What was needed.
        want: String,
        /// Who needed it.
        by: String,
    },
    /// Two packages of the closure exclude each other (`Conflicts` or `Breaks`).
    #[error("{a} and {b} cannot both be in the image: {a} has `{field}: {relation}` (drop one from `packages`, `exclude` the one a dependency pulled in, or pin versions that fit)")]
    Clash {
        /// The package with the relation (`name version`).
        a: String,
        /// `Conflicts` or `Breaks`.
        field: &'static str,
        /// The relation that matched.
        relation: String,
        /// The package it matched (`name version`).
        b: String,
    },
    /// No available package satisfies a relation.
    #[error("{by} depends on `{relation}`, which no package in the apt lists satisfies (add one to `packages`, or `exclude` it)")]
    Unsatisfiable {
        /// Who depends.
        by: String,
        /// The relation.
        relation: String,
    },
}
