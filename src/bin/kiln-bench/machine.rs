//! The machine the bench runs on, and what else is running on it: facts
//! for the report header, load samples, and the memory of processes read
//! from `/proc`.

use std::path::Path;
use std::process::Command;

/// The facts printed at the top of the report.
pub struct Machine {
    /// `(label, value)` lines.
    pub lines: Vec<(&'static str, String)>,
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{program} not found"))
}

fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

impl Machine {
    /// Reads the facts of this host; `vmm` and `accel` are what the
    /// executor chose, `kernel` says which guest kernel(s) the run boots.
    pub fn detect(vmm: &str, accel: &str, kernel: String) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem_kib: u64 = proc_field("/proc/meminfo", "MemTotal")
            .and_then(|v| v.trim_end_matches(" kB").parse().ok())
            .unwrap_or(0);
        let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
            " (/dev/kvm is kvm_pvm: no hardware acceleration for stock kernels)"
        } else {
            ""
        };
        let b3sum = match crate::ingestion::b3sum_binary() {
            Some(p) => first_line(&p.to_string_lossy(), &["--version"]),
            None => "not installed".into(),
        };
        let virtiofsd = match kiln::vmm::virtiofsd::find_binary() {
            Some(p) => first_line(&p.to_string_lossy(), &["--version"]),
            None => "not found".into(),
        };
        Self {
            lines: vec![
                (
                    "CPU",
                    proc_field("/proc/cpuinfo", "model name").unwrap_or_default(),
                ),
                ("cores", cores.to_string()),
                (
                    "memory",
                    format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
                ),
                (
                    "host kernel",
                    std::fs::read_to_string("/proc/sys/kernel/osrelease")
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                ),
                ("QEMU", first_line("qemu-system-x86_64", &["--version"])),
                ("VMM / accel", format!("{vmm} / {accel}{kvm}")),
                ("virtiofsd", virtiofsd),
                ("guest kernel", kernel),
                ("b3sum", b3sum),
            ],
        }
    }
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Memory of one process, KiB.
///
/// Pages shared between processes (libraries, the binary) are split among
/// their sharers (PSS), so one VM's figure is what one more VM costs. Guest
/// RAM is a shared memfd: it is counted apart, as resident shared memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// Proportional share of anonymous memory (heap, stacks).
    pub anon: u64,
    /// Proportional share of file-backed pages (binary, libraries).
    pub file: u64,
    /// Resident shared memory (for a VMM: the guest RAM it touched).
    pub shmem: u64,
}

impl Rss {
    /// Outside guest RAM: anonymous plus file-backed.
    pub fn own(&self) -> u64 {
        self.anon + self.file
    }

    /// Each figure raised to `now`'s where that is higher (a peak over
    /// samples).
    pub fn raise(&mut self, now: Rss) {
        self.anon = self.anon.max(now.anon);
        self.file = self.file.max(now.file);
        self.shmem = self.shmem.max(now.shmem);
    }
}

fn kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reads the memory of `pid` (`smaps_rollup` and `status`).
pub fn rss(pid: u32) -> Option<Rss> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Rss {
        anon: kib(&rollup, "Pss_Anon:"),
        file: kib(&rollup, "Pss_File:"),
        shmem: kib(&status, "RssShmem:"),
    })
}

/// File-backed pages a process maps, KiB, each counted in full (not split
/// among the processes sharing it, unlike PSS), so the figure does not
/// depend on what else runs on the host. Pages copied on write (a
/// library's relocations) are anonymous memory and not counted here, nor
/// shared memory (`/memfd:…`, `/dev/…`, SysV): a VMM's guest RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilePages {
    /// Every file-backed page it maps.
    pub all: u64,
    /// Those of files under its own directory (for a VM: its initramfs),
    /// which no other VM maps; the rest (the VMM's binary, its libraries,
    /// the guest kernel) are the same files for every VM of the host.
    pub own: u64,
}

impl FilePages {
    /// Each figure raised to `now`'s where that is higher.
    pub fn raise(&mut self, now: FilePages) {
        self.all = self.all.max(now.all);
        self.own = self.own.max(now.own);
    }
}

/// Reads the file-backed pages of `pid` from `/proc/<pid>/smaps`; `own_dir`
/// is the path prefix of the files counted as its own.
pub fn file_pages(pid: u32, own_dir: &str) -> Option<FilePages> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(parse_file_pages(&smaps, own_dir))
}

