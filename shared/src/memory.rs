//! Process memory figures for benchmarks and service logs.

/// Returns this process's peak resident set size in bytes (`VmHWM` in
/// `/proc/self/status`), or `None` where that file does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_covers_a_touched_buffer() {
        let Some(before) = super::peak_rss_bytes() else {
            return;
        };
        let buffer = vec![1u8; 64 << 20];
        std::hint::black_box(&buffer);
        let after = super::peak_rss_bytes().unwrap();
        assert!(after >= before.max(64 << 20), "peak {after} after touching 64 MiB");
    }
}
