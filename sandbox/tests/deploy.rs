//! Zero-downtime deploys through the library front: a real `FunctionHost`
//! serving on a loopback port, real hyper clients, real components from
//! `sandbox/examples/wasm`. No wall-clock assertions: counts only.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hostd_sandbox::deploy::{DeployError, DeploySpec, FunctionHost, HostOptions};
use hostd_sandbox::server::{self, ConnectionLimits};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

fn wasm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/wasm/{name}.wasm"))
}

fn put(host: &FunctionHost, name: &str) -> String {
    host.put_component(&std::fs::read(wasm(name)).unwrap())
        .unwrap()
}

fn spec(component: &str, routes: &[&str], grants: &str) -> DeploySpec {
    DeploySpec {
        component: component.to_owned(),
        routes: routes.iter().map(|r| r.to_string()).collect(),
        grants: toml::from_str(grants).unwrap(),
        health_check: None,
    }
}

/// The front of a host, serving until stopped.
struct Front {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Stops accepting and waits until every connection is done.
    async fn stop(mut self) {
        self.stop.take();
        self.task.await.unwrap();
    }
}

/// A host serving on 127.0.0.1:0.
async fn serve(host: &FunctionHost) -> Front {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let host = host.clone();
    let task = tokio::spawn(async move {
        host.serve(
            listener,
            ConnectionLimits::default(),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        )
        .await;
    });
    Front {
        addr,
        stop: Some(tx),
        task,
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::new())
            .unwrap();
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

async fn get_once(addr: SocketAddr, path: &str) -> (u16, String) {
    Client::connect(addr).await.get(path).await.unwrap()
}

const TOTAL: usize = 10_000;
const CONCURRENCY: usize = 64;

/// The order in which versions go live: v1, deploy v2, deploy v3, roll back to v2.
const PHASES: [&str; 4] = ["v1", "v2", "v3", "v2"];

/// Which version a body names; `None` unless it names exactly one.
fn version_of(body: &str) -> Option<&'static str> {
    let named: Vec<&'static str> = ["v1", "v2", "v3"]
        .into_iter()
        .filter(|v| body.contains(&format!("version {v}")))
        .collect();
    match named[..] {
        [one] => Some(one),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_requests_across_two_deploys_and_a_rollback_all_2xx() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token.txt");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let host = FunctionHost::open(HostOptions::new(&dir.path().join("state"))).unwrap();
    let version = put(&host, "version");
    let secret_reader = put(&host, "secret");

    let v1 = host
        .deploy(
            "app",
            spec(&version, &["/v"], "config = { version = \"v1\" }"),
        )
        .await
        .unwrap();
    assert_eq!(v1.record.version, 1);
    let front = serve(&host).await;
    let addr = front.addr;

    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                // Versions this connection saw, in order; failures.
                let mut seen = Vec::new();
                let mut failures = Vec::new();
                while done.fetch_add(1, Ordering::SeqCst) < TOTAL {
                    match c.get("/v").await {
                        Ok((200, body)) => match version_of(&body) {
                            Some(v) => seen.push(v),
                            None => {
                                failures.push(format!("body names no single version: {body:?}"))
                            }
                        },
                        Ok((status, body)) => failures.push(format!("status {status}: {body:?}")),
                        Err(e) => {
                            failures.push(format!("request failed: {e}"));
                            c = Client::connect(addr).await;
                        }
                    }
                }
                (seen, failures)
            })
        })
        .collect();

    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            while done.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let t = Instant::now();
    wait_for(1_000).await;
    // v2: the same component, another grant.
    let v2 = host
        .deploy(
            "app",
            spec(&version, &["/v"], "config = { version = \"v2\" }"),
        )
        .await
        .unwrap();
    println!(
        "v2 live at request {} after {:?}",
        done.load(Ordering::SeqCst),
        t.elapsed()
    );
    // A version failing its health check (no `version` granted: the config
    // read is denied and it answers 403) is refused and changes nothing.
    let mut bad = spec(&version, &["/v"], "");
    bad.health_check = Some("/v".into());
    match host.deploy("app", bad).await {
        Err(DeployError::HealthCheck { outcome, .. }) => {
            assert!(outcome.contains("403"), "{outcome}")
        }
        other => panic!("unhealthy version deployed: {other:?}"),
    }
    wait_for(4_000).await;
    // v3: another component (compiled while v2 serves), with a health check.
    let mut s3 = spec(
        &secret_reader,
        &["/v"],
        &format!(
            "config = {{ greeting = \"version v3\" }}\nsecrets = {{ api-token = {{ file = \"{}\" }} }}",
            secret.display()
        ),
    );
    s3.health_check = Some("/v".into());
    let v3 = host.deploy("app", s3).await.unwrap();
    println!(
        "v3 live at request {} after {:?}",
        done.load(Ordering::SeqCst),
        t.elapsed()
    );
    assert_eq!((v2.record.version, v3.record.version), (2, 3));
    wait_for(7_000).await;
    let back = host.rollback("app", None).await.unwrap();
    assert_eq!(back.record.version, 2);
    println!(
        "rolled back to 2 at request {} after {:?}",
        done.load(Ordering::SeqCst),
        t.elapsed()
    );

    let mut counts = BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    let mut out_of_order = Vec::new();
    for c in clients {
        let (seen, f) = c.await.unwrap();
        failures.extend(f);
        // Each connection sees the versions in the order they went live: once
        // it has seen a newer table it never gets an older one.
        let mut phase = 0;
        for v in &seen {
            *counts.entry(v).or_default() += 1;
            match (phase..PHASES.len()).find(|p| PHASES[*p] == *v) {
                Some(p) => phase = p,
                None => out_of_order.push(format!("{v} after phase {}", PHASES[phase])),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
    let served: usize = counts.values().sum();
    assert_eq!(served, TOTAL);
    println!("responses by version: {counts:?}");
    for v in ["v1", "v2", "v3"] {
        assert!(
            counts.get(v).copied().unwrap_or(0) > 0,
            "no response from {v}: {counts:?}"
        );
    }

    // Per-version metrics count the same requests.
    let versions = host.versions("app").unwrap();
    assert_eq!(versions.len(), 3);
    let total: u64 = versions.iter().map(|v| v.metrics.requests).sum();
    let non_2xx: u64 = versions.iter().map(|v| v.metrics.non_2xx).sum();
    assert_eq!((total, non_2xx), (TOTAL as u64, 0));
    assert_eq!(versions[2].metrics.requests as usize, counts["v3"]);
    assert!(versions[1].live && versions.iter().all(|v| v.warm));
    assert!(versions[1].metrics.latency_p99.is_some());

    // After the load: rollback to a named version is served at once.
    host.rollback("app", Some(3)).await.unwrap();
    let (status, body) = get_once(addr, "/v").await;
    assert_eq!((status, version_of(&body)), (200, Some("v3")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_host_serves_the_same_live_versions() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
        let version = put(&host, "version");
        let hello = put(&host, "hello");
        let counter = put(&host, "counter");
        host.deploy("hello", spec(&hello, &["/hello"], ""))
            .await
            .unwrap();
        host.deploy(
            "counter",
            spec(&counter, &["/counter"], "buckets = [\"counters\"]"),
        )
        .await
        .unwrap();
        for v in ["v1", "v2", "v3"] {
            host.deploy(
                "ver",
                spec(
                    &version,
                    &["/ver/..."],
                    &format!("config = {{ version = \"{v}\" }}"),
                ),
            )
            .await
            .unwrap();
        }
        host.rollback("ver", Some(2)).await.unwrap();
        let front = serve(&host).await;
        assert_eq!(get_once(front.addr, "/counter").await.0, 200);
        // The process ends: its front and the host go, files stay.
        front.stop().await;
    }
    let t = Instant::now();
    let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
    let ready = t.elapsed();
    let front = serve(&host).await;
    let addr = front.addr;
    let (status, body) = get_once(addr, "/ver/x").await;
    let first = t.elapsed();
    println!("reopened host: ready after {ready:?}, first answer after {first:?}");
    assert_eq!((status, body.as_str()), (200, "version v2\n"));
    let (status, body) = get_once(addr, "/hello").await;
    assert_eq!((status, body.as_str()), (200, "hello from a nanoservice"));
    let (status, body) = get_once(addr, "/counter").await;
    // The second increment ever: the bucket survived too.
    assert_eq!((status, body.as_str()), (200, "2\n"));
    // Only the live versions are loaded at start; older ones load on rollback.
    let versions = host.versions("ver").unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.record.version, v.live, v.warm))
            .collect::<Vec<_>>(),
        [(1, false, false), (2, true, true), (3, false, false)]
    );
    host.rollback("ver", None).await.unwrap();
    assert_eq!(get_once(addr, "/ver/x").await.1, "version v1\n");
    assert_eq!(host.list().unwrap().len(), 3);
}

