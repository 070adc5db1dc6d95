//! The spec reader: arbitrary text as the TOML file a user hands to `hostd build`
//! (`Spec::parse`, strict serde plus validation). Every error must render (it names the
//! file and field, with a line number computed from the parser's byte span), and a spec
//! that is accepted must hold what the validator promises the builder: names and guest
//! paths well formed, one `main` service at most, known and acyclic dependencies,
//! unique volumes.

use std::path::Path;

use hostd_images::spec::{is_guest_path, Spec};

/// One input: the spec's text (inputs that are not UTF-8 are what `Spec::load` refuses
/// before parsing).
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let spec = match Spec::parse(text, Path::new("fuzz.toml")) {
        Ok(spec) => spec,
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.toml: "), "{message}");
            return;
        }
    };
    assert!(!spec.name.is_empty() && spec.name.len() <= 64);
    if let Some(v) = spec.vcpus {
        assert!((1..=32).contains(&v));
    }
    for f in &spec.files {
        assert!(is_guest_path(&f.path) && f.path != "/", "{}", f.path);
    }
    for s in &spec.boot {
        assert!(is_guest_path(&s.command), "{}", s.command);
    }
    let mut mains = 0;
    for (name, s) in &spec.services {
        assert!(!name.is_empty() && name.len() <= 64, "{name}");
        assert!(is_guest_path(&s.command), "{}", s.command);
        for d in &s.depends_on {
            assert!(spec.services.contains_key(d), "unknown dependency {d}");
        }
        mains += usize::from(s.main);
    }
    assert!(mains <= 1);
    let mut volumes: Vec<&str> = spec.volumes.iter().map(|v| v.name.as_str()).collect();
    volumes.sort_unstable();
    volumes.dedup();
    assert_eq!(volumes.len(), spec.volumes.len(), "a volume declared twice");
    for v in &spec.volumes {
        assert!(is_guest_path(&v.mount) && v.mount != "/", "{}", v.mount);
    }
}
