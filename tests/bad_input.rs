//! Bad input, as a careless or hostile user gives it, to `build`, `inspect` and `run`:
//! each case must end quickly (every command runs under a deadline that fails the test),
//! with a non-zero exit and an error naming the input, leaving every original file as
//! it was and nothing behind. None of these boot a guest; they use a stand-in kernel.

mod common;

use common::{fake_kernel, hostd, mkfifo, run_with_deadline, Output};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn hostd_out(args: &[&str]) -> Output {
    let mut cmd = hostd();
    cmd.args(args);
    run_with_deadline(cmd, LIMIT)
}

/// Asserts `out` failed with exit code 1 (or 2 for clap's usage errors) and its
/// stderr holds every one of `needles`.
fn refused(out: &Output, needles: &[&str]) {
    assert!(
        matches!(out.code(), Some(1) | Some(2)),
        "expected a refusal (exit 1 or 2):\n{}",
        out.all()
    );
    for n in needles {
        assert!(out.stderr.contains(n), "error lacks {n:?}:\n{}", out.all());
    }
    assert!(
        !out.stdout.contains("hostd-init"),
        "a guest was booted:\n{}",
        out.all()
    );
}

struct Ctx {
    dir: tempfile::TempDir,
}

impl Ctx {
    fn new() -> Ctx {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_kernel(dir.path());
        Ctx { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    /// Writes app.toml (`name = "t"`, the stand-in kernel, then `body`) and builds it
    /// into `out`.
    fn build(&self, body: &str, out: &str, extra: &[&str]) -> Output {
        std::fs::write(
            self.path("app.toml"),
            format!("name = \"t\"\nkernel = \"vmlinux\"\n{body}\n"),
        )
        .expect("write spec");
        let spec = self.s("app.toml");
        let out = if out.starts_with('/') {
            out.to_string()
        } else {
            self.s(out)
        };
        let mut args = vec!["build", spec.as_str(), "-o", out.as_str()];
        args.extend_from_slice(extra);
        hostd_out(&args)
    }
    /// Every entry of the directory but the ones a test made on purpose.
    fn leftovers(&self, expected: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !expected.contains(&n.as_str()))
            .collect();
        names.sort();
        names
    }
}

#[test]
fn package_names_never_reach_apt_as_options() {
    let c = Ctx::new();
    // With `--config-file=FILE`, apt would read a configuration of the spec author's
    // choosing; that one would run a program as root.
    std::fs::write(
        c.path("evil.conf"),
        format!(
            "APT::Update::Pre-Invoke {{ \"touch {}\"; }};\nDPkg::Pre-Invoke {{ \"touch {}\"; }};\n",
            c.s("pwned"),
            c.s("pwned")
        ),
    )
    .expect("write");
    for pkg in [
        format!("--config-file={}", c.s("evil.conf")),
        "-c/etc/passwd".to_string(),
        "-oDebug::pkgProblemResolver=1".to_string(),
        "busybox-static=--version".to_string(),
        "busybox-static/bookworm".to_string(),
        "Busybox".to_string(),
        "x".to_string(),
        "busybox static".to_string(),
    ] {
        let out = c.build(&format!("packages = [{pkg:?}]"), "app.img", &[]);
        refused(
            &out,
            &["app.toml", "packages[0]", "not a Debian package name"],
        );
        assert!(
            !c.path("pwned").exists(),
            "{pkg}: apt ran the spec's program"
        );
        assert!(!c.path("app.img").exists());
    }
    assert_eq!(
        c.leftovers(&["vmlinux", "app.toml", "evil.conf"]),
        Vec::<String>::new()
    );
}

#[test]
fn a_spec_reads_only_files_under_its_build_context() {
    let outer = tempfile::tempdir().expect("tempdir");
    std::fs::write(outer.path().join("outside.txt"), "host secret").expect("write");
    let ctx_dir = outer.path().join("ctx");
    std::fs::create_dir(&ctx_dir).expect("mkdir");
    fake_kernel(&ctx_dir);
    std::os::unix::fs::symlink("/etc/shadow", ctx_dir.join("innocent")).expect("symlink");
    std::os::unix::fs::symlink("../outside.txt", ctx_dir.join("up")).expect("symlink");
    let spec = ctx_dir.join("app.toml");
    let img = ctx_dir.join("app.img");
    let build = |source: &str, extra: &[&str]| {
        std::fs::write(
            &spec,
            format!(
                "name = \"t\"\nkernel = \"vmlinux\"\n[[files]]\npath = \"/etc/x\"\nsource = {source:?}\n"
            ),
        )
        .expect("write");
        let mut cmd = hostd();
        cmd.arg("build").arg(&spec).arg("-o").arg(&img).args(extra);
        run_with_deadline(cmd, LIMIT)
    };
    for source in [
        "../../../etc/shadow",
        "/etc/shadow",
        "innocent",
        "up",
        "../outside.txt",
    ] {
        let out = build(source, &[]);
        refused(
            &out,
            &["files[0].source", "outside the build context", "--context"],
        );
        assert!(!img.exists(), "{source}: an image was written");
    }
    // The kernel path is confined the same way.
    std::fs::write(&spec, "name = \"t\"\nkernel = \"../../vmlinux\"\n").expect("write");
    let mut cmd = hostd();
    cmd.arg("build").arg(&spec).arg("-o").arg(&img);
    refused(&run_with_deadline(cmd, LIMIT), &["`kernel`"]);
    // An explicit, wider context is the documented opt-in.
    let out = build(
        "../outside.txt",
        &["--context", &outer.path().to_string_lossy()],
    );
    assert!(out.status.success(), "{}", out.all());
    assert!(img.exists());
}

#[test]
fn fifos_devices_and_directories_are_refused_quickly_by_name() {
    let c = Ctx::new();
    mkfifo(&c.path("fifo"));
    // A spec that is a FIFO, a device, a directory.
    for (spec, kind) in [
        (c.s("fifo"), "FIFO"),
        ("/dev/zero".into(), "character device"),
        (c.s(""), "directory"),
    ] {
        let out = hostd_out(&["build", &spec, "-o", &c.s("app.img")]);
        refused(&out, &[&spec, kind]);
    }
    // A files[].source that is a FIFO or a device node inside the context (a symlink
    // to /dev/zero is refused as outside the context, before its type matters).
    std::os::unix::fs::symlink("/dev/zero", c.path("zero")).expect("symlink");
    let out = c.build(
        "[[files]]\npath = \"/x\"\nsource = \"zero\"",
        "app.img",
        &[],
    );
    refused(&out, &["files[0].source", "resolves to /dev/zero"]);
    let mut sources = vec!["fifo"];
    if common::is_root() {
        let node = std::ffi::CString::new(c.s("zero-node")).expect("path");
        // SAFETY: a valid path; makes a character device node (1, 5) like /dev/zero.
        let r = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) };
        assert_eq!(r, 0, "mknod");
        sources.push("zero-node");
    }
    for source in sources {
        let out = c.build(
            &format!("[[files]]\npath = \"/x\"\nsource = {source:?}"),
            "app.img",
            &[],
        );
        refused(&out, &["files[0].source", "not a regular file"]);
    }
    // An image, a kernel, an initrd, a secret that is a FIFO or a device.
    for image in [c.s("fifo"), "/dev/zero".into()] {
        refused(
            &hostd_out(&["inspect", &image]),
            &[&image, "not a regular file"],
        );
        refused(
            &hostd_out(&["run", "--vmm", "qemu", &image]),
            &[&image, "not a regular file"],
        );
    }
    refused(
        &hostd_out(&["run", "--vmm", "qemu", "--kernel", "/dev/zero"]),
        &["--kernel", "/dev/zero", "character device"],
    );
    let vmlinux = c.s("vmlinux");
    refused(
        &hostd_out(&[
            "run",
            "--vmm",
            "qemu",
            "--kernel",
            &vmlinux,
            "--initrd",
            &c.s("fifo"),
        ]),
        &["--initrd", "FIFO"],
    );
    assert!(c.build("", "app.img", &[]).status.success());
    let img = c.s("app.img");
    for secret in [c.s("fifo"), "/dev/zero".into()] {
        let arg = format!("s=@{secret}");
        refused(
            &hostd_out(&["run", "--vmm", "qemu", "--secret", &arg, &img]),
            &["secret s", "not a regular file"],
        );
    }
}

