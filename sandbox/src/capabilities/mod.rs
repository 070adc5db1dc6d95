//! Capability handles: what a function can reach beside its own memory.
//!
//! Each module implements one kind of grant and denies everything else with an
//! error to the function and one `warn` line on the host naming the function
//! and the capability.

pub mod filesystem;
pub mod keyvalue;
pub mod outbound;
pub mod secrets;
pub mod wire;

/// Host bindings for the interfaces in `sandbox/wit/`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "hostd:capabilities/imports",
        // Key-value calls are async: the database work runs on the blocking pool.
        imports: {
            "wasi:keyvalue/store": async | trappable,
            "wasi:keyvalue/atomics": async | trappable,
            default: trappable,
        },
        with: {
            "wasi:keyvalue/store.bucket": crate::capabilities::keyvalue::BucketHandle,
            "hostd:capabilities/secrets.secret": crate::capabilities::secrets::SecretHandle,
        },
    });
}

use std::sync::Arc;

use wasmtime::component::{HasData, ResourceTable};

use crate::capabilities::keyvalue::KvStore;
use crate::manifest::Grants;

/// What every request of one function shares: its name, its grants, and the
/// key-value store (when it has buckets).
#[derive(Debug)]
pub struct FnCaps {
    /// The function's manifest name.
    pub name: String,
    /// Its grants.
    pub grants: Grants,
    /// The key-value database, if any function was granted buckets.
    pub kv: Option<Arc<KvStore>>,
    /// The host's cap store (the keys of the capabilities it holds), when
    /// this host has one; the function only ever names a capability.
    pub cap_store: Option<Arc<hostd_caps::CapStore>>,
}

/// The view host implementations of `sandbox/wit` work on.
pub struct CapsView<'a> {
    /// The function's grants.
    pub caps: &'a FnCaps,
    /// The store's resource table (bucket and secret handles live here).
    pub table: &'a mut ResourceTable,
    /// Whether this request already logged a key-value quota denial.
    pub kv_quota_logged: &'a mut bool,
}

impl std::fmt::Debug for CapsView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsView")
            .field("function", &self.caps.name)
            .finish()
    }
}

/// Marker for `add_to_linker`: the data is a [`CapsView`].
#[derive(Debug)]
pub struct Caps;

impl HasData for Caps {
    type Data<'a> = CapsView<'a>;
}

/// Config values: `wasi:config/store`, answering only granted keys.
impl bindings::wasi::config::store::Host for CapsView<'_> {
    fn get(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, bindings::wasi::config::store::Error>> {
        match self.caps.grants.config.get(&key) {
            Some(v) => Ok(Ok(Some(v.clone()))),
            None => {
                tracing::warn!(function = %self.caps.name, capability = %"config", key = %key, "denied: config key not granted");
                Ok(Err(bindings::wasi::config::store::Error::Upstream(
                    format!("config key {key:?} is not granted to this function"),
                )))
            }
        }
    }

    fn get_all(
        &mut self,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, bindings::wasi::config::store::Error>> {
        Ok(Ok(self
            .caps
            .grants
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()))
    }
}
