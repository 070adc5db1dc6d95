//! The nested real-KVM test host (issue 21): Debian's kernel with its KVM modules,
//! booted under QEMU with TCG and an emulated AMD CPU with SVM, so that `/dev/kvm` inside
//! is the KVM users have (not this machine's PVM). tests/kvmhost/build.sh builds and
//! caches the kernel and the base initramfs; here a payload (hostd, its backends, images,
//! a script) is appended as a second cpio archive, the host booted, and its console
//! parsed: the script frames each command's output as
//! `KVMOUT NAME BEGIN` … `KVMOUT NAME END rc=N`.

use super::require;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The CPU QEMU emulates: an AMD model with SVM (TCG implements SVM with nested paging).
pub const CPU: &str = "EPYC,+svm";

/// Builds (or finds cached) the test host; None after a SKIP line when a prerequisite is
/// missing outside CI (panics under CI=true).
pub fn base() -> Option<PathBuf> {
    let tools_ok = [
        "qemu-system-x86_64",
        "cpio",
        "objcopy",
        "apt-get",
        "dpkg-deb",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !require(
        "qemu-system-x86_64, cpio, objcopy, apt-get and dpkg-deb",
        tools_ok,
        "a Debian host: .ci/setup",
    ) {
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kvmhost/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/kvmhost/build.sh");
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    let ok = out.status.success() && dir.join("base.cpio").is_file();
    if !require(
        "the kvmhost test host (Debian's linux-image-6.1.0-*-amd64 from apt)",
        ok,
        "apt-get update; see tests/kvmhost/build.sh's output",
    ) {
        return None;
    }
    Some(dir)
}

/// Files that go into the test host under /kvmtest.
pub struct Payload {
    dir: tempfile::TempDir,
}

impl Payload {
    pub fn new() -> Payload {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("kvmtest")).expect("mkdir kvmtest");
        Payload { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("kvmtest").join(name)
    }

    /// Copies `from` to /kvmtest/NAME.
    pub fn file(&self, name: &str, from: &Path) -> &Payload {
        std::fs::copy(from, self.path(name))
            .unwrap_or_else(|e| panic!("copy {} into the payload: {e}", from.display()));
        self
    }

    /// Writes /kvmtest/NAME with `contents` and `mode`.
    pub fn bytes(&self, name: &str, contents: &[u8], mode: u32) -> &Payload {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write payload file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        self
    }

    /// Copies an executable without its debug information (a debug build of hostd is
    /// hundreds of MB, all of which the test host would hold in memory).
    pub fn program(&self, name: &str, from: &Path) -> &Payload {
        if let Some(dir) = self.path(name).parent() {
            std::fs::create_dir_all(dir).expect("mkdir in the payload");
        }
        let out = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(self.path(name))
            .output()
            .expect("objcopy");
        assert!(
            out.status.success(),
            "objcopy {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.libraries(from);
        self
    }

    /// This machine's `/sbin/NAME` (with its libraries) at /sbin/NAME in the test host:
    /// tools hostd runs that busybox lacks (mkfs.ext4 for volumes).
    pub fn host_tool(&self, name: &str) -> &Payload {
        let from = Path::new("/sbin").join(name);
        let to = self.dir.path().join("sbin").join(name);
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir sbin");
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        self.libraries(&from);
        self
    }

    /// The shared libraries `program` loads (as `ldd` lists them), at their own paths:
    /// the test host has busybox and nothing else.
    fn libraries(&self, program: &Path) {
        let out = Command::new("ldd").arg(program).output().expect("ldd");
        let text = String::from_utf8_lossy(&out.stdout);
        for lib in text.lines().filter_map(|l| {
            let l = l.trim();
            let path = l.split("=> ").nth(1).unwrap_or(l);
            path.split(" (").next().filter(|p| p.starts_with('/'))
        }) {
            let to = self.dir.path().join(lib.trim_start_matches('/'));
            if to.exists() {
                continue;
            }
            std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
            std::fs::copy(lib, &to).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
        }
    }

    /// The dynamic linker's cache of the libraries copied in (`ldconfig -r`), as any
    /// Debian host has: without it, every dynamically linked program (mkfs.ext4, strace;
    /// hostd and its backends are static) looks for its libraries in a dozen
    /// directories first, about 15 ms of failed opens each under TCG.
    fn linker_cache(&self) {
        let etc = self.dir.path().join("etc");
        std::fs::create_dir_all(&etc).expect("mkdir etc");
        std::fs::write(etc.join("ld.so.conf"), "/lib/x86_64-linux-gnu\n/lib64\n")
            .expect("write ld.so.conf");
        let out = Command::new("ldconfig")
            .arg("-X")
            .arg("-r")
            .arg(self.dir.path())
            .output()
            .expect("ldconfig");
        assert!(
            out.status.success() && etc.join("ld.so.cache").is_file(),
            "ldconfig -r: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The payload as a newc archive, appended to `base`'s: the initrd to boot.
    fn initrd(&self, base: &Path) -> PathBuf {
        self.linker_cache();
        let list = Command::new("sh")
            .arg("-c")
            .arg("find kvmtest etc $(ls -d sbin lib lib64 2>/dev/null) | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
            .current_dir(self.dir.path())
            .output()
            .expect("cpio");
        assert!(
            list.status.success(),
            "cpio: {}",
            String::from_utf8_lossy(&list.stderr)
        );
        let mut initrd = std::fs::read(base.join("base.cpio")).expect("read base.cpio");
        initrd.extend_from_slice(&list.stdout);
        let path = self.dir.path().join("initrd.cpio");
        std::fs::write(&path, initrd).expect("write initrd");
        path
    }
}

/// What the test host printed.
#[derive(Debug)]
pub struct Console {
    pub text: String,
    /// Each framed command: its exit code and output.
    pub runs: BTreeMap<String, (i32, String)>,
}

impl Console {
    /// The output of the framed command `name` (panics, with the console, if it never
    /// finished).
    pub fn run(&self, name: &str) -> &(i32, String) {
        self.runs
            .get(name)
            .unwrap_or_else(|| panic!("{name} did not run to its end:\n{}", self.text))
    }
}

/// How long the test host may go without a new framed line before a boot that logged a
/// soft lockup counts as hung.
/// Its longest step (a guest booting under emulated SVM on a loaded host) prints
/// within about a minute.
const STALL: Duration = Duration::from_secs(300);

/// How long the test host may print nothing at all before it counts as wedged: longer
/// than a case may run before the test host's own watchdog reports it
/// ([`CASE_LIMIT_SECS`]), so that a case that hangs in a working test host is reported
/// by it, with its stacks.
const WEDGED: Duration = Duration::from_secs(CASE_LIMIT_SECS as u64 + 180);

/// Boots the test host with `payload` (its /kvmtest/run.sh runs) on `cpus` vCPUs and
/// `mem_mib` of memory, waits at most `limit`, and returns its console.
///
/// Two known faults are retried once, loudly (docs/testing.md): the test host's own
/// kernel (Debian's, under QEMU TCG with emulated SVM) was seen once in six boots to lock
/// up in a `hostd` task ("soft lockup - CPU#0 stuck"), and one case once hung with no
/// output. A boot that logged a lock-up and made no progress for [`STALL`], or that
/// printed nothing at all for [`WEDGED`], is killed, and
/// a case that ran past [`CASE_LIMIT_SECS`] is killed by the test host's own watchdog
/// (its tasks' kernel stacks printed, rc 124); either way the test host is booted again
/// with everything printed. A second fault fails; any other hang fails at once.
pub fn boot(base: &Path, payload: &Payload, cpus: u32, mem_mib: u32, limit: Duration) -> Console {
    let why = match boot_once(base, payload, cpus, mem_mib, limit) {
        Ok(c) => match timed_out(&c) {
            None => return c,
            Some(case) => format!(
                "case {case} ran past {CASE_LIMIT_SECS} s and was killed; its output:\n{}",
                c.runs[case].1
            ),
        },
        Err(console) => {
            format!("the test host's kernel locked up or wedged; its console:\n{console}")
        }
    };
    eprintln!("KVMHOST: booting the test host again once (known: docs/testing.md): {why}");
    match boot_once(base, payload, cpus, mem_mib, limit) {
        Ok(c) => c,
        Err(console) => {
            panic!("the test host's kernel locked up after a retry; its console:\n{console}")
        }
    }
}

/// The first case the test host's watchdog killed, if any.
fn timed_out(c: &Console) -> Option<&str> {
    c.runs
        .iter()
        .find(|(_, (rc, out))| *rc == 124 && out.contains("KVMSTACK"))
        .map(|(name, _)| name.as_str())
}

/// One boot: its console, or Err(console) when it hung after a soft lockup.
fn boot_once(
    base: &Path,
    payload: &Payload,
    cpus: u32,
    mem_mib: u32,
    limit: Duration,
) -> Result<Console, String> {
    let initrd = payload.initrd(base);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", CPU, "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-smp", &cpus.to_string(), "-m", &mem_mib.to_string()])
        .arg("-kernel")
        .arg(base.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"]);
    // The console goes to a file, so that a test host that hangs still shows how far it
    // got when the deadline kills it.
    let console = payload.dir.path().join("console.log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).expect("console file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let read =
        || String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    let start = std::time::Instant::now();
    // Progress is a new framed line (a locked-up kernel keeps printing its lock-up).
    let (mut frames, mut changed) = (0usize, start);
    // Any output at all: a test host that printed nothing for WEDGED, not even its own
    // watchdog's report of a case past CASE_LIMIT_SECS, is wedged.
    let (mut len, mut spoke) = (0usize, start);
    while child.try_wait().expect("wait for qemu").is_none() {
        let text = read();
        let now = text.matches("KVMOUT ").count();
        if now != frames {
            (frames, changed) = (now, std::time::Instant::now());
        }
        if text.len() != len {
            (len, spoke) = (text.len(), std::time::Instant::now());
        }
        if spoke.elapsed() > WEDGED {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{text}\n(no output at all for {} s: the test host is wedged)",
                WEDGED.as_secs()
            ));
        }
        if changed.elapsed() > STALL && text.contains("soft lockup") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(text);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the test host did not finish within {limit:?}; its console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = read().replace('\r', "");
    assert!(
        text.contains("KVMHOST /dev/kvm ready"),
        "the test host has no /dev/kvm:\n{text}"
    );
    let runs = parse(&text);
    Ok(Console { text, runs })
}

/// The framed commands in console text.
pub fn parse(text: &str) -> BTreeMap<String, (i32, String)> {
    let mut runs = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("KVMOUT ") {
            let mut w = rest.split_whitespace();
            let name = w.next().unwrap_or_default().to_string();
            match (w.next(), w.next()) {
                (Some("BEGIN"), _) => current = Some((name, String::new())),
                (Some("END"), Some(rc)) => {
                    if let Some((n, out)) = current.take() {
                        let rc = rc.trim_start_matches("rc=").parse().unwrap_or(-1);
                        runs.insert(n, (rc, out));
                    }
                }
                _ => {}
            }
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    runs
}

/// The shell function run.sh scripts use to frame a command: `framed NAME CMD ARGS…`.
/// The output streams to the console as it comes (through a pipe, so the command sees
/// no terminal), so a command that hangs still shows how far it got; one that runs past
/// [`CASE_LIMIT_SECS`] is killed after the kernel stacks of hostd's threads are printed
/// (`KVMSTACK` lines) and ends with rc 124.
pub fn framed_sh() -> String {
    FRAMED.replace("CASE_LIMIT_SECS", &CASE_LIMIT_SECS.to_string())
}

const FRAMED: &str = r#"
framed() {
    name=$1; shift
    echo "KVMOUT $name BEGIN"
    rm -f /tmp/$name.rc /tmp/$name.timeout
    exec 3>&1
    { "$@" < /dev/null 2>&1 & pid=$!
      ( sleep CASE_LIMIT_SECS
        kill -0 $pid 2>/dev/null || exit 0
        touch /tmp/$name.timeout
        echo "KVMOUT $name TIMEOUT after CASE_LIMIT_SECS s: the stacks of hostd's tasks"
        for t in /proc/[0-9]*/task/[0-9]*; do
            case "$(cat $t/comm 2>/dev/null)" in
            hostd*|vcpu*|rng|irq-forward|vring*|vsock*|blk*|net*|cap*)
                echo "KVMSTACK $t $(cat $t/comm) $(grep '^State' $t/status) wchan=$(cat $t/wchan)"
                sed "s|^|KVMSTACK $t |" $t/stack 2>/dev/null ;;
            esac
        done
        pkill -KILL -f "hostd run"; pkill -KILL -f "hostd-backend" ) >&3 2>&3 &
      watchdog=$!
      wait $pid; echo $? > /tmp/$name.rc
      kill $watchdog 2>/dev/null; } | cat
    exec 3>&-
    rc=$(cat /tmp/$name.rc 2>/dev/null || echo 125)
    [ -e /tmp/$name.timeout ] && rc=124
    printf '\nKVMOUT %s END rc=%d\n' "$name" "$rc"
}
"#;

/// How long one framed command may run in the test host before it is killed with its
/// stacks printed: past the `--timeout 600` the cases give `hostd run` (a hostd that
/// stops itself says why); the slowest case, a Linux guest booting under emulated SVM on
/// a busy host, takes about a minute.
pub const CASE_LIMIT_SECS: u32 = 720;
