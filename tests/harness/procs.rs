//! What a server left behind: build directories and processes naming them,
//! and this process's memory.

use std::path::Path;

/// Build directories under `runs` and processes whose command line
/// mentions `runs`.
pub fn leftovers(runs: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runs) {
        for e in entries.flatten() {
            found.push(format!("dir {}", e.path().display()));
        }
    }
    let needle = runs.as_os_str().as_encoded_bytes();
    for pid in processes_mentioning(needle) {
        found.push(format!("process {pid}"));
    }
    found
}

/// [`leftovers`] less the warm pool's VMs (`runs/warm-*`, directories and
/// processes): a waiting pool VM belongs to the server, not to a build. A
/// pool VM given to a build keeps its name while the build runs and goes
/// with it.
pub fn build_leftovers(runs: &Path) -> Vec<String> {
    let pool = runs.join("warm-");
    let pool = pool.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runs) {
        for e in entries.flatten() {
            if !e.file_name().as_encoded_bytes().starts_with(b"warm-") {
                found.push(format!("dir {}", e.path().display()));
            }
        }
    }
    let needle = runs.as_os_str().as_encoded_bytes();
    for pid in processes_mentioning(needle) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmd.windows(pool.len()).any(|w| w == pool) {
            found.push(format!("process {pid}"));
        }
    }
    found
}

/// PIDs of `program` (by the name of its executable) whose command line
/// mentions `runs`.
pub fn build_processes(runs: &Path, program: &str) -> Vec<i32> {
    processes_mentioning(runs.as_os_str().as_encoded_bytes())
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .and_then(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .map(|a| a.ends_with(program.as_bytes()))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// PIDs other than this process whose command line contains `needle`.
pub fn processes_mentioning(needle: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            // Zombies have an empty cmdline and hold nothing.
            if cmd.windows(needle.len()).any(|w| w == needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// This process's resident set size, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
