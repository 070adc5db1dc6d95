//! Signed images (`hostd key new`, `hostd build --sign`, `hostd run --trust`): a signed
//! image boots with the signer's key trusted; an unsigned one, one re-signed by another
//! key, and one whose signature was swapped in from another image are refused, by
//! `run` and by `inspect --trust`, before anything boots.

mod common;

use common::{hostd, require_qemu_guest, run_with_deadline, Output};
use std::path::Path;
use std::time::Duration;

const SPEC: &str = r#"
name = "signed-hello"
memory = "128M"
packages = ["busybox-static"]

[services.hello]
command = "/bin/busybox"
args = ["echo", "hello from a signed image"]
main = true
"#;

fn hostd_out(args: &[&str]) -> Output {
    let mut cmd = hostd();
    cmd.args(args);
    run_with_deadline(cmd, Duration::from_secs(300))
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn only_images_signed_by_a_trusted_key_boot_with_trust() {
    if !require_qemu_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    for k in ["release", "other"] {
        let out = hostd_out(&["key", "new", &s(&d(k))]);
        assert!(out.status.success(), "{}", out.all());
        assert!(out.stderr.contains("key "), "{}", out.all());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d("release.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key is private");
    // `key new` never replaces a key.
    let again = hostd_out(&["key", "new", &s(&d("release"))]);
    assert!(!again.status.success(), "{}", again.all());

    std::fs::write(d("app.toml"), SPEC).expect("spec");
    let build = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "build".to_string(),
            s(&d("app.toml")),
            "-o".into(),
            s(&d(out)),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = hostd_out(&args);
        assert!(o.status.success(), "{}", o.all());
        o
    };
    let signed = build("signed.img", &["--sign", &s(&d("release.key"))]);
    assert!(signed.stderr.contains("signed by key"), "{}", signed.all());
    build("unsigned.img", &[]);
    build("other.img", &["--sign", &s(&d("other.key"))]);
    let trust = s(&d("release.pub"));

    // inspect shows the signer; with --trust it verifies.
    let out = hostd_out(&["inspect", &s(&d("signed.img"))]);
    assert!(out.stdout.contains("not verified"), "{}", out.all());
    let out = hostd_out(&["inspect", "--trust", &trust, &s(&d("signed.img"))]);
    assert!(out.status.success(), "{}", out.all());
    assert!(
        out.stdout.contains("(verified: hostd image signed-hello"),
        "{}",
        out.all()
    );

    // The signed image boots with its key trusted.
    let out = hostd_out(&[
        "run",
        "--vmm",
        "qemu",
        "--timeout",
        "240",
        "--trust",
        &trust,
        &s(&d("signed.img")),
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("hello from a signed image"),
        "{}",
        out.all()
    );

    // The release key's signature over this build, carried by an image whose manifest
    // was changed afterwards (every digest recomputed, as a forger would).
    let swapped = d("swapped.img");
    common::rewrite_manifest(&d("signed.img"), &swapped, |m| {
        String::from_utf8(m)
            .expect("utf-8")
            .replace("\"memory_mib\": 128", "\"memory_mib\": 129")
            .into_bytes()
    });
    for (image, needle) in [
        ("unsigned.img", "is not signed"),
        ("other.img", "not among the trusted keys"),
        ("swapped.img", "does not match the image's content"),
    ] {
        for sub in [
            &["inspect", "--trust"][..],
            &["run", "--vmm", "qemu", "--trust"][..],
        ] {
            let mut args = sub.to_vec();
            let img = s(&d(image));
            args.push(&trust);
            args.push(&img);
            let out = hostd_out(&args);
            assert_eq!(out.code(), Some(1), "{image} {sub:?}: {}", out.all());
            assert!(
                out.stderr.contains(needle),
                "{image} {sub:?}: {}",
                out.all()
            );
            assert!(!out.stdout.contains("hostd-init"), "{image} was booted");
        }
    }
    // Two keys trusted: either signer is accepted.
    let out = hostd_out(&[
        "inspect",
        "--trust",
        &trust,
        "--trust",
        &s(&d("other.pub")),
        &s(&d("other.img")),
    ]);
    assert!(out.status.success(), "{}", out.all());
    // A key file that is not a key is named.
    let out = hostd_out(&[
        "inspect",
        "--trust",
        &s(&d("app.toml")),
        &s(&d("signed.img")),
    ]);
    assert!(
        out.stderr
            .contains("app.toml: cannot use it as a public key"),
        "{}",
        out.all()
    );
}
