//! What the daemon tests share: a real `hostd daemon` on a temporary socket and state
//! directory, its API through hostd-daemon's own client, and the guest images they boot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostd_daemon::client::{Answer, Client};
use hostd_daemon::guests::record::{GuestState, GuestStatus};
use hostd_daemon::hyper::Method;

use crate::common;

/// A long-lived busybox service that prints a greeting and then a numbered tick a second.
pub const TICKER_SPEC: &str = r#"
name = "ticker"
packages = ["busybox-static"]
[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "echo guest says hello; i=0; while true; do i=$((i+1)); echo tick $i; /bin/busybox sleep 1; done"]
main = true
"#;

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub client: Client,
}

impl Daemon {
    /// Starts `hostd daemon` with its socket and state in `dir`, extra args after.
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("hostd.sock");
        let state = dir.join("state");
        let log = dir.join(format!("daemon-{}.log", now_ms()));
        let err = std::fs::File::create(&log).expect("daemon log");
        let child = common::hostd()
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("HOSTD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn hostd daemon");
        let client = Client::new(&socket).expect("client");
        let d = Daemon {
            child: Some(child),
            socket,
            state,
            log,
            client,
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = d
                .client
                .raw(Method::GET, "/version", "application/json", Vec::new())
            {
                assert_eq!(a.status, 200);
                break;
            }
            assert!(Instant::now() < end, "daemon did not answer:\n{}", d.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// The daemon's own log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A request; the whole answer.
    pub fn req(
        &self,
        method: Method,
        path: &str,
        ctype: &str,
        body: impl Into<hostd_daemon::hyper::body::Bytes>,
    ) -> Answer {
        self.client
            .raw(method, path, ctype, body)
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", self.logs()))
    }

    /// GET a JSON answer (status must be 2xx).
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.client
            .json(Method::GET, path, None::<&()>)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()))
    }

    /// One guest's status.
    pub fn guest(&self, name: &str) -> GuestStatus {
        self.get(&format!("/guests/{name}"))
    }

    /// Waits until `pred` holds for guest `name` (panics with the daemon's log after
    /// `limit`).
    pub fn wait_guest(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&GuestStatus) -> bool,
    ) -> GuestStatus {
        let end = Instant::now() + limit;
        loop {
            let g = self.guest(name);
            if pred(&g) {
                return g;
            }
            assert!(
                Instant::now() < end,
                "guest {name} never got there: {g:?}\n--- console ---\n{}\n--- daemon ---\n{}",
                self.console(name),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest's console ring.
    pub fn console(&self, name: &str) -> String {
        let a = self.req(
            Method::GET,
            &format!("/guests/{name}/logs"),
            "text/plain",
            Vec::new(),
        );
        String::from_utf8_lossy(&a.body).into_owned()
    }

    /// Waits until the console of `name` has a line containing `needle`.
    pub fn wait_console(&self, name: &str, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let c = self.console(name);
            if c.contains(needle) {
                return c;
            }
            assert!(
                Instant::now() < end,
                "guest {name}: `{needle}` never appeared\n--- console ---\n{c}\n--- status ---\n{:?}\n--- daemon ---\n{}",
                self.guest(name),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9` of the daemon (its guests keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The hostd CLI pointed at this daemon.
    pub fn cli(&self) -> Command {
        let mut c = common::hostd();
        c.env("HOSTD_SOCKET", &self.socket);
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Guests outlive the daemon by design: kill their process groups first.
        if self.child.is_some() {
            if let Ok(gs) =
                self.client
                    .json::<Vec<GuestStatus>>(Method::GET, "/guests", None::<&()>)
            {
                for g in gs {
                    if let Some(pid) = g.pid {
                        kill_group(pid);
                    }
                }
            }
        }
        self.kill9();
    }
}

/// SIGKILL to a guest's process group (its `hostd run` is the leader of its session).
pub fn kill_group(pid: u32) {
    // SAFETY: kill takes no memory.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                .is_some_and(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// Waits until `pid` is gone.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn running(g: &GuestStatus) -> bool {
    g.state == GuestState::Running && g.pid.is_some()
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Creates a guest through the API: `POST /guests`.
pub fn create(d: &Daemon, body: serde_json::Value) -> GuestStatus {
    d.client
        .json(Method::POST, "/guests", Some(&body))
        .unwrap_or_else(|e| panic!("POST /guests {body}: {e}\n{}", d.logs()))
}

/// One HTTP/1.1 request on a fresh connection, written by hand the way any client
/// (curl) does: the body is written from another thread while the answer is read, and a
/// write that fails because the daemon answered early and closed (a body over its limit)
/// is ignored. Returns the status and the body.
pub fn raw_http(
    socket: &Path,
    method: &str,
    path: &str,
    ctype: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: hostd\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let _ = w
            .write_all(head.as_bytes())
            .and_then(|_| w.write_all(&body));
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            // The daemon may reset the connection after its answer when it did not read
            // the whole body; what was answered is already here.
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let text_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&resp)));
    let headers = String::from_utf8_lossy(&resp[..text_end]).into_owned();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {headers}"));
    let mut body = resp[text_end + 4..].to_vec();
    if let Some(len) = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    (status, body)
}
