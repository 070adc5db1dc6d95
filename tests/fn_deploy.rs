//! Function deploys through a real `hostd daemon`: the CLI (`hostd fn
//! deploy|rollback|versions|ls|rm`) over its socket, the function front on
//! `--listen`, real HTTP clients, the example components. No wall-clock
//! assertions: times are printed, behaviour is asserted.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn wasm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("sandbox/examples/wasm/{name}.wasm"))
}

/// A running `hostd daemon` on a temporary socket and state directory, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    front: String,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let socket = dir.join("hostd.sock");
        let mut child = Command::new(common::hostd_exe())
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("function front listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon did not start its function front");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "no API socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            socket,
            front: format!("http://{addr}"),
        }
    }

    fn hostd(&self, args: &[&str]) -> Output {
        let out = Command::new(common::hostd_exe())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.hostd(args);
        assert!(
            out.status.success(),
            "hostd {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

fn get(a: &ureq::Agent, url: &str) -> (u16, String) {
    match a.get(url).call() {
        Ok(r) => {
            let s = r.status();
            (s, r.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

fn grants(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// Which version a body names; `None` unless exactly one.
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

#[test]
fn deploys_under_load_through_the_daemon_answer_every_request() {
    const TOTAL: usize = 10_000;
    const CONCURRENCY: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let version = wasm("version");
    let version = version.to_str().unwrap();
    let g = |v: &str| {
        grants(
            dir.path(),
            v,
            &format!("config = {{ version = \"{v}\" }}\n"),
        )
    };
    d.ok(&[
        "fn",
        "deploy",
        "app",
        version,
        "--route",
        "/v",
        "--grants",
        &g("v1"),
    ]);
    let url = format!("{}/v", d.front);
    assert_eq!(get(&agent(), &url), (200, "version v1\n".into()));

    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (done, url) = (done.clone(), url.clone());
            std::thread::spawn(move || {
                let a = agent();
                let (mut seen, mut failures) = (Vec::new(), Vec::new());
                while done.fetch_add(1, Ordering::SeqCst) < TOTAL {
                    match get(&a, &url) {
                        (200, body) => match version_of(&body) {
                            Some(v) => seen.push(v),
                            None => failures.push(format!("body {body:?}")),
                        },
                        (s, body) => failures.push(format!("status {s}: {body:?}")),
                    }
                }
                (seen, failures)
            })
        })
        .collect();
    let wait_for = |n: usize| {
        while done.load(Ordering::SeqCst) < n {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(1_000);
    d.ok(&[
        "fn",
        "deploy",
        "app",
        version,
        "--route",
        "/v",
        "--grants",
        &g("v2"),
    ]);
    wait_for(4_000);
    // v3 with a health check, through the CLI.
    d.ok(&[
        "fn",
        "deploy",
        "app",
        version,
        "--route",
        "/v",
        "--grants",
        &g("v3"),
        "--health",
        "/v",
    ]);
    wait_for(7_000);
    let rolled = d.ok(&["fn", "rollback", "app"]);
    assert!(rolled.contains("version 2"), "{rolled}");
    let mut counts = BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    let phases = ["v1", "v2", "v3", "v2"];
    let mut out_of_order = Vec::new();
    for t in threads {
        let (seen, f) = t.join().unwrap();
        failures.extend(f);
        let mut phase = 0;
        for v in seen {
            *counts.entry(v).or_default() += 1;
            match (phase..phases.len()).find(|p| phases[*p] == v) {
                Some(p) => phase = p,
                None => out_of_order.push(format!("{v} after {}", phases[phase])),
            }
        }
    }
    println!("responses by version: {counts:?}");
    assert!(
        failures.is_empty(),
        "{} failures, first {:?}",
        failures.len(),
        failures.first()
    );
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
    assert_eq!(counts.values().sum::<usize>(), TOTAL);
    for v in ["v1", "v2", "v3"] {
        assert!(counts.get(v).copied().unwrap_or(0) > 0, "{counts:?}");
    }
    let versions = d.ok(&["fn", "versions", "app"]);
    println!("{versions}");
    assert_eq!(versions.lines().count(), 4, "{versions}");
    // A failing health check changes nothing.
    let bad = grants(dir.path(), "bad", "");
    let out = d.hostd(&[
        "fn", "deploy", "app", version, "--route", "/v", "--grants", &bad, "--health", "/v",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Named as its deployer knows it: the file given and the digest it was stored as.
    assert!(
        err.contains("health check")
            && err.contains(&format!("{version} (uploaded as sha256:"))
            && !err.contains("components/"),
        "{err}"
    );
    assert_eq!(get(&agent(), &url), (200, "version v2\n".into()));
}

/// `hostd apply` of a fleet's `[functions.*]`: deploys, updates (a grant changed),
/// changes nothing when applied again, removes what a later fleet no longer declares,
/// and leaves a function deployed by hand alone.
#[test]
fn apply_deploys_updates_and_removes_the_fleets_functions() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let fleet = dir.path().join("fleet.toml");
    let ver = |v: &str| {
        format!(
            "[functions.ver]\ncomponent = {:?}\nroutes = [\"/ver\"]\nconfig = {{ version = \"{v}\" }}\n",
            wasm("version").to_str().unwrap()
        )
    };
    let fleet_s = fleet.to_str().unwrap();
    let a = agent();
    d.ok(&[
        "fn",
        "deploy",
        "manual",
        wasm("hello").to_str().unwrap(),
        "--route",
        "/manual",
    ]);
    let versions = |name: &str| d.ok(&["fn", "versions", name]).lines().count() - 1;

    std::fs::write(&fleet, ver("v1")).unwrap();
    let out = d.ok(&["apply", fleet_s]);
    assert!(out.contains("deployed  function ver"), "{out}");
    let (status, body) = get(&a, &format!("{}/ver", d.front));
    assert_eq!((status, version_of(&body)), (200, Some("v1")), "{body}");

    // Again: nothing new.
    let out = d.ok(&["apply", fleet_s]);
    assert!(out.contains("unchanged function ver"), "{out}");
    assert_eq!(versions("ver"), 1);

    // A grant changed: a new version, live.
    std::fs::write(&fleet, ver("v2")).unwrap();
    let out = d.ok(&["apply", fleet_s]);
    assert!(out.contains("deployed  function ver"), "{out}");
    assert_eq!(versions("ver"), 2);
    let (status, body) = get(&a, &format!("{}/ver", d.front));
    assert_eq!((status, version_of(&body)), (200, Some("v2")), "{body}");

    // Gone from the fleet: removed; the hand-deployed one stays.
    std::fs::write(
        &fleet,
        format!(
            "[functions.hello]\ncomponent = {:?}\nroutes = [\"/hello\"]\n",
            wasm("hello").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = d.ok(&["apply", fleet_s]);
    assert!(out.contains("removed   function ver"), "{out}");
    assert!(out.contains("deployed  function hello"), "{out}");
    assert_eq!(get(&a, &format!("{}/ver", d.front)).0, 404);
    assert_eq!(get(&a, &format!("{}/hello", d.front)).0, 200);
    assert_eq!(get(&a, &format!("{}/manual", d.front)).0, 200);
    let ls = d.ok(&["fn", "ls"]);
    assert!(
        ls.contains("manual") && ls.contains("hello") && !ls.contains("ver "),
        "{ls}"
    );

    // Two functions trade routes in one apply: their new versions go live together.
    let pair = |one: &str, two: &str| {
        let v = wasm("version");
        format!(
            "[functions.one]\ncomponent = {v:?}\nroutes = [\"{one}\"]\nconfig = {{ version = \"one\" }}\n\
             [functions.two]\ncomponent = {v:?}\nroutes = [\"{two}\"]\nconfig = {{ version = \"two\" }}\n"
        )
    };
    std::fs::write(&fleet, pair("/x", "/y")).unwrap();
    d.ok(&["apply", fleet_s]);
    std::fs::write(&fleet, pair("/y", "/x")).unwrap();
    let out = d.ok(&["apply", fleet_s]);
    assert!(
        out.contains("deployed  function one") && out.contains("deployed  function two"),
        "{out}"
    );
    for (route, version) in [("/x", "two"), ("/y", "one")] {
        let (status, body) = get(&a, &format!("{}{route}", d.front));
        assert_eq!(
            (status, body.trim()),
            (200, format!("version {version}").as_str())
        );
    }
    // A route a function outside the fleet serves stays its: that version is refused,
    // the others of the apply go live.
    std::fs::write(&fleet, pair("/manual", "/z")).unwrap();
    let out = d.hostd(&["apply", fleet_s]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("function one not deployed") && text.contains("manual"),
        "{text}"
    );
    assert_eq!(get(&a, &format!("{}/manual", d.front)).0, 200);
    let (status, body) = get(&a, &format!("{}/z", d.front));
    assert_eq!((status, body.trim()), (200, "version two"));

    // A function that does not compile is reported and the exit status says so.
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    std::fs::write(
        &fleet,
        format!("[functions.bad]\ncomponent = {bad:?}\nroutes = [\"/bad\"]\n"),
    )
    .unwrap();
    let out = d.hostd(&["apply", fleet_s]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("function bad not deployed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_9_of_the_daemon_keeps_its_functions_serving_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let counter_grants = grants(dir.path(), "counter", "buckets = [\"counters\"]\n");
    let ver_grants = grants(dir.path(), "ver", "config = { version = \"v1\" }\n");
    d.ok(&[
        "fn",
        "deploy",
        "hello",
        wasm("hello").to_str().unwrap(),
        "--route",
        "/hello",
    ]);
    d.ok(&[
        "fn",
        "deploy",
        "counter",
        wasm("counter").to_str().unwrap(),
        "--route",
        "/counter",
        "--grants",
        &counter_grants,
    ]);
    d.ok(&[
        "fn",
        "deploy",
        "ver",
        wasm("version").to_str().unwrap(),
        "--route",
        "/ver/...",
        "--grants",
        &ver_grants,
    ]);
    let a = agent();
    assert_eq!(
        get(&a, &format!("{}/counter", d.front)),
        (200, "1\n".into())
    );
    let listed = d.ok(&["fn", "ls"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    d.kill9();

    let t = Instant::now();
    let d = Daemon::start(dir.path());
    let started = t.elapsed();
    let mut answered = Vec::new();
    for (path, want) in [
        ("/hello", "hello from a nanoservice"),
        ("/ver/x", "version v1\n"),
        ("/counter", "2\n"),
    ] {
        assert_eq!(
            get(&a, &format!("{}{path}", d.front)),
            (200, want.to_string()),
            "{path}"
        );
        answered.push(t.elapsed());
    }
    println!(
        "restarted daemon: front up {:?} after spawn, all 3 functions answered {:?} after spawn",
        started,
        answered.last().unwrap()
    );
    // Nothing in the database was lost.
    let versions = d.ok(&["fn", "versions", "ver"]);
    assert!(
        versions.lines().nth(1).is_some_and(|l| l.contains("yes")),
        "{versions}"
    );
    d.ok(&["fn", "rm", "hello"]);
    assert_eq!(get(&a, &format!("{}/hello", d.front)).0, 404);
}

#[test]
fn the_function_api_answers_bad_input_with_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    // Raw requests over the socket with curl-less HTTP: use the CLI for the
    // good path and hostd_daemon's client for the bad ones.
    let client = hostd_daemon::client::Client::new(&d.socket).unwrap();
    use hostd_daemon::hyper::Method;
    let cases: Vec<(Method, &str, &str, Vec<u8>, u16)> = vec![
        (
            Method::PUT,
            "/components",
            "application/wasm",
            b"not wasm".to_vec(),
            400,
        ),
        (
            Method::PUT,
            "/components",
            "application/wasm",
            vec![0u8; 100 << 20],
            413,
        ),
        (
            Method::POST,
            "/functions/a/versions",
            "application/json",
            b"{not json".to_vec(),
            400,
        ),
        (
            Method::POST,
            "/functions/a/versions",
            "application/json",
            br#"{"component":"x","routes":["/a"]}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            "/functions/a/versions",
            "application/json",
            format!(
                r#"{{"component":"sha256:{}","routes":["/a"]}}"#,
                "0".repeat(64)
            )
            .into_bytes(),
            404,
        ),
        (
            Method::POST,
            "/functions/..%2Fx/versions",
            "application/json",
            br#"{"component":"x","routes":["/a"]}"#.to_vec(),
            400,
        ),
        (
            Method::GET,
            "/functions/nope/versions",
            "application/json",
            vec![],
            404,
        ),
        (
            Method::POST,
            "/functions/nope/rollback",
            "application/json",
            b"{}".to_vec(),
            404,
        ),
        (
            Method::DELETE,
            "/functions/nope",
            "application/json",
            vec![],
            404,
        ),
    ];
    for (method, path, ct, body, want) in cases {
        let a = client.raw(method.clone(), path, ct, body).unwrap();
        assert_eq!(
            a.status.as_u16(),
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|_| {
            panic!(
                "{method} {path}: not JSON: {}",
                String::from_utf8_lossy(&a.body)
            )
        });
        assert!(v["error"].is_string(), "{v}");
    }
    // Still serving.
    d.ok(&[
        "fn",
        "deploy",
        "hello",
        wasm("hello").to_str().unwrap(),
        "--route",
        "/hello",
    ]);
    assert_eq!(get(&agent(), &format!("{}/hello", d.front)).0, 200);
    let _ = common::in_ci();
}
