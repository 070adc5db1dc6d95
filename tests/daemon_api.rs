//! The daemon's API against a real `hostd daemon` on a temporary socket: every endpoint
//! answers bad input with a 4xx JSON error and the daemon keeps serving; the socket's
//! access rules; the OpenAPI document validates and lists every route. No guest boots
//! here (see daemon_guests.rs for those).

mod common;
mod daemon_harness;

use daemon_harness::{create, Daemon};
use hostd_daemon::hyper::Method;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const JSON: &str = "application/json";

/// Asserts a 4xx answer whose body is `{"error": "...", "code": "..."}`.
fn assert_4xx_json(d: &Daemon, what: &str, (got, body): (u16, Vec<u8>), status: u16) {
    let a = hostd_daemon::client::Answer {
        status: got.try_into().expect("status"),
        body: body.into(),
    };
    assert_eq!(
        a.status.as_u16(),
        status,
        "{what}: {}\n{}",
        String::from_utf8_lossy(&a.body),
        d.logs()
    );
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {:?}",
            String::from_utf8_lossy(&a.body)
        )
    });
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()) && v["code"].as_str().is_some(),
        "{what}: {v}"
    );
}

/// Asserts the daemon still serves.
fn still_serving(d: &Daemon) {
    let a = d.req(Method::GET, "/guests", JSON, Vec::new());
    assert_eq!(a.status, 200, "{}", d.logs());
}

#[test]
fn bad_input_on_every_endpoint_is_a_4xx_json_error_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--max-image-mib", "64"]);
    let digest = "0".repeat(64);
    let huge = vec![b'x'; 100 << 20];
    type Case = (&'static str, Method, String, &'static str, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        // Unknown guest, on every guest route.
        ("get unknown", Method::GET, "/guests/nope".into(), JSON, vec![], 404),
        ("start unknown", Method::POST, "/guests/nope/start".into(), JSON, vec![], 404),
        ("stop unknown", Method::POST, "/guests/nope/stop".into(), JSON, vec![], 404),
        ("delete unknown", Method::DELETE, "/guests/nope".into(), JSON, vec![], 404),
        ("logs unknown", Method::GET, "/guests/nope/logs".into(), JSON, vec![], 404),
        // `../` in a name, in the path and in a body.
        ("get ../", Method::GET, "/guests/..%2Fetc".into(), JSON, vec![], 400),
        ("start ../", Method::POST, "/guests/..%2Fx/start".into(), JSON, vec![], 400),
        ("stop ../", Method::POST, "/guests/..%2Fx/stop".into(), JSON, vec![], 400),
        ("delete ../", Method::DELETE, "/guests/..%2Fx".into(), JSON, vec![], 400),
        ("logs ../", Method::GET, "/guests/..%2Fx/logs".into(), JSON, vec![], 400),
        (
            "create ../",
            Method::POST,
            "/guests".into(),
            JSON,
            br#"{"name":"../x","image":"/tmp/a.img"}"#.to_vec(),
            400,
        ),
        // Malformed JSON and wrong shapes.
        ("create malformed", Method::POST, "/guests".into(), JSON, b"{\"name\":".to_vec(), 400),
        ("create wrong type", Method::POST, "/guests".into(), JSON, br#"{"name":5}"#.to_vec(), 422),
        (
            "create unknown field",
            Method::POST,
            "/guests".into(),
            JSON,
            br#"{"name":"a","image":"/a.img","bogus":1}"#.to_vec(),
            422,
        ),
        ("create not json", Method::POST, "/guests".into(), "text/plain", b"hi".to_vec(), 415),
        ("fleet malformed", Method::PUT, "/fleet".into(), JSON, b"{\"guests\":".to_vec(), 400),
        (
            "fleet bad name",
            Method::PUT,
            "/fleet".into(),
            JSON,
            br#"{"guests":{"../x":{"image":{"file":"/a.img"},"vmm":"qemu","vcpus":null,"memory":null,"autostart":true,"restart":"never","net":null,"secrets":{},"trust":[]}},"base":"/"}"#.to_vec(),
            400,
        ),
        ("logs bad query", Method::GET, "/guests/nope/logs?follow=x".into(), JSON, vec![], 400),
        // Bad digests.
        ("image bad digest", Method::GET, "/images/sha256:xyz".into(), JSON, vec![], 400),
        ("image unknown digest", Method::GET, format!("/images/sha256:{digest}"), JSON, vec![], 404),
        (
            "create bad digest",
            Method::POST,
            "/guests".into(),
            JSON,
            br#"{"name":"a","image":"sha256:abc"}"#.to_vec(),
            400,
        ),
        (
            "create absent digest",
            Method::POST,
            "/guests".into(),
            JSON,
            format!(r#"{{"name":"a","image":"sha256:{digest}"}}"#).into_bytes(),
            400,
        ),
        (
            "create missing image file",
            Method::POST,
            "/guests".into(),
            JSON,
            br#"{"name":"a","image":"/nonexistent/a.img"}"#.to_vec(),
            400,
        ),
        (
            "create relative image",
            Method::POST,
            "/guests".into(),
            JSON,
            br#"{"name":"a","image":"a.img"}"#.to_vec(),
            400,
        ),
        ("upload not an image", Method::POST, "/images".into(), "application/octet-stream", b"not an image".to_vec(), 400),
        // 100 MB bodies.
        ("create 100 MB", Method::POST, "/guests".into(), JSON, huge.clone(), 413),
        ("fleet 100 MB", Method::PUT, "/fleet".into(), JSON, huge.clone(), 413),
        ("upload 100 MB", Method::POST, "/images".into(), "application/octet-stream", huge, 413),
        // Unknown routes and methods.
        ("unknown route", Method::GET, "/nope".into(), JSON, vec![], 404),
        ("wrong method", Method::PATCH, "/guests".into(), JSON, vec![], 405),
    ];
    for (what, method, path, ctype, body, status) in cases {
        let a = daemon_harness::raw_http(&d.socket, method.as_str(), &path, ctype, body);
        assert_4xx_json(&d, what, a, status);
        still_serving(&d);
    }
    // Nothing was created by any of it.
    let guests: Vec<serde_json::Value> = d.get("/guests");
    assert!(guests.is_empty(), "{guests:?}");
}

#[test]
fn the_socket_is_0660_and_other_users_get_403() {
    if !common::require(
        "root (to connect as another user)",
        common::is_root(),
        "run the tests as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The test user `nobody` must reach the socket's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = Daemon::start(dir.path(), &[]);
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    // The file mode alone keeps `nobody` out; open it up to reach the peer check.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(common::hostd_exe());
        c.arg("ps")
            .arg("--socket")
            .arg(&d.socket)
            .uid(65534)
            .gid(65534);
        c.output().expect("hostd ps as nobody")
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("403") && err.contains("socket's group"),
        "{err}"
    );
    // Root still gets in.
    still_serving(&d);
}

#[test]
fn cli_without_a_daemon_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let out = Command::new(common::hostd_exe())
        .arg("ps")
        .env("HOSTD_SOCKET", &sock)
        .output()
        .expect("hostd ps");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "hostd: no daemon at {}: start it with `hostd daemon`",
            sock.display()
        )
    );
}