#[test]
fn outputs_never_clobber_inputs_or_special_files() {
    let c = Ctx::new();
    std::fs::write(c.path("data.txt"), "keep me").expect("write");
    let spec_body = "[[files]]\npath = \"/data\"\nsource = \"data.txt\"";
    // -o onto the spec itself, a source file, the kernel.
    for (out_name, needle) in [
        ("app.toml", "the spec itself"),
        ("data.txt", "files[0].source"),
        ("vmlinux", "kernel"),
    ] {
        let before = std::fs::read(c.path(out_name)).ok();
        let out = c.build(spec_body, out_name, &[]);
        refused(&out, &[needle]);
        if out_name != "app.toml" {
            assert_eq!(
                before,
                std::fs::read(c.path(out_name)).ok(),
                "{out_name} changed"
            );
        }
    }
    let spec = std::fs::read_to_string(c.path("app.toml")).expect("read");
    assert!(spec.contains("name = \"t\""), "the spec was replaced");
    // With packages, the lock file goes beside the spec: never onto the image or the spec.
    let out = c.build("packages = [\"busybox-static\"]", "app.lock", &[]);
    refused(&out, &["app.lock", "lock file"]);
    assert!(!c.path("app.lock").exists());
    std::fs::write(
        c.path("x.lock"),
        "name = \"t\"\nkernel = \"vmlinux\"\npackages = [\"busybox-static\"]\n",
    )
    .expect("write");
    let out = hostd_out(&["build", &c.s("x.lock"), "-o", &c.s("x.img")]);
    refused(&out, &["would be the spec itself"]);
    assert!(std::fs::read_to_string(c.path("x.lock")).is_ok_and(|s| s.contains("name = \"t\"")));
    std::fs::remove_file(c.path("x.lock")).expect("rm");
    // -o onto a device node, a directory, a FIFO.
    mkfifo(&c.path("fifo"));
    std::fs::create_dir(c.path("adir")).expect("mkdir");
    for out_path in ["/dev/null".to_string(), c.s("adir"), c.s("fifo")] {
        let out = c.build(spec_body, &out_path, &[]);
        refused(&out, &[&out_path, "not a regular file"]);
    }
    let null = std::fs::metadata("/dev/null").expect("stat /dev/null");
    assert!(null.file_type().is_char_device(), "/dev/null was replaced");
    assert!(c.path("adir").is_dir());
    assert_eq!(
        c.leftovers(&["vmlinux", "app.toml", "data.txt", "fifo", "adir"]),
        Vec::<String>::new()
    );
}

