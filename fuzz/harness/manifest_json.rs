//! The image manifest reader: arbitrary bytes as the JSON that `hostd inspect`/`run`
//! read from an image's `manifest` section and guest init reads from the initrd. A
//! manifest that parses must survive a round trip through its canonical JSON unchanged
//! (the bytes stored in an image are the canonical ones, hashed and signed), and the
//! service start order must not panic on any service graph (cycles, unknown names).

use hostd_images::manifest::Manifest;

/// One input: the manifest's bytes.
pub fn run(data: &[u8]) {
    let Ok(manifest) = Manifest::from_json(data) else {
        return;
    };
    let canonical = manifest.to_canonical_json();
    let again = Manifest::from_json(&canonical)
        .unwrap_or_else(|e| panic!("the canonical JSON of a parsed manifest does not parse: {e}"));
    assert_eq!(
        again, manifest,
        "the canonical JSON round trip changed the manifest"
    );
    assert_eq!(
        again.to_canonical_json(),
        canonical,
        "canonical JSON is not stable"
    );
    if let Some(order) = manifest.start_order() {
        assert_eq!(order.len(), manifest.services.len());
        for (i, name) in order.iter().enumerate() {
            for dep in &manifest.services[name].depends_on {
                assert!(
                    order[..i].contains(dep),
                    "service {name} starts before its dependency {dep}"
                );
            }
        }
    }
}
