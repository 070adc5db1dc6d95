//! Scratch files and directories (a half-written image, a package download, a volume
//! being formatted) that must not outlive hostd, whichever way it ends. Each is
//! registered while it exists ([`create`] makes and registers it in one step); its
//! guard removes it on every normal exit path, and a signal handler calls
//! [`remove_all`] before the process ends.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Held while an output is made visible ([`commit`]): how many outputs were made
/// visible, and whether [`remove_all`] has started (then no more are).
static COMMITS: Mutex<(u32, bool)> = Mutex::new((0, false));

/// Makes an output visible (`commit` renames it into place) unless the process is being
/// ended by a signal: once [`remove_all`] has started, no output appears any more, and
/// a commit already under way finishes before [`remove_all`] goes on. So an interrupted
/// command either wrote its output whole or wrote nothing, and says which.
pub fn commit<T>(commit: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut state = COMMITS.lock().unwrap_or_else(|p| p.into_inner());
    if state.1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "interrupted: the output was not written",
        ));
    }
    let out = commit()?;
    state.0 += 1;
    Ok(out)
}

/// Removes its path (file or directory tree) when dropped, unless [`Scratch::keep`]
/// was called (the path was renamed into place).
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

/// Makes a scratch path with `make` and registers it (`path` names what was made) in one
/// step against [`remove_all`]: either it is made and registered before `remove_all`
/// takes the registry, which then removes it, or, once `remove_all` has begun, it is not
/// made at all (an `Interrupted` error). Making first and registering after left a
/// window in which a signal's clean-up missed a path made just then (bad_input's
/// interrupted build once left its output's temporary file behind in CI).
pub fn create<T>(
    make: impl FnOnce() -> std::io::Result<T>,
    path: impl FnOnce(&T) -> PathBuf,
) -> std::io::Result<(T, Scratch)> {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    if COMMITS.lock().unwrap_or_else(|p| p.into_inner()).1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "interrupted: nothing more is written",
        ));
    }
    let made = make()?;
    let path = path(&made);
    live.push(path.clone());
    Ok((made, Scratch { path }))
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

fn forget(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        if let Some(i) = live.iter().rposition(|p| p == path) {
            live.swap_remove(i);
        }
    }
}

impl Scratch {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path has become a result (renamed into place): stop tracking it.
    pub fn keep(self) {
        forget(&self.path);
        std::mem::forget(self);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove(&self.path);
        forget(&self.path);
    }
}

/// Removes every registered scratch path. For signal handlers that are about to end
/// the process; it takes the registry's lock, so call it from a normal thread (a
/// thread waiting in `sigwait`), not from an asynchronous signal handler. Other threads
/// may still be writing into a scratch directory meanwhile, so each removal is tried
/// until the path is gone (for at most about a second).
///
/// Returns how many outputs [`commit`] made visible before it was called.
pub fn remove_all() -> u32 {
    let committed = {
        let mut state = COMMITS.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = true;
        state.0
    };
    remove_matching(|_| true);
    committed
}

/// [`remove_all`] for the registered paths `which` selects (the unit test's own: other
/// tests running alongside register theirs in the same registry).
fn remove_matching(which: impl Fn(&Path) -> bool) {
    let paths: Vec<PathBuf> = match LIVE.lock() {
        Ok(mut live) => {
            let (gone, stay) = std::mem::take(&mut *live)
                .into_iter()
                .partition(|p| which(p));
            *live = stay;
            gone
        }
        Err(_) => return,
    };
    for p in paths {
        for _ in 0..100 {
            remove(&p);
            if std::fs::symlink_metadata(&p).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers a path the test made already.
    fn register(path: &Path) -> Scratch {
        create(|| Ok(()), |()| path.to_path_buf())
            .unwrap_or_else(|e| panic!("{e}"))
            .1
    }

    #[test]
    fn scratch_goes_on_drop_and_on_remove_all_but_not_when_kept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap_or_else(|e| panic!("{e}"));
        drop(register(&a));
        assert!(!a.exists());
        let b = dir.path().join("b");
        std::fs::create_dir_all(b.join("c")).unwrap_or_else(|e| panic!("{e}"));
        let guard = register(&b);
        let ours = |p: &Path| p.starts_with(dir.path());
        remove_matching(ours);
        assert!(!b.exists());
        drop(guard);
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap_or_else(|e| panic!("{e}"));
        register(&k).keep();
        remove_matching(ours);
        assert!(k.exists());
        let (file, guard) = create(
            || std::fs::File::create(dir.path().join("m")),
            |_| dir.path().join("m"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        drop(file);
        remove_matching(ours);
        assert!(!dir.path().join("m").exists());
        drop(guard);
    }
}