#[test]
fn values_out_of_range_are_refused_never_cut_or_wrapped() {
    let c = Ctx::new();
    for (body, field) in [
        (
            "[[files]]\npath = \"/x\"\ncontents = \"\"\nowner = \"4294967295:0\"",
            "files[0].owner",
        ),
        (
            "[[files]]\npath = \"/x\"\ncontents = \"\"\nowner = \"0:4294967296\"",
            "files[0].owner",
        ),
        (
            "[[volumes]]\nname = \"d\"\nsize = \"4000G\"\nmount = \"/d\"",
            "volumes[0].size",
        ),
        (
            "[[volumes]]\nname = \"d\"\nsize = \"1M\"\nmount = \"/d\"",
            "volumes[0].size",
        ),
        ("vcpus = 0", "vcpus"),
        ("vcpus = 4294967296", "vcpus"),
        ("memory = \"100G\"", "memory"),
        ("stop_timeout = 99999999", "stop_timeout"),
        (
            "[services.a]\ncommand = \"/a\"\nuser = \"4294967295\"",
            "services.a",
        ),
    ] {
        let out = c.build(body, "app.img", &[]);
        refused(&out, &["app.toml", &format!("`{field}`")]);
        assert!(!c.path("app.img").exists(), "{body}");
    }
    let long = format!("cmdline = \"{}\"", "a".repeat(3000));
    refused(&c.build(&long, "app.img", &[]), &["`cmdline`", "2048"]);

    assert!(c.build("", "app.img", &[]).status.success());
    let img = c.s("app.img");
    let long = "x".repeat(3000);
    let near = "y".repeat(2000);
    for (args, needle) in [
        (vec!["--cmdline", long.as_str()], "--cmdline"),
        (vec!["--cmdline", near.as_str()], "at most 2047 fit"),
        (vec!["--vcpus", "0"], "--vcpus 0"),
        (vec!["--vcpus", "33"], "--vcpus 33"),
        (vec!["--vcpus", "4294967297"], "--vcpus"),
        (vec!["--mem", "0"], "--mem"),
        (vec!["--mem", "100G"], "--mem 100G"),
        (vec!["--timeout", "0"], "--timeout 0"),
        (vec!["--timeout", "18446744073709551615"], "--timeout"),
        (vec!["--net", "tap=averyveryverylongname"], "tap"),
        (vec!["--net", "tap=t0,mac=zz:00:00:00:00:00"], "mac"),
        (vec!["--net", "tap=t0,mac=01:00:00:00:00:00"], "multicast"),
    ] {
        let mut full = vec!["run", "--vmm", "qemu"];
        full.extend(args.iter());
        full.push(&img);
        refused(&hostd_out(&full), &[needle]);
    }
    // A flag for the other monitor is refused rather than ignored.
    refused(
        &hostd_out(&["run", "--vmm", "kvm", "--accel", "tcg", &img]),
        &["--accel applies to --vmm qemu only"],
    );
    refused(
        &hostd_out(&["run", "--vmm", "qemu", "--cpu-template", "pvm", &img]),
        &["--cpu-template applies to the built-in VMM only"],
    );
    // Refused rather than ignored: an initrd beside an image, keys for a bare kernel.
    refused(
        &hostd_out(&["run", "--initrd", &img, &img]),
        &["--initrd applies to --kernel only"],
    );
    refused(
        &hostd_out(&["run", "--kernel", &img, "--trust", &img]),
        &["--trust checks an image's signature"],
    );
}

