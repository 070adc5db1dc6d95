//! The functions tier of the daemon: REST endpoints over
//! [`hostd_sandbox::deploy::FunctionHost`] (upload a component, deploy a
//! version, list, roll back, remove), the function front on `--listen`,
//! functions declared in the fleet file, and their Prometheus figures.
//!
//! - [`api`]: the routes and their JSON shapes.
//! - [`fleet`]: deploying the fleet file's functions.
//! - [`prometheus`]: per-version figures in the text format.

pub mod api;
pub mod fleet;
pub mod prometheus;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hostd_sandbox::deploy::{FunctionHost, HostOptions};
use hostd_sandbox::server::{self, ConnectionLimits};

use crate::error::DaemonError;

/// Largest component `PUT /components` takes, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// How long the front waits for requests in flight when the daemon stops.
const FRONT_GRACE: Duration = Duration::from_secs(10);

/// Opens the function host in `state_dir/functions` (its component store,
/// deploy database and compile cache), loading each function's live version.
pub fn open(state_dir: &Path) -> Result<FunctionHost, DaemonError> {
    let dir = state_dir.join("functions");
    FunctionHost::open(HostOptions::new(&dir))
        .map_err(|source| DaemonError::Functions { path: dir, source })
}

/// Binds the function front on `addr` and serves the live versions from
/// there until `shutdown`; returns the bound address.
pub async fn start_front(
    host: &FunctionHost,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, DaemonError> {
    let listener = server::bind(addr)
        .await
        .map_err(|source| DaemonError::Front { addr, source })?;
    let bound = listener.local_addr().map_err(|e| DaemonError::Front {
        addr,
        source: hostd_sandbox::Error::Io {
            what: "reading the listening address".into(),
            source: e,
        },
    })?;
    let host = host.clone();
    tokio::spawn(async move {
        host.serve(listener, ConnectionLimits::default(), shutdown, FRONT_GRACE)
            .await;
    });
    tracing::info!("function front listening on http://{bound}");
    Ok(bound)
}
