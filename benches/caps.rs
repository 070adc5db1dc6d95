//! Benchmark: a function calling another through a capability (Noise over TCP,
//! one handshake per call) against the same call over plain loopback HTTP, in
//! one run, against one `hostd fn serve`.
//!
//! Function `a` (the fetcher) calls function `b` (hello) either as
//! `http://bsvc/b` (capability `bsvc`, through the capability listener) or as
//! `http://127.0.0.1:PORT/b` (an `outbound` grant, through the HTTP listener).
//! Prints requests/s, p50 and p99 for each, and writes `target/bench/caps.json`.
//!
//! `cargo bench --bench caps` (env: `CAPS_BENCH_REQUESTS` per mode, default 2000;
//! `CAPS_BENCH_CONCURRENCY`, default 8).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn get(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn load(addr: &str, path: &str, total: usize, conc: usize) -> Figures {
    // Warm up (compiles nothing new, opens the paths once).
    for _ in 0..20 {
        assert_eq!(get(addr, path), 200, "{path}");
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..conc)
        .map(|_| {
            let (addr, path, next) = (addr.to_string(), path.to_string(), next.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    let t = Instant::now();
                    assert_eq!(get(&addr, &path), 200);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wall = start.elapsed();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Figures {
        rps: lat.len() as f64 / wall.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn main() {
    let total = env_usize("CAPS_BENCH_REQUESTS", 2000);
    let conc = env_usize("CAPS_BENCH_CONCURRENCY", 8);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wasm = |n: &str| root.join(format!("sandbox/examples/wasm/{n}.wasm"));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = dir.path().join("fns.toml");
    std::fs::write(
        &manifest,
        format!(
            "[functions.b]\ncomponent = \"{}\"\nroutes = [\"/b\"]\nservice = \"bsvc\"\n\n\
             [functions.a]\ncomponent = \"{}\"\nroutes = [\"/fetch\"]\ncapabilities = [\"bsvc\"]\noutbound = [\"127.0.0.1\"]\n",
            wasm("hello").display(),
            wasm("fetch").display()
        ),
    )
    .unwrap();
    let hostd = std::env::var("HOSTD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hostd").into());
    let mut child = Command::new(&hostd)
        .args(["fn", "serve"])
        .arg(&manifest)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cap-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&state)
        .env("RUST_LOG", "warn,hostd_sandbox=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (key, tag) in [
                ("capability listener ready addr=", "cap"),
                ("listening on http://", "http"),
            ] {
                if let Some(rest) = line.split(key).nth(1) {
                    let _ = tx.send((tag, rest.trim().to_string()));
                }
            }
        }
    });
    let (mut http, mut cap) = (None, None);
    while http.is_none() || cap.is_none() {
        match rx.recv_timeout(Duration::from_secs(600)).unwrap() {
            ("cap", a) => cap = Some(a),
            (_, a) => http = Some(a),
        }
    }
    let (http, cap) = (http.unwrap(), cap.unwrap());
    let out = Command::new(&hostd)
        .args(["cap", "new", "bsvc", "--location", &cap, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let value = String::from_utf8(out.stdout).unwrap();
    let st = Command::new(&hostd)
        .args(["cap", "add", "bsvc", value.trim(), "--state-dir"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(st.success());

    let plain = load(&http, &format!("/fetch?url=http://{http}/b"), total, conc);
    let noise = load(&http, "/fetch?url=http://bsvc/b", total, conc);
    let _ = child.kill();
    let _ = child.wait();

    println!("caps: {total} requests per mode, concurrency {conc}, binary {hostd}");
    println!(
        "{:<34} {:>10} {:>9} {:>9}",
        "call a -> b", "req/s", "p50 ms", "p99 ms"
    );
    for (name, f) in [
        ("plain loopback HTTP (outbound)", &plain),
        ("capability (Noise NKpsk2, TCP)", &noise),
    ] {
        println!(
            "{:<34} {:>10.1} {:>9.2} {:>9.2}",
            name, f.rps, f.p50_ms, f.p99_ms
        );
    }
    let json = format!(
        "{{\"requests\":{total},\"concurrency\":{conc},\"plain\":{{\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}},\"capability\":{{\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}}}\n",
        plain.rps, plain.p50_ms, plain.p99_ms, noise.rps, noise.p50_ms, noise.p99_ms
    );
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("caps.json"), json).unwrap();
}
