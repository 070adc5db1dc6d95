//! The OCI base image reader: arbitrary bytes as an `oci-archive:` file (a tar of an
//! OCI image layout, blobs checked by digest, layers as tar or tar+gzip). Applying it
//! must not panic, whatever the archive, index, manifest or layers hold.

use hostd_images::oci::{apply, Source};
use hostd_images::rootfs::Tree;

/// One input: the archive's bytes.
pub fn run(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("image.tar");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let mut tree = Tree::new();
    let _ = apply(&path, Source::Archive, &mut tree);
}
