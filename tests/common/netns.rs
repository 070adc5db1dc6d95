//! A network namespace with a TAP device at 10.0.2.1/24 for a guest's net backend,
//! deleted on drop: the network tests' host side, kept off the host's own network.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether a command-line tool is installed (it answers `-V` or `--version`).
pub fn tool(name: &str) -> bool {
    Command::new(name).arg("-V").output().is_ok()
        || Command::new(name).arg("--version").output().is_ok()
}

/// Whether `ip` and `curl` are installed (skips loudly or fails under CI=true as
/// [`super::require`] does).
#[must_use]
pub fn require_ip_and_curl() -> bool {
    super::require(
        "ip and curl",
        tool("ip") && tool("curl"),
        "apt-get install iproute2 curl",
    )
}

/// A network namespace holding TAP device `tap` at 10.0.2.1/24.
pub struct Netns(String);

impl Netns {
    /// Creates it; `tag` keeps the names of namespaces made by one test process apart.
    pub fn new(tap: &str, tag: &str) -> Netns {
        let name = format!("hostdt{}{tag}", std::process::id());
        let ns = Netns(name.clone());
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &name]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name];
            all.extend_from_slice(args);
            run(&all);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "tuntap", "add", tap, "mode", "tap"]);
        inside(&["ip", "addr", "add", "10.0.2.1/24", "dev", tap]);
        inside(&["ip", "link", "set", tap, "up"]);
        ns
    }

    /// The namespace's name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.0
    }

    /// `ip netns exec NAME`, to which the caller adds the command to run inside.
    pub fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }

    /// Asks `url` with curl from inside the namespace until the answer contains
    /// `expect`, for at most 300 s (30 s per request); returns the last answer. Generous:
    /// on a slow day of a nested PVM host busybox httpd takes a minute to listen after it
    /// started and a request tens of seconds (docs/pvm.md). The loop ends at the answer.
    pub fn curl_until(&self, url: &str, expect: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = self
                .exec()
                .args(["curl", "-s", "--max-time", "30", url])
                .output()
                .expect("curl");
            let answer = String::from_utf8_lossy(&out.stdout).into_owned();
            if answer.contains(expect) || Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A UDP socket bound to `addr` inside the namespace (made on a thread that joins
    /// the namespace, so the test's own threads stay where they are).
    pub fn udp(&self, addr: &str) -> UdpSocket {
        let path = format!("/run/netns/{}", self.0);
        let addr = addr.to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd; it changes only this thread's
            // network namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            UdpSocket::bind(&addr).expect("bind the socket")
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
