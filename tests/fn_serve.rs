//! End-to-end tests of `hostd fn serve`: a real `hostd` process on a loopback
//! port, a real HTTP client, the example components in `sandbox/examples/`.
//! No wall-clock assertions: bounded counts and timeouts only.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
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

impl Server {
    fn start(target: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_limited(target, extra, env, None)
    }

    /// Starts hostd with its open-file limit (soft and hard) set to `nofile`.
    fn start_limited(
        target: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Server {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fn-compile-cache");
        let mut cmd = Command::new(common::hostd_exe());
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
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let set_limit = move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                // SAFETY: setrlimit reads the struct we pass by reference and
                // nothing else; it is async-signal-safe.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            // SAFETY: the closure runs in the child between fork and exec and
            // only calls setrlimit (async-signal-safe) on a stack value.
            unsafe {
                cmd.pre_exec(set_limit);
            }
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

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// Log lines containing every needle.
    fn count_log(&self, needles: &[&str]) -> usize {
        let log = self.log.lock().unwrap();
        log.lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits (bounded) for a log line containing every needle.
    fn wait_log(&self, needles: &[&str]) -> String {
        common::wait_log_line(&self.log, needles)
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
    // Handles beyond the resource-table cap trap the function.
    let (status, body) = get(&a, &server.url("/evil/handles"));
    assert_eq!(status, 500, "{body}");
    server.wait_log(&["resource table has no free", "function=handle-hog"]);
    assert_eq!(get(&a, &server.url("/hello")).0, 200, "after /evil/handles");
    // Nothing the thief did reached the counter.
    assert_eq!(get(&a, &server.url("/counter")), (200, "1\n".into()));
}

/// More functions in a CPU loop than the server has worker threads: the WebAssembly
/// yields at every epoch tick, so other requests are still answered while every loop
/// runs (before, each loop held a worker for its whole time limit and `/hello` waited
/// for them to be stopped).
#[test]
fn functions_in_a_cpu_loop_do_not_hold_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = examples().join("wasm");
    let manifest = dir.path().join("fns.toml");
    std::fs::write(
        &manifest,
        format!(
            "[functions.hello]\ncomponent = {:?}\nroutes = [\"/hello\"]\n\n\
             [functions.spin]\ncomponent = {:?}\nroutes = [\"/spin\"]\ntime_ms = 4000\n",
            wasm.join("hello.wasm"),
            wasm.join("spin.wasm"),
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&manifest, &["--state-dir", state.to_str().unwrap()], &[]);
    let a = agent();
    assert_eq!(get(&a, &server.url("/hello")).0, 200);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ended = Arc::new(AtomicUsize::new(0));
    let spinners: Vec<_> = (0..=workers)
        .map(|_| {
            let url = server.url("/spin");
            let ended = ended.clone();
            std::thread::spawn(move || {
                let r = get(&agent(), &url);
                ended.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    // Give the loops time to reach the server (a delay, not a measured limit: were they
    // late, `/hello` would only be answered sooner).
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        assert_eq!(get(&a, &server.url("/hello")).0, 200);
    }
    assert_eq!(
        ended.load(Ordering::SeqCst),
        0,
        "/hello was answered only after a CPU loop had been stopped"
    );
    for s in spinners {
        let (status, body) = s.join().unwrap();
        assert_eq!(status, 504, "{body}");
    }
}

/// HTTP/1.0 may leave out Host: served (the function sees `localhost`). HTTP/1.1 must
/// have it: 400, not a function failure (it was answered 500 and counted against the
/// function).
#[test]
fn requests_without_a_host_header() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::examples(state.path());
    let mut s = connect(&server.addr());
    s.write_all(b"GET /hello HTTP/1.0\r\n\r\n").unwrap();
    let resp = String::from_utf8_lossy(&read_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.contains("hello from a nanoservice"), "{resp}");
    let mut s = connect(&server.addr());
    s.write_all(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = String::from_utf8_lossy(&read_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("Host header"), "{resp}");
    assert_eq!(
        server.count_log(&["request failed"]),
        0,
        "{}",
        server.log.lock().unwrap()
    );
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

/// `/hello` requested in a loop by 64 threads (each with its own keep-alive
/// connection) until stopped, at most `MAX_PER_THREAD` times each.
struct HelloLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(usize, Vec<String>)>>,
}

impl HelloLoad {
    const CONCURRENCY: usize = 64;
    const MAX_PER_THREAD: usize = 100_000;

    fn start(url: String) -> HelloLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..Self::CONCURRENCY)
            .map(|_| {
                let url = url.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let a = agent();
                    let mut n = 0;
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) && n < Self::MAX_PER_THREAD {
                        n += 1;
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
        HelloLoad { stop, threads }
    }

    /// Stops the load; returns how many requests were made and every error.
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        let mut errors = Vec::new();
        for t in self.threads {
            let (n, e) = t.join().unwrap();
            total += n;
            errors.extend(e);
        }
        (total, errors)
    }
}

fn assert_hello_load_clean(load: HelloLoad, server: &Server) -> usize {
    let (total, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} of {total} /hello requests failed, first: {:?}; server log:\n{}",
        errors.len(),
        errors.first(),
        server.log.lock().unwrap()
    );
    assert!(
        total >= HelloLoad::CONCURRENCY,
        "only {total} /hello requests"
    );
    total
}

/// Raises this test process's open-file limit so that it can hold `needed`
/// sockets; false (after one SKIP line, or a panic under CI=true) when the
/// hard limit does not allow it.
fn room_for_sockets(needed: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < needed && lim.rlim_max >= needed {
        lim.rlim_cur = needed;
        // SAFETY: setrlimit reads the struct we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
    common::require(
        &format!("an open-file limit of {needed} for the test process"),
        lim.rlim_cur >= needed,
        "raise the hard limit: ulimit -Hn",
    )
}

/// A raw loopback connection whose reads and writes fail after 60 s instead of hanging.
fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Reads a response head (up to the blank line), one byte at a time.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 64 << 10, "response head too long");
        s.read_exact(&mut b).expect("reading the response head");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads until the server closes the connection (end of file or reset);
/// panics if it is still open after 60 s.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = [0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return data,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return data,
            Err(e) => panic!("connection not closed by the server: {e}"),
        }
    }
}

/// A chunked body cut off by the server lacks the final zero-length chunk.
fn assert_truncated(head: &str, body: &[u8]) {
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        !body.ends_with(b"0\r\n\r\n"),
        "body of {} bytes ended normally",
        body.len()
    );
}

/// Opens `n` connections that never send a byte, then waits (bounded) until
/// the server has closed every one of them; none may receive a byte.
fn idle_flood(addr: &str, n: usize) {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(connect(addr));
    }
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("idle connection {i} received data"),
            Err(e) => panic!("idle connection {i} still open: {e}"),
        }
    }
}