/// [`file_pages`] of an `smaps` text: per mapping of a file, its resident
/// pages less the anonymous (copied-on-write) ones.
fn parse_file_pages(smaps: &str, own_dir: &str) -> FilePages {
    let mut pages = FilePages::default();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.ends_with(':') {
            let kib = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match (current.as_mut(), first) {
                (Some(m), "Rss:") => m.rss = kib,
                (Some(m), "Anonymous:") => m.anon = kib,
                _ => {}
            }
            continue;
        }
        // A mapping's header: address perms offset dev inode [path].
        let path = line
            .splitn(6, char::is_whitespace)
            .nth(5)
            .unwrap_or_default()
            .trim();
        if let Some(m) = current.take() {
            m.add_to(&mut pages);
        }
        current = Some(Mapping {
            file: path.starts_with('/')
                && !path.starts_with("/memfd:")
                && !path.starts_with("/dev/")
                && !path.starts_with("/SYSV"),
            own: path.starts_with(own_dir),
            rss: 0,
            anon: 0,
        });
    }
    if let Some(m) = current {
        m.add_to(&mut pages);
    }
    pages
}

/// One mapping of an `smaps` text, KiB.
struct Mapping {
    file: bool,
    own: bool,
    rss: u64,
    anon: u64,
}

impl Mapping {
    fn add_to(&self, pages: &mut FilePages) {
        if self.file {
            let file = self.rss.saturating_sub(self.anon);
            pages.all += file;
            if self.own {
                pages.own += file;
            }
        }
    }
}

/// Resident memory of `pid` (`VmRSS`), KiB.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(kib(&status, "VmRSS:"))
}

/// A process seen in `/proc`: pid, parent pid and command name.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// `comm` (at most 15 bytes).
    pub comm: String,
}

/// Every process, read from `/proc/<pid>/stat`.
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat.get(open + 1..close)?.to_owned();
            let ppid = stat
                .get(close + 2..)?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(Proc { pid, ppid, comm })
        })
        .collect()
}

/// The command line of `pid`, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// The pids below `of` in `procs` (children, their children, …).
pub fn descendants(of: u32, procs: &[Proc]) -> std::collections::HashSet<u32> {
    let mut found = std::collections::HashSet::from([of]);
    loop {
        let before = found.len();
        for p in procs {
            if found.contains(&p.ppid) {
                found.insert(p.pid);
            }
        }
        if found.len() == before {
            found.remove(&of);
            return found;
        }
    }
}

/// Whether `comm` is a QEMU process's.
pub fn is_vmm(comm: &str) -> bool {
    comm.starts_with("qemu-system")
}

/// The VMM processes this process started whose command line contains
/// `pattern` (a server's runs directory, or a pool VM's prefix in it), with
/// their memory now.
pub fn vmms(pattern: &str) -> Vec<(u32, Rss)> {
    let procs = processes();
    let mine = descendants(std::process::id(), &procs);
    procs
        .iter()
        .filter(|p| mine.contains(&p.pid) && is_vmm(&p.comm))
        .filter(|p| cmdline(p.pid).is_some_and(|c| c.contains(pattern)))
        .filter_map(|p| Some((p.pid, rss(p.pid)?)))
        .collect()
}

/// VMs running on this host that this process did not start (other
/// people's tests), to note the load.
pub fn foreign_vms() -> usize {
    let me = std::process::id();
    processes()
        .iter()
        .filter(|p| is_vmm(&p.comm) && p.ppid != me)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_children_and_their_children_only() {
        let proc = |pid, ppid| Proc {
            pid,
            ppid,
            comm: "x".into(),
        };
        let procs = [
            proc(10, 1),
            proc(11, 10),
            proc(12, 11),
            proc(20, 1),
            proc(21, 20),
        ];
        let mut found: Vec<u32> = descendants(10, &procs).into_iter().collect();
        found.sort();
        assert_eq!(found, [11, 12]);
    }

    #[test]
    fn file_pages_are_a_files_resident_pages_less_its_copied_ones_and_own_is_the_vms_dir() {
        let smaps = "\
55d0a0000000-55d0a1000000 r-xp 00000000 08:01 123   /usr/bin/qemu-system-x86_64
Rss:                1000 kB
Anonymous:           200 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                5000 kB
Anonymous:          5000 kB
7f0000200000-7f0000300000 rw-s 00000000 00:01 77    /memfd:memory-backend-memfd (deleted)
Rss:                9000 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 rw-p 00000000 08:01 9     /var/lib/kiln/runs/b1/initramfs.cpio
Rss:                  30 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r--p 00000000 08:01 10    /var/cache/kiln/kernel-kiln/vmlinux
Rss:                 400 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
Rss:                  24 kB
Anonymous:            24 kB
";
        assert_eq!(
            parse_file_pages(smaps, "/var/lib/kiln/runs/"),
            FilePages {
                all: 800 + 30 + 400,
                own: 30,
            }
        );
    }

    #[test]
    fn a_peak_keeps_each_figure_highest() {
        let mut peak = Rss::default();
        peak.raise(Rss {
            anon: 5,
            file: 1,
            shmem: 9,
        });
        peak.raise(Rss {
            anon: 3,
            file: 4,
            shmem: 2,
        });
        assert_eq!((peak.anon, peak.file, peak.shmem), (5, 4, 9));
        assert_eq!(peak.own(), 9);
    }
}
