//! `containerd-shim-hostd-v1`: a containerd runtime (shim v2) that runs hostd images as
//! microVMs and WebAssembly components in the function tier (docs/containerd.md).

mod cgroup;
mod mount;
mod rootfs_image;
mod service;
mod stats;
mod workload;

fn main() {
    containerd_shim::run::<service::Shim>(service::RUNTIME_ID, None);
}
