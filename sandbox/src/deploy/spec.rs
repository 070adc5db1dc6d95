//! What a version is: a component digest, its routes and its grants,
//! validated with the same rules as `fns.toml` (docs/capabilities.md).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::DeployError;
use crate::manifest::{Function, Manifest};

/// What to deploy as a function's next version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    /// The component's sha256 (from [`super::FunctionHost::put_component`]).
    pub component: String,
    /// Routes as in fns.toml: `/exact` or `/prefix/...`.
    pub routes: Vec<String>,
    /// The grants: the fields of an fns.toml function table except
    /// `component` and `routes` (`config`, `outbound`, `buckets`, `secrets`,
    /// `dirs`, `env`, `memory_mb`, `time_ms`, `kv_value_kb`, `kv_bucket_mb`).
    /// Relative paths are taken from `/`: give absolute ones.
    #[serde(default)]
    pub grants: toml::Table,
    /// A path the new version must answer with 2xx to a GET before it goes live.
    #[serde(default)]
    pub health_check: Option<String>,
}

/// One immutable version as stored: a [`DeploySpec`] with its number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The function.
    pub function: String,
    /// Its number: 1 for the first deploy, then one more each deploy.
    pub version: u64,
    /// The component's sha256 (hex).
    pub component: String,
    /// Routes.
    pub routes: Vec<String>,
    /// Grants (fns.toml fields).
    pub grants: toml::Table,
    /// The health-check path it passed, if one was asked for.
    pub health_check: Option<String>,
    /// When it was deployed (milliseconds since the Unix epoch).
    pub created_unix_ms: u64,
}

/// Whether `name` may name a function: 1-63 of `a-z 0-9 - _`, starting with
/// a letter or digit (the fleet file's rule; safe in paths and URLs).
pub fn check_name(name: &str) -> Result<(), DeployError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(DeployError::InvalidName {
            name: name.chars().take(80).collect(),
        })
    }
}

/// Checks a health-check path: absolute, no spaces or control characters.
pub fn check_health_path(function: &str, path: &str) -> Result<(), DeployError> {
    if path.starts_with('/')
        && path.len() <= 1024
        && path.bytes().all(|b| b.is_ascii_graphic())
        && path.parse::<http::Uri>().is_ok()
    {
        Ok(())
    } else {
        Err(DeployError::InvalidSpec {
            function: function.to_owned(),
            msg: format!(
                "health_check {:?} must be an absolute path such as \"/healthz\"",
                path.chars().take(80).collect::<String>()
            ),
        })
    }
}

/// Parses `record` with fns.toml's rules into the function the server runs,
/// with `component` as its file.
pub fn resolve(record: &VersionRecord, component: &Path) -> Result<Function, DeployError> {
    let invalid = |msg: String| DeployError::InvalidSpec {
        function: record.function.clone(),
        msg,
    };
    for key in ["component", "routes"] {
        if record.grants.contains_key(key) {
            return Err(invalid(format!(
                "grants may not contain `{key}`: it is given on its own"
            )));
        }
    }
    let mut table = record.grants.clone();
    table.insert(
        "component".into(),
        toml::Value::String(component.to_string_lossy().into_owned()),
    );
    table.insert(
        "routes".into(),
        toml::Value::Array(
            record
                .routes
                .iter()
                .map(|r| toml::Value::String(r.clone()))
                .collect(),
        ),
    );
    let mut functions = toml::Table::new();
    functions.insert(record.function.clone(), toml::Value::Table(table));
    let mut doc = toml::Table::new();
    doc.insert("functions".into(), toml::Value::Table(functions));
    let mut manifest = Manifest::from_table(doc, Path::new("/")).map_err(|msg| {
        // The parser names the field as `functions.NAME: …` or `functions.NAME.FIELD: …`;
        // the function is named already.
        let prefix = format!("functions.{}", record.function);
        let msg = msg.strip_prefix(&prefix).map_or(msg.as_str(), |rest| {
            rest.strip_prefix(": ")
                .or_else(|| rest.strip_prefix('.'))
                .unwrap_or(rest)
        });
        invalid(msg.to_owned())
    })?;
    let f = manifest
        .functions
        .pop()
        .ok_or_else(|| invalid("no function in the parsed grants (this is a bug)".to_owned()))?;
    for d in &f.grants.dirs {
        if !d.host.is_dir() {
            return Err(invalid(format!(
                "dirs: preopened directory {} does not exist",
                d.host.display()
            )));
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(grants: &str, routes: &[&str]) -> VersionRecord {
        VersionRecord {
            function: "f".into(),
            version: 1,
            component: "0".repeat(64),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            grants: toml::from_str(grants).expect("toml"),
            health_check: None,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn grants_validate_as_in_fns_toml() {
        let f = resolve(
            &record(
                "config = { version = \"v2\" }\nmemory_mb = 16",
                &["/a", "/b/..."],
            ),
            Path::new("/store/x.wasm"),
        )
        .expect("valid");
        assert_eq!(f.grants.config["version"], "v2");
        assert_eq!(f.grants.memory_bytes, 16 << 20);
        assert_eq!(f.routes.len(), 2);
        for (grants, routes) in [
            ("memory_mb = 0", &["/a"][..]),
            ("", &[][..]),
            ("", &["a"][..]),
            ("unknown = 1", &["/a"][..]),
            ("component = \"x\"", &["/a"][..]),
            (
                "dirs = [{ host = \"/nonexistent-dir\", guest = \"/d\" }]",
                &["/a"][..],
            ),
        ] {
            assert!(
                matches!(
                    resolve(&record(grants, routes), Path::new("/x.wasm")),
                    Err(DeployError::InvalidSpec { .. })
                ),
                "accepted {grants:?} {routes:?}"
            );
        }
    }

    /// A grant of the wrong type is named by its field, not by a line of the document
    /// the grants were once turned into.
    #[test]
    fn grant_errors_name_fields_not_lines() {
        for (grants, field) in [
            ("memory_mb = \"lots\"", "memory_mb"),
            ("unknown = 1", "unknown"),
        ] {
            let err = resolve(&record(grants, &["/a"]), Path::new("/x.wasm"))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(field) && !err.contains("line") && !err.contains(" | "),
                "{err}"
            );
        }
    }

    #[test]
    fn names_and_health_paths() {
        assert!(check_name("hello-2_x").is_ok());
        for bad in ["", "../x", "A", "-x", "a/b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_health_path("f", "/healthz?x=1").is_ok());
        for bad in ["healthz", "/a b", "/\n", ""] {
            assert!(check_health_path("f", bad).is_err(), "{bad:?}");
        }
    }
}
