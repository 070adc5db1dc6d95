//! The benchmark harness shared by `hostd bench` and the cargo benches in `benches/`:
//! one place for spawn-and-measure, medians and percentiles, host detection, HTTP load,
//! memory figures, the JSON report, comparison with an earlier report and the SVG chart.

pub mod compare;
pub mod host;
pub mod http;
pub mod mem;
pub mod report;
pub mod spawn;
pub mod stats;
pub mod svg;

pub use spawn::{spawn_and_measure, Sample};
pub use stats::{median, percentile};

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Writes `{"bench":NAME,<extra>"results":[RESULTS]}` to `dir/NAME.json` and returns its
/// path. `extra` is zero or more `"key":value,` pairs (the cargo benches' format).
pub fn write_bench_json(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
    results: &[String],
) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.json"));
    let body = format!(
        "{{\"bench\":\"{name}\",{extra}\"results\":[{}]}}\n",
        results.join(",")
    );
    std::fs::write(&path, body)?;
    Ok(path)
}
