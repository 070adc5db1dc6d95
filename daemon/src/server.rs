//! Running the daemon: state directory, stores, guests, the API socket (bound here or
//! passed by systemd socket activation), readiness and watchdog notifications, and a
//! clean stop on SIGTERM/SIGINT (guests keep running; the next daemon re-adopts them).

use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::{self, Access, AppState, Peer};
use crate::error::DaemonError;
use crate::fleet::Fleet;
use crate::guests::{Guests, GuestsConfig};
use crate::images::ImageStore;
use crate::metrics::Metrics;
use crate::store::Store;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/hostd/hostd.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hostd";

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The API socket.
    pub socket: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// A fleet to apply at start.
    pub fleet: Option<Fleet>,
    /// The program each guest runs as `PROGRAM run …` (the hostd binary).
    pub runner: PathBuf,
    /// Largest image accepted by `POST /images` or imported from a path, in bytes.
    pub max_image_bytes: u64,
    /// Where the function front listens (used by the functions tier).
    pub listen: Option<SocketAddr>,
}

/// The pieces of a running daemon, built before it serves.
#[derive(Debug)]
pub struct Daemon {
    /// Shared with every handler.
    pub state: AppState,
    opts: Options,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Makes the state directory (0700), or checks an existing one: a directory of this user
/// that nobody else may write. Its mode is tightened to 0700 only when it is empty (as
/// systemd's `StateDirectory=` makes it) or already holds a daemon's state: a directory
/// such as /var/lib or /tmp named by mistake is refused or left as it is, never changed.
fn state_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: &str| DaemonError::Io {
        what: "cannot use as the state directory",
        path: dir.to_owned(),
        source: std::io::Error::other(why.to_owned()),
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", dir)(e)),
    }
    let meta = std::fs::metadata(dir).map_err(io("cannot read", dir))?;
    if !meta.is_dir() {
        return Err(refuse("not a directory"));
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(refuse("owned by another user"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(
            "other users may write to it; give the daemon a directory of its own",
        ));
    }
    if meta.mode() & 0o077 != 0 {
        let empty = std::fs::read_dir(dir)
            .map_err(io("cannot read", dir))?
            .next()
            .is_none();
        if empty || dir.join("state.redb").exists() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("cannot set the mode of", dir))?;
        } else {
            tracing::warn!(
                "the state directory {} is readable by other users (mode {:o}); \
                 it was left as it is",
                dir.display(),
                meta.mode() & 0o777
            );
        }
    }
    Ok(())
}

