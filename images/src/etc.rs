//! The files a Debian system's maintainer scripts and installer would have made, made
//! at build time instead (maintainer scripts never run): accounts from the spec's
//! `[[users]]` and `[[groups]]` merged over what the packages ship (base-passwd's
//! master files), `/etc/hostname`, `/etc/hosts` and `/etc/os-release`.
//!
//! Everything here is written before the spec's `files`, so a spec can still replace
//! any of it. Entries keep the packages' order, then the spec's, so the bytes depend on
//! nothing but the inputs.

use crate::rootfs::{Kind, Node, Tree};
use crate::spec::Spec;

/// Where `/etc/resolv.conf` points: the file guest init writes at boot
/// ([`crate::abi::RESOLV_CONF`]), relative so it holds in any root.
pub const RESOLV_CONF_TARGET: &str = "../run/hostd/resolv.conf";

fn file(data: String, mode: u32, gid: u32) -> Node {
    Node {
        kind: Kind::File(data.into_bytes()),
        mode,
        uid: 0,
        gid,
    }
}

/// The text of the first of `paths` that is a file in `tree`.
fn existing(tree: &Tree, paths: &[&str]) -> Option<String> {
    paths.iter().find_map(|p| match tree.get(p) {
        Some(Node {
            kind: Kind::File(d),
            ..
        }) => Some(String::from_utf8_lossy(d).into_owned()),
        _ => None,
    })
}

/// `name:...` lines, in order; lines without a name are dropped.
fn entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let name = l.split(':').next()?;
            (!name.is_empty() && !l.starts_with('#')).then(|| (name.to_string(), l.to_string()))
        })
        .collect()
}

/// Replaces the entry named `name`, or appends it.
fn upsert(list: &mut Vec<(String, String)>, name: &str, line: String) {
    match list.iter_mut().find(|(n, _)| n == name) {
        Some(e) => e.1 = line,
        None => list.push((name.to_string(), line)),
    }
}

fn join(list: &[(String, String)]) -> String {
    list.iter().map(|(_, l)| format!("{l}\n")).collect()
}

