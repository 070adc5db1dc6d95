# NixOS module for hostd: guests (microVMs) and functions declared in configuration.nix,
# run as systemd units. See docs/nixos.md for an example and the option reference.
#
#   imports = [ /path/to/hostd/nix/module.nix ];
#   services.hostd.enable = true;
#   services.hostd.guests.web = { image = ./web.img; vmm = "qemu"; };
#
# Each guest becomes `hostd-guest-<name>.service`, wanted by `hostd-guests.target` when it
# autostarts; nix/units.nix renders them (the same units `hostd systemd generate` writes
# on other systemd hosts). Functions are served by one `hostd-daemon.service`.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types literalExpression mapAttrs mapAttrsToList
    attrNames optionalAttrs;

  cfg = config.services.hostd;
  tomlFormat = pkgs.formats.toml { };
  hostdBin = "${cfg.package}/bin/hostd";

  nameCheck = n: builtins.match "[a-z0-9][a-z0-9_-]{0,62}" n != null;

  netOptions = {
    options = {
      tap = mkOption {
        type = types.strMatching "[A-Za-z0-9_.-]{1,15}";
        description = "Name of the TAP device the unit creates before the guest starts and removes after it stops.";
        example = "tap-web";
      };
      address = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The guest's eth0 address with prefix (hostd run --net ip=).";
        example = "10.0.0.2/24";
      };
      gateway = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The guest's default gateway (hostd run --net gw=).";
        example = "10.0.0.1";
      };
      mac = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The guest's MAC address (default 52:54:00:12:34:56).";
      };
      bridge = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''
          A bridge the TAP device joins once created (declare the bridge itself with
          `networking.bridges`; NAT for it with `networking.nat`).
        '';
        example = "br-guests";
      };
    };
  };

  guestOptions = { name, config, ... }: {
    options = {
      image = mkOption {
        type = types.nullOr (types.either types.path types.str);
        default = null;
        description = "A prebuilt image (`hostd build` output). Exactly one of `image`, `spec`, `specFile`.";
      };
      spec = mkOption {
        type = types.nullOr tomlFormat.type;
        default = null;
        description = ''
          The image spec as a Nix attribute set (rendered to TOML, docs/spec.md). The
          unit builds it when it starts, into the guest's state directory, and rebuilds
          only when the spec or its lock file changed.
        '';
      };
      specFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "A spec file, built as for `spec`.";
      };
      lockFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = ''
          The spec's lock file (`hostd build` writes NAME.lock next to the spec). A spec
          with packages needs one here: the store is read-only, so the build cannot write it.
        '';
      };
      vmm = mkOption {
        type = types.enum [ "builtin" "qemu" ];
        default = "builtin";
        description = "The monitor: hostd's own VMM on KVM, or QEMU (KVM where it works, else TCG).";
      };
      vcpus = mkOption {
        type = types.nullOr (types.ints.between 1 64);
        default = null;
        description = "vCPUs (default: the image's).";
      };
      memory = mkOption {
        type = types.nullOr (types.strMatching "[0-9]+[MG]");
        default = null;
        description = "Guest memory such as `512M` or `2G` (default: the image's).";
      };
      autostart = mkOption {
        type = types.bool;
        default = true;
        description = "Start with `hostd-guests.target` (at boot and on switch).";
      };
      restart = mkOption {
        type = types.enum [ "always" "on-failure" "never" ];
        default = "on-failure";
        description = "When systemd starts the guest again after it ended (2 s later, at most 5 times a minute).";
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Restart the guest on `nixos-rebuild switch` when its unit changed.";
      };
      stopTimeout = mkOption {
        type = types.ints.between 0 3600;
        default = unitsLib.specStopTimeout config;
        defaultText = literalExpression "the stop_timeout of spec or specFile, else 5";
        description = ''
          The image's `stop_timeout` (seconds its services get between SIGTERM and
          SIGKILL); the unit's TimeoutStopSec is this plus 20.
        '';
      };
      net = mkOption {
        type = types.nullOr (types.submodule netOptions);
        default = null;
        description = "A network card backed by a TAP device the unit manages.";
      };
      secrets = mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = ''
          Secrets by name: host files (absolute paths as strings, so they never enter the
          store) handed to the unit as systemd credentials (`LoadCredential=`) and to the
          guest services that declare them as /run/secrets/NAME.
        '';
        example = { db_password = "/run/keys/db"; };
      };
      trust = mkOption {
        type = types.listOf types.path;
        default = [ ];
        description = "Public keys; when given, only an image signed by one of them boots.";
      };
    };
  };

  # A spec and its lock side by side, as `hostd build` looks for them.
  specDir = name: g:
    let
      spec = if g.spec != null then tomlFormat.generate "${name}.toml" g.spec else g.specFile;
    in
    if g.spec == null && g.specFile == null then null
    else "${pkgs.runCommand "hostd-spec-${name}" { } ''
      mkdir $out
      cp ${spec} $out/${name}.toml
      ${lib.optionalString (g.lockFile != null) "cp ${g.lockFile} $out/${name}.lock"}
    ''}/${name}.toml";

  coreGuests = mapAttrs
    (name: g: {
      # A Nix path is copied to the store, so a changed image changes the unit (and
      # restarts the guest on switch); a string names a host file as it is.
      image =
        if g.image == null then null
        else if builtins.isPath g.image then "${g.image}"
        else g.image;
      specFile = specDir name g;
      inherit (g) vmm vcpus memory autostart restart secrets stopTimeout;
      trust = map toString g.trust;
      net = g.net;
    })
    cfg.guests;

  unitsFor = import ./units.nix {
    hostd = hostdBin;
    ip = "${pkgs.iproute2}/bin/ip";
    stateDir = cfg.stateDir;
  };
  # The functions of units.nix that need no guests.
  unitsLib = unitsFor { };
  units = unitsFor coreGuests;

  fleetFile = tomlFormat.generate "hostd-functions.toml" { functions = cfg.functions; };
