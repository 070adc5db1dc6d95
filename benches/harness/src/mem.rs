//! Memory figures: a process tree's proportional set size and the host's available memory.

/// A field of /proc/meminfo in KiB (`MemAvailable`, `MemTotal`, …).
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The pids whose parent is `pid`, from /proc/*/stat.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // comm may hold spaces and parentheses: fields start after the last ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let kids = children(out[i]);
        out.extend(kids);
        i += 1;
    }
    out
}

/// The PSS (KiB) of one process (smaps_rollup), if readable.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The summed PSS (KiB) of `pid` and its descendants; None when none was readable.
pub fn tree_pss_kib(pid: u32) -> Option<u64> {
    let v: Vec<u64> = tree(pid).into_iter().filter_map(pss_kib).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_figures() {
        assert!(meminfo_kib("MemTotal").is_some_and(|k| k > 0));
        assert!(meminfo_kib("NoSuchField").is_none());
        assert!(pss_kib(std::process::id()).is_some_and(|k| k > 0));
        assert!(tree(std::process::id()).contains(&std::process::id()));
    }
}
