//! The baseline kiln is compared with: the same kernel and base initramfs,
//! booted by the same VMM backend with the same RAM (what kiln gave its
//! build) and vCPUs, whose init
//! powers off at once.
//!
//! The base image gets a second small archive (as kiln appends its job)
//! holding a busybox script that becomes init through `rdinit=`. It mounts
//! /proc and /dev, notes the guest uptime, optionally loads the same kernel
//! modules kiln's agent loads (virtio transport, console, fuse, virtiofs;
//! those the kernel has: kiln's own has them built in), notes the uptime
//! again on the serial console and powers off. No virtiofs share, no job,
//! no sandbox: the floor a microVM build cannot go below.
//!
//! Two host-clock figures per boot: until the mark is on the serial
//! console (the serial log is polled every few ms: a cold boot's time to
//! its first instruction) and until the VMM has exited.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln::guest_image::cpio::CpioWriter;
use kiln::vmm::session::{Guest, GuestBoot, SessionSpec, VmSession};

use crate::server::BenchServer;

/// Where the script lives in the initramfs.
const INIT: &str = "kiln-bench-init";
/// The busybox applets the script calls.
const APPLETS: &[&str] = &["mount", "insmod", "poweroff"];
/// The line the script prints on the serial console.
const MARK: &str = "kiln-bench-init";

/// How often the serial log is read for the mark.
const MARK_POLL: Duration = Duration::from_millis(5);
/// How long a bare VM may take to power off.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// One bare boot, timed.
pub struct BareBoot {
    /// VMM spawned to VMM exited.
    pub wall: Duration,
    /// VMM spawned to the mark seen on the serial console (at most
    /// [`MARK_POLL`] late).
    pub to_mark: Duration,
    /// VMM spawned to its guest channel connected (as kiln waits for it).
    pub vmm_up: Duration,
    /// Guest uptime when init started, ms.
    pub guest_boot_ms: f64,
    /// Guest time spent loading modules, ms (0 without modules).
    pub modules_ms: f64,
}

/// Prepared initramfs images for bare boots.
pub struct Bare {
    dir: PathBuf,
    plain: PathBuf,
    with_modules: PathBuf,
    /// The modules the second image loads.
    modules: Vec<&'static str>,
}

fn script(modules: &[&str]) -> String {
    let mut s = String::from(
        "#!/kiln/sh\nexport PATH=/kiln-bench\nmount -t proc proc /proc\nmount -t devtmpfs dev /dev\nread up rest < /proc/uptime\n",
    );
    for m in modules {
        s.push_str(&format!("insmod /kiln/modules/{m}.ko\n"));
    }
    s.push_str(&format!(
        "read up2 rest < /proc/uptime\necho \"{MARK} $up $up2\" > /dev/ttyS0\npoweroff -f\n"
    ));
    s
}

fn write_image(base: &Path, dest: &Path, init: &str) -> anyhow::Result<()> {
    std::fs::copy(base, dest).with_context(|| format!("copying {}", base.display()))?;
    let file = std::fs::OpenOptions::new().append(true).open(dest)?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    w.file(INIT, 0o755, init.as_bytes())?;
    // busybox runs the applet its link is named after.
    for applet in APPLETS {
        w.symlink(&format!("kiln-bench/{applet}"), "/kiln/sh")?;
    }
    w.finish()?.flush()?;
    Ok(())
}

impl Bare {
    /// Writes both images under `dir`.
    pub fn prepare(server: &BenchServer, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let base = kiln::guest_image::base_image(&server.artifacts, &server.cache_dir)?;
        let plain = dir.join("bare.cpio");
        let with_modules = dir.join("bare-modules.cpio");
        write_image(&base, &plain, &script(&[]))?;
        // The transport's list is in load order, as the script's plain
        // `insmod`s need (the agent resolves dependencies itself); a kernel
        // with them built in has none of the files.
        let modules: Vec<&'static str> = server
            .runner
            .transport()
            .guest_modules()
            .iter()
            .copied()
            .filter(|m| {
                server
                    .artifacts
                    .modules_dir()
                    .join(format!("{m}.ko"))
                    .exists()
            })
            .collect();
        write_image(&base, &with_modules, &script(&modules))?;
        Ok(Self {
            dir: dir.to_owned(),
            plain,
            with_modules,
            modules,
        })
    }

