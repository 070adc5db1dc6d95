//! A web server from its Debian package, on a read-only root, answering a real HTTP
//! client over a TAP; and the guest's resolver finding a name through the DNS server
//! the run names. Everything network runs in a namespace the test creates and deletes.

mod common;

use common::netns::{require_ip_and_curl, Netns};
use common::{build, hostd, is_root, require, require_qemu_guest, spawn_running};
use std::net::UdpSocket;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The name the DNS server knows, and its address.
const KNOWN: (&str, [u8; 4]) = ("db.hostd.test", [10, 0, 2, 7]);

/// Answers DNS queries on `sock`: an A record for [`KNOWN`], no records for its other
/// types, NXDOMAIN for every other name. Records each name asked for.
fn serve_dns(sock: UdpSocket, asked: Arc<Mutex<Vec<String>>>) {
    let mut buf = [0u8; 512];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let q = &buf[..n];
        if q.len() < 12 {
            continue;
        }
        // The question: labels, then type and class.
        let mut i = 12;
        let mut labels = Vec::new();
        while let Some(&len) = q.get(i) {
            i += 1;
            if len == 0 {
                break;
            }
            let Some(l) = q.get(i..i + usize::from(len)) else {
                break;
            };
            labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
            i += usize::from(len);
        }
        let Some(tail) = q.get(i..i + 4) else {
            continue;
        };
        let qtype = u16::from_be_bytes([tail[0], tail[1]]);
        let name = labels.join(".");
        asked.lock().expect("lock").push(name.clone());
        let known = name == KNOWN.0;
        let answer = known && qtype == 1;
        let mut r = Vec::with_capacity(64);
        r.extend_from_slice(&q[0..2]);
        r.extend_from_slice(if known { &[0x81, 0x80] } else { &[0x81, 0x83] });
        r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
        r.extend_from_slice(&q[12..i + 4]);
        if answer {
            // A pointer to the question's name, A, IN, TTL 60, 4 bytes.
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&KNOWN.1);
        }
        let _ = sock.send_to(&r, from);
    }
}

/// lighttpd from Debian's package (13 packages with `systemd-sysv` excluded, against 31
/// for nginx-light). Its maintainer scripts would have made `www-data`; the spec
/// declares it. The package's own configuration runs perl at start-up
/// (`include_shell`), so the spec gives a short one; logs go to a tmpfs that takes the
/// package's directory's owner and mode (www-data, 0750), the pid file to /run.
/// `private.html` belongs to root, 0600: served only if lighttpd still ran as root.
const LIGHTTPD: &str = r#"
name = "lighttpd"
packages = ["lighttpd", "libc-bin"]
# init-system-helpers wants `usrmerge | usr-is-merged`; lighttpd wants
# `systemd-sysv | lsb-base`: the second of each is enough here.
exclude = ["usrmerge", "systemd-sysv"]

[network]
# Replaced at run time by `--net ...,dns=10.0.2.1`; the search domain stays.
dns = ["192.0.2.53"]
search = ["hostd.test"]

[[users]]
name = "www-data"
uid = 33
gid = 33
home = "/var/www"

[[groups]]
name = "www-data"
gid = 33

[[tmpfs]]
path = "/var/log/lighttpd"
size = "16M"

[[files]]
path = "/etc/lighttpd/lighttpd.conf"
contents = """
server.modules = ("mod_indexfile", "mod_access", "mod_staticfile")
server.document-root = "/var/www/html"
server.errorlog = "/var/log/lighttpd/error.log"
server.upload-dirs = ("/tmp")
server.pid-file = "/run/lighttpd.pid"
server.username = "www-data"
server.groupname = "www-data"
server.port = 80
index-file.names = ("index.html")
mimetype.assign = (".html" => "text/html")
"""

[[files]]
path = "/var/www/html/index.html"
contents = "lighttpd from its Debian package\n"

[[files]]
path = "/var/www/html/private.html"
contents = "only root can read this\n"
mode = "0600"

