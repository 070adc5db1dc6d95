//! The NixOS module under Debian's nix-bin (Nix 2.8; no nixpkgs here), issue 13: every
//! file of nix/ and the example of docs/nixos.md parse (`nix-instantiate --parse`); the
//! example evaluates with the module's pure core (nix/units.nix, builtins only), and the
//! units it renders are byte for byte those `hostd systemd generate` writes for the same
//! guests as a fleet file, and `systemd-analyze verify` says nothing about them.

mod common;

use common::{fake_kernel, hostd, require};
use std::path::{Path, PathBuf};
use std::process::Command;

const NIX_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nix");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/nixos.md");

fn require_nix() -> bool {
    require(
        "nix-instantiate (Debian's nix-bin)",
        Command::new("nix-instantiate")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "apt-get install nix-bin",
    )
}

/// The configuration.nix of docs/nixos.md: the ```nix block after the example marker.
fn doc_example() -> String {
    let doc = std::fs::read_to_string(DOC).expect("docs/nixos.md");
    let at = doc
        .find("<!-- example: tests/nixos_module.rs -->")
        .expect("the example marker in docs/nixos.md");
    let rest = &doc[at..];
    let start = rest.find("```nix\n").expect("a nix block after the marker") + 7;
    let len = rest[start..].find("```").expect("the end of the nix block");
    rest[start..start + len].to_string()
}

