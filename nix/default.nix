# Entry points for Nix users (docs/nixos.md):
#
#   imports = [ (import /path/to/hostd/nix).nixosModules.default ];
#
# `units` is the module's pure core (guests -> systemd units, builtins only), for
# rendering hostd's units outside NixOS.
{
  nixosModules.default = ./module.nix;
  nixosModules.hostd = ./module.nix;
  module = ./module.nix;
  units = import ./units.nix;
}
