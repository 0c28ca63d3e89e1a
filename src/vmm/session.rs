//! One build VM's whole life, owned by one value.
//!
//! A [`VmSession`] is everything a booted build VM holds on the host: one
//! virtiofsd per share, the initramfs (the cached base image followed by
//! this build's job), the VMM process with its serial log, and the guest
//! channel. [`VmSession::boot`] starts them in that order and undoes what it
//! started when a later step fails; [`VmSession::end`] stops them; dropping
//! a session (a cancelled build, a panic) kills the VMM and the daemons too.
//! A session is never booted twice: one build, one VM.
//!
//! The executor, the guest tests, the cloud-hypervisor end-to-end tests and
//! the bench's bare boot all boot through here, so there is one boot recipe.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_guest::contract::Job;
use tokio::sync::OnceCell;
use tracing::{info_span, Instrument};

use crate::guest_image::{self, Artifacts, GuestImageError};
use crate::vmm::virtiofsd::{Virtiofsd, VirtiofsdError};
use crate::vmm::{FsShare, GuestChannel, RunningVm, VmRunner, VmSpec, VmmError};

/// How many serial console lines a crash report quotes.
pub const SERIAL_TAIL_LINES: usize = 15;

/// A host directory the guest mounts by virtiofs tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The tag the guest mounts it by.
    pub tag: String,
    /// The host directory.
    pub source: PathBuf,
    /// Served read-only.
    pub read_only: bool,
}

/// What one session boots.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Build id, for process names and log lines.
    pub id: String,
    /// Shares in the order the guest expects them.
    pub shares: Vec<Share>,
    /// What runs in the VM.
    pub guest: Guest,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Expose VMX/SVM to the guest.
    pub nested_virt: bool,
    /// A directory owned by this build for sockets, the initramfs and logs
    /// (the caller removes it).
    pub run_dir: PathBuf,
    /// When the build's time is up.
    pub deadline: Instant,
}

/// What a session's VM runs.
#[derive(Debug, Clone)]
pub enum Guest {
    /// kiln's agent running a build's job: the cached base image followed
    /// by the job archive, on [`guest_image::kernel_cmdline`]. The job's
    /// module list is filled in from the runner's transport.
    Agent(Job),
    /// A prepared initramfs on its own command line: a guest that is not
    /// kiln's agent (the bench's bare boot, the VMM end-to-end tests).
    Image {
        /// The initramfs file.
        initramfs: PathBuf,
        /// The whole kernel command line.
        cmdline: String,
    },
}

/// The guest's boot files: the kernel artifacts and the base initramfs,
/// built once per process from them and cached on disk by content.
pub struct GuestBoot {
    artifacts: Artifacts,
    cache_dir: PathBuf,
    base: OnceCell<PathBuf>,
}

impl GuestBoot {
    /// Boot files from `artifacts`; base images are cached in `cache_dir`.
    pub fn new(artifacts: Artifacts, cache_dir: PathBuf) -> Self {
        Self {
            artifacts,
            cache_dir,
            base: OnceCell::new(),
        }
    }

    /// The kernel, modules, agent and shell in use.
    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    /// The base initramfs (agent, shell, modules), built on first use.
    pub async fn base_image(&self) -> Result<&Path, SessionError> {
        let path = self
            .base
            .get_or_try_init(|| async {
                let artifacts = self.artifacts.clone();
                let cache = self.cache_dir.clone();
                tokio::task::spawn_blocking(move || guest_image::base_image(&artifacts, &cache))
                    .await
                    .map_err(|e| SessionError::BaseImageTask(e.to_string()))?
                    .map_err(SessionError::BaseImage)
            })
            .await?;
        Ok(path)
    }
}