/// Every route the daemon serves, as (method, OpenAPI path).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/guests"),
    ("post", "/guests"),
    ("get", "/guests/{name}"),
    ("delete", "/guests/{name}"),
    ("post", "/guests/{name}/start"),
    ("post", "/guests/{name}/stop"),
    ("get", "/guests/{name}/logs"),
    ("post", "/images"),
    ("post", "/images/gc"),
    ("get", "/images/{digest}"),
    ("put", "/fleet"),
    ("get", "/metrics"),
    ("get", "/version"),
    ("get", "/openapi.json"),
    ("put", "/components"),
    ("get", "/functions"),
    ("post", "/functions/{name}/versions"),
    ("get", "/functions/{name}/versions"),
    ("post", "/functions/{name}/rollback"),
    ("delete", "/functions/{name}"),
];

#[test]
fn openapi_document_validates_and_lists_every_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let a = d.req(Method::GET, "/openapi.json", JSON, Vec::new());
    assert_eq!(a.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON");
    let paths = doc["paths"].as_object().expect("paths");
    let mut listed: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    listed.sort();
    let mut expected: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    // Each listed route is served (not the unknown-route fallback).
    for (m, p) in ROUTES {
        let path = p
            .replace("{name}", "nope")
            .replace("{digest}", &"0".repeat(64));
        let method: Method = m.to_uppercase().parse().expect("method");
        let a = d.req(method, &path, JSON, Vec::new());
        let code = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(!code.contains("no such route"), "{m} {p}: {code}");
    }
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &a.body).expect("write");
    let validator = Command::new("openapi-spec-validator")
        .arg("--version")
        .output();
    if !common::require(
        "openapi-spec-validator",
        validator.is_ok_and(|o| o.status.success()),
        "apt-get install python3-openapi-spec-validator",
    ) {
        return;
    }
    let out = Command::new("openapi-spec-validator")
        .arg(&file)
        .output()
        .expect("validator");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_count_requests_by_route_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.req(Method::GET, "/guests", JSON, Vec::new());
    d.req(Method::GET, "/guests/nope", JSON, Vec::new());
    let a = d.req(Method::GET, "/metrics", JSON, Vec::new());
    let text = String::from_utf8_lossy(&a.body);
    assert!(
        text.contains(r#"hostd_api_requests_total{method="GET",route="/guests",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"hostd_api_requests_total{method="GET",route="/guests/{name}",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"hostd_guests{state="running"} 0"#),
        "{text}"
    );
}

#[test]
fn log_format_json_writes_one_json_object_a_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--log-format", "json"]);
    // A request to an unknown guest is answered and the daemon keeps logging.
    let _ = d.req(Method::GET, "/guests/nobody", JSON, Vec::new());
    let logs = d.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        assert!(v["fields"]["message"].is_string(), "{v}");
    }
    assert!(lines.iter().any(|l| l.contains("listening on")), "{logs}");
}