#[test]
fn abusive_clients_are_cut_off_while_hello_answers() {
    const IDLE: usize = 5_000;
    // Both idle floods may run at once in this process.
    if !room_for_sockets(2 * IDLE as u64 + 1024) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(
        &examples().join("fns.toml"),
        &[
            "--state-dir",
            state.path().to_str().unwrap(),
            "--header-timeout",
            "2",
            "--idle-timeout",
            "5",
            "--max-connections",
            "1000",
        ],
        &[],
    );
    let started = Instant::now();
    let load = HelloLoad::start(server.url("/hello"));
    let addr = server.addr();

    // A client reading the body one byte a second.
    let slow_reader = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = connect(&addr);
            s.write_all(b"GET /evil/endless HTTP/1.1\r\nhost: test\r\n\r\n")
                .unwrap();
            let head = read_head(&mut s);
            let mut b = [0u8; 1];
            for _ in 0..5 {
                s.read_exact(&mut b).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            }
            (head, read_until_closed(&mut s))
        })
    };
    // A function streaming forever to a client that reads everything.
    let streamer = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = connect(&addr);
            s.write_all(b"GET /evil/endless?interval_ms=50 HTTP/1.1\r\nhost: test\r\n\r\n")
                .unwrap();
            let head = read_head(&mut s);
            (head, read_until_closed(&mut s))
        })
    };
    // A client sending its headers one byte a second.
    let slow_headers = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = connect(&addr);
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = w.write_all(b"GET /hello HTTP/1.1\r\n");
                for b in b"x-slow: abcdefghijklmnopqrstuvwxyz\r\n\r\n" {
                    std::thread::sleep(Duration::from_secs(1));
                    if w.write_all(&[*b]).is_err() {
                        return;
                    }
                }
            });
            let answer = read_until_closed(&mut s);
            let _ = s.shutdown(std::net::Shutdown::Both);
            writer.join().unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        })
    };
    // Five thousand connections that never send a byte.
    idle_flood(&addr, IDLE);

    let (head, body) = slow_reader.join().unwrap();
    assert_truncated(&head, &body);
    let (head, body) = streamer.join().unwrap();
    assert_truncated(&head, &body);
    let answer = slow_headers.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("request headers not received"), "{answer}");

    let hellos = assert_hello_load_clean(load, &server);
    let elapsed = started.elapsed().as_secs() as usize;
    eprintln!("{hellos} /hello answered while {IDLE} idle connections came and went");

    server.wait_log(&[
        "function=endless",
        "capability=time",
        "while sending the response body",
    ]);
    server.wait_log(&["request headers not received in time", "answered 408"]);
    server.wait_log(&["closed idle connection"]);
    server.wait_log(&["connection limit reached: closed the longest-idle connection"]);
    // Rate-limited: at most one line a second per kind, not one per connection.
    for kind in [
        "closed idle connection",
        "closed the longest-idle connection",
    ] {
        let lines = server.count_log(&[kind]);
        assert!(
            lines <= elapsed + 2,
            "{lines} lines of {kind:?} in {elapsed} s"
        );
    }
}

