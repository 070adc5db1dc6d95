//! Preopened directories are enforced by wasmtime-wasi (cap-std resolves every
//! path beneath its directory handle). This module adds the host log line: it
//! wraps `wasi:filesystem/types.[method]descriptor.open-at` so that a path that
//! climbs out of its directory (`../`, or an absolute path) is refused before
//! reaching the filesystem, with one `warn` line naming function and path.

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, Host, HostDescriptor, OpenFlags, PathFlags,
};

use crate::store::FnState;

/// The `wasi:filesystem/types` instance wasmtime-wasi defines (semver-compatible
/// imports of older 0.2.x versions resolve to it).
const FS_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Whether `path`, resolved beneath a directory, leaves it.
pub fn escapes(path: &str) -> bool {
    if path.starts_with('/') {
        return true;
    }
    let mut depth: i64 = 0;
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

type OpenAtParams = (
    Resource<Descriptor>,
    PathFlags,
    String,
    OpenFlags,
    DescriptorFlags,
);

/// Replaces `open-at` in `linker` (which must already hold wasmtime-wasi's) with the guarded one.
pub fn add_open_at_guard(linker: &mut Linker<FnState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.instance(FS_TYPES)?.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, FnState>,
         (fd, path_flags, path, oflags, flags): OpenAtParams| {
            Box::new(async move {
                if escapes(&path) {
                    tracing::warn!(
                        function = %store.data().caps.name,
                        capability = %"filesystem",
                        path = %path,
                        "denied: path escapes its preopened directory"
                    );
                    return Ok((Err::<Resource<Descriptor>, ErrorCode>(
                        ErrorCode::NotPermitted,
                    ),));
                }
                let mut view = store.data_mut().filesystem();
                match HostDescriptor::open_at(&mut view, fd, path_flags, path, oflags, flags).await
                {
                    Ok(fd) => Ok((Ok(fd),)),
                    Err(e) => Ok((Err(Host::convert_error_code(&mut view, e)?),)),
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::escapes;

    #[test]
    fn escape_detection() {
        for bad in ["..", "../x", "a/../../x", "/etc/passwd", "./../x"] {
            assert!(escapes(bad), "{bad}");
        }
        for ok in ["x", "a/b", "a/../b", "./a", "a/./b/..", ""] {
            assert!(!escapes(ok), "{ok}");
        }
    }
}