fn nix(args: &[&str], file_or_expr: &str) -> String {
    let out = Command::new("nix-instantiate")
        .args(args)
        .arg(file_or_expr)
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "nix-instantiate {args:?} {file_or_expr}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nix_files_and_the_doc_example_parse() {
    if !require_nix() {
        return;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(NIX_DIR)
        .expect("nix/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("flake.nix"));
    let dir = tempfile::tempdir().expect("tempdir");
    let example = dir.path().join("configuration.nix");
    std::fs::write(&example, doc_example()).expect("example");
    files.push(example);
    for f in &files {
        nix(&["--parse"], &f.to_string_lossy());
    }
}

/// The `ip` `hostd systemd generate` finds (the same search as src/systemd_cmd.rs).
fn ip() -> String {
    [
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
        "/run/current-system/sw/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join("ip"))
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("/usr/sbin/ip"))
    .to_string_lossy()
    .into_owned()
}

/// A fleet file with the guests nix/units.nix saw (after `withDefaults`).
fn fleet_of(guests: &serde_json::Map<String, serde_json::Value>) -> String {
    let q = |v: &serde_json::Value| serde_json::to_string(v).expect("json string");
    let mut t = String::new();
    for (name, g) in guests {
        t.push_str(&format!("[guests.{name}]\n"));
        if !g["image"].is_null() {
            t.push_str(&format!("image = {}\n", q(&g["image"])));
        }
        if !g["specFile"].is_null() {
            t.push_str(&format!("spec = {}\n", q(&g["specFile"])));
        }
        t.push_str(&format!("vmm = {}\n", q(&g["vmm"])));
        if !g["vcpus"].is_null() {
            t.push_str(&format!("vcpus = {}\n", g["vcpus"]));
        }
        if !g["memory"].is_null() {
            t.push_str(&format!("memory = {}\n", q(&g["memory"])));
        }
        t.push_str(&format!("autostart = {}\n", g["autostart"]));
        t.push_str(&format!("restart = {}\n", q(&g["restart"])));
        if let Some(n) = g["net"].as_object() {
            let mut s = format!("tap={}", n["tap"].as_str().expect("tap"));
            for (k, key) in [("address", "ip"), ("gateway", "gw"), ("mac", "mac")] {
                if let Some(v) = n[k].as_str() {
                    s.push_str(&format!(",{key}={v}"));
                }
            }
            t.push_str(&format!("net = \"{s}\"\n"));
        }
        t.push_str(&format!("trust = {}\n", g["trust"]));
        t.push_str(&format!("[guests.{name}.secrets]\n"));
        for (k, v) in g["secrets"].as_object().expect("secrets") {
            t.push_str(&format!("{k} = {}\n", q(v)));
        }
    }
    t
}

#[test]
fn doc_example_renders_the_units_hostd_generates() {
    if !require_nix()
        || !require(
            "systemd-analyze",
            Command::new("systemd-analyze")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "apt-get install systemd",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("configuration.nix"), doc_example()).expect("example");
    // The files the example names: a prebuilt image (stop_timeout 3, as the example
    // says) and a spec (stop_timeout 9, which the module reads from it).
    let images = d.join("images");
    std::fs::create_dir(&images).expect("images");
    fake_kernel(&images);
    let spec =
        |n: &str, t: u32| format!("name = \"{n}\"\nkernel = \"vmlinux\"\nstop_timeout = {t}\n");
    std::fs::write(images.join("web.toml"), spec("web", 3)).expect("spec");
    std::fs::write(images.join("batch.toml"), spec("batch", 9)).expect("spec");
    let out = hostd()
        .arg("build")
        .arg(images.join("web.toml"))
        .arg("-o")
        .arg(images.join("web.img"))
        .output()
        .expect("hostd build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hostd_bin = common::hostd_exe().to_str().expect("a UTF-8 path");
    let expr = format!(
        r#"let
  example = import {d}/configuration.nix {{ config = {{ }}; pkgs = {{ }}; lib = {{ }}; }};
  units = import {nix}/units.nix {{ hostd = "{hostd_bin}"; ip = "{ip}"; stateDir = "/var/lib/hostd"; }};
  guests = builtins.mapAttrs (n: g: (units {{ }}).withDefaults g) example.services.hostd.guests;
  rendered = units guests;
  daemon = {{ fleet = "{d}/units/hostd-daemon.fleet.toml"; inherit (example.services.hostd) listen; }};
in {{
  inherit guests;
  inherit (example.services.hostd) functions listen;
  inherit (rendered) autostart services;
  texts = rendered.texts // {{ "${{rendered.daemonUnit}}" = rendered.daemonText daemon; }};
  daemonService = rendered.daemonService daemon;
}}"#,
        d = d.display(),
        nix = NIX_DIR,
        ip = ip(),
    );
    let json = nix(&["--eval", "--strict", "--json", "-E"], &expr);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nix's JSON");
    let guests = v["guests"].as_object().expect("guests");
    assert_eq!(
        guests.keys().collect::<Vec<_>>(),
        ["batch", "web"],
        "{json}"
    );
    // The daemon serves the example's functions, keeps its state in the state directory.
    let daemon = &v["daemonService"]["serviceConfig"];
    assert_eq!(daemon["Type"], "notify", "{daemon}");
    assert_eq!(daemon["StateDirectory"], "hostd", "{daemon}");
    assert!(
        daemon["ExecStart"]
            .as_str()
            .is_some_and(|e| e.ends_with("--listen 127.0.0.1:8080 --state-dir /var/lib/hostd")),
        "{daemon}"
    );
    // What NixOS gets through systemd.services: the same values.
    let web = &v["services"]["hostd-guest-web"]["serviceConfig"];
    assert_eq!(web["TimeoutStopSec"], 23, "{web}");
    assert_eq!(web["Type"], "notify", "{web}");
    assert_eq!(
        web["LoadCredential"][0], "db_password:/run/keys/db_password",
        "{web}"
    );

    let fleet = d.join("fleet.toml");
    // The example's functions, as the module hands them to hostd-daemon.service.
    let mut fleet_text = fleet_of(guests);
    for (name, f) in v["functions"].as_object().expect("functions") {
        fleet_text.push_str(&format!(
            "[functions.{name}]\ncomponent = {}\nroutes = {}\n",
            f["component"], f["routes"]
        ));
    }
    std::fs::write(&fleet, fleet_text).expect("fleet");
    let units = d.join("units");
    let out = hostd()
        .args(["systemd", "generate"])
        .arg(&units)
        .arg("--fleet")
        .arg(&fleet)
        .arg("--hostd")
        .arg(hostd_bin)
        .arg("--listen")
        .arg(v["listen"].as_str().expect("listen"))
        .output()
        .expect("generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let texts = v["texts"].as_object().expect("texts");
    let mut generated: Vec<String> = std::fs::read_dir(&units)
        .expect("units")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".target"))
        .collect();
    generated.sort();
    assert_eq!(generated, texts.keys().cloned().collect::<Vec<_>>());
    let nix_units = d.join("nix-units");
    std::fs::create_dir(&nix_units).expect("dir");
    for (name, text) in texts {
        let text = text.as_str().expect("text");
        let ours = std::fs::read_to_string(units.join(name)).expect("generated unit");
        assert_eq!(
            text, ours,
            "{name}: nix/units.nix and hostd systemd generate differ"
        );
        let path = nix_units.join(name);
        std::fs::write(&path, text).expect("write");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {name}:\n{said}\n{text}"
        );
    }
    // Only web autostarts, in both.
    assert_eq!(
        v["autostart"],
        serde_json::json!(["hostd-guest-web.service"])
    );
    let wants: Vec<String> = std::fs::read_dir(units.join("hostd-guests.target.wants"))
        .expect("wants")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(wants, ["hostd-guest-web.service"]);
}

/// nix/package.nix and flake.nix cannot be built here (no nixpkgs, no binary cache), so
/// they are evaluated against stand-ins for the few nixpkgs functions they call, which
/// return their arguments: what the package asks rustPlatform for, and what the flake
/// exposes.
#[test]
fn package_and_flake_evaluate_with_stand_ins() {
    if !require_nix() {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let expr = format!(
        r#"let
  # Stand-ins: only what package.nix and flake.nix call.
  lib = {{
    cleanSource = src: src;
    cleanSourceWith = a: a;
    removePrefix = p: s: let n = builtins.stringLength p; in
      if builtins.substring 0 n s == p then builtins.substring n (-1) s else s;
    splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
    licenses.asl20 = "asl20";
    genAttrs = names: f: builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) names);
  }};
  rustPlatform.buildRustPackage = a: a // {{ outPath = "/nix/store/hostd"; }};
  pkgsStatic.rustPlatform.buildRustPackage = a: a // {{ outPath = "/nix/store/hostd-guest"; }};
  callPackage = f: _: import f {{ inherit lib rustPlatform pkgsStatic; }};
  pkg = callPackage {root}/nix/package.nix {{ }};
  flake = (import {root}/flake.nix).outputs {{
    self = {{ }};
    nixpkgs = {{ inherit lib; legacyPackages.x86_64-linux = {{ inherit callPackage; }}; }};
  }};
  entry = import {root}/nix;
  keep = p: pkg.src.filter "{root}/${{p}}" "directory";
in {{
  inherit (pkg) pname version cargoBuildFlags HOSTD_GUEST_PREBUILT doCheck;
  lock = toString pkg.cargoLock.lockFile;
  mainProgram = pkg.meta.mainProgram;
  guestFlags = pkg.passthru.guest.cargoBuildFlags;
  guestLto = pkg.passthru.guest.CARGO_PROFILE_RELEASE_LTO;
  keeps = {{ src = keep "src"; guest = keep "guest"; target = keep "target"; nix = keep "nix"; cargo = keep ".cargo"; }};
  flakePackage = flake.packages.x86_64-linux.default.pname;
  flakeModule = toString flake.nixosModules.default;
  overlay = (flake.overlays.default {{ inherit callPackage; }} {{ }}).hostd.pname;
  entryModule = toString entry.nixosModules.default;
  entryPackage = toString entry.package;
}}"#
    );
    let json = nix(&["--eval", "--strict", "--json", "-E"], &expr);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nix's JSON");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(v["pname"], "hostd", "{json}");
    assert_eq!(v["version"], version, "{json}");
    assert_eq!(
        v["cargoBuildFlags"],
        serde_json::json!(["-p", "hostd"]),
        "{json}"
    );
    assert_eq!(v["lock"], format!("{root}/Cargo.lock"), "{json}");
    assert_eq!(v["mainProgram"], "hostd", "{json}");
    assert_eq!(v["doCheck"], false, "{json}");
    // Guest init and the bench workload come from the static derivation (build.rs
    // copies them from HOSTD_GUEST_PREBUILT instead of building them).
    assert_eq!(
        v["HOSTD_GUEST_PREBUILT"], "/nix/store/hostd-guest/bin",
        "{json}"
    );
    assert_eq!(
        v["guestFlags"],
        serde_json::json!(["-p", "hostd-init", "-p", "hostd-bench-workload"]),
        "{json}"
    );
    assert_eq!(v["guestLto"], "true", "{json}");
    assert_eq!(
        v["keeps"],
        serde_json::json!({"src": true, "guest": true, "target": false, "nix": false, "cargo": false}),
        "{json}"
    );
    assert_eq!(v["flakePackage"], "hostd", "{json}");
    assert_eq!(v["overlay"], "hostd", "{json}");
    for k in ["flakeModule", "entryModule"] {
        assert_eq!(v[k], format!("{root}/nix/module.nix"), "{json}");
    }
    assert_eq!(
        v["entryPackage"],
        format!("{root}/nix/package.nix"),
        "{json}"
    );
}
