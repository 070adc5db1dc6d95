//! The fleet file's functions: each `[functions.NAME]` table (fns.toml's
//! fields, paths made absolute by the fleet parser) becomes a version of
//! NAME, unless the live version already is exactly that (same component
//! digest, routes and grants): applying the same fleet twice deploys nothing.
//! A function an earlier fleet declared and this one does not is removed;
//! one deployed by hand (`hostd fn deploy`) and never in a fleet is left alone.

use std::path::Path;

use hostd_sandbox::deploy::{DeployError, DeploySpec, FunctionHost};
use serde::{Deserialize, Serialize};

use crate::fleet::Fleet;
use crate::store::Store;

/// What applying the fleet's functions did, function names in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionsReport {
    /// Functions given a new version.
    pub deployed: Vec<String>,
    /// Functions whose live version already matched.
    pub unchanged: Vec<String>,
    /// Functions an earlier fleet declared and this one does not: removed.
    #[serde(default)]
    pub removed: Vec<String>,
    /// Functions that could not be deployed, with why.
    pub failed: Vec<(String, String)>,
}

/// Why one function of the fleet could not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum FleetFunctionError {
    /// `component` is missing or not a string.
    #[error("functions.{0}: `component` must be the path of a .wasm file")]
    NoComponent(String),
    /// `routes` is missing or not a list of strings.
    #[error("functions.{0}: `routes` must be a list of paths")]
    NoRoutes(String),
    /// The component file could not be read.
    #[error("functions.{name}: reading {path}")]
    Read {
        /// The function.
        name: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The deploy failed.
    #[error("functions.{name}")]
    Deploy {
        /// The function.
        name: String,
        /// Why.
        #[source]
        source: DeployError,
    },
}

/// Splits a fleet function table into component path, routes and grants.
fn split(
    name: &str,
    table: &toml::Table,
) -> Result<(String, Vec<String>, toml::Table), FleetFunctionError> {
    let component = table
        .get("component")
        .and_then(|c| c.as_str())
        .ok_or_else(|| FleetFunctionError::NoComponent(name.to_owned()))?
        .to_owned();
    let routes = table
        .get("routes")
        .and_then(|r| r.as_array())
        .and_then(|a| {
            a.iter()
                .map(|r| r.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| FleetFunctionError::NoRoutes(name.to_owned()))?;
    let mut grants = table.clone();
    grants.remove("component");
    grants.remove("routes");
    Ok((component, routes, grants))
}

/// Reads and stores the component of one fleet function; its new version, or None when
/// the live version is exactly that already.
async fn stage(
    host: &FunctionHost,
    name: &str,
    table: &toml::Table,
) -> Result<Option<DeploySpec>, FleetFunctionError> {
    let (path, routes, grants) = split(name, table)?;
    // A regular file of at most the upload API's limit: a FIFO named here hung the apply
    // (and a daemon's start with `--fleet`), /dev/zero grew the daemon until it was killed.
    let file = path.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        hostd_sandbox::input::read_regular(
            "component",
            Path::new(&file),
            super::MAX_COMPONENT_BYTES as u64,
        )
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r.map_err(std::io::Error::other))
    .map_err(|source| FleetFunctionError::Read {
        name: name.to_owned(),
        path: path.clone(),
        source,
    })?;
    let deploy_err = |source| FleetFunctionError::Deploy {
        name: name.to_owned(),
        source,
    };
    let digest = host.put_component(&bytes).map_err(deploy_err)?;
    let live = match host.versions(name) {
        Ok(v) => v.into_iter().find(|v| v.live),
        Err(DeployError::UnknownFunction { .. }) => None,
        Err(e) => return Err(deploy_err(e)),
    };
    if let Some(live) = live {
        let r = &live.record;
        if r.component == digest && r.routes == routes && r.grants == grants {
            return Ok(None);
        }
    }
    Ok(Some(DeploySpec {
        component: digest,
        routes,
        grants,
        health_check: None,
    }))
}

/// Deploys the fleet's functions whose live version differs, and removes those
/// an earlier fleet declared and this one does not. Functions never in a fleet
/// are left alone (they were deployed by hand).
pub async fn apply(host: &FunctionHost, store: &Store, fleet: &Fleet) -> FunctionsReport {
    let mut report = FunctionsReport::default();
    let fail = |report: &mut FunctionsReport, name: &str, msg: String| {
        tracing::error!("fleet: {msg}");
        report.failed.push((name.to_owned(), msg));
    };
    match store.fleet_functions() {
        Ok(before) => {
            for name in before.iter().filter(|n| !fleet.functions.contains_key(*n)) {
                match host.remove(name).await {
                    Ok(()) | Err(DeployError::UnknownFunction { .. }) => {}
                    Err(e) => {
                        fail(&mut report, name, crate::error::chain(&e));
                        continue;
                    }
                }
                match store.set_fleet_function(name, false) {
                    Ok(()) => report.removed.push(name.clone()),
                    Err(e) => fail(&mut report, name, crate::error::chain(&e)),
                }
            }
        }
        Err(e) => fail(&mut report, "", crate::error::chain(&e)),
    }
    // The new versions are made live together, so that functions may trade routes.
    let mut changed = Vec::new();
    for (name, table) in &fleet.functions {
        match stage(host, name, table).await {
            Ok(Some(spec)) => changed.push((name.clone(), spec)),
            Ok(None) => match store.set_fleet_function(name, true) {
                Ok(()) => report.unchanged.push(name.clone()),
                Err(e) => fail(&mut report, name, crate::error::chain(&e)),
            },
            Err(e) => fail(&mut report, name, crate::error::chain(&e)),
        }
    }
    for (name, outcome) in host.deploy_together(changed).await {
        let recorded = outcome
            .map_err(|source| {
                crate::error::chain(&FleetFunctionError::Deploy {
                    name: name.clone(),
                    source,
                })
            })
            .and_then(|_| {
                store
                    .set_fleet_function(&name, true)
                    .map_err(|e| crate::error::chain(&e))
            });
        match recorded {
            Ok(()) => report.deployed.push(name),
            Err(msg) => fail(&mut report, &name, msg),
        }
    }
    report.deployed.sort();
    report
}
