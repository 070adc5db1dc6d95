//! Shared helpers for the end-to-end tests: the hostd binary, prerequisites that skip
//! loudly (or fail under CI=true), building images and running them with a deadline.
#![allow(dead_code)]

pub mod kvmhost;
pub mod netns;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The hostd binary under test, building images with this checkout's kernel.
pub fn hostd() -> Command {
    let mut c = Command::new(hostd_exe());
    c.env("HOSTD_KERNEL", kernel());
    c
}

/// `hostd` as it is shipped: the VM path's two executables (`hostd`, `hostd-backend`)
/// built for musl (docs/startup.md, "musl"), with this build's `hostd-full` beside them,
/// in `target/hostd-dist/PROFILE/`. Built with cargo the first time a test process (or
/// a nextest run) asks, so a test never runs stale executables.
pub fn hostd_exe() -> &'static Path {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| dist_dir().join("hostd"))
}

fn dist_dir() -> PathBuf {
    const MUSL: &str = "x86_64-unknown-linux-musl";
    let full = Path::new(env!("CARGO_BIN_EXE_hostd-full"));
    // target/x86_64-unknown-linux-gnu/PROFILE/hostd-full
    let profile_dir = full.parent().expect("hostd-full's directory");
    let profile = profile_dir.file_name().expect("a profile directory");
    let target = profile_dir
        .parent()
        .and_then(Path::parent)
        .expect("cargo's target directory");
    let dist = target.join("hostd-dist").join(profile);
    std::fs::create_dir_all(&dist).expect("create target/hostd-dist");
    // Once per nextest run (every test is a process of its own there); once per test
    // binary with `cargo test`.
    let marker = std::env::var("NEXTEST_RUN_ID")
        .ok()
        .map(|id| dist.join(format!(".built-{id}")));
    if marker.as_ref().is_some_and(|m| m.exists()) {
        return dist;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--locked",
            "--no-default-features",
            "--target",
            MUSL,
        ])
        .args(["--bin", "hostd", "--bin", "hostd-backend"])
        .env("CARGO_TARGET_DIR", target);
    if profile != "debug" {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo build (the musl VM path)");
    assert!(
        out.status.success(),
        "building the musl VM path failed ({cmd:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = target.join(MUSL).join(profile);
    // Linked anew each time: cargo replaces a rebuilt file (a new inode), which would
    // leave an older link behind. hostd-full is linked, not symlinked, so that its own
    // path (/proc/self/exe) is here and the `hostd` it starts VMs with is this one.
    for (from, name) in [
        (built.join("hostd"), "hostd"),
        (built.join("hostd-backend"), "hostd-backend"),
        (full.to_path_buf(), "hostd-full"),
    ] {
        let tmp = dist.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(&from, &tmp)
            .or_else(|_| std::fs::copy(&from, &tmp).map(|_| ()))
            .unwrap_or_else(|e| panic!("link {} into {}: {e}", from.display(), dist.display()));
        std::fs::rename(&tmp, dist.join(name)).expect("rename into target/hostd-dist");
        // rename(2) leaves both names when they are links to one file already.
        let _ = std::fs::remove_file(&tmp);
    }
    if let Some(m) = marker {
        // Earlier runs' markers go.
        for e in std::fs::read_dir(&dist).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(".built-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::write(m, b"");
    }
    dist
}

/// Whether we are in CI, where a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks a prerequisite. Returns false (after printing one SKIP line) when it is
/// missing outside CI; panics when it is missing under CI=true.
#[must_use]
pub fn require(what: &str, ok: bool, how: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("prerequisite missing under CI=true: {what} ({how})");
    }
    eprintln!("SKIP: {what} is missing ({how}); this test checked nothing");
    false
}

/// Whether the tests run as root (namespaces, pivot_root, TAP devices need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// hostd's cache directory, as the binary computes it.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HOSTD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/hostd")
        })
}

/// The guest kernel for this checkout's kernel config: guest/kernel/build.sh prints its
/// cached build (instant once built; .ci/setup builds it). Several checkouts share the
/// cache, so the `default` link may point at another checkout's kernel; tests never
/// rely on it. $HOSTD_KERNEL overrides.
pub fn kernel() -> PathBuf {
    static KERNEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            if let Some(k) = std::env::var_os("HOSTD_KERNEL") {
                return PathBuf::from(k);
            }
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/kernel/build.sh");
            Command::new("bash")
                .arg(script)
                .stderr(Stdio::inherit())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .last()
                        .map(|l| PathBuf::from(l.trim()).join("vmlinux"))
                })
                .unwrap_or_else(|| cache_dir().join("kernel/missing/vmlinux"))
        })
        .clone()
}

