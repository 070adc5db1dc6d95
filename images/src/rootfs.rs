//! An in-memory root file system tree and its cpio "newc" serialisation (the initrd).
//!
//! Reproducible by construction: entries are sorted by path, every mtime is 0, inode
//! numbers are assigned in path order, owners and modes come only from the spec or
//! the package.

use std::collections::BTreeMap;

use crate::names::{MAX_GUEST_NAME, MAX_GUEST_PATH};

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: Kind,
    /// Permission bits (0o7777 mask).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// A root file system under construction. Paths are absolute and normalised.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) `path`, creating missing parent directories (0755, root).
    /// A later insert of a directory over an existing directory keeps the first.
    pub fn insert(&mut self, path: &str, node: Node) {
        let path = normalise(path);
        if path == "/" {
            return;
        }
        let mut parent = String::new();
        let comps: Vec<&str> = path[1..].split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            parent.push('/');
            parent.push_str(comp);
            let is_dir = matches!(
                self.nodes.get(&parent),
                Some(Node {
                    kind: Kind::Dir,
                    ..
                })
            );
            if !is_dir {
                self.nodes.insert(
                    parent.clone(),
                    Node {
                        kind: Kind::Dir,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                    },
                );
            }
        }
        if node.kind == Kind::Dir {
            if let Some(Node {
                kind: Kind::Dir, ..
            }) = self.nodes.get(&path)
            {
                return;
            }
        }
        // Replacing a directory with a non-directory drops whatever was below it.
        if node.kind != Kind::Dir {
            let prefix = format!("{path}/");
            self.nodes.retain(|k, _| !k.starts_with(&prefix));
        }
        self.nodes.insert(path, node);
    }

    /// As [`Tree::insert`], but a directory already there takes the new node's mode and
    /// owner (a `[[files]]` entry overrides what packages made).
    pub fn insert_over(&mut self, path: &str, node: Node) {
        let key = normalise(path);
        match self.nodes.get_mut(&key) {
            Some(old) if old.kind == Kind::Dir && node.kind == Kind::Dir => *old = node,
            _ => self.insert(path, node),
        }
    }

    /// Removes `path` and everything below it (an OCI layer's whiteout).
    pub fn remove(&mut self, path: &str) {
        let path = normalise(path);
        let prefix = format!("{path}/");
        self.nodes
            .retain(|k, _| *k != path && !k.starts_with(&prefix));
    }

    /// Removes everything below `dir`, keeping `dir` (an OCI opaque whiteout).
    pub fn clear_below(&mut self, dir: &str) {
        let path = normalise(dir);
        let prefix = if path == "/" {
            path
        } else {
            format!("{path}/")
        };
        self.nodes.retain(|k, _| !k.starts_with(&prefix));
    }

    /// Looks up a path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(&normalise(path))
    }

    /// Every entry, sorted by path (a directory comes before everything below it).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(p, n)| (p.as_str(), n))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The first entry the guest's kernel could not create as it is, and why: a name
    /// longer than [`MAX_GUEST_NAME`] bytes, a path or a symlink target longer than
    /// [`MAX_GUEST_PATH`]. (The kernel skips such an initramfs entry without a word, and a
    /// file of the image would be missing in the guest.) None when there is none.
    pub fn unrepresentable(&self) -> Option<String> {
        let short = |s: &str| match s.char_indices().nth(48) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s.to_string(),
        };
        self.nodes.iter().find_map(|(path, node)| {
            if path.len() > MAX_GUEST_PATH {
                return Some(format!(
                    "`{}` is a path of {} bytes; Linux takes at most {MAX_GUEST_PATH}",
                    short(path),
                    path.len()
                ));
            }
            if let Some(name) = path.split('/').find(|c| c.len() > MAX_GUEST_NAME) {
                return Some(format!(
                    "`{}` has a name of {} bytes (`{}`); Linux allows at most {MAX_GUEST_NAME}",
                    short(path),
                    name.len(),
                    short(name)
                ));
            }
            match &node.kind {
                Kind::Symlink(t) if t.len() > MAX_GUEST_PATH => Some(format!(
                    "`{}` is a symlink to a target of {} bytes; Linux takes at most {MAX_GUEST_PATH}",
                    short(path),
                    t.len()
                )),
                _ => None,
            }
        })
    }

    /// Serialises the tree as a cpio newc archive (what the kernel unpacks as initramfs).
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (type_bits, data, rdev): (u32, &[u8], (u32, u32)) = match &node.kind {
                Kind::Dir => (0o040000, &[], (0, 0)),
                Kind::File(d) => (0o100000, d, (0, 0)),
                Kind::Symlink(t) => (0o120000, t.as_bytes(), (0, 0)),
                Kind::CharDev(ma, mi) => (0o020000, &[], (*ma, *mi)),
            };
            let nlink = if node.kind == Kind::Dir { 2 } else { 1 };
            cpio_entry(
                &mut out,
                &path[1..],
                ino as u32 + 1,
                type_bits | (node.mode & 0o7777),
                node.uid,
                node.gid,
                nlink,
                rdev,
                data,
            );
        }
        cpio_entry(&mut out, "TRAILER!!!", 0, 0, 0, 0, 1, (0, 0), &[]);
        out
    }
}

