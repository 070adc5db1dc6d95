//! Benchmark: function deploys and the deploy front, in one run.
//!
//! 1. Deploy-to-serving time through `hostd_sandbox::deploy::FunctionHost`
//!    (in-process): from the `deploy` call to the first 200 through the front,
//!    with a cold compile cache and with the component already compiled; a
//!    new version of a function that is serving; a rollback (a pointer move);
//!    and how long a host with 3 functions takes to open again (a restart).
//! 2. Requests/s and p50/p99 of the `hello` component served by a real
//!    `hostd daemon --listen` process (deployed through its API with
//!    `hostd fn deploy`) and by `hostd fn serve`, the same load client and
//!    load against each, one after the other. `wasmtime serve` joins when a
//!    `wasmtime` binary is on PATH, named by `WASMTIME`, or in
//!    `~/.cache/hostd/wasmtime-cli/bin`; otherwise the run says it was skipped.
//!
//! Prints a table and writes `target/bench/fn_deploy.json`.
//! `cargo bench --bench fn_deploy` (env: `FN_BENCH_REQUESTS`,
//! `FN_BENCH_CONCURRENCY`, `WASMTIME`).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostd_sandbox::deploy::{DeploySpec, FunctionHost, HostOptions};
use hostd_sandbox::server::{self, ConnectionLimits};

/// Deploys measured per case (medians reported).
const ROUNDS: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn wasm(name: &str) -> PathBuf {
    root().join(format!("sandbox/examples/wasm/{name}.wasm"))
}