/// Rewrites `img`'s manifest JSON with `edit` into `out`, every digest correct.
fn hand_made(img: &Path, out: &Path, edit: impl Fn(&mut serde_json::Value)) {
    common::rewrite_manifest(img, out, |bytes| {
        let mut m: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest json");
        edit(&mut m);
        serde_json::to_vec(&m).expect("json")
    });
}

#[test]
fn a_hand_made_manifest_is_checked_again_when_an_image_is_read() {
    let c = Ctx::new();
    let out = c.build(
        "[[volumes]]\nname = \"data\"\nsize = \"16M\"\nmount = \"/data\"",
        "app.img",
        &[],
    );
    assert!(out.status.success(), "{}", out.all());
    let state = c.path("state");
    let state_s = state.to_string_lossy().into_owned();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 6] = [
        (
            |m| m["volumes"][0]["name"] = "../x".into(),
            "volumes[0].name",
        ),
        (
            |m| m["volumes"][0]["name"] = "/etc/passwd".into(),
            "volumes[0].name",
        ),
        (
            |m| m["volumes"][0]["size_mib"] = 4_096_000.into(),
            "volumes[0].size_mib",
        ),
        (|m| m["vcpus"] = 0.into(), "manifest field `vcpus`"),
        (|m| m["memory_mib"] = 1.into(), "memory_mib"),
        (|m| m["cmdline"] = "x".repeat(3000).into(), "cmdline"),
    ];
    for (edit, needle) in cases {
        hand_made(&c.path("app.img"), &c.path("bad.img"), edit);
        let bad = c.s("bad.img");
        refused(&hostd_out(&["inspect", &bad]), &[&bad, needle]);
        let out = hostd_out(&["run", "--vmm", "qemu", "--state-dir", &state_s, &bad]);
        refused(&out, &[needle]);
        assert!(!out.stderr.contains("--vcpus"), "{}", out.all());
    }
    assert!(!c.path("x").exists() && !c.path("x.ext4").exists());
    assert!(!state.join("x.ext4").exists() && !state.join("volumes").exists());
}

