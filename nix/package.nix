# hostd as a Nix package (callPackage-style), the default of `services.hostd.package`:
#
#   hostd = pkgs.callPackage /path/to/hostd/nix/package.nix { };
#
# Two derivations: guest init and the bench workload, static (musl), which `hostd`
# embeds; then `hostd`, `hostd-full` and `hostd-backend`, with build.rs pointed at the first
# (HOSTD_GUEST_PREBUILT) instead of building them itself. The tests need KVM, QEMU and
# root, so the package does not run them (doCheck = false).
{
  lib,
  rustPlatform,
  pkgsStatic,
}:

let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  version = cargoToml.package.version;

  # The sources cargo reads: no target/, no docs, no nix/ (so editing the module does
  # not rebuild the package), no .cargo/ (its static glibc link needs a libc.a, which
  # nixpkgs' glibc does not ship: the package links against nixpkgs' glibc as usual).
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter =
      path: type:
      let
        rel = lib.removePrefix (toString ../. + "/") (toString path);
        top = builtins.head (lib.splitString "/" rel);
      in
      !(builtins.elem top [
        "target"
        ".cargo"
        "docs"
        "nix"
        "fuzz"
        "flake.nix"
        "flake.lock"
        "result"
      ]);
  };

  cargoLock.lockFile = ../Cargo.lock;

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
  };

  # The profile build.rs uses for the guest binaries.
  guestProfile = {
    CARGO_PROFILE_RELEASE_DEBUG = "false";
    CARGO_PROFILE_RELEASE_STRIP = "symbols";
    CARGO_PROFILE_RELEASE_OPT_LEVEL = "s";
    CARGO_PROFILE_RELEASE_LTO = "true";
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS = "1";
    CARGO_PROFILE_RELEASE_PANIC = "abort";
  };

  guest = pkgsStatic.rustPlatform.buildRustPackage (
    guestProfile
    // {
      pname = "hostd-guest";
      inherit version src cargoLock;
      cargoBuildFlags = [
        "-p"
        "hostd-init"
        "-p"
        "hostd-bench-workload"
      ];
      doCheck = false;
      meta = meta // {
        description = "hostd's guest init and bench workload (static)";
      };
    }
  );
in
rustPlatform.buildRustPackage {
  pname = "hostd";
  inherit version src cargoLock;
  cargoBuildFlags = [
    "-p"
    "hostd"
  ];
  HOSTD_GUEST_PREBUILT = "${guest}/bin";
  doCheck = false;
  passthru = { inherit guest; };
  meta = meta // {
    mainProgram = "hostd";
  };
}