/// A rollback without a version goes back to the version that was live before, never to
/// one rolled away from: v1, v2 (bad), rollback (v1), v3 (bad), rollback is v1 again,
/// not v2; with nothing before v1 a further rollback is refused. The record survives a
/// reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_goes_back_to_what_was_live_before() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let live = |host: &FunctionHost| {
        host.versions("rb")
            .unwrap()
            .into_iter()
            .find(|v| v.live)
            .map(|v| v.record.version)
    };
    {
        let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
        let version = put(&host, "version");
        let deploy = |v: &str| {
            host.deploy(
                "rb",
                spec(
                    &version,
                    &["/rb"],
                    &format!("config = {{ version = \"{v}\" }}"),
                ),
            )
        };
        deploy("v1").await.unwrap();
        deploy("v2").await.unwrap();
        assert_eq!(host.rollback("rb", None).await.unwrap().record.version, 1);
        deploy("v3").await.unwrap();
        assert_eq!(live(&host), Some(3));
    }
    let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
    assert_eq!(host.rollback("rb", None).await.unwrap().record.version, 1);
    assert!(matches!(
        host.rollback("rb", None).await,
        Err(DeployError::UnknownVersion { .. })
    ));
    // A rollback may still name any version, the one rolled away from included.
    assert_eq!(
        host.rollback("rb", Some(3)).await.unwrap().record.version,
        3
    );
    assert_eq!(live(&host), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host = FunctionHost::open(HostOptions::new(dir.path())).unwrap();
    let version = put(&host, "version");
    let hello = put(&host, "hello");
    host.deploy(
        "a",
        spec(&version, &["/a"], "config = { version = \"v1\" }"),
    )
    .await
    .unwrap();
    let front = serve(&host).await;
    let addr = front.addr;

    let cases: Vec<(&str, DeploySpec)> = vec![
        ("../a", spec(&version, &["/x"], "")),
        ("b", spec("not-a-digest", &["/b"], "")),
        ("b", spec(&"0".repeat(64), &["/b"], "")),
        ("b", spec(&hello, &["/a"], "")),
        ("b", spec(&hello, &["b"], "")),
        ("b", spec(&hello, &["/b"], "memory_mb = 100000")),
        ("b", spec(&hello, &["/b"], "component = \"/etc/passwd\"")),
    ];
    for (name, s) in cases {
        let err = host.deploy(name, s.clone()).await.expect_err("refused");
        println!("{name} {:?}: {err}", s.routes);
        let ok = matches!(
            err,
            DeployError::InvalidName { .. }
                | DeployError::InvalidDigest { .. }
                | DeployError::UnknownComponent { .. }
                | DeployError::RouteConflict { .. }
                | DeployError::InvalidSpec { .. }
        );
        assert!(ok, "{err:?}");
    }
    // Not a component at all, and a component that is not an HTTP proxy.
    assert!(matches!(
        host.put_component(b"#!/bin/sh\n"),
        Err(DeployError::NotAComponent { .. })
    ));
    let core_module = host.put_component(b"\0asm\x01\0\0\0").unwrap();
    assert!(matches!(
        host.deploy("b", spec(&core_module, &["/b"], "")).await,
        Err(DeployError::Prepare { .. })
    ));
    assert!(matches!(
        host.rollback("a", None).await,
        Err(DeployError::UnknownVersion { .. })
    ));
    assert!(matches!(
        host.rollback("nope", None).await,
        Err(DeployError::UnknownFunction { .. })
    ));
    assert_eq!(host.versions("a").unwrap().len(), 1);
    assert_eq!(
        get_once(addr, "/a").await,
        (200, "version v1\n".to_string())
    );

    // Removing stops serving it; the path is free for another function.
    host.remove("a").await.unwrap();
    assert_eq!(get_once(addr, "/a").await.0, 404);
    host.deploy("b", spec(&hello, &["/a"], "")).await.unwrap();
    assert_eq!(get_once(addr, "/a").await.0, 200);
    assert!(matches!(
        host.versions("a"),
        Err(DeployError::UnknownFunction { .. })
    ));
}