impl Daemon {
    /// Opens the state (database, image store) and loads the guests, re-adopting those
    /// still running. Must run inside the tokio runtime.
    pub fn open(opts: Options) -> Result<Daemon, DaemonError> {
        state_dir(&opts.state_dir)?;
        let store = Arc::new(Store::open(&opts.state_dir)?);
        let images = Arc::new(
            ImageStore::open(&opts.state_dir, opts.max_image_bytes).map_err(|e| match e {
                crate::images::ImageStoreError::Store { path, source } => DaemonError::Io {
                    what: "cannot create",
                    path,
                    source,
                },
                other => DaemonError::Io {
                    what: "cannot open the image store in",
                    path: opts.state_dir.clone(),
                    source: std::io::Error::other(other),
                },
            })?,
        );
        let guests = Guests::load(
            GuestsConfig {
                runner: opts.runner.clone(),
                state_dir: opts.state_dir.clone(),
            },
            store,
            Arc::clone(&images),
        )?;
        Ok(Daemon {
            state: AppState {
                guests,
                images,
                metrics: Arc::new(Metrics::new()),
                functions: crate::functions::open(&opts.state_dir)?,
            },
            opts,
        })
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn serve(self) -> Result<(), DaemonError> {
        // Functions first: their live versions are loaded already, so they
        // serve as soon as the front listens, before the API does.
        if let Some(addr) = self.opts.listen {
            crate::functions::start_front(&self.state.functions, addr, shutdown_signal()).await?;
        }
        let (listener, bound) = listener(&self.opts.socket)?;
        let socket = self.opts.socket.clone();
        let gid = if bound {
            std::fs::metadata(&socket)
                .map(|m| m.gid())
                .unwrap_or_else(|_| current_gid())
        } else {
            current_gid()
        };
        let access = Access {
            // SAFETY: geteuid has no preconditions.
            uid: unsafe { libc::geteuid() },
            gid,
        };
        let app = api::app(self.state.clone(), access);
        tracing::info!("listening on {}", socket.display());
        // After the signal, requests in flight get SHUTDOWN_GRACE to finish; a client
        // following a console (`?follow=1`) would otherwise keep the daemon up for as
        // long as it stays connected.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stopping = stop_rx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        // The API answers from now on, also while the fleet of `--fleet` is applied (an
        // apply asked for meanwhile waits for it, as any two applies do); ready for
        // systemd once that apply is done, so that what is ordered after the daemon finds
        // the fleet's guests and functions there.
        let ready = async {
            if let Some(fleet) = &self.opts.fleet {
                apply_at_start(&self.state, fleet).await;
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            if let Some(period) = sd_notify::watchdog_enabled() {
                let mut tick = tokio::time::interval(period / 2);
                loop {
                    tick.tick().await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            std::future::pending::<()>().await
        };
        let serve = serve_api(listener, app, stop_rx.clone());
        let served = tokio::select! {
            served = serve => served,
            () = ready => Ok(()),
            () = async {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!(
                    "requests still open {SHUTDOWN_GRACE:?} after the signal (console followers?); closing them"
                );
                Ok(())
            }
        };
        drop(stop_rx);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if bound {
            let _ = std::fs::remove_file(&socket);
        }
        served.map_err(|source| DaemonError::Socket {
            path: socket,
            source,
        })
    }
}

/// Applies the fleet given with `--fleet` (the apply logs what it did; an error is
/// logged here).
async fn apply_at_start(state: &AppState, fleet: &Fleet) {
    if let Err(e) = crate::reconcile::apply(&state.guests, &state.functions, fleet).await {
        tracing::error!("--fleet: {}", e.message);
    }
}

/// How long a client may take to send a request's headers (once it began one, or
/// after connecting): a client that sends half a request and waits holds nothing longer.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the API on `listener` until `stop` turns true, then lets the connections'
/// requests in flight finish (the caller bounds how long). Each connection is served by
/// hyper with [`HEADER_TIMEOUT`], and its peer's credentials (SO_PEERCRED) reach the
/// router as `ConnectInfo<Peer>`.
async fn serve_api(
    listener: tokio::net::UnixListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, or a connection reset before it was taken: the
                    // listener itself is fine; try again shortly.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Reap the connections that ended, so the set does not grow with them.
        while connections.try_join_next().is_some() {}
        let peer = Peer::of(&stream);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let mut stop = stop.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!("API connection: {e}");
            }
        });
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How long requests in flight may take to finish after SIGTERM or SIGINT.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the daemon on a new multi-threaded tokio runtime until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async move { Daemon::open(opts)?.serve().await })
}

fn current_gid() -> u32 {
    // SAFETY: getegid has no preconditions.
    unsafe { libc::getegid() }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping the API (guests keep running)");
}

/// The API listener: the socket systemd passed (LISTEN_FDS), else a new socket at
/// `path` with mode 0660. Returns whether we bound it (and so remove it at exit).
fn listener(path: &Path) -> Result<(tokio::net::UnixListener, bool), DaemonError> {
    let sock = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(fd) = sd_notify::listen_fds().ok().and_then(|mut fds| fds.next()) {
        // SAFETY: systemd passed this fd to us (LISTEN_PID matched) and nothing else in
        // this process owns it.
        let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        std.set_nonblocking(true).map_err(sock)?;
        tracing::info!("using the socket passed by systemd (fd {fd})");
        return Ok((
            tokio::net::UnixListener::from_std(std).map_err(sock)?,
            false,
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket left by an earlier daemon is removed: anything else at the path
        // (a typo naming a file, the state database) is the user's.
        if !meta.file_type().is_socket() {
            return Err(sock(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there; remove it or choose another path",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(sock(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(sock)?;
    }
    let std = std::os::unix::net::UnixListener::bind(path).map_err(sock)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(sock)?;
    std.set_nonblocking(true).map_err(sock)?;
    Ok((tokio::net::UnixListener::from_std(std).map_err(sock)?, true))
}
