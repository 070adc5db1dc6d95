//! Debian packages: fetched with `apt-get download` into a cache (one file per exact
//! name, version and architecture), checked against the sha256 the index or the lock
//! gives, unpacked with `dpkg-deb --fsys-tarfile` into the image tree. No maintainer
//! scripts run.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lock::LockedPackage;
use crate::names;
use crate::progress::Progress;
use crate::rootfs::Tree;
/// Why a package could not be used.
#[derive(Debug, thiserror::Error)]
#[error("package `{package}`: {message}")]
pub struct DebError {
    /// The package as written in the spec.
    pub package: String,
    /// What went wrong and what to do.
    pub message: String,
}

fn err(package: &str, message: impl Into<String>) -> DebError {
    DebError {
        package: package.to_string(),
        message: message.into(),
    }
}

fn run(package: &str, cmd: &mut Command) -> Result<Vec<u8>, DebError> {
    let out = cmd.output().map_err(|e| {
        err(
            package,
            format!(
                "cannot run {:?}: {e} (is this a Debian host with apt?)",
                cmd.get_program()
            ),
        )
    })?;
    if !out.status.success() {
        return Err(err(
            package,
            format!(
                "{:?} failed: {}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(out.stdout)
}

/// apt with nothing from the environment that could change its configuration; operands
/// after `--`, so a name can never be read as an option.
fn apt(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("APT_CONFIG");
    c
}

/// Where the cache keeps a package: `CACHE/debs/NAME_VERSION_ARCH.deb`, `:` written
/// `%3a` (the name `apt-get download` gives it).
pub fn cache_file(cache: &Path, p: &LockedPackage) -> PathBuf {
    cache.join("debs").join(format!(
        "{}_{}_{}.deb",
        p.name,
        p.version.replace(':', "%3a"),
        p.architecture
    ))
}

/// How many packages one `apt-get download` fetches (progress advances per batch).
const DOWNLOAD_BATCH: usize = 8;

/// Makes sure every package is in the cache with the expected sha256 and returns the
/// files, in the order given. Missing ones are downloaded; a file whose digest differs
/// is refused, naming the package.
pub fn fetch(
    packages: &[LockedPackage],
    cache: &Path,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, DebError> {
    let dir = cache.join("debs");
    std::fs::create_dir_all(&dir)
        .map_err(|e| err("(cache)", format!("cannot create {}: {e}", dir.display())))?;
    for p in packages {
        // The lock and the index are checked where they are read; checked again here
        // because whatever reaches apt must be a name and a version, never an option.
        if !names::is_debian_package(&p.name) || !names::is_debian_version(&p.version) {
            return Err(err(&p.name, "not a Debian package name and version"));
        }
    }
    let missing: Vec<&LockedPackage> = packages
        .iter()
        .filter(|p| !cache_file(cache, p).exists())
        .collect();
    if !missing.is_empty() {
        let bytes: u64 = missing.iter().map(|p| p.size).sum();
        progress.begin(
            &format!("downloading {} package(s)", missing.len()),
            bytes,
            true,
        );
        for batch in missing.chunks(DOWNLOAD_BATCH) {
            download(batch, cache, &dir)?;
            let size = batch.iter().map(|p| p.size).sum();
            progress.advance(size, &batch[batch.len() - 1].name);
        }
        progress.end();
    }
    packages
        .iter()
        .map(|p| {
            let path = cache_file(cache, p);
            verify(p, &path)?;
            Ok(path)
        })
        .collect()
}

fn download(batch: &[&LockedPackage], cache: &Path, dir: &Path) -> Result<(), DebError> {
    let first = batch.first().map(|p| p.name.as_str()).unwrap_or("");
    let (tmp, _scratch) =
        crate::scratch::create(|| tempfile::tempdir_in(dir), |t| t.path().to_path_buf())
            .map_err(|e| err(first, e.to_string()))?;
    let args: Vec<String> = batch
        .iter()
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    let out = apt("apt-get")
        .args(["download", "-q", "--"])
        .args(&args)
        .current_dir(tmp.path())
        .output()
        .map_err(|e| {
            err(
                first,
                format!("cannot run apt-get: {e} (is this a Debian host with apt?)"),
            )
        })?;
    if !out.status.success() {
        // Name the package that cannot be had: one at a time.
        if batch.len() > 1 {
            for p in batch {
                download(&[p], cache, dir)?;
            }
            return Ok(());
        }
        let p = batch[0];
        return Err(err(
            &p.name,
            format!(
                "version {} cannot be fetched ({}); put its .deb (sha256 {}) at {}, or run \
                 `hostd build --update-lock` to resolve the packages again",
                p.version,
                String::from_utf8_lossy(&out.stderr).trim(),
                p.sha256,
                cache_file(cache, p).display()
            ),
        ));
    }
    for p in batch {
        let dest = cache_file(cache, p);
        let got = tmp.path().join(dest.file_name().unwrap_or_default());
        if !got.exists() {
            return Err(err(
                &p.name,
                format!("apt-get download did not produce {}", got.display()),
            ));
        }
        // Checked before it enters the cache: a bad download never lands there.
        verify(p, &got)?;
        std::fs::rename(&got, &dest).map_err(|e| err(&p.name, e.to_string()))?;
    }
    Ok(())
}

/// Checks a .deb's size and sha256 against the lock's (the size first: a file of
/// another size is refused without reading it).
fn verify(p: &LockedPackage, path: &Path) -> Result<(), DebError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| err(&p.name, format!("{}: {e}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| err(&p.name, format!("{}: {e}", path.display())))?
        .len();
    if len != p.size {
        return Err(err(
            &p.name,
            format!(
                "{} has {len} bytes, but version {} must have {} (sha256 {}); the file is \
                 damaged or not the locked package, or the lock's size is wrong: delete the \
                 file to download it again, or run `hostd build --update-lock`",
                path.display(),
                p.version,
                p.size,
                p.sha256
            ),
        ));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| err(&p.name, format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = crate::format::digest_hex(&h.finalize().into());
    if got != p.sha256 {
        return Err(err(
            &p.name,
            format!(
                "{} has sha256 {got}, but version {} must have {}; the file is damaged or \
                 not the locked package: delete it to download it again",
                path.display(),
                p.version,
                p.sha256
            ),
        ));
    }
    Ok(())
}

/// The data archive (tar) of each .deb, extracted by `dpkg-deb` on a few threads.
pub fn data_tars(debs: &[(String, PathBuf)]) -> Result<Vec<Vec<u8>>, DebError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<Result<Vec<u8>, DebError>>>;
    let results: Vec<Slot> = debs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, path)) = debs.get(i) else {
                    break;
                };
                let r = run(
                    name,
                    Command::new("dpkg-deb").arg("--fsys-tarfile").arg(path),
                );
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .zip(debs)
        .map(|(slot, (name, _))| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(err(name, "dpkg-deb did not run")))
        })
        .collect()
}

/// Unpacks a .deb's data archive ([`data_tars`]) into `tree`. Owners and modes come
/// from the package; mtimes are dropped.
pub fn unpack(package: &str, tar_bytes: &[u8], tree: &mut Tree) -> Result<(), DebError> {
    crate::layer::apply(tar_bytes, tree, false).map_err(|m| err(package, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked(bytes: &[u8], size: u64) -> LockedPackage {
        LockedPackage {
            name: "hello".into(),
            version: "2.10-3".into(),
            architecture: "amd64".into(),
            sha256: crate::format::digest_hex(&Sha256::digest(bytes).into()),
            size,
        }
    }

    /// A .deb must have the lock's size as well as its sha256: a lock whose size does
    /// not match is refused, naming both sizes.
    #[test]
    fn a_deb_of_another_size_than_the_locks_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hello.deb");
        std::fs::write(&path, b"!<arch>\nnot really a deb").expect("write");
        let len = std::fs::metadata(&path).expect("stat").len();
        let content = std::fs::read(&path).expect("read");
        verify(&locked(&content, len), &path).expect("the right size and digest");
        let e = verify(&locked(&content, len + 1), &path)
            .expect_err("a wrong size")
            .to_string();
        assert!(
            e.contains(&format!("has {len} bytes"))
                && e.contains(&format!("must have {}", len + 1)),
            "{e}"
        );
        let e = verify(&locked(b"other", len), &path)
            .expect_err("a wrong digest")
            .to_string();
        assert!(e.contains("sha256"), "{e}");
    }
}