/// Which step of booting a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A share's virtiofsd did not start.
    #[error("start virtiofsd for share {tag}")]
    Virtiofsd {
        /// The share.
        tag: String,
        /// Why.
        #[source]
        source: VirtiofsdError,
    },
    /// The base initramfs could not be built.
    #[error("build the base initramfs")]
    BaseImage(#[source] GuestImageError),
    /// The task building the base initramfs failed.
    #[error("build the base initramfs: the task failed: {0}")]
    BaseImageTask(String),
    /// This build's initramfs could not be written.
    #[error("write the initramfs")]
    Initramfs(#[source] GuestImageError),
    /// The VMM did not start.
    #[error("start the VMM")]
    Vmm(#[source] VmmError),
    /// The VMM started but its guest channel did not connect.
    #[error("connect the guest channel")]
    Channel(#[source] VmmError),
}

/// A booted build VM and everything it holds on the host.
pub struct VmSession {
    vm: Box<dyn RunningVm>,
    daemons: Vec<Virtiofsd>,
    serial_log: PathBuf,
}

impl VmSession {
    /// Boots `spec` on `runner`: a virtiofsd per share, the initramfs, the
    /// VMM, the guest channel. On error everything started so far is
    /// stopped (by drop) before this returns.
    pub async fn boot(
        runner: &dyn VmRunner,
        boot: &GuestBoot,
        spec: SessionSpec,
    ) -> Result<(Self, GuestChannel), SessionError> {
        let SessionSpec {
            id,
            shares,
            guest,
            memory_mib,
            vcpus,
            nested_virt,
            run_dir,
            deadline,
        } = spec;
        let (daemons, fs_shares) = serve_shares(&run_dir, shares)
            .instrument(info_span!("virtiofsd"))
            .await?;

        let (initramfs, cmdline) = match guest {
            Guest::Agent(job) => (
                agent_initramfs(runner, boot, job, &run_dir).await?,
                guest_image::kernel_cmdline(),
            ),
            Guest::Image { initramfs, cmdline } => (initramfs, cmdline),
        };

        let serial_log = run_dir.join("serial.log");
        let vm_spec = VmSpec {
            id,
            kernel: boot.artifacts.vmlinux(),
            initramfs,
            cmdline,
            memory_mib,
            vcpus,
            nested_virt,
            shares: fs_shares,
            run_dir,
            serial_log: serial_log.clone(),
            deadline,
        };
        let mut vm = runner
            .start(&vm_spec)
            .instrument(info_span!("vmm_start"))
            .await
            .map_err(SessionError::Vmm)?;
        let channel = vm.take_channel().await.map_err(SessionError::Channel)?;
        tracing::info!(pid = vm.pid(), vmm = runner.name(), "VM started");
        Ok((
            Self {
                vm,
                daemons,
                serial_log,
            },
            channel,
        ))
    }

    /// The VM, its share daemons and its console, borrowed apart so one
    /// can wait on the VM while watching the daemons.
    pub fn parts(&mut self) -> Parts<'_> {
        Parts {
            vm: self.vm.as_mut(),
            daemons: Daemons(&mut self.daemons),
            console: Console(&self.serial_log),
        }
    }

    /// The PID of the VMM process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.vm.pid()
    }

    /// The last lines the guest wrote to its serial console.
    pub fn serial_tail(&self) -> String {
        Console(&self.serial_log).tail()
    }

    /// Stops the VM and its daemons and waits for them.
    pub async fn end(mut self) {
        async {
            self.vm.kill().await;
            for d in &mut self.daemons {
                d.kill().await;
            }
        }
        .instrument(info_span!("teardown"))
        .await;
    }
}

/// A session's pieces, borrowed apart (see [`VmSession::parts`]).
pub struct Parts<'a> {
    /// The VMM process.
    pub vm: &'a mut dyn RunningVm,
    /// The share daemons.
    pub daemons: Daemons<'a>,
    /// The serial console.
    pub console: Console<'a>,
}

/// The share daemons of a session.
pub struct Daemons<'a>(&'a mut Vec<Virtiofsd>);

impl Daemons<'_> {
    /// Resolves when any daemon exits, with a sentence saying which and how.
    /// Never resolves for a session without shares.
    pub async fn first_exit(&mut self) -> String {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let (why, _, _) =
            futures::future::select_all(self.0.iter_mut().map(|d| Box::pin(d.exited()))).await;
        why
    }
}

/// A session's serial console log.
#[derive(Clone, Copy)]
pub struct Console<'a>(&'a Path);

impl Console<'_> {
    /// The last [`SERIAL_TAIL_LINES`] lines the guest wrote.
    pub fn tail(&self) -> String {
        let text = std::fs::read(self.0).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..].join("\n")
    }
}

/// `run_dir/initramfs.cpio`: the base image and `job`, with the modules of
/// the runner's transport.
async fn agent_initramfs(
    runner: &dyn VmRunner,
    boot: &GuestBoot,
    mut job: Job,
    run_dir: &Path,
) -> Result<PathBuf, SessionError> {
    let initramfs = run_dir.join("initramfs.cpio");
    let span = info_span!("initramfs");
    let base = boot.base_image().instrument(span.clone()).await?;
    job.modules = runner
        .guest_modules()
        .iter()
        .map(|m| m.to_string())
        .collect();
    span.in_scope(|| guest_image::build_initramfs(base, &job, &initramfs))
        .map_err(SessionError::Initramfs)?;
    Ok(initramfs)
}

/// One virtiofsd per share, with the vhost-user sockets in `run_dir`.
async fn serve_shares(
    run_dir: &Path,
    shares: Vec<Share>,
) -> Result<(Vec<Virtiofsd>, Vec<FsShare>), SessionError> {
    let mut daemons = Vec::with_capacity(shares.len());
    let mut fs_shares = Vec::with_capacity(shares.len());
    for share in shares {
        let socket = run_dir.join(format!("{}.sock", share.tag));
        let daemon = Virtiofsd::spawn(&share.source, &socket, share.read_only)
            .await
            .map_err(|source| SessionError::Virtiofsd {
                tag: share.tag.clone(),
                source,
            })?;
        daemons.push(daemon);
        fs_shares.push(FsShare {
            tag: share.tag,
            socket,
            source: share.source,
        });
    }
    Ok((daemons, fs_shares))
}
