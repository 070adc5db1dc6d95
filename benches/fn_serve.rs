//! Benchmark: the same `hello` component under `hostd fn serve` and under
//! `wasmtime serve`, in one run, side by side.
//!
//! Measures requests/s and p50/p99 latency at a fixed concurrency, the time
//! from process start to the first answered request (cold compile cache and,
//! for hostd, warm cache), the first request's own latency, per-request
//! instantiation time (in-process, the same engine settings hostd serves
//! with), the server's RSS, and the same load again while idle connections
//! are held open against the server. Prints a table and writes
//! `target/bench/fn_serve.json`.
//!
//! `cargo bench --bench fn_serve` (env: `FN_BENCH_REQUESTS`, `FN_BENCH_CONCURRENCY`,
//! `FN_BENCH_IDLE` = idle connections held, default 5000,
//! `WASMTIME` = path of the wasmtime CLI). Without a wasmtime CLI the peer is
//! skipped with a note on how to install it.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WASMTIME_VERSION: &str = "48.0.8";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find_wasmtime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cache/hostd/wasmtime-cli/bin/wasmtime");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("wasmtime"))
            .find(|p| p.is_file())
    })
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

/// Starts a server and waits for its first 200: (process, spawn→first 200,
/// latency of the first request once the port accepts).
fn deploy(mut cmd: Command, url: &str, port: u16) -> (Proc, Duration, Duration) {
    let t0 = Instant::now();
    let child = Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let t1 = Instant::now();
    let a = agent();
    loop {
        if let Ok(r) = a.get(url).call() {
            if r.status() == 200 {
                let _ = r.into_string();
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "server never answered 200"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    (child, t0.elapsed(), t1.elapsed())
}

struct Load {
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies_us: Vec<u64>,
}

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
                    match a.get(&url).call() {
                        Ok(r) if r.status() == 200 => match r.into_string() {
                            Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                            Err(_) => errors += 1,
                        },
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut latencies_us = Vec::with_capacity(total);
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().unwrap();
        latencies_us.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    Load {
        requests: total,
        errors,
        seconds,
        latencies_us,
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Deploys to repeat for the deploy and first-request figures (medians reported).
const DEPLOYS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// No compiled artifact available: the server compiles the component.
    Cold,
    /// The server's compile cache holds the component.
    Warm,
}

struct Figures {
    name: String,
    command: String,
    deploy_cold_ms: f64,
    deploy_warm_ms: f64,
    first_request_cold_ms: f64,
    first_request_warm_ms: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    requests: usize,
    rss_kib: u64,
    peak_rss_kib: u64,
    /// The same load while `idle_connections` connections that never send a
    /// byte are held open against the server.
    idle_connections: usize,
    flood_rps: f64,
    flood_p99_ms: f64,
    flood_errors: usize,
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "command_warm": self.command,
            "deploy_to_first_response_cold_cache_ms": self.deploy_cold_ms,
            "deploy_to_first_response_warm_cache_ms": self.deploy_warm_ms,
            "first_request_latency_cold_cache_ms": self.first_request_cold_ms,
            "first_request_latency_warm_cache_ms": self.first_request_warm_ms,
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "rss_kib_after_load": self.rss_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "idle_connections_held": self.idle_connections,
            "requests_per_second_under_idle_flood": self.flood_rps,
            "p99_ms_under_idle_flood": self.flood_p99_ms,
            "errors_under_idle_flood": self.flood_errors,
        })
    }
}

fn median(v: Vec<Duration>) -> f64 {
    hostd_bench::median(v.into_iter().map(ms).collect())
}

/// Deploys `DEPLOYS` times: medians of (spawn → first 200, first request latency).
fn deploys(make: &dyn Fn(u16, Cache) -> Command, cache: Cache) -> (f64, f64) {
    let mut total = Vec::new();
    let mut first = Vec::new();
    for _ in 0..DEPLOYS {
        let port = free_port();
        let (p, d, f) = deploy(
            make(port, cache),
            &format!("http://127.0.0.1:{port}/hello"),
            port,
        );
        drop(p);
        total.push(d);
        first.push(f);
    }
    (median(total), median(first))
}

fn measure(
    name: &str,
    make: &dyn Fn(u16, Cache) -> Command,
    total: usize,
    concurrency: usize,
    idle_connections: usize,
) -> Figures {
    let (deploy_cold_ms, first_request_cold_ms) = deploys(make, Cache::Cold);
    // Populate the cache, then deploy warm.
    let port = free_port();
    drop(deploy(
        make(port, Cache::Warm),
        &format!("http://127.0.0.1:{port}/hello"),
        port,
    ));
    let (deploy_warm_ms, first_request_warm_ms) = deploys(make, Cache::Warm);

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hello");
    let cmd = make(port, Cache::Warm);
    let command = format!("{cmd:?}");
    let (proc_, _, _) = deploy(cmd, &url, port);
    let _ = load(&url, 500.min(total), concurrency); // warm-up
    let l = load(&url, total, concurrency);
    let (rss, hwm) = rss_kib(proc_.0.id());
    // The same load again while idle connections (opened, never used) are held.
    let idle: Vec<TcpStream> = (0..idle_connections)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let held = idle.len();
    let flood = load(&url, total, concurrency);
    drop(idle);
    Figures {
        name: name.into(),
        command,
        deploy_cold_ms,
        deploy_warm_ms,
        first_request_cold_ms,
        first_request_warm_ms,
        rps: (l.latencies_us.len() as f64 / l.seconds).round(),
        p50_ms: pct(&l.latencies_us, 0.50),
        p99_ms: pct(&l.latencies_us, 0.99),
        errors: l.errors,
        requests: l.requests,
        rss_kib: rss,
        peak_rss_kib: hwm,
        idle_connections: held,
        flood_rps: (flood.latencies_us.len() as f64 / flood.seconds).round(),
        flood_p99_ms: pct(&flood.latencies_us, 0.99),
        flood_errors: flood.errors,
    }
}

fn stats_us(times: &[Duration]) -> serde_json::Value {
    let first = times
        .first()
        .map(|d| d.as_nanos() as u64 / 1000)
        .unwrap_or(0);
    let mut us: Vec<u64> = times.iter().map(|d| d.as_nanos() as u64 / 1000).collect();
    us.sort_unstable();
    let mean = us.iter().sum::<u64>() as f64 / us.len().max(1) as f64;
    serde_json::json!({
        "n": us.len(),
        "first_us": first,
        "max_us": us.last().copied().unwrap_or(0),
        "mean_us": (mean * 10.0).round() / 10.0,
        "p50_us": us.get(us.len() / 2).copied().unwrap_or(0),
        "p99_us": us.get(us.len() * 99 / 100).copied().unwrap_or(0),
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then only smoke-test.
    let benching = std::env::args().any(|a| a == "--bench");
    let total = env_usize("FN_BENCH_REQUESTS", if benching { 20_000 } else { 200 });
    let concurrency = env_usize("FN_BENCH_CONCURRENCY", 64);
    let idle = env_usize("FN_BENCH_IDLE", if benching { 5000 } else { 200 });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let component = root.join("sandbox/examples/wasm/hello.wasm");
    let hostd = PathBuf::from(env!("CARGO_BIN_EXE_hostd"));
    let work = std::env::temp_dir().join(format!("hostd-fn-bench-{}", std::process::id()));
    let cache = work.join("cache");
    std::fs::create_dir_all(&work).unwrap();

    println!(
        "fn_serve: {total} requests at concurrency {concurrency}, component {}",
        component.display()
    );

    let hostd_cmd = |port: u16, mode: Cache| {
        if mode == Cache::Cold {
            let _ = std::fs::remove_dir_all(&cache);
        }
        let mut c = Command::new(&hostd);
        c.args(["fn", "serve"])
            .arg(&component)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--cache-dir"])
            .arg(&cache)
            .env("RUST_LOG", "warn");
        c
    };
    let mut servers = vec![measure(
        "hostd fn serve",
        &hostd_cmd,
        total,
        concurrency,
        idle,
    )];

    let wasmtime = find_wasmtime();
    let mut wasmtime_version = serde_json::Value::Null;
    match &wasmtime {
        Some(bin) => {
            wasmtime_version = version_of(bin).into();
            // wasmtime's own compile cache is on by default; `-Ccache=n` gives the cold figure.
            let wasmtime_cmd = |port: u16, mode: Cache| {
                let mut c = Command::new(bin);
                c.arg("serve")
                    .args(["--addr", &format!("127.0.0.1:{port}"), "-Scli"])
                    .arg(if mode == Cache::Cold { "-Ccache=n" } else { "-Ccache=y" })
                    .arg(&component);
                c
            };
            servers.push(measure("wasmtime serve", &wasmtime_cmd, total, concurrency, idle));
        }
        None => println!(
            "fn_serve: SKIPPING the wasmtime serve peer: no wasmtime CLI found (WASMTIME, \
             ~/.cache/hostd/wasmtime-cli/bin, PATH). Install it with:\n  \
             cargo install --root ~/.cache/hostd/wasmtime-cli wasmtime-cli --version {WASMTIME_VERSION} --locked"
        ),
    }

    let n_inst = if benching { 2000 } else { 50 };
    let inst_pool = hostd_sandbox::measure_instantiation(&component, n_inst, true).unwrap();
    let inst_default = hostd_sandbox::measure_instantiation(&component, n_inst, false).unwrap();

    println!();
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>6} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8}",
        "server",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "deploy cold",
        "deploy warm",
        "first cold",
        "first warm",
        "RSS KiB",
        "peak KiB"
    );
    for s in &servers {
        println!(
            "{:<16} {:>8} {:>8.3} {:>8.3} {:>6} {:>11.1} {:>11.1} {:>11.3} {:>11.3} {:>8} {:>8}",
            s.name,
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.errors,
            s.deploy_cold_ms,
            s.deploy_warm_ms,
            s.first_request_cold_ms,
            s.first_request_warm_ms,
            s.rss_kib,
            s.peak_rss_kib
        );
    }
    let pool = stats_us(&inst_pool);
    let default = stats_us(&inst_default);
    println!("(deploy = process start to first 200, first = latency of that first request; ms, medians of {DEPLOYS}; RSS in KiB)");
    println!("the same load while idle connections (opened, never used) are held open:");
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>6}",
        "server", "idle", "req/s", "p99 ms", "errors"
    );
    for s in &servers {
        println!(
            "{:<16} {:>8} {:>8} {:>8.3} {:>6}",
            s.name, s.idle_connections, s.flood_rps, s.flood_p99_ms, s.flood_errors
        );
    }
    println!("instantiation per request (in-process, fresh store + ProxyPre, hostd's engine):");
    println!("  pooling allocator (hostd; also wasmtime serve's default): {pool}");
    println!("  on-demand allocator:                                       {default}");

    let mut ratios = serde_json::Map::new();
    if let [h, w] = servers.as_slice() {
        let r = |a: f64, b: f64| ((a / b) * 1000.0).round() / 1000.0;
        ratios.insert("rps_hostd_over_wasmtime".into(), r(h.rps, w.rps).into());
        ratios.insert(
            "p50_hostd_over_wasmtime".into(),
            r(h.p50_ms, w.p50_ms).into(),
        );
        ratios.insert(
            "p99_hostd_over_wasmtime".into(),
            r(h.p99_ms, w.p99_ms).into(),
        );
        ratios.insert(
            "rss_hostd_over_wasmtime".into(),
            r(h.rss_kib as f64, w.rss_kib as f64).into(),
        );
        ratios.insert(
            "deploy_cold_hostd_over_wasmtime".into(),
            r(h.deploy_cold_ms, w.deploy_cold_ms).into(),
        );
        ratios.insert(
            "deploy_warm_hostd_over_wasmtime".into(),
            r(h.deploy_warm_ms, w.deploy_warm_ms).into(),
        );
        ratios.insert(
            "first_request_warm_hostd_over_wasmtime".into(),
            r(h.first_request_warm_ms, w.first_request_warm_ms).into(),
        );
        println!(
            "ratios hostd / wasmtime: {}",
            serde_json::Value::Object(ratios.clone())
        );
    }

    let out = serde_json::json!({
        "benchmark": "fn_serve",
        "component": component.display().to_string(),
        "requests": total,
        "concurrency": concurrency,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "wasmtime_cli": wasmtime.as_ref().map(|p| p.display().to_string()),
        "wasmtime_cli_version": wasmtime_version,
        "servers": servers.iter().map(Figures::json).collect::<Vec<_>>(),
        "instantiation": { "pooling_hostd": pool, "on_demand": default },
        "ratios": ratios,
    });
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fn_serve.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
    let _ = std::fs::remove_dir_all(&work);
}
