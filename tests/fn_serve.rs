//! End-to-end tests of `hostd fn serve`: a real `hostd` process on a loopback
//! port, a real HTTP client, the example components in `sandbox/examples/`.
//! No wall-clock assertions: bounded counts and timeouts only.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(300);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sandbox/examples")
}

/// A running `hostd fn serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

fn strip_ansi(s: &str) -> String {
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

impl Server {
    fn start(target: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fn-compile-cache");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostd"));
        cmd.arg("fn")
            .arg("serve")
            .arg(target)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !extra.contains(&"--cache-dir") {
            cmd.arg("--cache-dir").arg(&cache);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning hostd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "hostd fn serve did not start; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }

    fn examples(state: &Path) -> Server {
        Server::start(
            &examples().join("fns.toml"),
            &["--state-dir", state.to_str().unwrap()],
            &[],
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits (bounded) for a log line containing every needle.
    fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                    return line.to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending SIGTERM to our own child process by its pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hostd did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// GET → (status, body), for any status.
fn get(agent: &ureq::Agent, url: &str) -> (u16, String) {
    match agent.get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// A plain HTTP/1.1 server on 127.0.0.1 answering every request with `body`
/// after `delay`; `hits` receives one message per request received.
fn upstream(body: &'static str, delay: Duration) -> (String, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(());
                std::thread::sleep(delay);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes());
            });
        }
    });
    (format!("http://{addr}"), rx)
}

#[test]
fn every_example_route_answers() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::examples(state.path());
    let a = agent();
    let (up, _hits) = upstream("upstream says hi", Duration::ZERO);

    assert_eq!(
        get(&a, &server.url("/hello")),
        (200, "hello from a nanoservice".into())
    );
    assert_eq!(get(&a, &server.url("/counter")), (200, "1\n".into()));
    assert_eq!(get(&a, &server.url("/counter")), (200, "2\n".into()));
    assert_eq!(
        get(&a, &server.url(&format!("/fetch?url={up}/x"))),
        (200, "upstream says hi".into())
    );
    assert_eq!(
        get(&a, &server.url("/secret")),
        (
            200,
            "hello, config; api-token is 18 bytes: example-token-0123\n".into()
        )
    );
    assert_eq!(
        get(&a, &server.url("/files?name=hello.txt")),
        (
            200,
            "file says: a file from the host, read through a read-only preopen\n".into()
        )
    );
    assert_eq!(get(&a, &server.url("/files?name=missing.txt")).0, 404);
    assert_eq!(get(&a, &server.url("/no/such/route")).0, 404);
}

#[test]
fn hostile_functions_are_stopped_or_denied() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::examples(state.path());
    let a = agent();

    // The infinite loop runs in the background while the other routes answer.
    let spin_url = server.url("/evil/spin");
    let spinner = std::thread::spawn(move || get(&agent(), &spin_url));
    for _ in 0..20 {
        assert_eq!(get(&a, &server.url("/hello")).0, 200);
    }
    let (status, body) = spinner.join().unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("time limit"), "{body}");
    server.wait_log(&["function=spin", "capability=time"]);

    // (route, expected status, function, capability)
    let cases = [
        ("/evil/membomb", 500, "membomb", "memory"),
        ("/evil/escape", 403, "escape", "filesystem"),
        ("/evil/outbound", 403, "sneaky-fetch", "outbound"),
        ("/evil/bucket", 403, "bucket-thief", "keyvalue"),
        ("/evil/secret", 403, "secret-thief", "secret"),
    ];
    for (route, status, function, capability) in cases {
        let (got, body) = get(&a, &server.url(route));
        assert_eq!(got, status, "{route}: {body}");
        assert!(!body.contains("root:"), "{route} leaked: {body}");
        server.wait_log(&[
            &format!("function={function}"),
            &format!("capability={capability}"),
        ]);
        assert_eq!(get(&a, &server.url("/hello")).0, 200, "after {route}");
    }
    // Nothing the thief did reached the counter.
    assert_eq!(get(&a, &server.url("/counter")), (200, "1\n".into()));
}

