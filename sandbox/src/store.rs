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
    /// Whether a key-value quota denial was logged for this request (once is enough).
    kv_quota_logged: bool,
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
            table: {
                let mut t = ResourceTable::new();
                t.set_max_capacity(MAX_TABLE_ENTRIES);
                t
            },
            hooks: OutboundPolicy::new(caps.clone()),
            limiter: MemoryLimiter::new(caps.clone()),
            caps: caps.clone(),
            kv_quota_logged: false,
        })
    }

    /// The view the `sandbox/wit` host implementations use.
    pub fn caps_view(&mut self) -> CapsView<'_> {
        CapsView {
            caps: &self.caps,
            table: &mut self.table,
            kv_quota_logged: &mut self.kv_quota_logged,
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

/// Entries one request's resource table may hold (streams, pollables,
/// bodies, fields, bucket and secret handles …). Past it, creating another
/// handle traps the function instead of growing host memory.
pub const MAX_TABLE_ENTRIES: usize = 10_000;

/// Linear memories one request's instances may create (each counted against
/// the same memory limit).
pub const MAX_MEMORIES: usize = 32;

/// Core instances one request may create.
pub const MAX_INSTANCES: usize = 64;

/// Tables one request may create.
pub const MAX_TABLES: usize = 64;

/// Elements any one table may grow to.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The function's memory limit, counted over every linear memory of the
/// request together (a component has several core instances, each may have
/// its own memory), remembering whether a growth was refused so a resulting
/// trap is reported as the memory limit.
pub struct MemoryLimiter {
    limits: StoreLimits,
    caps: Arc<FnCaps>,
    /// Bytes of linear memory granted so far, over all memories.
    total: usize,
    /// Set when a memory growth beyond the limit was refused.
    pub(crate) hit: bool,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("total", &self.total)
            .field("hit", &self.hit)
            .finish()
    }
}

impl MemoryLimiter {
    fn new(caps: Arc<FnCaps>) -> MemoryLimiter {
        MemoryLimiter {
            limits: StoreLimitsBuilder::new()
                .memories(MAX_MEMORIES)
                .instances(MAX_INSTANCES)
                .tables(MAX_TABLES)
                .table_elements(MAX_TABLE_ELEMENTS)
                .build(),
            caps,
            total: 0,
            hit: false,
        }
    }

    fn limit(&self) -> usize {
        usize::try_from(self.caps.grants.memory_bytes).unwrap_or(usize::MAX)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired.saturating_sub(current);
        let total = self.total.saturating_add(delta);
        if total > self.limit() {
            if !self.hit {
                self.hit = true;
                tracing::warn!(
                    function = %self.caps.name,
                    capability = %"memory",
                    limit_mib = self.caps.grants.memory_bytes >> 20,
                    in_use_bytes = self.total,
                    requested_bytes = delta,
                    "denied: memory growth beyond the function's limit"
                );
            }
            return Ok(false);
        }
        // A granted growth that then fails (beyond the memory type's maximum)
        // stays counted: wasmtime does not say which memory failed, and
        // counting too much only errs on the side of the limit.
        self.total = total;
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Grants;

    const PAGE: usize = 64 << 10;
    const MIB: usize = 1 << 20;

    #[test]
    fn memory_limit_counts_every_memory_of_the_request_together() {
        let mut grants = Grants::none();
        grants.memory_bytes = 4 << 20;
        let caps = Arc::new(FnCaps {
            name: "t".into(),
            grants,
            kv: None,
            cap_store: None,
        });
        let mut l = MemoryLimiter::new(caps);
        // Two memories, each well under the limit on its own.
        assert!(l.memory_growing(0, 2 * MIB, None).expect("a"));
        assert!(l.memory_growing(0, MIB, None).expect("b"));
        // Growing the second to 2 MiB + 64 KiB would make 4 MiB + 64 KiB in all.
        assert!(!l
            .memory_growing(MIB, 2 * MIB + PAGE, None)
            .expect("b grows"));
        assert!(l.hit);
        // Exactly the limit in all is allowed; one page more is not.
        assert!(l.memory_growing(2 * MIB, 3 * MIB, None).expect("a grows"));
        assert!(!l
            .memory_growing(3 * MIB, 3 * MIB + PAGE, None)
            .expect("a again"));
        assert!(!l.memory_growing(0, PAGE, None).expect("a third memory"));
    }
}