/// Set in the child process of [`a_killed_host_process_serves_its_functions_again`]:
/// its state directory.
const CHILD_ENV: &str = "HOSTD_DEPLOY_TEST_CHILD";

/// The child: a process holding a `FunctionHost` with 3 functions (deployed
/// on its first start), serving until it is killed.
fn run_child(state: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let host = FunctionHost::open(HostOptions::new(state)).unwrap();
        if host.list().unwrap().is_empty() {
            let hello = put(&host, "hello");
            let counter = put(&host, "counter");
            let version = put(&host, "version");
            host.deploy("hello", spec(&hello, &["/hello"], ""))
                .await
                .unwrap();
            host.deploy(
                "counter",
                spec(&counter, &["/counter"], "buckets = [\"counters\"]"),
            )
            .await
            .unwrap();
            for v in ["v1", "v2"] {
                host.deploy(
                    "ver",
                    spec(
                        &version,
                        &["/ver/..."],
                        &format!("config = {{ version = \"{v}\" }}"),
                    ),
                )
                .await
                .unwrap();
            }
        }
        let front = serve(&host).await;
        println!("listening on http://{}", front.addr);
        std::future::pending::<()>().await;
    });
}

/// Starts this test binary as the child; returns it and its front's address.
fn spawn_child(state: &Path) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_host_process_serves_its_functions_again",
            "--nocapture",
        ])
        .env(CHILD_ENV, state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(a) = line.split("listening on http://").nth(1) {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the child did not start serving");
    (child, addr.parse().unwrap())
}

#[test]
fn a_killed_host_process_serves_its_functions_again() {
    if let Some(state) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&state));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut child, addr) = spawn_child(&state);
    assert_eq!(rt.block_on(get_once(addr, "/counter")), (200, "1\n".into()));
    child.kill().unwrap(); // SIGKILL: no chance to flush or close anything
    child.wait().unwrap();

    let t = Instant::now();
    let (mut child, addr) = spawn_child(&state);
    let up = t.elapsed();
    let answers = rt.block_on(async {
        vec![
            get_once(addr, "/hello").await,
            get_once(addr, "/ver/x").await,
            get_once(addr, "/counter").await,
        ]
    });
    let all = t.elapsed();
    println!(
        "after kill -9: the new process served from {up:?} after its spawn, all 3 functions answered after {all:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        answers,
        [
            (200, "hello from a nanoservice".to_string()),
            (200, "version v2\n".to_string()),
            // The bucket's count survived too.
            (200, "2\n".to_string()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_cannot_load_at_start_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let hello_path;
    {
        let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
        let hello = put(&host, "hello");
        let version = put(&host, "version");
        host.deploy("hello", spec(&hello, &["/hello"], ""))
            .await
            .unwrap();
        host.deploy(
            "ver",
            spec(&version, &["/ver"], "config = { version = \"v1\" }"),
        )
        .await
        .unwrap();
        hello_path = host.components().path(&hello);
    }
    // The stored component changes on disk: it no longer matches its digest.
    std::fs::write(&hello_path, b"\0asm\x0d\0\x01\0changed").unwrap();
    let host = FunctionHost::open(HostOptions::new(&state)).unwrap();
    let front = serve(&host).await;
    assert_eq!(
        get_once(front.addr, "/ver").await,
        (200, "version v1\n".into())
    );
    assert_eq!(get_once(front.addr, "/hello").await.0, 404);
    let listed: Vec<_> = host
        .list()
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.live.warm))
        .collect();
    assert_eq!(listed, [("hello".into(), false), ("ver".into(), true)]);
    // Uploading the component again repairs it; a rollback to the live
    // version (or a new deploy) serves it again.
    put(&host, "hello");
    host.rollback("hello", Some(1)).await.unwrap();
    assert_eq!(get_once(front.addr, "/hello").await.0, 200);
}
