//! A tar archive applied onto a [`Tree`]: a .deb's data archive, or an OCI image layer
//! (with whiteouts). Owners and modes come from the archive; mtimes are dropped; paths
//! with `..` are refused; device nodes and FIFOs are skipped (the guest's /dev is a
//! devtmpfs). Hard links become copies of their target.

use std::io::Read;

use crate::rootfs::{Kind, Node, Tree};

/// OCI whiteout prefix: `.wh.NAME` deletes NAME of the layers below.
const WHITEOUT: &str = ".wh.";
/// OCI opaque whiteout: the directory's contents from the layers below are deleted.
const OPAQUE: &str = ".wh..wh..opq";

struct Entry {
    path: String,
    node: Option<Node>,
    /// A hard link's target.
    link: Option<String>,
}

/// Applies `tar_bytes` onto `tree`. With `whiteouts`, OCI whiteout entries delete what
/// the layers below put there (before anything of this layer is added, so they never
/// touch this layer's own files).
pub fn apply(tar_bytes: &[u8], tree: &mut Tree, whiteouts: bool) -> Result<(), String> {
    let mut archive = tar::Archive::new(tar_bytes);
    let entries = archive
        .entries()
        .map_err(|e| format!("bad tar archive: {e}"))?;
    let mut list = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("bad tar entry: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("bad path in tar archive: {e}"))?
            .to_string_lossy()
            .into_owned();
        let comps: Vec<&str> = raw
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if comps.contains(&"..") {
            return Err(format!("refusing path `{raw}` with `..`"));
        }
        if comps.is_empty() {
            continue;
        }
        let path = format!("/{}", comps.join("/"));
        let h = entry.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = u32::try_from(h.uid().unwrap_or(0)).unwrap_or(0);
        let gid = u32::try_from(h.gid().unwrap_or(0)).unwrap_or(0);
        let et = h.entry_type();
        let link_name = entry
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned());
        let node = |kind| Node {
            kind,
            mode,
            uid,
            gid,
        };
        let item = if et.is_dir() {
            Entry {
                path,
                node: Some(node(Kind::Dir)),
                link: None,
            }
        } else if et.is_symlink() {
            Entry {
                path,
                node: Some(node(Kind::Symlink(link_name.unwrap_or_default()))),
                link: None,
            }
        } else if et.is_hard_link() {
            let target: Vec<&str> = link_name
                .as_deref()
                .unwrap_or("")
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if target.contains(&"..") {
                return Err(format!("refusing hard link target with `..` at {path}"));
            }
            Entry {
                path,
                node: Some(node(Kind::Dir)),
                link: Some(format!("/{}", target.join("/"))),
            }
        } else if et.is_file() {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("reading {path}: {e}"))?;
            Entry {
                path,
                node: Some(node(Kind::File(data))),
                link: None,
            }
        } else {
            tracing::warn!("skipping special file {path}");
            continue;
        };
        list.push(item);
    }
    if whiteouts {
        list.retain(|e| {
            let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
            if name == OPAQUE {
                tree.clear_below(if dir.is_empty() { "/" } else { dir });
                false
            } else if let Some(victim) = name.strip_prefix(WHITEOUT) {
                tree.remove(&format!("{dir}/{victim}"));
                false
            } else {
                true
            }
        });
    }
    for e in list {
        let Some(mut node) = e.node else { continue };
        if let Some(target) = e.link {
            let t = tree
                .get(&target)
                .cloned()
                .ok_or_else(|| format!("hard link {} -> {target}: target missing", e.path))?;
            node.kind = t.kind;
        }
        tree.insert(&e.path, node);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        b.into_inner().unwrap_or_else(|e| panic!("{e}"))
    }

    fn paths(t: &Tree) -> Vec<String> {
        t.iter()
            .filter(|(_, n)| matches!(n.kind, Kind::File(_)))
            .map(|(p, _)| p.to_string())
            .collect()
    }

    #[test]
    fn whiteouts_remove_only_what_lower_layers_put_there() {
        let mut t = Tree::new();
        let lower = tar(&[
            ("a/keep", b"1"),
            ("a/gone", b"2"),
            ("o/x", b"3"),
            ("o/y", b"4"),
        ]);
        apply(&lower, &mut t, true).unwrap_or_else(|e| panic!("{e}"));
        // The opaque marker comes after the layer's own entry in that directory: it
        // still only hides the lower layer's.
        let upper = tar(&[("a/.wh.gone", b""), ("o/z", b"5"), ("o/.wh..wh..opq", b"")]);
        apply(&upper, &mut t, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(paths(&t), ["/a/keep", "/o/z"]);
        assert!(t.get("/o").is_some());
        // Without whiteouts (a .deb) such names are plain files.
        let mut d = Tree::new();
        apply(&upper, &mut d, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(paths(&d), ["/a/.wh.gone", "/o/.wh..wh..opq", "/o/z"]);
        // A name with `..`, written raw (the tar crate's builder refuses to).
        let mut h = tar::Header::new_old();
        let name = b"../../etc/passwd";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap_or_else(|e| panic!("{e}"));
        let evil = b.into_inner().unwrap_or_else(|e| panic!("{e}"));
        let e = apply(&evil, &mut d, false).err().unwrap_or_default();
        assert!(e.contains(".."), "{e}");
    }
}
