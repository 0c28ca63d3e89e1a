//! cloud-hypervisor end to end: boots the real guest kernel on a real
//! `cloud-hypervisor` with hardware KVM, with a tiny busybox initramfs that
//! loads the virtio-pci modules, reports over the console (hvc0), writes into
//! a virtiofs share and powers off.
//!
//! Runs only where `cloud-hypervisor` is installed, hardware KVM
//! (`kvm_intel`/`kvm_amd`) opens, and the guest kernel, busybox and virtiofsd
//! are present; anywhere else each test prints "SKIPPED: ..." with the reason.
//! (On the PVM development hosts it always skips: see ENVIRONMENT.md.)

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::guest_image::cpio::CpioWriter;
use kiln::guest_image::Artifacts;
use kiln::vmm::cloud_hypervisor::CloudHypervisorRunner;
use kiln::vmm::host::{kvm_usable, HostFacts};
use kiln::vmm::session::{Guest, GuestBoot, SessionSpec, Share, VmSession};
use kiln::vmm::{GuestChannel, Transport, VmExit};
use tokio::io::AsyncReadExt;

/// What cloud-hypervisor guests load, in load order (plain `insmod` below).
const GUEST_MODULES: &[&str] = Transport::Pci.guest_modules();

const SHARE_TAG: &str = "e2e";
/// Generous: a real boot on KVM takes well under a second.
const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// Everything a real boot needs, or the reason it cannot happen here.
struct Env {
    ch: PathBuf,
    artifacts: Artifacts,
    nested: bool,
}

async fn env() -> Result<Env, String> {
    let facts = HostFacts::detect().await;
    kvm_usable(&facts, false).map_err(|why| format!("no hardware KVM: {why}"))?;
    let ch = facts
        .cloud_hypervisor
        .ok_or("cloud-hypervisor is not installed")?
        .path;
    let artifacts = Artifacts::from_env().expect("KILN_KERNEL names a kernel");
    for path in [artifacts.vmlinux(), artifacts.busybox.clone()] {
        if !path.is_file() {
            return Err(format!("{} is missing (make deps)", path.display()));
        }
    }
    for m in GUEST_MODULES {
        let ko = artifacts.modules_dir().join(format!("{m}.ko"));
        if !ko.is_file() {
            return Err(format!("{} is missing (make kernel)", ko.display()));
        }
    }
    if kiln::vmm::virtiofsd::find_binary().is_none() {
        return Err("virtiofsd is not installed (make deps)".into());
    }
    Ok(Env {
        ch,
        artifacts,
        nested: facts.nested == Some(true),
    })
}

macro_rules! env_or_skip {
    () => {
        match env().await {
            Ok(env) => env,
            Err(why) => {
                // Not a failure under KILN_REQUIRE_VM_TESTS: hardware KVM
                // and cloud-hypervisor are not part of `make deps`.
                harness::skip(format!("cloud-hypervisor e2e: {why}"));
                return;
            }
        }
    };
}

/// `/init`: load the modules, then run `body` with stdout/stderr on hvc0.
fn init_script(body: &str) -> String {
    let modules = GUEST_MODULES.join(" ");
    format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in {modules}; do $B insmod /modules/$m.ko || echo "insmod $m failed" > /dev/ttyS0; done
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 200 ]; do $B sleep 0.05; n=$((n+1)); done
exec > /dev/hvc0 2>&1
echo "kiln-e2e: up"
{body}
$B sync
$B poweroff -f
"#
    )
}

fn write_initramfs(env: &Env, init: &str, dest: &Path) {
    let file = std::fs::File::create(dest).unwrap();
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    w.file("init", 0o755, init.as_bytes()).unwrap();
    w.file(
        "bin/busybox",
        0o755,
        &std::fs::read(&env.artifacts.busybox).unwrap(),
    )
    .unwrap();
    for m in GUEST_MODULES {
        let ko = std::fs::read(env.artifacts.modules_dir().join(format!("{m}.ko"))).unwrap();
        w.file(&format!("modules/{m}.ko"), 0o644, &ko).unwrap();
    }
    for d in ["proc", "sys", "dev", "mnt"] {
        w.dir(d, 0o755).unwrap();
    }
    w.finish().unwrap();
}

/// Boots `init` (a busybox initramfs written into `dir`) on
/// cloud-hypervisor through a VM session, which serves `shares`.
async fn boot(
    env: &Env,
    dir: &Path,
    init: &str,
    shares: Vec<Share>,
    nested: bool,
    extra_cmdline: &str,
) -> (VmSession, GuestChannel) {
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(env, init, &initramfs);
    let spec = SessionSpec {
        id: "ch-e2e".into(),
        shares,
        guest: Guest::Image {
            initramfs,
            cmdline: format!("console=ttyS0 rdinit=/init{extra_cmdline}"),
        },
        memory_mib: 512,
        vcpus: 2,
        nested_virt: nested,
        run_dir: dir.to_owned(),
        deadline: Instant::now() + BOOT_LIMIT,
        network: None,
    };
    let runner = CloudHypervisorRunner::new(&env.ch);
    let images = GuestBoot::new(env.artifacts.clone(), dir.join("cache"));
    VmSession::boot(&runner, &images, spec)
        .await
        .expect("cloud-hypervisor boots")
}

