//! Reading the files a user names (specs, images, kernels, `files[].source`, secrets):
//! regular files only, opened without blocking and read with a size bound, so that a
//! FIFO, a device such as `/dev/zero` or a directory gets a clear error instead of a
//! hang or an unbounded read.

use std::fs::{File, FileType};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest spec or manifest file hostd reads.
pub const MAX_SPEC: u64 = 1 << 20;
/// The largest kernel or initrd hostd reads.
pub const MAX_KERNEL: u64 = 512 << 20;
/// The largest single `files[].source`.
pub const MAX_SOURCE_FILE: u64 = 1 << 30;
/// The largest secret value.
pub const MAX_SECRET: u64 = 1 << 20;

/// What kind of file `t` is, in words.
pub fn kind_name(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

fn not_regular(t: FileType) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file", kind_name(t)),
    )
}

/// Opens `path` for reading if it is a regular file (following symlinks). Never
/// blocks on a FIFO: the open is non-blocking and the type is checked on the open fd.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        return Err(not_regular(t));
    }
    Ok(f)
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(too_big(len, max));
    }
    let mut data = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(too_big(data.len() as u64, max));
    }
    Ok(data)
}

fn too_big(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {len} bytes; at most {max} are accepted"),
    )
}

/// Checks that `path` may be written as an output: it does not exist yet (and its
/// directory does), or it is a regular file (never a device, FIFO, directory or socket).
pub fn check_output(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(not_regular(m.file_type())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if dir.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("its directory {} does not exist", dir.display()),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether `a` and `b` are the same path once their directories are resolved (either
/// may not exist yet), or name the same existing file.
pub fn same_path(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some((std::fs::canonicalize(dir).ok()?, p.file_name()?.to_owned()))
    };
    same_file(a, b) || matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// Whether `a` and `b` name the same existing file (same device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_only_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"hello").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_regular(&ok, 5).ok(), Some(b"hello".to_vec()));
        let e = read_regular(&ok, 4).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("at most 4")),
            "{e:?}"
        );
        let e = read_regular(Path::new("/dev/zero"), 1 << 20)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("character device")),
            "{e:?}"
        );
        let e = read_regular(dir.path(), 10).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("directory")),
            "{e:?}"
        );
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, 10).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("FIFO")), "{e:?}");
        assert!(check_output(&ok).is_ok());
        assert!(check_output(&dir.path().join("new")).is_ok());
        assert!(check_output(Path::new("/dev/null")).is_err());
        assert!(check_output(&fifo).is_err());
        assert!(same_file(&ok, &dir.path().join(".").join("ok")));
    }
}