#[test]
fn counter_survives_restart_and_concurrent_increments() {
    let state = tempfile::tempdir().unwrap();
    let mut server = Server::examples(state.path());
    let url = server.url("/counter");
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&agent(), &url))
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{body}");
        seen.insert(body.trim().parse::<u64>().unwrap());
    }
    assert_eq!(
        seen,
        (1..=64).collect::<BTreeSet<_>>(),
        "every increment counted once"
    );
    assert!(server.terminate().success());

    let server = Server::examples(state.path());
    assert_eq!(get(&agent(), &server.url("/counter")), (200, "65\n".into()));
}

#[test]
fn ten_thousand_hellos_at_concurrency_64() {
    const TOTAL: usize = 10_000;
    const CONCURRENCY: usize = 64;
    let state = tempfile::tempdir().unwrap();
    let server = Server::examples(state.path());
    let url = server.url("/hello");
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|i| {
            let url = url.clone();
            let n = TOTAL / CONCURRENCY + usize::from(i < TOTAL % CONCURRENCY);
            std::thread::spawn(move || {
                let a = agent();
                let mut errors = Vec::new();
                for _ in 0..n {
                    match a.get(&url).call() {
                        Ok(r) if r.status() == 200 => {
                            let body = r.into_string().unwrap_or_default();
                            if body != "hello from a nanoservice" {
                                errors.push(format!("body {body:?}"));
                            }
                        }
                        Ok(r) => errors.push(format!("status {}", r.status())),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (n, errors)
            })
        })
        .collect();
    let mut done = 0;
    let mut errors = Vec::new();
    for t in threads {
        let (n, e) = t.join().unwrap();
        done += n;
        errors.extend(e);
    }
    assert_eq!(done, TOTAL);
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let state = tempfile::tempdir().unwrap();
    let mut server = Server::examples(state.path());
    let (up, hits) = upstream("slow answer", Duration::from_millis(1500));
    let url = server.url(&format!("/fetch?url={up}/slow"));
    let in_flight = std::thread::spawn(move || get(&agent(), &url));
    hits.recv_timeout(Duration::from_secs(60))
        .expect("request reached upstream");
    let status = server.terminate();
    assert_eq!(in_flight.join().unwrap(), (200, "slow answer".into()));
    assert!(status.success(), "{status:?}");
    server.wait_log(&["SIGTERM"]);
    let addr = server.base.trim_start_matches("http://").to_string();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after SIGTERM"
    );
}

#[test]
fn single_component_is_served_at_every_path_without_grants() {
    let server = Server::start(&examples().join("wasm/hello.wasm"), &[], &[]);
    let a = agent();
    assert_eq!(
        get(&a, &server.url("/")),
        (200, "hello from a nanoservice".into())
    );
    assert_eq!(
        get(&a, &server.url("/any/path")),
        (200, "hello from a nanoservice".into())
    );

    // A function with no grants gets nothing: the secret reader is denied.
    let thief = Server::start(&examples().join("wasm/secret.wasm"), &[], &[]);
    assert_eq!(get(&a, &thief.url("/")).0, 403);
    thief.wait_log(&["capability=config"]);
}

#[test]
fn secrets_come_from_the_host_environment() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("fns.toml");
    let wasm = examples().join("wasm/secret.wasm");
    std::fs::write(
        &manifest,
        format!(
            "[functions.s]\ncomponent = {:?}\nroutes = [\"/s\"]\nconfig = {{ greeting = \"hi\" }}\n\
             secrets = {{ api-token = {{ env = \"HOSTD_TEST_TOKEN\" }} }}\n",
            wasm.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(&manifest, &[], &[("HOSTD_TEST_TOKEN", "from-env")]);
    assert_eq!(
        get(&agent(), &server.url("/s")),
        (200, "hi; api-token is 8 bytes: from-env\n".into())
    );
}

#[test]
fn compiled_components_are_cached_by_digest_and_engine() {
    use sha2::Digest;
    let cache = tempfile::tempdir().unwrap();
    let wasm = examples().join("wasm/hello.wasm");
    let digest: String = sha2::Sha256::digest(std::fs::read(&wasm).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cache_arg = cache.path().to_str().unwrap();
    for _ in 0..2 {
        let server = Server::start(&wasm, &["--cache-dir", cache_arg], &[]);
        assert_eq!(get(&agent(), &server.url("/")).0, 200);
    }
    let names: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with(&format!("{digest}-")) && names[0].ends_with(".cwasm"),
        "{names:?}"
    );
}