/// Builds an image (a stand-in kernel: never booted) named `name` in `dir`.
fn unbooted_image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    common::fake_kernel(dir);
    let spec = dir.join(format!("{name}.toml"));
    std::fs::write(&spec, format!("name = \"{name}\"\nkernel = \"vmlinux\"\n")).expect("spec");
    let img = dir.join(format!("{name}.img"));
    let out = common::hostd()
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("hostd build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

#[test]
fn images_no_guest_uses_are_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let a = unbooted_image(dir.path(), "a");
    let b = unbooted_image(dir.path(), "b");
    let c = unbooted_image(dir.path(), "c");
    let ga = create(
        &d,
        serde_json::json!({"name": "ga", "image": a, "vmm": "qemu", "start": false}),
    );
    let gb = create(
        &d,
        serde_json::json!({"name": "gb", "image": b, "vmm": "qemu", "start": false}),
    );
    let up = d.req(
        Method::POST,
        "/images",
        "application/octet-stream",
        std::fs::read(&c).expect("read c"),
    );
    assert_eq!(up.status, 201, "{}", String::from_utf8_lossy(&up.body));
    let c_digest = serde_json::from_slice::<serde_json::Value>(&up.body).expect("json")["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let stored = |hex: &str| d.state.join("images/sha256").join(hex).is_file();
    assert!(stored(&ga.image_digest) && stored(&gb.image_digest) && stored(&c_digest));

    // c is used by no guest: collected; a and b stay.
    let gc = d.req(Method::POST, "/images/gc", JSON, Vec::new());
    assert_eq!(gc.status, 200, "{}", String::from_utf8_lossy(&gc.body));
    let report: serde_json::Value = serde_json::from_slice(&gc.body).expect("json");
    assert_eq!(report["removed"], serde_json::json!([c_digest]), "{report}");
    assert!(report["bytes"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(!stored(&c_digest) && stored(&ga.image_digest) && stored(&gb.image_digest));
    assert_eq!(
        d.req(
            Method::GET,
            &format!("/images/{c_digest}"),
            JSON,
            Vec::new()
        )
        .status,
        404
    );

    // Deleting gb removes its image; ga's stays.
    let del = d.req(Method::DELETE, "/guests/gb", JSON, Vec::new());
    assert_eq!(del.status, 204, "{}", String::from_utf8_lossy(&del.body));
    assert!(!stored(&gb.image_digest) && stored(&ga.image_digest));
    // Nothing left to collect.
    let gc = d.req(Method::POST, "/images/gc", JSON, Vec::new());
    let report: serde_json::Value = serde_json::from_slice(&gc.body).expect("json");
    assert_eq!(report["removed"], serde_json::json!([]), "{report}");
    still_serving(&d);
}

/// A fleet guest declared with `spec =` is built by the daemon (`hostd systemd
/// build-image`, cached by spec and lock), not refused; unchanged spec: unchanged guest;
/// changed spec: a new image, the guest replaced. Nothing boots (autostart = false).
#[test]
fn fleet_guests_declared_by_spec_are_built_and_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    common::fake_kernel(dir.path());
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, "name = \"web\"\nkernel = \"vmlinux\"\n").expect("spec");
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        "[guests.web]\nspec = \"web.toml\"\nvmm = \"qemu\"\nautostart = false\n",
    )
    .expect("fleet");
    let apply = || {
        let out = d.cli().arg("apply").arg(&fleet).output().expect("apply");
        assert!(
            out.status.success(),
            "{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(apply().contains("created   web"));
    let first = d.guest("web");
    assert!(d
        .state
        .join("images/sha256")
        .join(&first.image_digest)
        .is_file());
    let built = std::fs::read_dir(d.state.join("builds"))
        .expect("builds")
        .count();
    assert_eq!(built, 1);
    // Same spec: nothing rebuilt, nothing changed.
    assert!(apply().contains("unchanged web"));
    assert_eq!(d.guest("web").image_digest, first.image_digest);
    // A changed spec: a new image, the guest replaced.
    std::fs::write(
        &spec,
        "name = \"web\"\nkernel = \"vmlinux\"\ncmdline = \"quiet\"\n",
    )
    .expect("spec");
    assert!(apply().contains("replaced  web"));
    assert_ne!(d.guest("web").image_digest, first.image_digest);
    // A spec that does not build: a 4xx naming it, nothing changed.
    std::fs::write(&spec, "name = \"web\"\nkernel = \"missing\"\n").expect("spec");
    let out = d.cli().arg("apply").arg(&fleet).output().expect("apply");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web.toml: cannot build it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    still_serving(&d);
}

/// A client that sends half a request's headers and then waits is disconnected once the
/// header timeout (10 s) has passed, and others are served meanwhile.
#[test]
fn half_sent_headers_are_cut_off_and_others_are_served_meanwhile() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mut slow = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    slow.write_all(b"GET /guests HTTP/1.1\r\nHost: hostd\r\n")
        .expect("half a request");
    still_serving(&d);
    slow.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("read timeout");
    let mut answer = Vec::new();
    let r = slow.read_to_end(&mut answer);
    assert!(
        r.is_ok(),
        "the half-sent request was not cut off within 60 s: {r:?}\n{}",
        d.logs()
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    still_serving(&d);
}
