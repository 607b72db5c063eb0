//! Limits of this process that servers size themselves by.

/// This process's limit on open files (the soft limit), from `/proc/self/limits`;
/// `None` where that cannot be read.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
