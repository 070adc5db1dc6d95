//! One inotify instance for all of the daemon's guest directories, so that a console's
//! tail wakes when its file changes instead of looking every 100 ms (an idle guest then
//! costs the daemon no wake-up at all). One instance, not one per guest: a user may
//! have only `fs.inotify.max_user_instances` (128 by default) of them, while watches
//! are counted against the far larger `max_user_watches`.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// What wakes a directory's waiter: a file in it written, created, moved in or out,
/// deleted, or the directory itself going away.
const EVENTS: u32 = libc::IN_MODIFY
    | libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// The daemon's directory watcher: each watched directory has a [`Notify`] that gets a
/// permit whenever something happens in it.
#[derive(Debug)]
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    dirs: Mutex<HashMap<i32, Arc<Notify>>>,
    /// The reader failed: every waiter was woken and must poll from now on.
    failed: AtomicBool,
}

/// A watched directory; dropping it removes the watch.
#[derive(Debug)]
pub struct Watched {
    owner: Arc<DirWatch>,
    wd: i32,
    /// Gets a permit for each batch of changes in the directory.
    pub changed: Arc<Notify>,
}

impl Watched {
    /// True while the watcher works; false once it failed (the caller then polls).
    pub fn live(&self) -> bool {
        !self.owner.failed.load(Ordering::Relaxed)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.owner.lock().remove(&self.wd);
        // SAFETY: removes a watch descriptor of our own inotify fd; a stale one (the
        // directory is already gone) gives EINVAL, which is fine.
        unsafe { libc::inotify_rm_watch(self.owner.fd.get_ref().as_raw_fd(), self.wd) };
    }
}

impl DirWatch {
    /// A new inotify instance and the task that reads its events. Must run inside the
    /// tokio runtime.
    pub fn start() -> std::io::Result<Arc<DirWatch>> {
        // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an OwnedFd is a valid open fd, moved into the AsyncFd, which owns it
        // until dropped and always returns the same fd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        let w = Arc::new(DirWatch {
            fd,
            dirs: Mutex::new(HashMap::new()),
            failed: AtomicBool::new(false),
        });
        let reader = Arc::clone(&w);
        // The reader lives as long as the runtime (the daemon's life).
        tokio::spawn(async move {
            loop {
                if let Err(e) = reader.read_events().await {
                    tracing::warn!(
                        "console watch failed ({e}); guest consoles are polled from now on"
                    );
                    reader.failed.store(true, Ordering::Relaxed);
                    for n in reader.lock().values() {
                        n.notify_one();
                    }
                    return;
                }
            }
        });
        Ok(w)
    }

    /// How many directories are watched.
    #[cfg(test)]
    pub(crate) fn watched_dirs(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<Notify>>> {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `dir` (which must exist).
    pub fn watch(self: &Arc<Self>, dir: &Path) -> std::io::Result<Watched> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // Registered under the map's lock, so an event for the new descriptor cannot be
        // read before its waiter is there.
        let mut dirs = self.lock();
        // SAFETY: a valid NUL-terminated path and our own inotify fd.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.get_ref().as_raw_fd(),
                c.as_ptr(),
                EVENTS | libc::IN_ONLYDIR,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let changed = Arc::new(Notify::new());
        dirs.insert(wd, Arc::clone(&changed));
        Ok(Watched {
            owner: Arc::clone(self),
            wd,
            changed,
        })
    }

    /// Waits for events and wakes the directories they name (all of them when the
    /// kernel's queue overflowed).
    async fn read_events(&self) -> std::io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            let n = match guard.try_io(|fd| {
                // SAFETY: reads into a buffer we own, of its length.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            let dirs = self.lock();
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut off = 0;
            while off + header <= n {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with the
                // byte buffer's alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    dirs.values().for_each(|n| n.notify_one());
                } else if let Some(n) = dirs.get(&ev.wd) {
                    n.notify_one();
                }
                off += header + ev.len as usize;
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_in_a_watched_directory_wakes_only_its_waiter() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let w = DirWatch::start().expect("inotify");
        let wa = w.watch(a.path()).expect("watch a");
        let wb = w.watch(b.path()).expect("watch b");
        std::fs::write(a.path().join("console.log"), "x\n").expect("write");
        tokio::time::timeout(Duration::from_secs(5), wa.changed.notified())
            .await
            .expect("a is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), wb.changed.notified())
                .await
                .is_err(),
            "b is not"
        );
        assert!(wa.live());
        // A dropped watch is gone from the map; its directory's events wake nobody.
        let wd = wa.wd;
        drop(wa);
        assert!(!w.lock().contains_key(&wd));
        std::fs::write(b.path().join("console.log"), "y\n").expect("write");
        tokio::time::timeout(Duration::from_secs(5), wb.changed.notified())
            .await
            .expect("b is woken");
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error() {
        let w = DirWatch::start().expect("inotify");
        assert!(w.watch(Path::new("/nonexistent/guest")).is_err());
    }
}