/// Writes /etc/passwd, /etc/group, /etc/shadow, /etc/hostname, /etc/hosts and
/// /etc/os-release into `tree`.
pub fn write(tree: &mut Tree, spec: &Spec, hostname: &str) {
    let mut passwd = entries(
        &existing(
            tree,
            &["/etc/passwd", "/usr/share/base-passwd/passwd.master"],
        )
        .unwrap_or_else(|| "root:x:0:0:root:/root:/bin/sh\n".into()),
    );
    let mut group = entries(
        &existing(tree, &["/etc/group", "/usr/share/base-passwd/group.master"])
            .unwrap_or_else(|| "root:x:0:\n".into()),
    );
    let old_shadow = entries(&existing(tree, &["/etc/shadow"]).unwrap_or_default());

    for g in &spec.groups {
        upsert(
            &mut group,
            &g.name,
            format!("{}:x:{}:{}", g.name, g.gid, g.members.join(",")),
        );
    }
    for u in &spec.users {
        // Fields the spec leaves out keep the packages' values for an account they
        // ship, else get the defaults.
        let old: Vec<String> = passwd
            .iter()
            .find(|(n, _)| n == &u.name)
            .map(|(_, l)| l.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let old_field = |i: usize| old.get(i).filter(|f| !f.is_empty()).cloned();
        let gid = u
            .gid
            .or_else(|| old_field(3).and_then(|g| g.parse().ok()))
            .unwrap_or(u.uid);
        let home = u
            .home
            .clone()
            .or_else(|| old_field(5))
            .unwrap_or_else(|| "/nonexistent".into());
        let shell = u
            .shell
            .clone()
            .or_else(|| old_field(6))
            .unwrap_or_else(|| "/usr/sbin/nologin".into());
        let gecos = old_field(4).unwrap_or_else(|| u.name.clone());
        upsert(
            &mut passwd,
            &u.name,
            format!("{}:x:{}:{gid}:{gecos}:{home}:{shell}", u.name, u.uid),
        );
        // A user's own group, as `adduser --group` makes it, unless one has that id
        // or name already.
        let gid_s = gid.to_string();
        let taken = group
            .iter()
            .any(|(n, l)| n == &u.name || l.split(':').nth(2) == Some(gid_s.as_str()));
        if !taken {
            group.push((u.name.clone(), format!("{}:x:{gid}:", u.name)));
        }
    }
    // Every account gets a shadow entry: the packages' when they shipped one, else a
    // locked password (`*`), so no account can log in with a password.
    let shadow: Vec<(String, String)> = passwd
        .iter()
        .map(|(name, _)| {
            let line = old_shadow
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, l)| l.clone())
                .unwrap_or_else(|| format!("{name}:*:0:0:99999:7:::"));
            (name.clone(), line)
        })
        .collect();
    let shadow_gid = group
        .iter()
        .find(|(n, _)| n == "shadow")
        .and_then(|(_, l)| l.split(':').nth(2)?.parse().ok())
        .unwrap_or(0);

    tree.insert("/etc/passwd", file(join(&passwd), 0o644, 0));
    tree.insert("/etc/group", file(join(&group), 0o644, 0));
    tree.insert("/etc/shadow", file(join(&shadow), 0o640, shadow_gid));
    tree.insert("/etc/hostname", file(format!("{hostname}\n"), 0o644, 0));
    tree.insert(
        "/etc/hosts",
        file(
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\
                 ::1\tlocalhost ip6-localhost ip6-loopback\n"
            ),
            0o644,
            0,
        ),
    );
    // Guest init writes the resolver configuration at boot (the spec's `network`, or
    // `hostd run --net dns=`) on the writable /run; the root may be read-only.
    tree.insert(
        "/etc/resolv.conf",
        Node {
            kind: Kind::Symlink(RESOLV_CONF_TARGET.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        },
    );
    if tree.get("/etc/os-release").is_none() {
        let node = if tree.get("/usr/lib/os-release").is_some() {
            Node {
                kind: Kind::Symlink("../usr/lib/os-release".into()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            }
        } else {
            file(
                format!(
                    "PRETTY_NAME=\"hostd image {0}\"\nNAME=\"hostd\"\nID=hostd\n\
                     VARIANT_ID={0}\n",
                    spec.name
                ),
                0o644,
                0,
            )
        };
        tree.insert("/etc/os-release", node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn text(tree: &Tree, p: &str) -> String {
        existing(tree, &[p]).unwrap_or_default()
    }

    #[test]
    fn accounts_merge_over_the_packages() {
        let spec = Spec::parse(
            "name = \"x\"\n\
             [[users]]\nname = \"redis\"\nuid = 100\ngid = 101\nhome = \"/var/lib/redis\"\n\
             [[users]]\nname = \"app\"\nuid = 1000\n\
             [[users]]\nname = \"daemon\"\nuid = 1\nshell = \"/bin/sh\"\n\
             [[groups]]\nname = \"redis\"\ngid = 101\nmembers = [\"app\"]\n",
            Path::new("app.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut tree = Tree::new();
        tree.insert(
            "/usr/share/base-passwd/passwd.master",
            file(
                "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
                    .into(),
                0o644,
                0,
            ),
        );
        tree.insert(
            "/usr/share/base-passwd/group.master",
            file("root:x:0:\ndaemon:x:1:\nshadow:x:42:\n".into(), 0o644, 0),
        );
        write(&mut tree, &spec, "box");
        assert_eq!(
            text(&tree, "/etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\n\
             daemon:x:1:1:daemon:/usr/sbin:/bin/sh\n\
             redis:x:100:101:redis:/var/lib/redis:/usr/sbin/nologin\n\
             app:x:1000:1000:app:/nonexistent:/usr/sbin/nologin\n"
        );
        assert_eq!(
            text(&tree, "/etc/group"),
            "root:x:0:\ndaemon:x:1:\nshadow:x:42:\nredis:x:101:app\napp:x:1000:\n"
        );
        assert!(text(&tree, "/etc/shadow").contains("redis:*:0:0:99999:7:::\n"));
        assert_eq!(
            tree.get("/etc/shadow").map(|n| (n.mode, n.gid)),
            Some((0o640, 42))
        );
        assert_eq!(text(&tree, "/etc/hostname"), "box\n");
        assert!(text(&tree, "/etc/hosts").contains("127.0.1.1\tbox\n"));
        assert!(text(&tree, "/etc/os-release").contains("ID=hostd"));
        assert_eq!(
            tree.get("/etc/resolv.conf").map(|n| n.kind.clone()),
            Some(Kind::Symlink("../run/hostd/resolv.conf".into()))
        );
        // The same inputs, the same bytes.
        let mut again = Tree::new();
        for (p, n) in tree.iter().filter(|(p, _)| p.starts_with("/usr")) {
            again.insert(p, n.clone());
        }
        write(&mut again, &spec, "box");
        assert_eq!(text(&again, "/etc/passwd"), text(&tree, "/etc/passwd"));
    }
}