in
{
  options.services.hostd = {
    enable = mkEnableOption "hostd, an immutable service host (microVM guests and WebAssembly functions)";

    package = mkOption {
      type = types.package;
      default = pkgs.hostd or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "pkgs.hostd or (pkgs.callPackage ./package.nix { })";
      description = ''
        The hostd package (its bin/hostd runs the guests and the daemon): `pkgs.hostd`
        when an overlay provides it, else built from this checkout (nix/package.nix).
      '';
    };

    qemuPackage = mkOption {
      type = types.package;
      default = pkgs.qemu_kvm;
      defaultText = literalExpression "pkgs.qemu_kvm";
      description = "The QEMU that units of guests with `vmm = \"qemu\"` run (`HOSTD_QEMU`).";
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/hostd";
      description = ''
        Where guests keep their volumes and built images (STATEDIR/guests/NAME). Under
        /var/lib, each guest gets it as the unit's StateDirectory.
      '';
    };

    guests = mkOption {
      type = types.attrsOf (types.submodule guestOptions);
      default = { };
      description = "Guests, each run by `hostd-guest-<name>.service`.";
    };

    functions = mkOption {
      type = types.attrsOf tomlFormat.type;
      default = { };
      description = ''
        WebAssembly functions, each exactly a `[functions.NAME]` table of fns.toml
        (`component`, `routes` and grants; docs/capabilities.md), served by
        `hostd-daemon.service`.
      '';
    };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:8080";
      description = "Where `hostd daemon` serves the functions.";
    };
  };

  config = mkIf cfg.enable {
    assertions =
      mapAttrsToList
        (name: g: {
          assertion = builtins.length (builtins.filter (x: x != null) [ g.image g.spec g.specFile ]) == 1;
          message = "services.hostd.guests.${name}: give exactly one of image, spec, specFile.";
        })
        cfg.guests
      ++ mapAttrsToList
        (name: g: {
          assertion = nameCheck name && builtins.all nameCheck (attrNames g.secrets);
          message = "services.hostd.guests.${name}: guest and secret names are 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit.";
        })
        cfg.guests
      ++ mapAttrsToList
        (name: _: {
          assertion = nameCheck name;
          message = "services.hostd.functions.${name}: a function name is 1-63 of a-z, 0-9, `-`, `_`.";
        })
        cfg.functions;

    environment.systemPackages = [ cfg.package ];

    systemd.targets.hostd-guests = {
      description = "hostd guests";
      wantedBy = [ "multi-user.target" ];
    };

    systemd.services =
      mapAttrs
        (unit: s:
          let g = cfg.guests.${lib.removePrefix "hostd-guest-" unit}; in
          s // {
            inherit (g) restartIfChanged;
            # hostd starts QEMU with a cleared environment, so a PATH entry would not
            # reach it (it would look in /bin:/usr/bin): name the binary.
            environment = lib.optionalAttrs (g.vmm == "qemu") {
              HOSTD_QEMU = "${cfg.qemuPackage}/bin/qemu-system-x86_64";
            };
          })
        units.services
      // optionalAttrs (cfg.functions != { }) {
        hostd-daemon = unitsLib.daemonService { fleet = fleetFile; listen = cfg.listen; };
      };
  };
}
