//! Capabilities on the wire, end to end: real `hostd fn serve` processes, real
//! sockets, the example components. Function `a` (the fetcher) is granted the
//! capability `bsvc` of function `b` (hello) and calls `http://bsvc/b`; the host
//! carries the request over Noise. No wall-clock assertions.
#![allow(clippy::unwrap_used)]

mod common;

use common::cap_cli;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const HELLO: &str = "hello from a nanoservice";

fn wasm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("sandbox/examples/wasm/{name}.wasm"))
}

/// A running `hostd fn serve` (optionally inside a network namespace), killed on drop.
struct Server {
    child: Child,
    addr: String,
    cap_addr: Option<String>,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(
        netns: Option<&str>,
        manifest: &Path,
        state: &Path,
        cap_listen: Option<&str>,
    ) -> Server {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fn-compile-cache");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(common::hostd_exe());
                c
            }
            None => Command::new(common::hostd_exe()),
        };
        cmd.args(["fn", "serve"])
            .arg(manifest)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .arg("--cache-dir")
            .arg(&cache)
            .env("RUST_LOG", "info,hostd_caps=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = cap_listen {
            cmd.args(["--cap-listen", c]);
        }
        let mut child = cmd.spawn().expect("spawning hostd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = common::strip_ansi(&line);
                if let Some(rest) = line.split("capability listener ready addr=").nth(1) {
                    let _ = tx.send(("cap", rest.trim().to_string()));
                }
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(("http", rest.trim().to_string()));
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut addr = None;
        let mut cap_addr = None;
        while addr.is_none() {
            match rx.recv_timeout(Duration::from_secs(300)) {
                Ok(("cap", a)) => cap_addr = Some(a),
                Ok((_, a)) => addr = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "hostd fn serve did not start; log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        assert_eq!(
            cap_addr.is_some(),
            cap_listen.is_some(),
            "{}",
            log.lock().unwrap()
        );
        Server {
            child,
            addr: addr.unwrap(),
            cap_addr,
            log,
        }
    }

    fn wait_log(&self, needles: &[&str]) -> String {
        common::wait_log_line(&self.log, needles)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over a fresh connection (HTTP/1.0, so the body ends at close).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read the response");
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// One relayed connection's bytes, each direction.
#[derive(Default, Clone)]
struct Captured {
    to_service: Vec<u8>,
    to_caller: Vec<u8>,
}

/// A TCP relay in front of `target` that keeps every byte it passes on.
fn relay(target: String) -> (String, Arc<Mutex<Vec<Captured>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let conns = Arc::new(Mutex::new(Vec::<Captured>::new()));
    let all = conns.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let idx = {
                let mut c = all.lock().unwrap();
                c.push(Captured::default());
                c.len() - 1
            };
            let pipe = |mut from: TcpStream,
                        mut to: TcpStream,
                        all: Arc<Mutex<Vec<Captured>>>,
                        up: bool| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        {
                            let mut c = all.lock().unwrap();
                            let rec = &mut c[idx];
                            if up {
                                rec.to_service.extend_from_slice(&buf[..n]);
                            } else {
                                rec.to_caller.extend_from_slice(&buf[..n]);
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                all.clone(),
                true,
            );
            pipe(server, client, all.clone(), false);
        }
    });
    (addr, conns)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("fns.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Host side B serves `b` as capability service `bsvc`; `a` holds its capability,
/// `c` does not. Through a relay that records the wire.
#[test]
fn granted_function_calls_a_capability_over_noise_and_others_are_denied() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        &format!(
            r#"
[functions.b]
component = "{hello}"
routes = ["/b"]
service = "bsvc"

[functions.a]
component = "{fetch}"
routes = ["/fetch"]
capabilities = ["bsvc", "badsvc"]

[functions.c]
component = "{fetch}"
routes = ["/cfetch"]
"#,
            hello = wasm("hello").display(),
            fetch = wasm("fetch").display()
        ),
    );
    let server = Server::start(None, &manifest, &state, Some("127.0.0.1:0"));
    let cap_addr = server.cap_addr.clone().unwrap();
    let (relay_addr, wire) = relay(cap_addr.clone());

    // Mint B's capability (location: the relay) and hold it as `bsvc`.
    let cap = cap_cli(&state, &["new", "bsvc", "--location", &relay_addr]);
    let cap = cap.trim();
    assert!(cap.starts_with("hostd-cap:1.bsvc@"), "{cap}");
    cap_cli(&state, &["add", "bsvc", cap]);
    let key = state.join("caps/services/bsvc.key");
    let mode = std::fs::metadata(&key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // A, granted: B's answer.
    let (status, body) = get(&server.addr, "/fetch?url=http://bsvc/b");
    assert_eq!((status, body.as_str()), (200, HELLO), "{}", server.log());

    // C, not granted: denied, with a log line naming it.
    let (status, body) = get(&server.addr, "/cfetch?url=http://bsvc/b");
    assert_eq!(status, 403, "{body}");
    server.wait_log(&[
        "denied: capability not granted",
        "function=c",
        "capability=cap",
        "name=bsvc",
    ]);

    // The wire carried no plaintext: neither B's answer nor A's request.
    let captured = wire.lock().unwrap().clone();
    assert_eq!(captured.len(), 1, "one relayed connection");
    let c = &captured[0];
    assert!(c.to_service.len() > 48 && c.to_caller.len() > 48);
    for needle in [HELLO.as_bytes(), b"GET /b", b"bsvc\r\n", b"HTTP/1.1"] {
        assert!(
            !contains(&c.to_service, needle),
            "plaintext {:?} on the wire",
            String::from_utf8_lossy(needle)
        );
        assert!(
            !contains(&c.to_caller, needle),
            "plaintext {:?} on the wire",
            String::from_utf8_lossy(needle)
        );
    }
    // The service name travels in clear in the first frame (documented); keys never.
    let psk_hex = &cap[cap.len() - 9 - 64..cap.len() - 9];
    assert!(!contains(&c.to_service, psk_hex.as_bytes()));

    // A replayed handshake (and the recorded request after it) gets nowhere:
    // the responder answers with a fresh ephemeral key, the recorded frames do
    // not decrypt, the connection is closed, B never runs.
    let mut replay = TcpStream::connect(&cap_addr).unwrap();
    replay
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    replay.write_all(&c.to_service).unwrap();
    let mut answer = Vec::new();
    let _ = replay.read_to_end(&mut answer);
    assert_ne!(answer, c.to_caller, "the replay got the recorded answer");
    assert!(
        answer.len() < 100,
        "the replay got more than a handshake answer: {} bytes",
        answer.len()
    );
    server.wait_log(&["capability connection closed: frame did not decrypt"]);

    // A wrong psk: a capability for the same service and key with another psk.
    let mut forged = hostd_caps::Capability::parse(cap).unwrap();
    forged.psk[0] ^= 0x55;
    cap_cli(&state, &["add", "badsvc", &forged.reveal()]);
    let (status, body) = get(&server.addr, "/fetch?url=http://badsvc/b");
    assert_eq!(status, 502, "{body}");
    server.wait_log(&[
        "capability handshake refused",
        "no such capability, or it was revoked",
    ]);
    server.wait_log(&[
        "capability call failed",
        "function=a",
        "name=badsvc",
        "handshake",
    ]);

    // Revoked: the same call that worked now fails the handshake.
    let id = hostd_caps::Capability::parse(cap).unwrap().id();
    let ls = cap_cli(&state, &["ls"]);
    assert!(ls.contains(&id) && ls.contains("valid"), "{ls}");
    assert!(!ls.contains(psk_hex), "hostd cap ls shows a psk:\n{ls}");
    cap_cli(&state, &["revoke", &id]);
    let (status, body) = get(&server.addr, "/fetch?url=http://bsvc/b");
    assert_eq!(status, 502, "{body}");
    server.wait_log(&[
        "capability call failed",
        "function=a",
        "name=bsvc",
        "handshake",
    ]);
    assert!(cap_cli(&state, &["ls"]).contains("revoked"));

    // Nothing logged the whole capability.
    assert!(!server.log().contains(psk_hex), "a psk reached the log");
}

/// Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), deleted on drop.
struct TwoHosts(String, String);

impl TwoHosts {
    fn new() -> TwoHosts {
        let tag = std::process::id();
        let (h1, h2) = (format!("hostdcap1{tag}"), format!("hostdcap2{tag}"));
        let hosts = TwoHosts(h1.clone(), h2.clone());
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (v1, v2) = (
            format!("hc1{}", tag % 100000),
            format!("hc2{}", tag % 100000),
        );
        run(&["netns", "add", &h1]);
        run(&["netns", "add", &h2]);
        run(&["link", "add", &v1, "type", "veth", "peer", "name", &v2]);
        run(&["link", "set", &v1, "netns", &h1]);
        run(&["link", "set", &v2, "netns", &h2]);
        for (ns, dev, ip) in [(&h1, &v1, "10.77.0.1/24"), (&h2, &v2, "10.77.0.2/24")] {
            run(&["-n", ns, "link", "set", "lo", "up"]);
            run(&["-n", ns, "addr", "add", ip, "dev", dev]);
            run(&["-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }

    /// `get` made from a thread inside namespace `ns`.
    fn get_in(ns: &str, addr: &str, path: &str) -> (u16, String) {
        let (ns, addr, path) = (
            format!("/run/netns/{ns}"),
            addr.to_string(),
            path.to_string(),
        );
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd; it changes only this thread's
            // network namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            get(&addr, &path)
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).output();
    }
}

/// A capability minted on host 1 lets a function on host 2 call host 1's service
/// across two network namespaces; revoked, it fails the handshake.
#[test]
fn capability_minted_on_one_host_works_from_another() {
    if !common::require(
        "root (network namespaces)",
        common::is_root(),
        "run the tests as root",
    ) || !common::require(
        "ip (iproute2)",
        common::netns::tool("ip"),
        "apt-get install iproute2",
    ) {
        return;
    }
    let hosts = TwoHosts::new();
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    let d1 = dir.path().join("h1");
    let d2 = dir.path().join("h2");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let m1 = write_manifest(
        &d1,
        &format!(
            "[functions.b]\ncomponent = \"{}\"\nroutes = [\"/b\"]\nservice = \"bsvc\"\n",
            wasm("hello").display()
        ),
    );
    let m2 = write_manifest(
        &d2,
        &format!(
            "[functions.a]\ncomponent = \"{f}\"\nroutes = [\"/fetch\"]\ncapabilities = [\"remote\"]\n\n[functions.c]\ncomponent = \"{f}\"\nroutes = [\"/cfetch\"]\noutbound = [\"10.77.0.1\"]\n",
            f = wasm("fetch").display()
        ),
    );
    let host1 = Server::start(Some(&hosts.0), &m1, &s1, Some("10.77.0.1:7443"));
    let host2 = Server::start(Some(&hosts.1), &m2, &s2, None);

    let cap = cap_cli(&s1, &["new", "bsvc", "--location", "10.77.0.1:7443"]);
    cap_cli(&s2, &["add", "remote", cap.trim()]);

    let (status, body) = TwoHosts::get_in(&hosts.1, &host2.addr, "/fetch?url=http://remote/b");
    assert_eq!(
        (status, body.as_str()),
        (200, HELLO),
        "host1:\n{}\nhost2:\n{}",
        host1.log(),
        host2.log()
    );

    // Host 2's other function, even granted the address itself, gets nothing
    // from the capability port without the capability.
    // (Plain HTTP there is not a handshake: the responder waits for the rest of
    // a "frame" until the caller's time limit ends it, 504, or closes, 502.)
    let (status, body) =
        TwoHosts::get_in(&hosts.1, &host2.addr, "/cfetch?url=http://10.77.0.1:7443/b");
    assert!(matches!(status, 502 | 504), "{status} {body}");
    assert!(!body.contains(HELLO));

    let id = hostd_caps::Capability::parse(&cap).unwrap().id();
    cap_cli(&s1, &["revoke", &id]);
    // Refused handshakes are logged at most once a second (a flood must not
    // flood the log): let the previous refusal's second pass.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, _) = TwoHosts::get_in(&hosts.1, &host2.addr, "/fetch?url=http://remote/b");
    assert_eq!(status, 502);
    host1.wait_log(&[
        "capability handshake refused",
        "no such capability, or it was revoked",
    ]);
    host2.wait_log(&["capability call failed", "function=a", "name=remote"]);
}
