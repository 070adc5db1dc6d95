//! The VMM process's jail: the shared pieces live in `hostd_devices::jail`.

pub use hostd_devices::jail::caps::drop_capabilities;
pub use hostd_devices::jail::seccomp::*;
pub use hostd_devices::jail::JailError;
