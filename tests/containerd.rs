//! hostd as a containerd runtime: Debian's containerd (1.6) on a temporary root, state
//! and socket, `ctr` as the client, the `containerd-shim-hostd-v1` shim from this
//! build on containerd's PATH, and QEMU as the microVM monitor (`HOSTD_SHIM_VMM=qemu`).
//! Needs root (containerd mounts snapshots), containerd, QEMU and the guest kernel:
//! under CI=true their absence fails, otherwise each test skips with one line.
#![allow(clippy::unwrap_used)]

mod common;

use common::{cache_dir, hostd, kernel, require, require_qemu_guest, run_with_deadline, Output};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shim, built next to hostd (`cargo test --workspace` builds it through the shim
/// crate's own test; `cargo build -p hostd-shim` otherwise).
fn shim_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_hostd-full"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn prerequisites() -> bool {
    let has = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    require("root", common::is_root(), "run the tests as root")
        && require(
            "containerd",
            has("containerd"),
            "apt-get install containerd",
        )
        && require("ctr", has("ctr"), "apt-get install containerd")
        && require(
            "containerd-shim-hostd-v1",
            shim_dir().join("containerd-shim-hostd-v1").is_file(),
            "cargo build -p hostd-shim",
        )
        && require_qemu_guest()
}