#[test]
fn idle_connections_beyond_a_low_fd_limit_do_not_stop_hello() {
    const IDLE: usize = 5_000;
    if !room_for_sockets(2 * IDLE as u64 + 1024) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let server = Server::start_limited(
        &examples().join("fns.toml"),
        &[
            "--state-dir",
            state.path().to_str().unwrap(),
            "--idle-timeout",
            "5",
        ],
        &[],
        Some(1024),
    );
    server.wait_log(&["connection cap lowered", "max_connections=512"]);
    let started = Instant::now();
    let load = HelloLoad::start(server.url("/hello"));
    idle_flood(&server.addr(), IDLE);
    assert_hello_load_clean(load, &server);
    let elapsed = started.elapsed().as_secs() as usize;
    server.wait_log(&["connection limit reached: closed the longest-idle connection"]);
    let lines = server.count_log(&["connection"]);
    assert!(
        lines <= 3 * (elapsed + 2) + 5,
        "{lines} log lines about connections in {elapsed} s"
    );
    assert_eq!(server.count_log(&["out of file descriptors"]), 0);
}

#[test]
fn connection_cap_answers_503_when_every_connection_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("fns.toml");
    std::fs::write(
        &manifest,
        format!(
            "[functions.hello]\ncomponent = {:?}\nroutes = [\"/hello\"]\n\
             [functions.endless]\ncomponent = {:?}\nroutes = [\"/endless\"]\ntime_ms = 30000\n",
            examples().join("wasm/hello.wasm"),
            examples().join("wasm/endless.wasm"),
        ),
    )
    .unwrap();
    let server = Server::start(&manifest, &["--max-connections", "4"], &[]);
    let addr = server.addr();
    let mut busy: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect(&addr);
            s.write_all(b"GET /endless?interval_ms=100 HTTP/1.1\r\nhost: test\r\n\r\n")
                .unwrap();
            assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    let mut refused = connect(&addr);
    let _ = refused.write_all(b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut refused)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer.contains("connection limit (4 connections, all busy)"),
        "{answer}"
    );
    server.wait_log(&["every connection busy: answered 503", "max_connections=4"]);
    // Once the busy connections go, the server answers again.
    for s in busy.drain(..) {
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match agent().get(&server.url("/hello")).call() {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no answer after the busy clients left: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_function_filling_its_bucket_hits_the_quota() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::examples(state.path());
    let a = agent();
    let (status, body) = get(&a, &server.url("/evil/fill?mb=100"));
    assert_eq!(status, 507, "{body}");
    assert!(
        body.contains("bucket \"fill\" is full") && body.contains("kv_bucket_mb"),
        "{body}"
    );
    let written: u64 = body
        .strip_prefix("wrote ")
        .and_then(|b| b.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        written <= 16 << 20,
        "{written} bytes stored past a 16 MiB quota"
    );
    server.wait_log(&[
        "function=bucket-filler",
        "capability=keyvalue",
        "bucket=fill",
        "quota",
    ]);
    // A value above kv_value_kb (1 MiB by default) is refused on its own.
    let (status, body) = get(&a, &server.url("/evil/fill?mb=2&value_kb=2048"));
    assert_eq!(status, 507, "{body}");
    assert!(
        body.contains("wrote 0 bytes") && body.contains("kv_value_kb"),
        "{body}"
    );
    // The rest of the server is unaffected; the database did not take 100 MB.
    assert_eq!(get(&a, &server.url("/hello")).0, 200);
    assert_eq!(get(&a, &server.url("/counter")), (200, "1\n".into()));
    let db = std::fs::metadata(state.path().join("kv.redb"))
        .unwrap()
        .len();
    assert!(db < 100 << 20, "kv.redb is {db} bytes");
}

fn only_artifact(cache: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_tampered_compile_cache_artifact_is_refused_and_replaced() {
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let wasm = examples().join("wasm/hello.wasm");
    {
        let server = Server::start(&wasm, &["--cache-dir", cache_arg], &[]);
        assert_eq!(get(&agent(), &server.url("/")).0, 200);
    }
    let artifact = only_artifact(cache.path());
    let original = std::fs::read(&artifact).unwrap();
    let name = artifact.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.ends_with(&format!("-{}.cwasm", sha256_hex(&original))),
        "{name}"
    );
    // Same name, same size, different code bytes.
    let mut tampered = original.clone();
    let mid = tampered.len() / 2;
    for b in &mut tampered[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&artifact, &tampered).unwrap();

    let server = Server::start(&wasm, &["--cache-dir", cache_arg], &[]);
    let a = agent();
    for _ in 0..3 {
        assert_eq!(
            get(&a, &server.url("/")),
            (200, "hello from a nanoservice".into())
        );
    }
    server.wait_log(&["refusing cached artifact", &name, "does not match its name"]);
    drop(server);
    let replaced = only_artifact(cache.path());
    assert_eq!(
        std::fs::read(&replaced).unwrap(),
        original,
        "artifact not rewritten"
    );
}

#[test]
fn an_unsafe_cache_directory_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let wasm = examples().join("wasm/hello.wasm");
    let server = Server::start(&wasm, &["--cache-dir", cache.path().to_str().unwrap()], &[]);
    assert_eq!(get(&agent(), &server.url("/")).0, 200);
    server.wait_log(&["not using the compile cache", "writable by group or others"]);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

/// Runs `hostd fn serve ARGS`, which must fail (within 60 s) without serving;
/// returns its stderr.
fn serve_fails(args: &[&Path]) -> String {
    let mut child = Command::new(common::hostd_exe())
        .arg("fn")
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--no-cache"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hostd fn serve {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("listening on"), "{err}");
    err
}

#[test]
fn fifos_and_devices_as_component_or_manifest_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo_toml = dir.path().join("fns.toml");
    let fifo_wasm = dir.path().join("app.wasm");
    for f in [&fifo_toml, &fifo_wasm] {
        let ok = Command::new("mkfifo").arg(f).status().unwrap();
        assert!(ok.success(), "mkfifo {}", f.display());
    }
    let zero = Path::new("/dev/zero");
    let manifest_naming = |component: &Path, name: &str| {
        let m = dir.path().join(name);
        std::fs::write(
            &m,
            format!("[functions.a]\ncomponent = {component:?}\nroutes = [\"/a\"]\n"),
        )
        .unwrap();
        m
    };
    let names_zero = manifest_naming(zero, "zero.toml");
    let names_fifo = manifest_naming(&fifo_wasm, "fifo.toml");
    let cases: [(&Path, &str, &Path); 5] = [
        (&fifo_toml, "manifest", &fifo_toml),
        (&fifo_wasm, "component", &fifo_wasm),
        (zero, "manifest", zero),
        (&names_zero, "component", zero),
        (&names_fifo, "component", &fifo_wasm),
    ];
    for (target, what, culprit) in cases {
        let err = serve_fails(&[target]);
        let expected = format!("{what} {}: is a", culprit.display());
        assert!(err.contains(&expected), "{}: {err}", target.display());
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn a_fifo_as_secret_file_is_refused_without_hanging_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let manifest = dir.path().join("fns.toml");
    std::fs::write(
        &manifest,
        format!(
            "[functions.s]\ncomponent = {:?}\nroutes = [\"/s\"]\nconfig = {{ greeting = \"hi\" }}\n\
             secrets = {{ api-token = {{ file = {:?} }} }}\n",
            examples().join("wasm/secret.wasm"),
            fifo,
        ),
    )
    .unwrap();
    let server = Server::start(&manifest, &[], &[]);
    let (status, body) = get(&agent(), &server.url("/s"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Unavailable"), "{body}");
    server.wait_log(&[
        "secret unavailable",
        "is a FIFO, not a regular file",
        fifo.to_str().unwrap(),
    ]);
    assert_eq!(
        get(&agent(), &server.url("/s")).0,
        403,
        "server still answers"
    );
}
