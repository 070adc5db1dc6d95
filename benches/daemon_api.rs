//! Benchmark: latency of the daemon's `GET /guests` with 100 guests, side by side with
//! `GET /version` (same socket, same connection setup, no guest work) as the baseline,
//! through a real `hostd daemon` on a temporary socket. Each request opens its own
//! connection, as the CLI does. Prints the figures and writes
//! `target/bench/daemon_api.json`.
//!
//! `cargo bench --bench daemon_api`; `DAEMON_BENCH_REQUESTS` (default 2000) and
//! `DAEMON_BENCH_GUESTS` (default 100) change the load. Under `cargo test --benches` it
//! only smoke-tests (50 requests).

#![allow(clippy::print_stdout)] // a benchmark's figures are its output

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostd_daemon::client::Client;
use hostd_daemon::hyper::Method;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stats_us(mut times: Vec<Duration>) -> serde_json::Value {
    times.sort();
    let us: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let pct = |p: f64| us[((us.len() as f64 - 1.0) * p).round() as usize];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    serde_json::json!({
        "requests": us.len(),
        "mean_us": mean.round(),
        "p50_us": pct(0.50).round(),
        "p90_us": pct(0.90).round(),
        "p99_us": pct(0.99).round(),
        "max_us": pct(1.0).round(),
    })
}

fn measure(c: &Client, path: &str, n: usize) -> serde_json::Value {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.min(50) {
        let _ = c.raw(Method::GET, path, "application/json", Vec::new());
    }
    for _ in 0..n {
        let t = Instant::now();
        let a = c
            .raw(Method::GET, path, "application/json", Vec::new())
            .expect("request");
        times.push(t.elapsed());
        assert_eq!(a.status, 200, "{path}");
    }
    stats_us(times)
}

/// A small image that is never booted: the builder accepts a stand-in kernel.
fn build_image(dir: &Path) -> std::path::PathBuf {
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(64 * 1024, 0xAB);
    std::fs::write(dir.join("vmlinux"), k).expect("kernel");
    std::fs::write(
        dir.join("app.toml"),
        "name = \"bench\"\nkernel = \"vmlinux\"\n[services.main]\ncommand = \"/bin/true\"\nmain = true\n",
    )
    .expect("spec");
    let img = dir.join("app.img");
    let st = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(dir.join("app.toml"))
        .arg("-o")
        .arg(&img)
        .status()
        .expect("hostd build");
    assert!(st.success(), "hostd build failed");
    img
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let requests = env_usize("DAEMON_BENCH_REQUESTS", if benching { 2000 } else { 50 });
    let guests = env_usize("DAEMON_BENCH_GUESTS", 100);
    let work = tempfile::tempdir().expect("tempdir");
    let image = build_image(work.path());
    let socket = work.path().join("hostd.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .env("HOSTD_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("hostd daemon");
    let c = Client::new(&socket).expect("client");
    let end = Instant::now() + Duration::from_secs(30);
    while c
        .raw(Method::GET, "/version", "application/json", Vec::new())
        .is_err()
    {
        assert!(Instant::now() < end, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Guests that exist but are not started: the figure is the API's, not QEMU's.
    let t = Instant::now();
    for i in 0..guests {
        let body = serde_json::json!({
            "name": format!("g{i:03}"),
            "image": image,
            "vmm": "qemu",
            "start": false,
        });
        let _: serde_json::Value = c
            .json(Method::POST, "/guests", Some(&body))
            .expect("create");
    }
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let listed: Vec<serde_json::Value> = c.json(Method::GET, "/guests", None::<&()>).expect("list");
    assert_eq!(listed.len(), guests);
    let body_bytes = c
        .raw(Method::GET, "/guests", "application/json", Vec::new())
        .expect("list")
        .body
        .len();

    let version = measure(&c, "/version", requests);
    let list = measure(&c, "/guests", requests);
    println!(
        "daemon_api: {guests} guests (created in {create_ms:.0} ms, {:.1} ms each), {requests} requests each, one connection per request",
        create_ms / guests as f64
    );
    for (name, s) in [("GET /version", &version), ("GET /guests", &list)] {
        println!(
            "  {name:<13} mean {:>6} us  p50 {:>6} us  p90 {:>6} us  p99 {:>6} us  max {:>6} us",
            s["mean_us"], s["p50_us"], s["p90_us"], s["p99_us"], s["max_us"]
        );
    }
    println!("  GET /guests answer: {body_bytes} bytes");
    let out = serde_json::json!({
        "bench": "daemon_api",
        "guests": guests,
        "requests": requests,
        "create_ms_total": create_ms.round(),
        "list_body_bytes": body_bytes,
        "get_version": version,
        "get_guests": list,
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let path = dir.join("daemon_api.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).expect("json")).expect("write");
    println!("wrote {}", path.display());
}
