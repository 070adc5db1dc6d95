//! A sampling profiler for the guest kernel: where do the vCPUs spend their time?
//!
//! On a nested PVM host the guest kernel runs through KVM's instruction emulator, so
//! boot time is kernel time, and finding what to cut means finding where it goes
//! (docs/pvm.md). With `HOSTD_GUEST_PROFILE=/path/to/System.map` in the environment,
//! the control thread kicks every vCPU out of KVM_RUN every few milliseconds, each vCPU
//! records its RIP, and when the VM stops hostd logs the kernel functions that held
//! the most samples. guest/kernel/build.sh keeps `System.map` next to `vmlinux`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// At 200 samples a second, about 40 minutes of guest time.
const MAX_SAMPLES: usize = 1 << 19;

/// Samples, and the symbols to name them by.
pub struct Profile {
    /// Function start addresses and names, sorted by address.
    symbols: Vec<(u64, String)>,
    /// Sampled RIPs, from every vCPU, in a buffer allocated up front: vCPU threads must
    /// not grow their malloc arena (their seccomp filter has no mprotect).
    samples: Mutex<Vec<u64>>,
}

impl Profile {
    /// The profile asked for by `HOSTD_GUEST_PROFILE`, if any. Read before the seccomp
    /// filters are on; an unreadable map is a warning, not an error.
    pub fn from_env() -> Option<Profile> {
        let path = std::env::var_os("HOSTD_GUEST_PROFILE")?;
        match std::fs::read_to_string(Path::new(&path)) {
            Ok(map) => Some(Profile::new(&map)),
            Err(e) => {
                tracing::warn!("HOSTD_GUEST_PROFILE: cannot read {path:?}: {e}; not profiling");
                None
            }
        }
    }

    /// A profile naming samples by `System.map`'s text symbols.
    pub fn new(system_map: &str) -> Profile {
        let mut symbols: Vec<(u64, String)> = system_map
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T" | "W" | "w").then(|| (addr, name.to_string()))
            })
            .collect();
        symbols.sort();
        Profile {
            symbols,
            samples: Mutex::new(Vec::with_capacity(MAX_SAMPLES)),
        }
    }

    /// Records one sample of a vCPU's RIP (dropped once the buffer is full).
    pub fn record(&self, rip: u64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < samples.capacity() {
            samples.push(rip);
        }
    }

    /// The function containing `rip`; user-space addresses are all one "(user)".
    fn name(&self, rip: u64) -> &str {
        if rip < 0x8000_0000_0000_0000 {
            return "(user)";
        }
        match self.symbols.partition_point(|(a, _)| *a <= rip) {
            0 => "(unknown)",
            i => &self.symbols[i - 1].1,
        }
    }

    /// Samples per function, most first, with the total.
    pub fn by_function(&self) -> (Vec<(String, u64)>, u64) {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        // A BTreeMap: a new HashMap would seed itself with getrandom, which the control
        // thread's seccomp filter does not allow.
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for rip in samples.iter() {
            *by.entry(self.name(*rip)).or_default() += 1;
        }
        let total = by.values().sum();
        let mut v: Vec<(String, u64)> = by.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        (v, total)
    }

    /// Logs the `top` functions with their share of the samples.
    pub fn report(&self, top: usize) {
        let (v, total) = self.by_function();
        let mut out = format!("guest profile: {total} samples");
        for (name, n) in v.iter().take(top) {
            out.push_str(&format!(
                "\n  {:5.1}%  {n:6}  {name}",
                100.0 * *n as f64 / total.max(1) as f64
            ));
        }
        tracing::info!("{out}");
    }
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t memcpy_orig
ffffffff81001100 T memset
ffffffff81200000 D some_data
";

    #[test]
    fn samples_are_named_by_the_function_they_fall_in() {
        let p = Profile::new(MAP);
        p.record(0xffff_ffff_8100_1000);
        p.record(0xffff_ffff_8100_10ff);
        p.record(0xffff_ffff_8100_1100);
        p.record(0x7fff_0000_1000);
        p.record(0x1000);
        let (v, total) = p.by_function();
        assert_eq!(total, 5);
        // Most samples first; ties by name.
        assert_eq!(v[0], ("(user)".to_string(), 2));
        assert_eq!(v[1], ("memcpy_orig".to_string(), 2));
        assert_eq!(v[2], ("memset".to_string(), 1));
    }

    #[test]
    fn data_symbols_do_not_name_code() {
        let p = Profile::new(MAP);
        // Past `memset`, a data symbol follows: still attributed to the last function.
        assert_eq!(p.name(0xffff_ffff_8120_0010), "memset");
        assert_eq!(p.name(0xffff_ffff_8000_0000), "(unknown)");
    }
}