fn spec(component: &str, route: &str, grants: &str) -> DeploySpec {
    DeploySpec {
        component: component.to_owned(),
        routes: vec![route.to_owned()],
        grants: toml::from_str(grants).unwrap(),
        health_check: None,
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().map(ms).unwrap_or(f64::NAN)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

/// GETs `url` until it answers 200.
fn until_200(a: &ureq::Agent, url: &str) {
    let t = Instant::now();
    loop {
        if let Ok(r) = a.get(url).call() {
            if r.status() == 200 {
                let _ = r.into_string();
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{url} never answered 200"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A host in a runtime of its own, with its front on 127.0.0.1:0. Dropping
/// it stops the runtime (and with it the front), as a process exit would.
struct Running {
    host: FunctionHost,
    base: String,
    rt: tokio::runtime::Runtime,
}

impl Running {
    fn open(state: &Path, cache: &Path) -> Running {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = HostOptions::new(state);
        opts.cache_dir = Some(cache.to_owned());
        let host = FunctionHost::open(opts).unwrap();
        let listener = rt
            .block_on(server::bind("127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let served = host.clone();
        rt.spawn(async move {
            served
                .serve(
                    listener,
                    ConnectionLimits::default(),
                    std::future::pending(),
                    Duration::from_secs(1),
                )
                .await;
        });
        Running { host, base, rt }
    }

    fn deploy(&self, name: &str, s: DeploySpec) {
        self.rt.block_on(self.host.deploy(name, s)).unwrap();
    }
}

struct DeployFigures {
    cold_deploy_ms: f64,
    cold_to_first_200_ms: f64,
    cached_deploy_ms: f64,
    cached_to_first_200_ms: f64,
    new_version_to_first_200_ms: f64,
    rollback_ms: f64,
    reopen_ms: f64,
    reopen_to_all_3_answer_ms: f64,
}

/// Part 1: deploy-to-serving, in-process.
fn deploy_figures(work: &Path) -> DeployFigures {
    let hello = std::fs::read(wasm("hello")).unwrap();
    let version = std::fs::read(wasm("version")).unwrap();
    let a = agent();
    let shared_cache = work.join("shared-cache");
    let mut n = 0;
    // (deploy call, deploy call → first 200) on a fresh host.
    let mut once = |cache: &Path| {
        n += 1;
        let r = Running::open(&work.join(format!("deploy-{n}")), cache);
        let digest = r.host.put_component(&hello).unwrap();
        let url = format!("{}/hello", r.base);
        let t = Instant::now();
        r.deploy("hello", spec(&digest, "/hello", ""));
        let deployed = t.elapsed();
        until_200(&a, &url);
        (deployed, t.elapsed())
    };
    let (mut cold, mut cold_first, mut cached, mut cached_first) = (vec![], vec![], vec![], vec![]);
    for i in 0..ROUNDS {
        let (d, f) = once(&work.join(format!("cold-cache-{i}")));
        cold.push(d);
        cold_first.push(f);
    }
    once(&shared_cache); // fills the shared cache
    for _ in 0..ROUNDS {
        let (d, f) = once(&shared_cache);
        cached.push(d);
        cached_first.push(f);
    }

    // A serving function gets new versions (another grant each: the compile
    // is cached), each followed by a rollback (a pointer move).
    let state = work.join("versions");
    let r = Running::open(&state, &shared_cache);
    let digest = r.host.put_component(&version).unwrap();
    let hello_digest = r.host.put_component(&hello).unwrap();
    r.deploy("v", spec(&digest, "/v", "config = { version = \"v0\" }"));
    let url = format!("{}/v", r.base);
    let (mut new_version, mut rollback) = (vec![], vec![]);
    for i in 1..=ROUNDS {
        let want = format!("version v{i}\n");
        let t = Instant::now();
        r.deploy(
            "v",
            spec(&digest, "/v", &format!("config = {{ version = \"v{i}\" }}")),
        );
        while a
            .get(&url)
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .as_deref()
            != Some(&want)
        {}
        new_version.push(t.elapsed());
        let t = Instant::now();
        r.rt.block_on(r.host.rollback("v", None)).unwrap();
        rollback.push(t.elapsed());
    }
    // Three functions in all; then the host is opened again, as after a restart.
    r.deploy("hello", spec(&hello_digest, "/hello", ""));
    r.deploy(
        "other",
        spec(&digest, "/other", "config = { version = \"o\" }"),
    );
    drop(r);
    let (mut reopen, mut reopen_served) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let r = Running::open(&state, &shared_cache);
        reopen.push(t.elapsed());
        for path in ["/v", "/hello", "/other"] {
            until_200(&a, &format!("{}{path}", r.base));
        }
        reopen_served.push(t.elapsed());
    }
    DeployFigures {
        cold_deploy_ms: median(cold),
        cold_to_first_200_ms: median(cold_first),
        cached_deploy_ms: median(cached),
        cached_to_first_200_ms: median(cached_first),
        new_version_to_first_200_ms: median(new_version),
        rollback_ms: median(rollback),
        reopen_ms: median(reopen),
        reopen_to_all_3_answer_ms: median(reopen_served),
    }
}

/// The child process serving the deploy front: opens a host on the state
/// directory in `FRONT_ENV`, deploys `hello` at `/hello` (cached compile after
/// the first run), prints `listening on http://ADDR`, serves until killed.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns a server that prints `listening on http://ADDR` (hostd on stderr,
/// the front on stdout) and returns it with its base URL.
fn spawn_server(mut cmd: Command, on_stderr: bool) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out: Box<dyn std::io::Read + Send> = if on_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && !c.is_control())
                    .collect();
                let _ = tx.send(addr);
            }
        }
    });
    let child = Proc(child);
    let addr = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("server did not print its address");
    (child, format!("http://{addr}"))
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// `total` GETs of `url` from `concurrency` threads with keep-alive agents.
fn load(url: &str, total: usize, concurrency: usize) -> Load {
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|i| {
            let url = url.to_string();
            let n = total / concurrency + usize::from(i < total % concurrency);
            std::thread::spawn(move || {
                let a = agent();
                let mut lat = Vec::with_capacity(n);
                let mut errors = 0;
                for _ in 0..n {
                    let t = Instant::now();
                    let ok = match a.get(&url).call() {
                        Ok(r) => r.status() == 200 && r.into_string().is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(total);
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().unwrap();
        lat.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Load {
        rps: (lat.len() as f64 / seconds).round(),
        p50_ms: pct(&lat, 0.50),
        p99_ms: pct(&lat, 0.99),
        errors,
    }
}

fn find_wasmtime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("wasmtime"))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            // Where the project's setup installs it (cargo install --root).
            let home = std::env::var_os("HOME").map(PathBuf::from)?;
            let p = home.join(".cache/hostd/wasmtime-cli/bin/wasmtime");
            p.is_file().then_some(p)
        })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then only smoke-test.
    let benching = std::env::args().any(|a| a == "--bench");
    let total = env_usize("FN_BENCH_REQUESTS", if benching { 20_000 } else { 200 });
    let concurrency = env_usize("FN_BENCH_CONCURRENCY", 64);
    let work = std::env::temp_dir().join(format!("hostd-fn-deploy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    println!("fn_deploy: deploy-to-serving ({ROUNDS} rounds each, medians)");
    let d = deploy_figures(&work);
    println!(
        "  cold compile:   deploy call {:>9.1} ms, deploy -> first 200 {:>9.1} ms",
        d.cold_deploy_ms, d.cold_to_first_200_ms
    );
    println!(
        "  cached compile: deploy call {:>9.1} ms, deploy -> first 200 {:>9.1} ms",
        d.cached_deploy_ms, d.cached_to_first_200_ms
    );
    println!(
        "  new version of a serving function (cached compile) -> its first answer {:>9.1} ms",
        d.new_version_to_first_200_ms
    );
    println!("  rollback (pointer move) {:>9.3} ms", d.rollback_ms);
    println!(
        "  reopen a host with 3 functions {:>9.1} ms; -> all 3 answered {:>9.1} ms",
        d.reopen_ms, d.reopen_to_all_3_answer_ms
    );

    println!("fn_deploy: {total} GET /hello at concurrency {concurrency} per server");
    let mut servers = Vec::new();
    let hostd = PathBuf::from(env!("CARGO_BIN_EXE_hostd"));
    // The real daemon process: `hostd daemon --listen`, the function deployed through
    // its API with `hostd fn deploy`, the load sent to its front.
    let socket = work.join("daemon.sock");
    let mut cmd = Command::new(&hostd);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(work.join("daemon-state"))
        .args(["--listen", "127.0.0.1:0"])
        .env("HOSTD_LOG", "warn,hostd_daemon::functions=info")
        .env("NO_COLOR", "1");
    let (p, base) = spawn_server(cmd, true);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no daemon API socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(&hostd)
        .args(["fn", "deploy", "hello"])
        .arg(wasm("hello"))
        .args(["--route", "/hello", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hostd fn deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("{base}/hello");
    until_200(&agent(), &url);
    let _ = load(&url, 500.min(total), concurrency);
    servers.push(("hostd daemon --listen", load(&url, total, concurrency)));
    drop(p);

    let mut cmd = Command::new(&hostd);
    cmd.args(["fn", "serve"])
        .arg(wasm("hello"))
        .args(["--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(work.join("fn-serve-cache"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let (p, base) = spawn_server(cmd, true);
    let url = format!("{base}/hello");
    let _ = load(&url, 500.min(total), concurrency);
    servers.push(("hostd fn serve", load(&url, total, concurrency)));
    drop(p);

    let wasmtime = find_wasmtime();
    match &wasmtime {
        Some(bin) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut cmd = Command::new(bin);
            cmd.arg("serve")
                .args(["--addr", &format!("127.0.0.1:{port}"), "-Scli"])
                .arg(wasm("hello"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let p = Proc(cmd.spawn().unwrap());
            let t = Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(t.elapsed() < Duration::from_secs(300), "wasmtime serve did not start");
                std::thread::sleep(Duration::from_millis(5));
            }
            let url = format!("http://127.0.0.1:{port}/hello");
            until_200(&agent(), &url);
            let _ = load(&url, 500.min(total), concurrency);
            servers.push(("wasmtime serve", load(&url, total, concurrency)));
            drop(p);
        }
        None => println!(
            "fn_deploy: SKIPPED wasmtime serve: no `wasmtime` binary on PATH, in WASMTIME or in ~/.cache/hostd/wasmtime-cli/bin \
             (benches/fn_serve.rs says how to install wasmtime-cli 48.0.8)"
        ),
    }

    println!(
        "{:<30} {:>8} {:>8} {:>8} {:>6}",
        "server", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, l) in &servers {
        println!(
            "{:<30} {:>8} {:>8.3} {:>8.3} {:>6}",
            name, l.rps, l.p50_ms, l.p99_ms, l.errors
        );
    }
    let out = serde_json::json!({
        "benchmark": "fn_deploy",
        "requests": total,
        "concurrency": concurrency,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": ROUNDS,
        "deploy": {
            "cold_compile_deploy_call_ms": d.cold_deploy_ms,
            "cold_compile_deploy_to_first_200_ms": d.cold_to_first_200_ms,
            "cached_compile_deploy_call_ms": d.cached_deploy_ms,
            "cached_compile_deploy_to_first_200_ms": d.cached_to_first_200_ms,
            "new_version_to_its_first_answer_ms": d.new_version_to_first_200_ms,
            "rollback_ms": d.rollback_ms,
            "reopen_host_with_3_functions_ms": d.reopen_ms,
            "reopen_to_all_3_answered_ms": d.reopen_to_all_3_answer_ms,
        },
        "wasmtime_cli": wasmtime.as_ref().map(|p| p.display().to_string()),
        "servers": servers.iter().map(|(name, l)| serde_json::json!({
            "name": name,
            "requests_per_second": l.rps,
            "p50_ms": l.p50_ms,
            "p99_ms": l.p99_ms,
            "errors": l.errors,
        })).collect::<Vec<_>>(),
    });
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fn_deploy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
    let _ = std::fs::remove_dir_all(&work);
}
