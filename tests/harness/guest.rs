//! One build VM booted without the executor, through the same
//! [`VmSession`] the executor boots with (virtiofsd per share, the cached
//! base initramfs plus the job, QEMU microvm under TCG), and everything the
//! agent sent. `tests/guest_vm.rs` checks the sandbox from inside with it.
//!
//! Two things a build never does boot a prepared image instead
//! (`Guest::Image`): a job file other than the one the session writes (an
//! undecodable one, a module list the transport does not have), and extra
//! kernel arguments (`KILN_TEST_KERNEL_ARGS`, e.g. `loglevel=7`, when
//! debugging a boot).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::guest_image::cpio::CpioWriter;
use kiln::guest_image::{self, Artifacts};
use kiln::vmm::qemu::{Accel, QemuRunner};
use kiln::vmm::session::{Guest, GuestBoot, SessionSpec, Share, VmSession};
use kiln::vmm::Transport;
use kiln_guest::contract::{
    Decoder, FrameKind, Job, Report, ACK, INPUTS_TAG, JOB_PATH, SCRATCH_TAG,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixtures::{self, all_applets};

/// How long one VM may take before the test gives up on it.
const VM_TIMEOUT: Duration = Duration::from_secs(90);

/// Everything one VM produced.
pub struct VmRun {
    /// Frames in arrival order.
    pub frames: Vec<(FrameKind, Vec<u8>)>,
    /// The report, if one arrived.
    pub report: Option<Report>,
    /// Boot start to the end of the channel (the VM has powered off).
    pub elapsed: Duration,
    /// Boot start to the arrival of the report.
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

/// A Nix-like job running `script` with busybox's shell, as the harness's
/// inputs provide it at `/nix/store/busybox`. The session fills in the
/// guest modules.
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
        cores: 1,
        ..Job::default()
    }
}

/// The modules QEMU microvm guests load (virtio-mmio), for a job that
/// changes them (see [`run_job_file`]).
pub fn qemu_guest_modules() -> Vec<String> {
    Transport::Mmio
        .guest_modules()
        .iter()
        .map(|m| m.to_string())
        .collect()
}

/// The job file the session would write for `job` (its JSON encoding).
pub fn job_file(job: &Job) -> Vec<u8> {
    serde_json::to_vec(job).unwrap()
}

/// Boots `job`; `prepare` may add to the inputs share before boot.
pub async fn run(job: &Job, nested: bool, prepare: impl FnOnce(&Path)) -> VmRun {
    run_with_ro_shares(job, nested, prepare, &[]).await
}

/// Boots a VM whose job file holds `raw` instead of what the session
/// writes: undecodable bytes, or a job whose module list is not the
/// transport's.
pub async fn run_job_file(raw: &[u8]) -> VmRun {
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

/// Puts busybox and one symlink per applet into `inputs/busybox/bin`.
fn install_busybox(inputs: &Path, busybox: &Path) {
    let applets = all_applets(busybox);
    let applets: Vec<&str> = applets.iter().map(String::as_str).collect();
    fixtures::install_busybox(&inputs.join("busybox/bin"), busybox, &applets);
}

async fn run_inner(
    job: &Job,
    job_file: Option<&[u8]>,
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
    let artifacts = Artifacts::from_env().expect("KILN_KERNEL names a kernel");
    install_busybox(&inputs, &artifacts.busybox);
    prepare(&inputs);

    let share = |tag: &str, source: &Path, read_only| Share {
        tag: tag.into(),
        source: source.to_owned(),
        read_only,
    };
    let mut shares = vec![
        share(INPUTS_TAG, &inputs, true),
        share(SCRATCH_TAG, &scratch, false),
    ];
    shares.extend(ro_shares.iter().map(|(tag, dir)| share(tag, dir, true)));
    let cache = std::env::temp_dir().join("kiln-guest-vm-test-images");
    let boot = GuestBoot::new(artifacts, cache);
    let guest = guest(&boot, job, job_file, &run_dir).await;
    let spec = SessionSpec {
        id: "test".into(),
        shares,
        guest,
        memory_mib: 1024,
        vcpus: 1,
        nested_virt: nested,
        run_dir: run_dir.clone(),
        deadline: Instant::now() + Duration::from_secs(600),
        network: None,
    };
    let runner = QemuRunner::new(Accel::Tcg);

    let started = Instant::now();
    let (mut session, channel) = VmSession::boot(&runner, &boot, spec).await.unwrap();
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
    if !timed_out {
        tokio::time::timeout(Duration::from_secs(10), session.parts().vm.wait())
            .await
            .expect("QEMU did not exit after the channel closed")
            .unwrap();
    }
    session.end().await;
    let serial =
        String::from_utf8_lossy(&std::fs::read(run_dir.join("serial.log")).unwrap_or_default())
            .into_owned();
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

/// What the VM runs: kiln's agent with `job`, as the session writes it;
/// or, for a job file the session would not write (`raw`) or extra
/// kernel arguments (`KILN_TEST_KERNEL_ARGS`), an initramfs made here the
/// same way: the base image, then an archive holding the job file.
async fn guest(boot: &GuestBoot, job: &Job, raw: Option<&[u8]>, run_dir: &Path) -> Guest {
    let kernel_args = std::env::var("KILN_TEST_KERNEL_ARGS").ok();
    if raw.is_none() && kernel_args.is_none() {
        return Guest::Agent(Box::new(job.clone()));
    }
    let file = raw.map(<[u8]>::to_vec).unwrap_or_else(|| {
        let mut job = job.clone();
        job.modules = qemu_guest_modules();
        job_file(&job)
    });
    let mut image = std::fs::read(boot.base_image().await.unwrap()).unwrap();
    let mut archive = CpioWriter::new(Vec::new());
    archive.file(JOB_PATH, 0o644, &file).unwrap();
    image.extend(archive.finish().unwrap());
    let initramfs = run_dir.join("initramfs.cpio");
    std::fs::write(&initramfs, image).unwrap();
    let cmdline = match kernel_args {
        Some(args) => format!("{} {args}", guest_image::kernel_cmdline()),
        None => guest_image::kernel_cmdline(),
    };
    Guest::Image { initramfs, cmdline }
}
