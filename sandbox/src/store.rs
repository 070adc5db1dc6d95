//! Per-request store data: a fresh WASI context built from the function's
//! grants, the `wasi:http` context with the outbound policy, and the memory
//! limiter.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::capabilities::outbound::OutboundPolicy;
use crate::capabilities::{CapsView, FnCaps};
use crate::Error;

/// Everything one request's store holds.
pub struct FnState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundPolicy,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) caps: Arc<FnCaps>,
}

impl std::fmt::Debug for FnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnState")
            .field("function", &self.caps.name)
            .finish()
    }
}

impl FnState {
    /// Builds the state for one request of the function `caps` describes.
    pub fn new(caps: &Arc<FnCaps>) -> Result<FnState, Error> {
        let g = &caps.grants;
        let mut b = WasiCtxBuilder::new();
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in &g.env {
            b.env(k, v);
        }
        for d in &g.dirs {
            let perms = if d.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            b.preopened_dir(&d.host, &d.guest, perms)
                .map_err(|e| Error::Grant {
                    function: caps.name.clone(),
                    msg: format!("preopening {} as {}: {e:#}", d.host.display(), d.guest),
                })?;
        }
        Ok(FnState {
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundPolicy::new(caps.clone()),
            limiter: MemoryLimiter::new(caps.clone()),
            caps: caps.clone(),
        })
    }

    /// The view the `sandbox/wit` host implementations use.
    pub fn caps_view(&mut self) -> CapsView<'_> {
        CapsView {
            caps: &self.caps,
            table: &mut self.table,
        }
    }
}

impl WasiView for FnState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for FnState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `StoreLimits` for the function's memory limit, remembering whether a
/// growth was refused so a resulting trap is reported as the memory limit.
pub struct MemoryLimiter {
    limits: StoreLimits,
    caps: Arc<FnCaps>,
    /// Set when a memory growth beyond the limit was refused.
    pub(crate) hit: bool,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("hit", &self.hit)
            .finish()
    }
}

impl MemoryLimiter {
    fn new(caps: Arc<FnCaps>) -> MemoryLimiter {
        let limit = usize::try_from(caps.grants.memory_bytes).unwrap_or(usize::MAX);
        MemoryLimiter {
            limits: StoreLimitsBuilder::new().memory_size(limit).build(),
            caps,
            hit: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if !ok && !self.hit {
            self.hit = true;
            tracing::warn!(
                function = %self.caps.name,
                capability = %"memory",
                limit_mib = self.caps.grants.memory_bytes >> 20,
                requested_bytes = desired,
                "denied: memory growth beyond the function's limit"
            );
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}