/// Prerequisites for booting a real guest under QEMU.
#[must_use]
pub fn require_qemu_guest() -> bool {
    require(
        "the hostd guest kernel",
        kernel().exists(),
        "run guest/kernel/build.sh",
    ) && require(
        "qemu-system-x86_64",
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "apt-get install qemu-system-x86",
    ) && require(
        "apt-get (to fetch busybox-static)",
        Command::new("apt-cache")
            .args(["show", "busybox-static"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "a Debian host with apt lists: apt-get update",
    )
}

/// Writes `spec` into a fresh temp dir as app.toml and builds it. Returns the dir (keep
/// it alive) and the image path. Panics with hostd's output when the build fails.
pub fn build(spec: &str) -> (tempfile::TempDir, PathBuf) {
    build_with_files(spec, &[])
}

/// As [`build`], with host files copied next to the spec first (`(name, from)`), so the
/// spec can name them as `source = "name"` inside its build context.
pub fn build_with_files(spec: &str, files: &[(&str, &Path)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, from) in files {
        std::fs::copy(from, dir.path().join(name)).expect("copy a file next to the spec");
    }
    let spec_path = dir.path().join("app.toml");
    std::fs::write(&spec_path, spec).expect("write spec");
    let image = dir.path().join("app.img");
    let out = hostd()
        .arg("build")
        .arg(&spec_path)
        .arg("-o")
        .arg(&image)
        .output()
        .expect("run hostd build");
    assert!(
        out.status.success(),
        "hostd build failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, image)
}

/// Writes `dir/vmlinux`, a minimal ELF header: enough for the builder to accept the file
/// as a kernel (for tests that build images without booting them).
pub fn fake_kernel(dir: &Path) {
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(64 * 1024, 0xAB);
    std::fs::write(dir.join("vmlinux"), k).expect("write kernel");
}

/// Writes `out`: the image `img` with its manifest section's bytes passed through
/// `edit`, every digest recomputed (what a hand-made, hostile image looks like: all its
/// digests are right). Other sections, a signature included, are kept as they are.
pub fn rewrite_manifest(img: &Path, out: &Path, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    use hostd_images::format::{self, Image};
    let image = Image::open(img).expect("open");
    let mut parts: Vec<(String, Vec<u8>)> = image
        .header
        .sections
        .iter()
        .map(|s| (s.name.clone(), image.read_section(&s.name).expect("read")))
        .collect();
    parts[0].1 = edit(std::mem::take(&mut parts[0].1));
    let refs: Vec<(&str, &[u8])> = parts.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    std::fs::write(out, format::write_image(&refs).expect("write_image")).expect("write");
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    /// Both streams, for assertion messages.
    pub fn all(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    })
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_deadline(&mut child, limit);
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Waits for `child`, killing it and panicking after `limit`: nothing may hang.
pub fn wait_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `hostd run --vmm qemu IMAGE ARGS…` with a deadline.
pub fn run_image(image: &Path, args: &[&str]) -> Output {
    run_image_with("qemu", image, args)
}

/// `hostd run --vmm VMM ARGS IMAGE`. The built-in VMM (`kvm`) gets more time: on a
/// nested PVM host a boot takes seconds of emulated kernel code, and on a slow day of
/// that host minutes (docs/pvm.md: /init at 117 s; a secrets run did not finish in
/// 400 s). The deadline is for a hang, not a measure.
pub fn run_image_with(vmm: &str, image: &Path, args: &[&str]) -> Output {
    let timeout: u64 = if vmm == "kvm" { 1200 } else { 400 };
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", vmm, "--timeout", &timeout.to_string()])
        .args(args)
        .arg(image);
    run_with_deadline(cmd, Duration::from_secs(timeout + 100))
}

/// Whether /dev/kvm can be opened read-write (hostd's own VMM can run).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Index of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle))
}

/// A running process (usually `hostd run`) whose stdout lines can be waited for.
pub struct Running {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// Spawns `cmd` with piped stdout/stderr, collecting both.
pub fn spawn_running(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let stderr = reader(child.stderr.take());
    Running {
        child,
        lines: rx,
        stdout,
        stderr,
    }
}

impl Running {
    /// Waits up to `limit` for a stdout line containing `needle`; false if it never came.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        self.wait_for_all(&[needle], limit)
    }

    /// Waits up to `limit` until each of `needles` was on some stdout line, in any order.
    pub fn wait_for_all(&self, needles: &[&str], limit: Duration) -> bool {
        let mut missing: Vec<&str> = needles.to_vec();
        let end = Instant::now() + limit;
        while !missing.is_empty() {
            let Some(left) = end.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => missing.retain(|n| !line.contains(n)),
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; the pid is our live child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (at most `limit`) for the process to end; returns how, stdout and stderr.
    pub fn finish(mut self, limit: Duration) -> Output {
        let status = wait_deadline(&mut self.child, limit);
        Output {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

/// The image header's section table, read from the raw bytes (independently of the
/// images crate, so tests can damage exactly the bytes they mean to): (name, offset,
/// length) of each section.
pub fn sections(img: &[u8]) -> Vec<(String, usize, usize)> {
    let count = u32::from_le_bytes(img[12..16].try_into().expect("4 bytes")) as usize;
    (0..count)
        .map(|i| {
            let e = 64 + i * 64;
            let name = String::from_utf8_lossy(&img[e..e + 16])
                .trim_end_matches('\0')
                .to_string();
            let off = u64::from_le_bytes(img[e + 16..e + 24].try_into().expect("8 bytes")) as usize;
            let len = u64::from_le_bytes(img[e + 24..e + 32].try_into().expect("8 bytes")) as usize;
            (name, off, len)
        })
        .collect()
}

/// `hostd cap ARGS… --state-dir STATE`, which must succeed; its standard output.
#[allow(dead_code)]
pub fn cap_cli(state: &std::path::Path, args: &[&str]) -> String {
    let out = hostd()
        .arg("cap")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("hostd cap");
    assert!(
        out.status.success(),
        "hostd cap {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("hostd cap prints UTF-8")
}

/// Waits (at most 30 s) until `log` (a child's log, collected by a reader thread) has a
/// line containing every needle, and returns that line; fails the test with the whole
/// log otherwise.
#[allow(dead_code)]
pub fn wait_log_line(log: &std::sync::Mutex<String>, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?}; log:\n{}",
            log.lock().unwrap_or_else(|p| p.into_inner())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `s` without ANSI escape sequences (the colours of tracing's log lines).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
