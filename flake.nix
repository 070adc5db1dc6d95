{
  description = "hostd: an immutable service host (microVM guests and WebAssembly functions)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        hostd = pkgs.callPackage ./nix/package.nix { };
        default = hostd;
      });
      overlays.default = final: prev: { hostd = final.callPackage ./nix/package.nix { }; };
      nixosModules.default = ./nix/module.nix;
      nixosModules.hostd = ./nix/module.nix;
    };
}
