//! Boots one build VM the way kiln does (virtiofsd per share, the cached base
//! initramfs plus the job, QEMU microvm under TCG) and collects everything
//! the agent sent. Used by `tests/guest_vm.rs`.

#![allow(clippy::unwrap_used)] // test harness: failures should be loud

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::guest_image::{self, Artifacts};
use kiln::vmm::qemu::{Accel, QemuRunner};
use kiln::vmm::virtiofsd::{self, Virtiofsd};
use kiln::vmm::{FsShare, VmRunner, VmSpec, MMIO_GUEST_MODULES};
use kiln_guest::contract::{Decoder, FrameKind, Job, Report, ACK, INPUTS_TAG, SCRATCH_TAG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one VM may take before the test gives up on it.
const VM_TIMEOUT: Duration = Duration::from_secs(90);

/// Everything one VM produced.
pub struct VmRun {
    /// Frames in arrival order.
    pub frames: Vec<(FrameKind, Vec<u8>)>,
    /// The report, if one arrived.
    pub report: Option<Report>,
    /// QEMU start to the end of the channel (the VM has powered off).
    pub elapsed: Duration,
    /// QEMU start to the arrival of the report.
    pub to_report: Option<Duration>,
    /// The scratch share on the host (`build/`, `nix/store/`).
    pub scratch: PathBuf,
    /// The kernel console.
    pub serial: String,
    _dir: tempfile::TempDir,
}

impl VmRun {
    /// Concatenated payloads of one kind.
    pub fn stream(&self, kind: FrameKind) -> Vec<u8> {
        self.frames
            .iter()
            .filter(|(k, _)| *k == kind)
            .flat_map(|(_, p)| p.clone())
            .collect()
    }

    /// stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stream(FrameKind::Stdout)).into_owned()
    }

    /// stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stream(FrameKind::Stderr)).into_owned()
    }

    /// The report, or a panic showing what happened instead.
    pub fn report(&self) -> &Report {
        match &self.report {
            Some(r) => r,
            None => panic!(
                "no report.\nagent: {}\nstdout: {}\nstderr: {}\nserial:\n{}",
                String::from_utf8_lossy(&self.stream(FrameKind::AgentLog)),
                self.stdout(),
                self.stderr(),
                self.serial
            ),
        }
    }
}

/// Why the VM tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("qemu-system-x86_64 is not installed (make apt)".into());
    }
    if virtiofsd::find_binary().is_none() {
        return Some("virtiofsd is not installed (make virtiofsd)".into());
    }
    if let Err(e) = Artifacts::default().locate() {
        return Some(e.to_string());
    }
    None
}

/// Skips the calling test loudly when a prerequisite is missing.
#[macro_export]
macro_rules! require_vm {
    ($name:expr) => {
        if let Some(why) = harness::missing_prerequisite() {
            eprintln!("SKIPPED: {} because {}", $name, why);
            return;
        }
    };
}

/// A Nix-like job running `script` with busybox's shell, as the harness's
/// inputs provide it at `/nix/store/busybox`.
pub fn sh_job(script: &str) -> Job {
    Job {
        command_args: vec![
            "/nix/store/busybox/bin/sh".into(),
            "-c".into(),
            script.into(),
        ],
        env: vec![(b"PATH".to_vec(), b"/nix/store/busybox/bin".to_vec())],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        modules: MMIO_GUEST_MODULES.iter().map(|m| m.to_string()).collect(),
        cores: 1,
        ..Job::default()
    }
}

