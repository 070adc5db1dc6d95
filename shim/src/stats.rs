//! `ctr task metrics`: the task cgroup's figures in the types containerd decodes
//! (`io.containerd.cgroups.v1.Metrics`, or `io.containerd.cgroups.v2.Metrics` on a
//! unified hierarchy).

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::util::convert_to_any;

use crate::cgroup::{is_v2, Usage};

/// The figures as the Any containerd unpacks.
pub fn metrics(u: &Usage) -> Result<Any, String> {
    let any = if is_v2() {
        convert_to_any(Box::new(v2::Metrics {
            pids: MessageField::some(v2::PidsStat {
                current: u.pids,
                ..Default::default()
            }),
            cpu: MessageField::some(v2::CPUStat {
                usage_usec: u.cpu_ns / 1000,
                user_usec: u.cpu_user_ns / 1000,
                system_usec: u.cpu_system_ns / 1000,
                ..Default::default()
            }),
            memory: MessageField::some(v2::MemoryStat {
                usage: u.memory_bytes,
                usage_limit: u.memory_limit,
                ..Default::default()
            }),
            ..Default::default()
        }))
    } else {
        convert_to_any(Box::new(v1::Metrics {
            pids: MessageField::some(v1::PidsStat {
                current: u.pids,
                ..Default::default()
            }),
            cpu: MessageField::some(v1::CPUStat {
                usage: MessageField::some(v1::CPUUsage {
                    total: u.cpu_ns,
                    user: u.cpu_user_ns,
                    kernel: u.cpu_system_ns,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(v1::MemoryStat {
                usage: MessageField::some(v1::MemoryEntry {
                    usage: u.memory_bytes,
                    limit: u.memory_limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
    };
    any.map_err(|e| e.to_string())
}