/// Reads the whole console until the VMM exits, bounded by [`BOOT_LIMIT`].
async fn console_until_exit(
    session: &mut VmSession,
    mut channel: GuestChannel,
) -> (String, VmExit) {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(BOOT_LIMIT, channel.reader.read_to_end(&mut bytes)).await;
    if read.is_err() {
        let serial = session.serial_tail();
        panic!(
            "the guest did not power off within {BOOT_LIMIT:?}; console so far:\n{}\nserial:\n{serial}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let exit = session.parts().vm.wait().await.unwrap();
    (String::from_utf8_lossy(&bytes).replace('\r', ""), exit)
}

fn line<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in the console:\n{console}"))
        .trim()
}

#[tokio::test]
async fn boots_reports_on_the_console_writes_the_share_and_powers_off() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::create_dir_all(&shared).unwrap();

    let body = r#"echo "cpus: $($B grep -c ^processor /proc/cpuinfo)"
echo "virt: $($B grep -cwE 'vmx|svm' /proc/cpuinfo)"
echo "mem: $($B awk '/MemTotal/ {print $2}' /proc/meminfo)"
$B mount -t virtiofs e2e /mnt && echo "written by the guest" > /mnt/hello && echo "share: ok""#;
    let share = Share {
        tag: SHARE_TAG.into(),
        source: shared.clone(),
        read_only: false,
    };
    let (mut session, channel) =
        boot(&env, &run_dir, &init_script(body), vec![share], false, "").await;
    let (console, exit) = console_until_exit(&mut session, channel).await;
    session.end().await;

    assert!(console.contains("kiln-e2e: up"), "{console}");
    assert_eq!(line(&console, "cpus:"), "2");
    assert_eq!(line(&console, "virt:"), "0", "nested is off unless asked");
    let mem_kib: u64 = line(&console, "mem:").parse().unwrap();
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for a 512 MiB VM"
    );
    assert_eq!(line(&console, "share:"), "ok");
    assert_eq!(
        std::fs::read_to_string(shared.join("hello")).unwrap(),
        "written by the guest\n"
    );
    assert!(
        matches!(exit, VmExit::Exited { code: Some(0), .. }),
        "{exit:?}"
    );
    assert!(std::fs::metadata(run_dir.join("serial.log")).unwrap().len() > 0);
}

#[tokio::test]
async fn nested_virt_exposes_vmx_or_svm() {
    let env = env_or_skip!();
    if !env.nested {
        harness::skip("the host KVM module has nested=0");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = r#"echo "virt: $($B grep -cwE 'vmx|svm' /proc/cpuinfo)""#;
    let (mut session, channel) = boot(&env, dir.path(), &init_script(body), vec![], true, "").await;
    let (console, _) = console_until_exit(&mut session, channel).await;
    session.end().await;
    assert_eq!(line(&console, "virt:"), "2", "one flag line per vCPU");
}

#[tokio::test]
async fn kill_stops_a_guest_that_never_powers_off() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let (session, mut channel) = boot(
        &env,
        dir.path(),
        &init_script("$B sleep 3600"),
        vec![],
        false,
        "",
    )
    .await;
    let pid = session.pid().unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(BOOT_LIMIT, channel.reader.read_exact(&mut first))
        .await
        .expect("the guest came up")
        .unwrap();
    let started = Instant::now();
    session.end().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// A guest whose init exits panics; with `panic=-1` it resets at once.
/// cloud-hypervisor would boot it again, so kiln kills the VMM and says why,
/// quoting the panic line from the serial console.
#[tokio::test]
async fn a_kernel_panic_ends_the_vm_as_a_reboot_with_the_panic_line() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let (mut session, channel) = boot(
        &env,
        dir.path(),
        &init_script("exit 1"),
        vec![],
        false,
        " panic=-1",
    )
    .await;
    let (console, exit) = console_until_exit(&mut session, channel).await;
    session.end().await;
    assert!(console.contains("kiln-e2e: up"), "{console}");
    match exit {
        VmExit::GuestRebooted { panic: Some(line) } => {
            assert!(line.starts_with("Kernel panic - not syncing"), "{line}");
            assert!(line.contains("kill init"), "{line}");
        }
        other => panic!("expected a reboot with the panic line, got {other:?}"),
    }
}