/// A containerd of the test's own.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("HOSTD_SHIM_VMM", "qemu")
            .env("HOSTD_KERNEL", kernel())
            .env("HOSTD_BIN", common::hostd_exe())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { dir, child };
        let end = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < end,
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK -n test ARGS…`, with a deadline.
    fn ctr(&self, args: &[&str]) -> Output {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.sock()).args(["-n", "test"]).args(args);
        run_with_deadline(c, Duration::from_secs(300))
    }

    /// `ctr run FLAGS… --runtime io.containerd.hostd.v1 REFERENCE ID`.
    fn run(&self, flags: &[&str], reference: &str, id: &str) -> Output {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--runtime", "io.containerd.hostd.v1", reference, id]);
        self.ctr(&args)
    }

    fn import(&self, archive: &Path) {
        let out = self.ctr(&["image", "import", archive.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "import: {}\n{}",
            out.all(),
            self.log()
        );
    }

    /// Asserts that nothing of task `id` is left: no process naming its bundle, no
    /// shim, no mount below containerd's state, no cgroup.
    fn assert_clean(&self, id: &str) {
        let bundle = self
            .dir
            .path()
            .join("state/io.containerd.runtime.v2.task/test")
            .join(id);
        let needle = bundle.to_string_lossy().to_string();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let mut procs = processes_mentioning(&needle);
            // The task's shim exits once the task is deleted.
            procs.extend(processes_mentioning(&format!(
                "-id {id} -address {}",
                self.sock().display()
            )));
            let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&needle))
                .map(str::to_string)
                .collect();
            let cgroups: Vec<PathBuf> = ["memory", "cpuacct", "pids", ""]
                .iter()
                .map(|c| Path::new("/sys/fs/cgroup").join(c).join("test").join(id))
                .filter(|p| p.exists())
                .collect();
            if procs.is_empty() && mounts.is_empty() && cgroups.is_empty() {
                return;
            }
            assert!(
                Instant::now() < end,
                "task {id} left processes {procs:?}, mounts {mounts:?}, cgroups {cgroups:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A test that failed half-way leaves tasks: kill and delete them, so that no
        // shim or guest outlives the test.
        let ls = self.ctr(&["task", "ls", "-q"]);
        for id in ls.stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["task", "kill", "-a", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["task", "delete", "-f", id]);
        }
        // SAFETY: kill has no memory effects; the pid is our live child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = common::wait_deadline(&mut self.child, Duration::from_secs(30));
        // Its snapshots stay mounted under its root unless unmounted.
        let root = self.dir.path().to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().rev() {
            if let Some(target) = m.split(' ').nth(1).filter(|t| t.starts_with(&root)) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
    }
}

/// Pids whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{name}: {cmd}"));
        }
    }
    out
}

/// Builds a spec into an image in `dir`.
fn build(dir: &Path, name: &str, spec: &str) -> PathBuf {
    let spec_path = dir.join(format!("{name}.toml"));
    std::fs::write(&spec_path, spec).unwrap();
    let image = dir.join(format!("{name}.img"));
    let mut c = hostd();
    c.arg("build").arg(&spec_path).arg("-o").arg(&image);
    let out = run_with_deadline(c, Duration::from_secs(300));
    assert!(out.status.success(), "build {name}: {}", out.all());
    image
}

/// A one-service busybox image running `sh -c SCRIPT` as its main service, built and
/// packed as `hostd.local/NAME:latest`.
fn busybox_image(dir: &Path, name: &str, script: &str) -> PathBuf {
    let spec = format!(
        "name = {name:?}\nmemory = \"128M\"\npackages = [\"busybox-static\"]\n\
         [services.main]\ncommand = \"/bin/busybox\"\nargs = [\"sh\", \"-c\", {script:?}]\nmain = true\n"
    );
    pack(
        &build(dir, name, &spec),
        &format!("hostd.local/{name}:latest"),
    )
}

/// `hostd oci pack IMAGE -o IMAGE.oci.tar --ref REF`.
fn pack(image: &Path, reference: &str) -> PathBuf {
    let archive = image.with_extension("oci.tar");
    let mut c = hostd();
    c.args(["oci", "pack"])
        .arg(image)
        .arg("-o")
        .arg(&archive)
        .args(["--ref", reference]);
    let out = run_with_deadline(c, Duration::from_secs(60));
    assert!(out.status.success(), "pack: {}", out.all());
    archive
}

fn tar_entry(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, data).unwrap();
}

fn hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// An OCI archive written by the test (not by `hostd oci pack`): layers as given
/// (media type, bytes), the config's command, named `reference`.
fn oci_archive(out: &Path, reference: &str, layers: &[(&str, Vec<u8>)], cmd: &[&str]) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(_, b)| format!("sha256:{}", hex(b)))
        .collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    .to_string();
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|(t, b)| serde_json::json!({"mediaType": t, "digest": format!("sha256:{}", hex(b)), "size": b.len()}))
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", hex(config.as_bytes())), "size": config.len()},
        "layers": layer_descs})
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", hex(manifest.as_bytes())), "size": manifest.len(),
        "annotations": {"io.containerd.image.name": reference,
                        "org.opencontainers.image.ref.name": "latest"}}]})
    .to_string();
    let mut tar = tar::Builder::new(Vec::new());
    tar_entry(
        &mut tar,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    tar_entry(&mut tar, "index.json", 0o644, index.as_bytes());
    for blob in [config.as_bytes(), manifest.as_bytes()] {
        tar_entry(
            &mut tar,
            &format!("blobs/sha256/{}", hex(blob)),
            0o644,
            blob,
        );
    }
    for (_, b) in layers {
        tar_entry(&mut tar, &format!("blobs/sha256/{}", hex(b)), 0o644, b);
    }
    std::fs::write(out, tar.into_inner().unwrap()).unwrap();
}

/// A tar layer holding `files` (path, mode, bytes).
fn layer(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (p, m, d) in files {
        tar_entry(&mut tar, p, *m, d);
    }
    tar.into_inner().unwrap()
}

/// An image's layers: (media type, tar bytes).
type Layers<'a> = Vec<(&'a str, Vec<u8>)>;

const TASK_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[test]
fn packed_hello_image_runs_prints_and_passes_the_exit_code() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let hello = pack(
        &build(
            work.path(),
            "hello",
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/images/examples/hello.toml"
            ))
            .unwrap(),
        ),
        "hostd.local/hello:latest",
    );
    let exit7 = busybox_image(work.path(), "exit7", "echo leaving with 7; exit 7");
    let c = Containerd::start();
    c.import(&hello);
    c.import(&exit7);
    let out = c.run(&["--rm"], "hostd.local/hello:latest", "hello1");
    assert_eq!(out.code(), Some(0), "{}\n{}", out.all(), c.log());
    assert!(
        out.stdout.contains("[hello] hello from hostd"),
        "{}",
        out.all()
    );
    c.assert_clean("hello1");
    let out = c.run(&["--rm"], "hostd.local/exit7:latest", "exit7");
    assert!(out.stdout.contains("leaving with 7"), "{}", out.all());
    assert_eq!(out.code(), Some(7), "{}\n{}", out.all(), c.log());
    c.assert_clean("exit7");
}

#[test]
fn a_running_guest_is_listed_measured_killed_cleanly_and_deleted() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let archive = busybox_image(
        work.path(),
        "sleeper",
        "echo sleeper up; exec /bin/busybox sleep 600",
    );
    let c = Containerd::start();
    c.import(&archive);
    let console = work.path().join("console.log");
    let uri = format!("file://{}", console.display());
    let out = c.run(
        &["-d", "--log-uri", &uri],
        "hostd.local/sleeper:latest",
        "sleeper",
    );
    assert!(out.status.success(), "{}\n{}", out.all(), c.log());
    let end = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("sleeper up")
    {
        assert!(Instant::now() < end, "the guest never came up\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let ls = c.ctr(&["task", "ls"]);
    let row = ls
        .stdout
        .lines()
        .find(|l| l.starts_with("sleeper"))
        .unwrap_or("");
    assert!(row.contains("RUNNING"), "{}", ls.all());
    let pid = row.split_whitespace().nth(1).unwrap_or("0").to_string();
    let ps = c.ctr(&["task", "ps", "sleeper"]);
    assert!(
        ps.status.success() && ps.stdout.lines().any(|l| l.starts_with(&pid)),
        "task ps does not list {pid}:\n{}",
        ps.all()
    );
    // The VMM (qemu) is in the task's cgroup too.
    assert!(ps.stdout.lines().count() >= 3, "{}", ps.all());
    let metrics = c.ctr(&["task", "metrics", "sleeper"]);
    assert!(metrics.status.success(), "{}\n{}", metrics.all(), c.log());
    let usage = metrics
        .stdout
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes") || l.starts_with("memory.usage "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // A guest of 128 MiB under QEMU: its RAM and QEMU itself are charged to the cgroup.
    assert!(usage > 10 << 20, "memory usage {usage}:\n{}", metrics.all());
    let kill = c.ctr(&["task", "kill", "sleeper"]);
    assert!(kill.status.success(), "{}", kill.all());
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let ls = c.ctr(&["task", "ls"]);
        if ls
            .stdout
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "not stopped after SIGTERM:\n{}",
            ls.all()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        log.contains("hostd-init: powering off"),
        "the guest did not shut down cleanly:\n{log}"
    );
    // The exit code guest init reported on its way down is the task's.
    let code: i32 = log
        .split("powering off (exit code ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|c| c.parse().ok())
        .unwrap();
    let del = c.ctr(&["task", "delete", "sleeper"]);
    assert_eq!(del.code(), Some(code), "{}", del.all());
    let del = c.ctr(&["container", "delete", "sleeper"]);
    assert!(del.status.success(), "{}", del.all());
    c.assert_clean("sleeper");
}

#[test]
fn bad_bundles_fail_at_create_with_a_clear_error_in_containerds_log() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let c = Containerd::start();
    let cases: [(&str, Layers, &str); 3] = [
        // No layer at all: an empty root file system.
        ("nolayer", vec![], "nothing runnable"),
        // A layer whose `.img` is not a hostd image (a text file named like one).
        (
            "notimage",
            vec![(
                TASK_LAYER,
                layer(&[("app.img", 0o644, b"this is not a hostd image\n")]),
            )],
            "is not a valid hostd image",
        ),
        // Files, but neither an image, a component nor the configured program.
        (
            "nothing",
            vec![(TASK_LAYER, layer(&[("README", 0o644, b"hello\n")]))],
            "nothing runnable",
        ),
    ];
    for (name, layers, expect) in cases {
        let archive = work.path().join(format!("{name}.oci.tar"));
        let reference = format!("hostd.local/{name}:latest");
        oci_archive(&archive, &reference, &layers, &["/bin/app"]);
        c.import(&archive);
        let out = c.run(&["--rm"], &reference, name);
        assert!(!out.status.success(), "{name} ran:\n{}", out.all());
        assert!(out.stderr.contains(expect), "{name}: {}", out.all());
        let log = c.log();
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("create {name}")) && l.contains(expect)),
            "{name}: containerd's log has no `{expect}`:\n{log}"
        );
        let _ = c.ctr(&["container", "delete", name]);
        c.assert_clean(name);
    }
}

#[test]
fn a_wasm_image_answers_a_request() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sandbox/examples/wasm/hello.wasm"
    ))
    .unwrap();
    let archive = work.path().join("fn.oci.tar");
    oci_archive(
        &archive,
        "hostd.local/fn:latest",
        &[(TASK_LAYER, layer(&[("hello.wasm", 0o644, &wasm)]))],
        &["/hello.wasm"],
    );
    let c = Containerd::start();
    c.import(&archive);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("HOSTD_FN_LISTEN=127.0.0.1:{port}");
    let out = c.run(&["-d", "--env", &listen], "hostd.local/fn:latest", "fn1");
    assert!(out.status.success(), "{}\n{}", out.all(), c.log());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let url = format!("http://127.0.0.1:{port}/");
    let end = Instant::now() + Duration::from_secs(120);
    let body = loop {
        match agent.get(&url).call() {
            Ok(r) => break r.into_string().unwrap(),
            Err(e) => {
                assert!(Instant::now() < end, "no answer: {e}\n{}", c.log());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert_eq!(body, "hello from a nanoservice");
    assert!(c.ctr(&["task", "kill", "fn1"]).status.success());
    let end = Instant::now() + Duration::from_secs(60);
    while !c
        .ctr(&["task", "ls"])
        .stdout
        .lines()
        .any(|l| l.starts_with("fn1") && l.contains("STOPPED"))
    {
        assert!(Instant::now() < end, "fn1 did not stop\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.ctr(&["task", "delete", "fn1"]);
    assert!(c.ctr(&["container", "delete", "fn1"]).status.success());
    c.assert_clean("fn1");
}

#[test]
fn a_busybox_root_file_system_runs_its_entrypoint_in_a_microvm() {
    if !prerequisites() {
        return;
    }
    // Debian's busybox-static, as `hostd build` caches it (building hello fetches it).
    let work = tempfile::tempdir().unwrap();
    let _ = build(
        work.path(),
        "fetch",
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/hello.toml"
        ))
        .unwrap(),
    );
    let deb = std::fs::read_dir(cache_dir().join("debs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("busybox-static_"))
        })
        .expect("busybox-static .deb in the hostd cache");
    let x = work.path().join("x");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "dpkg-deb -x {}", deb.display());
    let busybox = std::fs::read(x.join("bin/busybox")).unwrap();
    let archive = work.path().join("bb.oci.tar");
    oci_archive(
        &archive,
        "hostd.local/busybox:latest",
        &[(TASK_LAYER, layer(&[("bin/busybox", 0o755, &busybox)]))],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "echo entrypoint of a busybox root in $(/bin/busybox uname -s); exit 3",
        ],
    );
    let c = Containerd::start();
    c.import(&archive);
    let out = c.run(&["--rm"], "hostd.local/busybox:latest", "bb1");
    assert!(
        out.stdout.contains("entrypoint of a busybox root in Linux"),
        "{}\n{}",
        out.all(),
        c.log()
    );
    // It ran as the guest's main service (guest init's lines), not on the host.
    assert!(
        out.stdout.contains("hostd-init: powering off"),
        "{}",
        out.all()
    );
    assert_eq!(out.code(), Some(3), "{}", out.all());
    c.assert_clean("bb1");
}