#[test]
fn every_byte_of_an_image_is_covered_and_required_sections_are_not_empty() {
    let c = Ctx::new();
    assert!(c.build("", "app.img", &[]).status.success());
    let good = std::fs::read(c.path("app.img")).expect("read");
    let sections = common::sections(&good);
    let (_, off, len) = sections[0].clone();
    // A byte in the padding after the manifest (covered by no section digest).
    let mut img = good.clone();
    img[off + len + 1] = 0x55;
    std::fs::write(c.path("bad.img"), &img).expect("write");
    let bad = c.s("bad.img");
    refused(&hostd_out(&["inspect", &bad]), &["padding"]);
    refused(&hostd_out(&["run", "--vmm", "qemu", &bad]), &["padding"]);
    // A hand-made image whose kernel section is empty (digests correct).
    use hostd_images::format;
    let image = format::Image::open(&c.path("app.img")).expect("open");
    let manifest = image.read_section("manifest").expect("manifest");
    let initrd = image.read_section("initrd").expect("initrd");
    let empty = format::write_image(&[
        ("manifest", &manifest),
        ("kernel", b""),
        ("initrd", &initrd),
    ])
    .expect("write_image");
    std::fs::write(c.path("bad.img"), empty).expect("write");
    refused(
        &hostd_out(&["inspect", &bad]),
        &["section `kernel`", "empty"],
    );
}

#[test]
fn each_cause_is_printed_once() {
    let c = Ctx::new();
    let missing = c.s("missing.toml");
    let out = hostd_out(&["build", &missing, "-o", &c.s("app.img")]);
    refused(&out, &[&missing]);
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        out.all()
    );
    let out = hostd_out(&["inspect", &c.s("missing.img")]);
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        out.all()
    );
    let out = c.build(
        "[[files]]\npath = \"/x\"\nsource = \"nope\"",
        "app.img",
        &[],
    );
    refused(&out, &["files[0].source"]);
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        out.all()
    );
}

#[test]
fn an_interrupted_build_leaves_no_scratch_files() {
    let c = Ctx::new();
    let tmp = c.path("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    // A large source makes the erofs staging and packing take a while.
    let big = std::fs::File::create(c.path("big.bin")).expect("create");
    big.set_len(768 << 20).expect("size");
    drop(big);
    std::fs::write(
        c.path("app.toml"),
        "name = \"t\"\nkernel = \"vmlinux\"\nroot = \"erofs\"\n[[files]]\npath = \"/big\"\nsource = \"big.bin\"\n",
    )
    .expect("write");
    let mut cmd = hostd();
    cmd.env("TMPDIR", &tmp)
        .arg("build")
        .arg(c.path("app.toml"))
        .arg("-o")
        .arg(c.path("app.img"));
    let running = common::spawn_running(cmd);
    // Wait until the build has scratch material in TMPDIR, then interrupt it.
    let start = std::time::Instant::now();
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(start.elapsed() < LIMIT, "the build never staged anything");
        std::thread::sleep(Duration::from_millis(10));
    }
    running.signal(libc::SIGTERM);
    let out = running.finish(LIMIT);
    assert_eq!(out.code(), Some(128 + libc::SIGTERM), "{}", out.all());
    assert_eq!(
        std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(99),
        0,
        "scratch files left in TMPDIR"
    );
    assert_eq!(
        c.leftovers(&["vmlinux", "app.toml", "big.bin", "tmp"]),
        Vec::<String>::new()
    );
}
