//! The Debian package index reader and the dependency resolver: arbitrary bytes as the
//! `Packages` text `hostd build` reads from the host's apt lists (untrusted: a mirror
//! writes it). Parsing must not panic; resolving any package the text names must end
//! (no endless loop on cyclic or self-providing packages) without a panic; version
//! comparison must be antisymmetric.

use hostd_images::packages::{index::Index, resolve::resolve, version::compare};

/// One input: the text of a Packages file.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let index = Index::parse(text);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Package:"))
        .map(str::trim)
        .take(4)
        .collect();
    let versions: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Version:"))
        .map(str::trim)
        .take(8)
        .collect();
    for a in &versions {
        for b in &versions {
            assert_eq!(
                compare(a, b),
                compare(b, a).reverse(),
                "version order is not antisymmetric for {a:?} and {b:?}"
            );
        }
    }
    for name in &names {
        let _ = resolve(&index, &[name.to_string()], &[]);
        let _ = resolve(
            &index,
            &[name.to_string()],
            &names[..1].iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
    }
}
