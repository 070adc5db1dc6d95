//! Files hostd takes from the user (manifest, components, secrets, cached
//! artifacts): each must be a regular file and is read with a size bound, so
//! a FIFO cannot hang the server and `/dev/zero` cannot grow it without end.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;

/// Largest manifest (`fns.toml`) read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest component (`.wasm`) read.
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;
/// Largest secret file read.
pub const MAX_SECRET_BYTES: u64 = 1 << 20;
/// Largest compiled artifact read from the compile cache.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// What kind of file `meta` describes, for messages (the same words `hostd build` uses).
fn kind(meta: &std::fs::Metadata) -> &'static str {
    hostd_images::input::kind_name(meta.file_type())
}

fn check(what: &'static str, path: &Path, meta: &std::fs::Metadata, max: u64) -> Result<(), Error> {
    if !meta.is_file() {
        return Err(Error::NotRegular {
            what,
            path: path.to_owned(),
            kind: kind(meta),
        });
    }
    if meta.len() > max {
        return Err(Error::TooLarge {
            what,
            path: path.to_owned(),
            size: meta.len(),
            max,
        });
    }
    Ok(())
}

/// Reads `path` (a `what`, named in errors) if it is a regular file of at most `max` bytes.
///
/// The type is checked before opening; the file is opened non-blocking (so a
/// FIFO swapped in after the check cannot block the open) and checked again
/// through the open descriptor; at most `max` bytes are read.
pub fn read_regular(what: &'static str, path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        what: format!("reading {what} {}", path.display()),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    check(what, path, &meta, max)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check(what, path, &meta, max)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(Error::TooLarge {
            what,
            path: path.to_owned(),
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_directories_and_oversized_files() {
        let e = read_regular("manifest", Path::new("/dev/zero"), 10).expect_err("device");
        assert!(
            matches!(
                e,
                Error::NotRegular {
                    kind: "a character device",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("/dev/zero"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_regular("component", dir.path(), 10).expect_err("directory");
        assert!(
            matches!(
                e,
                Error::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
        let f = dir.path().join("big");
        std::fs::write(&f, [0u8; 11]).expect("write");
        assert!(matches!(
            read_regular("component", &f, 10),
            Err(Error::TooLarge {
                size: 11,
                max: 10,
                ..
            })
        ));
        assert_eq!(read_regular("component", &f, 11).expect("read").len(), 11);
    }
}
