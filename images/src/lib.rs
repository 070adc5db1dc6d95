//! hostd images: the spec a user writes, the manifest guest init reads, the on-disk
//! image format and the builder that turns one into the other.
//!
//! With default features off, only [`manifest`] is built (that is what the guest needs).

pub mod abi;
pub mod input;
pub mod manifest;
pub mod names;
#[cfg(feature = "builder")]
pub mod scratch;
#[cfg(feature = "builder")]
pub mod signature;

#[cfg(feature = "builder")]
pub mod builder;
#[cfg(feature = "builder")]
pub mod debs;
#[cfg(feature = "builder")]
pub mod erofs;
#[cfg(feature = "builder")]
pub mod etc;
#[cfg(feature = "builder")]
pub mod format;
#[cfg(feature = "builder")]
pub mod kernel;
#[cfg(feature = "builder")]
pub mod layer;
#[cfg(feature = "builder")]
pub mod lock;
#[cfg(feature = "builder")]
pub mod oci;
#[cfg(feature = "builder")]
pub mod packages;
#[cfg(feature = "builder")]
pub mod progress;
#[cfg(feature = "builder")]
pub mod rootfs;
#[cfg(feature = "builder")]
pub mod spec;
#[cfg(feature = "builder")]
pub mod stamp;
#[cfg(feature = "builder")]
pub mod verity;