/// Puts busybox and one symlink per applet into `inputs/busybox/bin`.
fn install_busybox(inputs: &Path, busybox: &Path) {
    let bin = inputs.join("busybox/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// Boots `job`; `prepare` may add to the inputs share before boot.
pub async fn run(job: &Job, nested: bool, prepare: impl FnOnce(&Path)) -> VmRun {
    run_with_ro_shares(job, nested, prepare, &[]).await
}

/// Boots a VM whose job file holds `raw` instead of an encoded job.
pub async fn run_raw_job(raw: &[u8]) -> VmRun {
    run_inner(&sh_job("true"), Some(raw), false, |_| {}, &[]).await
}

/// Like [`run`], with extra read-only shares: (virtiofs tag, host dir).
pub async fn run_with_ro_shares(
    job: &Job,
    nested: bool,
    prepare: impl FnOnce(&Path),
    ro_shares: &[(&str, &Path)],
) -> VmRun {
    run_inner(job, None, nested, prepare, ro_shares).await
}

async fn run_inner(
    job: &Job,
    raw_job: Option<&[u8]>,
    nested: bool,
    prepare: impl FnOnce(&Path),
    ro_shares: &[(&str, &Path)],
) -> VmRun {
    let dir = tempfile::tempdir().unwrap();
    let (inputs, scratch, run_dir) = (
        dir.path().join("inputs"),
        dir.path().join("scratch"),
        dir.path().join("run"),
    );
    for d in [&inputs, &scratch, &run_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    for p in &job.scratch_paths {
        std::fs::create_dir_all(scratch.join(p)).unwrap();
    }
    let artifacts = Artifacts::default();
    install_busybox(&inputs, &artifacts.busybox);
    prepare(&inputs);

    let cache = std::env::temp_dir().join("kiln-guest-vm-test-images");
    let base = guest_image::base_image(&artifacts, &cache).unwrap();
    let initramfs = run_dir.join("initramfs.cpio");
    guest_image::build_initramfs(&base, job, &initramfs).unwrap();
    if let Some(raw) = raw_job {
        // Base image, then an archive whose job file is `raw`.
        let mut bytes = std::fs::read(&base).unwrap();
        let mut w = kiln::guest_image::cpio::CpioWriter::new(Vec::new());
        w.file(kiln_guest::contract::JOB_PATH, 0o644, raw).unwrap();
        bytes.extend(w.finish().unwrap());
        std::fs::write(&initramfs, bytes).unwrap();
    }

    let in_sock = run_dir.join("inputs.sock");
    let scratch_sock = run_dir.join("scratch.sock");
    let _d1 = Virtiofsd::spawn(&inputs, &in_sock, true).await.unwrap();
    let _d2 = Virtiofsd::spawn(&scratch, &scratch_sock, false)
        .await
        .unwrap();
    let mut extra = Vec::new();
    let mut extra_daemons = Vec::new();
    for (i, (tag, host_dir)) in ro_shares.iter().enumerate() {
        let socket = run_dir.join(format!("ro{i}.sock"));
        extra_daemons.push(Virtiofsd::spawn(host_dir, &socket, true).await.unwrap());
        extra.push(FsShare {
            tag: tag.to_string(),
            socket,
        });
    }
    let spec = VmSpec {
        id: "test".into(),
        kernel: artifacts.vmlinux(),
        initramfs,
        // KILN_TEST_KERNEL_ARGS (e.g. `loglevel=7`) helps when debugging a boot.
        cmdline: match std::env::var("KILN_TEST_KERNEL_ARGS") {
            Ok(extra) => format!("{} {extra}", guest_image::kernel_cmdline()),
            Err(_) => guest_image::kernel_cmdline(),
        },
        memory_mib: 1024,
        vcpus: 1,
        nested_virt: nested,
        shares: vec![
            FsShare {
                tag: INPUTS_TAG.into(),
                socket: in_sock,
            },
            FsShare {
                tag: SCRATCH_TAG.into(),
                socket: scratch_sock,
            },
        ]
        .into_iter()
        .chain(extra)
        .collect(),
        serial_log: run_dir.join("serial.log"),
        deadline: std::time::Instant::now() + std::time::Duration::from_secs(600),
        run_dir: run_dir.clone(),
    };
    let started = Instant::now();
    let mut vm = QemuRunner::new(Accel::Tcg).start(&spec).await.unwrap();
    let channel = vm.take_channel().await.unwrap();
    let (mut reader, mut ack) = (channel.reader, channel.ack);
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let mut report = None;
    let mut to_report = None;
    let read_all = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            decoder.push(&buf[..n]);
            while let Some(f) = decoder.next_frame().unwrap() {
                if f.kind == FrameKind::Report {
                    report = Some(serde_json::from_slice::<Report>(&f.payload).unwrap());
                    to_report = Some(started.elapsed());
                    // On a two-way channel the agent waits for this before powering off.
                    if let Some(w) = ack.as_mut() {
                        w.write_all(&[ACK]).await.unwrap();
                    }
                }
                frames.push((f.kind, f.payload));
            }
        }
    };
    let timed_out = tokio::time::timeout(VM_TIMEOUT, read_all).await.is_err();
    let elapsed = started.elapsed();
    if timed_out {
        vm.kill().await;
    } else {
        tokio::time::timeout(Duration::from_secs(10), vm.wait())
            .await
            .expect("QEMU did not exit after the channel closed")
            .unwrap();
    }
    let serial =
        String::from_utf8_lossy(&std::fs::read(&spec.serial_log).unwrap_or_default()).into_owned();
    assert!(
        !timed_out,
        "VM did not finish within {VM_TIMEOUT:?}; serial:\n{serial}"
    );
    VmRun {
        frames,
        report,
        elapsed,
        to_report,
        scratch,
        serial,
        _dir: dir,
    }
}