/// Collapses duplicate slashes and a trailing slash; adds a leading slash.
fn normalise(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

#[allow(clippy::too_many_arguments)]
fn cpio_entry(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        uid,
        gid,
        nlink,
        0, // mtime: fixed for reproducibility
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        namesize as u32,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(d: &[u8]) -> Node {
        Node {
            kind: Kind::File(d.to_vec()),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn a_directory_entry_over_a_directory_takes_its_mode_and_owner() {
        let dir = |mode, uid| Node {
            kind: Kind::Dir,
            mode,
            uid,
            gid: uid,
        };
        let mut t = Tree::default();
        t.insert("/usr/share/doc", dir(0o755, 0));
        // A package's directory again: the first one's attributes stay.
        t.insert("/usr/share/doc", dir(0o700, 7));
        assert_eq!(
            t.get("/usr/share/doc").map(|n| (n.mode, n.uid)),
            Some((0o755, 0))
        );
        // A [[files]] directory: its attributes win.
        t.insert_over("/usr/share/doc", dir(0o711, 5));
        assert_eq!(
            t.get("/usr/share/doc").map(|n| (n.mode, n.uid)),
            Some((0o711, 5))
        );
    }

    #[test]
    fn parents_are_created_and_order_is_stable() {
        let mut a = Tree::new();
        a.insert("/b/c/d", file(b"x"));
        a.insert("/a", file(b"y"));
        let mut b = Tree::new();
        b.insert("/a", file(b"y"));
        b.insert("//b/c/d", file(b"x"));
        assert_eq!(
            a.get("/b/c"),
            Some(&Node {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0
            })
        );
        assert_eq!(a.to_cpio(), b.to_cpio());
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn cpio_is_newc_and_padded() {
        let mut t = Tree::new();
        t.insert("/init", file(b"abc"));
        let c = t.to_cpio();
        assert!(c.starts_with(b"070701"));
        assert_eq!(c.len() % 4, 0);
        // header (110) + "init\0" (5) -> padded to 116, then "abc" padded to 4.
        assert_eq!(&c[116..119], b"abc");
        assert!(c.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn replacing_a_dir_with_a_file_drops_its_children() {
        let mut t = Tree::new();
        t.insert("/a/b", file(b"x"));
        t.insert("/a", file(b"y"));
        assert!(t.get("/a/b").is_none());
    }

    #[test]
    fn entries_linux_cannot_create_are_named() {
        let mut t = Tree::default();
        t.insert(&format!("/etc/{}", "n".repeat(255)), file(b"x"));
        assert_eq!(t.unrepresentable(), None);
        t.insert(&format!("/opt/{}/f", "m".repeat(300)), file(b"x"));
        let why = t.unrepresentable().expect("a long name");
        assert!(why.contains("a name of 300 bytes"), "{why}");
        let mut t = Tree::default();
        t.insert(
            "/l",
            Node {
                kind: Kind::Symlink("/t".repeat(2100)),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        );
        let why = t.unrepresentable().expect("a long target");
        assert!(why.contains("symlink to a target of 4200 bytes"), "{why}");
        let mut t = Tree::default();
        t.insert(&"/d".repeat(2100), file(b"x"));
        assert!(t
            .unrepresentable()
            .is_some_and(|w| w.contains("is a path of 4096 bytes")));
    }
}
