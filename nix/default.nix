# Entry points for Nix users (docs/nixos.md):
#
#   imports = [ (import /path/to/hostd/nix).nixosModules.default ];
#   environment.systemPackages = [ (pkgs.callPackage /path/to/hostd/nix/package.nix { }) ];
#
# `units` is the module's pure core (guests -> systemd units, builtins only), for
# rendering hostd's units outside NixOS; `package` builds hostd (callPackage it).
{
  nixosModules.default = ./module.nix;
  nixosModules.hostd = ./module.nix;
  module = ./module.nix;
  package = ./package.nix;
  overlays.default = final: prev: { hostd = final.callPackage ./package.nix { }; };
  units = import ./units.nix;
}