    /// How many modules the agent loads on this kernel (0: all built in,
    /// and a boot `with modules` is the plain one).
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Boots once and waits for the VMM to exit.
    pub async fn boot(
        &self,
        server: &BenchServer,
        modules: bool,
        memory_mib: u64,
        run: usize,
    ) -> anyhow::Result<BareBoot> {
        let run_dir = self
            .dir
            .join(format!("run-{run}-{}", if modules { "m" } else { "p" }));
        std::fs::create_dir_all(&run_dir)?;
        let spec = SessionSpec {
            id: format!("bare-{run}"),
            shares: vec![],
            guest: Guest::Image {
                initramfs: if modules {
                    self.with_modules.clone()
                } else {
                    self.plain.clone()
                },
                cmdline: format!("{} rdinit=/{INIT}", kiln::guest_image::kernel_cmdline()),
            },
            memory_mib,
            vcpus: 1,
            nested_virt: false,
            run_dir: run_dir.clone(),
            deadline: Instant::now() + BOOT_TIMEOUT,
            network: None,
        };
        let boot = GuestBoot::new(server.artifacts.clone(), server.cache_dir.clone());
        let serial_log = run_dir.join("serial.log");
        let started = Instant::now();
        let (mut session, _channel) = VmSession::boot(server.runner.as_ref(), &boot, spec).await?;
        let vmm_up = started.elapsed();
        let to_mark = watch_for_mark(&mut session, &serial_log, started).await;
        let wall = started.elapsed();
        let serial = std::fs::read_to_string(&serial_log).unwrap_or_default();
        session.end().await;
        let Some(to_mark) = to_mark else {
            bail!(
                "the bare VM did not power off within {} s",
                BOOT_TIMEOUT.as_secs()
            );
        };
        let (Some((up, up2)), Some(to_mark)) = (parse_mark(&serial), to_mark) else {
            bail!("the bare VM's init did not run; serial console:\n{serial}");
        };
        let _ = std::fs::remove_dir_all(&run_dir);
        Ok(BareBoot {
            wall,
            to_mark,
            vmm_up,
            guest_boot_ms: up * 1000.0,
            modules_ms: (up2 - up) * 1000.0,
        })
    }
}

/// Waits for the VM to exit (at most [`BOOT_TIMEOUT`]), reading the serial
/// log meanwhile. `None`: it did not exit in time; `Some(None)`: it exited
/// without the mark; else when the mark was first seen.
async fn watch_for_mark(
    session: &mut VmSession,
    serial_log: &Path,
    started: Instant,
) -> Option<Option<Duration>> {
    let seen = |log: &Path| std::fs::read_to_string(log).is_ok_and(|s| parse_mark(&s).is_some());
    let deadline = started + BOOT_TIMEOUT;
    let mut to_mark = None;
    let exit = session.parts().vm.wait();
    tokio::pin!(exit);
    loop {
        tokio::select! {
            _ = &mut exit => break,
            _ = tokio::time::sleep(MARK_POLL) => {
                if to_mark.is_none() && seen(serial_log) {
                    to_mark = Some(started.elapsed());
                }
                if Instant::now() > deadline {
                    return None;
                }
            }
        }
    }
    // Written in the last poll interval before the VMM exited.
    if to_mark.is_none() && seen(serial_log) {
        to_mark = Some(started.elapsed());
    }
    Some(to_mark)
}

fn parse_mark(serial: &str) -> Option<(f64, f64)> {
    let line = serial.lines().find_map(|l| l.trim().strip_prefix(MARK))?;
    let mut it = line.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some((it.next()??, it.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_loads_the_transport_modules_in_order_before_the_mark() {
        let modules = kiln::vmm::Transport::Mmio.guest_modules();
        let init = script(modules);
        let loads: Vec<&str> = init
            .lines()
            .filter_map(|l| l.strip_prefix("insmod /kiln/modules/"))
            .collect();
        let expected: Vec<String> = modules.iter().map(|m| format!("{m}.ko")).collect();
        assert_eq!(loads, expected);
        assert!(init.contains("insmod /kiln/modules/virtio_console.ko\nread up2"));
    }

    #[test]
    fn the_serial_mark_is_parsed() {
        let serial = "[    0.5] something\r\nkiln-bench-init 1.23 1.50\r\n";
        assert_eq!(parse_mark(serial), Some((1.23, 1.50)));
        assert_eq!(parse_mark("nothing"), None);
    }
}