[services.web]
command = "/usr/sbin/lighttpd"
args = ["-D", "-f", "/etc/lighttpd/lighttpd.conf"]
restart = "on-failure"

[services.resolve]
command = "/usr/bin/getent"
args = ["ahostsv4", "db"]
"#;

fn curl(ns: &Netns, path: &str) -> (String, String) {
    let out = ns
        .exec()
        .args([
            "curl",
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://10.0.2.2{path}"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.rsplit_once('\n') {
        Some((body, code)) => (body.to_string(), code.to_string()),
        None => (String::new(), text),
    }
}

#[test]
fn lighttpd_from_its_package_answers_curl_and_the_guest_resolves_names() {
    if !require_qemu_guest()
        || !require(
            "root (network namespaces, TAP, the www-data owner in the erofs root)",
            is_root(),
            "run the tests as root",
        )
        || !require_ip_and_curl()
        || !require(
            "mkfs.erofs",
            Command::new("mkfs.erofs").arg("--help").output().is_ok(),
            "apt-get install erofs-utils",
        )
        || !require(
            "lighttpd in the apt lists",
            Command::new("apt-cache")
                .args(["show", "--", "lighttpd"])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()),
            "apt-get update",
        )
    {
        return;
    }
    let (dir, image) = build(LIGHTTPD);
    let tap = "hostdtap7";
    let ns = Netns::new(tap, "pk");
    let asked = Arc::new(Mutex::new(Vec::new()));
    let dns = ns.udp("10.0.2.1:53");
    {
        let asked = asked.clone();
        std::thread::spawn(move || serve_dns(dns, asked));
    }
    let mut cmd = ns.exec();
    cmd.arg(common::hostd_exe())
        .args([
            "run",
            "--vmm",
            "qemu",
            "--timeout",
            "400",
            "--net",
            &format!("tap={tap},ip=10.0.2.2/24,gw=10.0.2.1,dns=10.0.2.1"),
        ])
        .arg(&image);
    let run = spawn_running(cmd);
    let started = run.wait_for("service web started", Duration::from_secs(400));
    let mut index = (String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while started && Instant::now() < deadline {
        index = curl(&ns, "/");
        if index.1 == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let private = curl(&ns, "/private.html");
    // The resolve service has had its answer by now (it started before web answered);
    // give a slow guest a moment more.
    let resolved = run.wait_for("[resolve] 10.0.2.7", Duration::from_secs(30));
    run.signal(libc::SIGINT);
    let out = run.finish(Duration::from_secs(60));
    let console = format!("{}\n--- host ---\n{}", out.stdout, out.stderr);
    assert!(started, "lighttpd never started:\n{console}");
    assert_eq!(
        index,
        ("lighttpd from its Debian package\n".into(), "200".into()),
        "console:\n{console}"
    );
    // lighttpd dropped root for www-data, as its package expects.
    assert_eq!(private.1, "403", "{private:?}\nconsole:\n{console}");
    for want in [
        "(erofs, read-only) mounted",
        "tmpfs mounted on /var/log/lighttpd (mode=0750,uid=33,gid=33,size=16m)",
        "network: resolver dns 10.0.2.1 search hostd.test",
        "[resolve] 10.0.2.7",
    ] {
        assert!(console.contains(want), "missing {want:?}:\n{console}");
    }
    assert!(resolved, "{console}");
    assert!(
        asked
            .lock()
            .expect("lock")
            .iter()
            .any(|n| n == "db.hostd.test"),
        "the DNS server was never asked for db.hostd.test:\n{console}"
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
    drop(dir);
}

/// A spec's DNS servers reach the image's manifest; bad ones are refused at build.
#[test]
fn resolver_settings_are_checked_at_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::fake_kernel(dir.path());
    let spec = dir.path().join("app.toml");
    std::fs::write(
        &spec,
        "name = \"x\"\nkernel = \"vmlinux\"\n[network]\ndns = [\"example.org\"]\n",
    )
    .expect("spec");
    let out = hostd()
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(dir.path().join("x.img"))
        .output()
        .expect("build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("network.dns") && err.contains("example.org"),
        "{err}"
    );
}
