//! Reconcile: make the guests match a fleet. Each guest's configuration digest (its
//! canonical JSON declaration and its image's digest) decides: unchanged → untouched,
//! changed → stopped and replaced, gone from the fleet → stopped and deleted, new →
//! created (and started if `autostart`). Guests made by hand are left alone unless the
//! fleet names them. Applying the same fleet twice changes nothing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::fleet::Fleet;
use crate::functions::fleet::FunctionsReport;
use crate::guests::record::Origin;
use crate::guests::{new_record, Guests};

/// What an apply did, guest names in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyReport {
    /// Guests created.
    pub created: Vec<String>,
    /// Guests whose configuration changed: stopped and replaced.
    pub replaced: Vec<String>,
    /// Guests no longer in the fleet: stopped and deleted.
    pub removed: Vec<String>,
    /// Guests left as they were.
    pub unchanged: Vec<String>,
    /// What was done to the fleet's functions.
    #[serde(default)]
    pub functions: FunctionsReport,
}

/// Applies `fleet` to the guests, then to the functions (see
/// [`crate::functions::fleet::apply`]).
pub async fn apply(
    guests: &Arc<Guests>,
    functions: &hostd_sandbox::deploy::FunctionHost,
    fleet: &Fleet,
) -> Result<ApplyReport, ApiError> {
    fleet
        .check()
        .map_err(|i| ApiError::bad_request(format!("fleet: {i}")))?;
    let _one_at_a_time = guests.apply_lock.lock().await;
    // Every image first: a fleet naming a bad image changes nothing.
    // Their pins keep them in the store until the apply ends: a guest removed below (a
    // renamed one, say) no longer takes an image the fleet's other guests need with it.
    let mut wanted = Vec::new();
    let mut held = Vec::new();
    for (name, decl) in &fleet.guests {
        crate::guests::check_trust(decl)
            .map_err(|e| ApiError::new(e.status, e.code, format!("guest {name}: {}", e.message)))?;
        let (image, pin) = guests
            .resolve_image(&decl.image)
            .await
            .map_err(|e| ApiError::new(e.status, e.code, format!("guest {name}: {}", e.message)))?;
        held.push(pin);
        wanted.push(new_record(
            name,
            decl.clone(),
            &image,
            Origin::Fleet,
            decl.autostart,
        ));
    }
    let current = guests.records();
    let mut report = ApplyReport::default();
    for old in &current {
        if old.origin == Origin::Fleet && !fleet.guests.contains_key(&old.name) {
            guests.remove(&old.name).await?;
            report.removed.push(old.name.clone());
        }
    }
    for new in wanted {
        match current.iter().find(|r| r.name == new.name) {
            Some(old) if old.config_digest == new.config_digest => {
                guests.adopt_into_fleet(&new.name);
                report.unchanged.push(new.name);
            }
            Some(_) => {
                let name = new.name.clone();
                guests.replace(new).await?;
                report.replaced.push(name);
            }
            None => {
                let name = new.name.clone();
                guests.insert_record(new)?;
                report.created.push(name);
            }
        }
    }
    report.functions = crate::functions::fleet::apply(functions, guests.store(), fleet).await;
    tracing::info!(
        "fleet applied: {} created, {} replaced, {} removed, {} unchanged; functions: {} deployed, {} removed, {} unchanged, {} failed",
        report.created.len(),
        report.replaced.len(),
        report.removed.len(),
        report.unchanged.len(),
        report.functions.deployed.len(),
        report.functions.removed.len(),
        report.functions.unchanged.len(),
        report.functions.failed.len()
    );
    Ok(report)
}
