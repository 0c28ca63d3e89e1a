//! One build VM's whole life, owned by one value.
//!
//! A [`VmSession`] is everything a booted build VM holds on the host: one
//! virtiofsd per share, the NAT helper of a networked build
//! ([`crate::vmm::net`]), the initramfs (the cached base image followed by
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
use crate::vmm::net::{HelperId, NetDevice, Passt, PasstError, PasstSpec, GUEST_MAC};
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
#[derive(Debug)]
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
    /// The NAT helper of a build that asked for network; `None`: the VM
    /// gets no network device.
    pub network: Option<SessionNetwork>,
}

/// How a networked build's NAT helper is started.
#[derive(Debug)]
pub struct SessionNetwork {
    /// The passt binary.
    pub passt: PathBuf,
    /// The helper's own uid (and gid), which the egress policy polices;
    /// held by the session until the helper is gone.
    pub id: HelperId,
    /// Upstream resolver (`None`: the host's `/etc/resolv.conf`).
    pub dns: Option<std::net::IpAddr>,
}

/// What a session's VM runs.
#[derive(Debug, Clone)]
pub enum Guest {
    /// kiln's agent running a build's job: the cached base image followed
    /// by the job archive, on [`guest_image::kernel_cmdline`]. The job's
    /// module list is filled in from the runner's transport.
    Agent(Box<Job>),
    /// kiln's agent booted ahead of its request (the warm pool): the base
    /// image followed by `kiln_guest::contract::WARM_PATH`; the job comes
    /// later over the channel ([`crate::executor::pool`]).
    Warm,
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
    /// The NAT helper did not start.
    #[error("start the NAT helper")]
    Network(#[source] PasstError),
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
    nat: Option<Passt>,
    /// Released after `nat` is gone (fields drop in order).
    _nat_id: Option<HelperId>,
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
            network,
        } = spec;
        let (daemons, fs_shares) = serve_shares(&run_dir, shares)
            .instrument(info_span!("virtiofsd"))
            .await?;
        let (nat, nat_id) = match network {
            Some(network) => {
                let passt = start_nat(runner, &run_dir, &network)
                    .instrument(info_span!("network"))
                    .await?;
                (Some(passt), Some(network.id))
            }
            None => (None, None),
        };
        let net = nat.as_ref().map(|nat| NetDevice {
            endpoint: nat.endpoint(),
            mac: GUEST_MAC.into(),
        });

        let (initramfs, cmdline) = match guest {
            Guest::Agent(job) => (
                agent_initramfs(runner, boot, *job, &run_dir).await?,
                guest_image::kernel_cmdline(),
            ),
            Guest::Warm => (
                warm_initramfs(runner, boot, &run_dir).await?,
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
            net,
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
                nat,
                _nat_id: nat_id,
                serial_log,
            },
            channel,
        ))
    }

    /// The VM, its daemons and its console, borrowed apart so one can wait
    /// on the VM while watching the daemons.
    pub fn parts(&mut self) -> Parts<'_> {
        Parts {
            vm: self.vm.as_mut(),
            daemons: Daemons {
                shares: &mut self.daemons,
                nat: self.nat.as_mut(),
            },
            console: Console(&self.serial_log),
        }
    }

    /// The NAT helper's PID, for a networked build while it runs.
    pub fn nat_pid(&self) -> Option<u32> {
        self.nat.as_ref().and_then(Passt::pid)
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
            if let Some(nat) = &mut self.nat {
                nat.kill().await;
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
    /// The share daemons and the NAT helper.
    pub daemons: Daemons<'a>,
    /// The serial console.
    pub console: Console<'a>,
}

/// The daemons of a session: one virtiofsd per share, and the NAT helper
/// of a networked build.
pub struct Daemons<'a> {
    shares: &'a mut Vec<Virtiofsd>,
    nat: Option<&'a mut Passt>,
}

impl Daemons<'_> {
    /// Resolves when any daemon exits, with a sentence saying which and how.
    /// Never resolves for a session without daemons.
    pub async fn first_exit(&mut self) -> String {
        use futures::future::{select_all, BoxFuture, FutureExt};
        let mut exits: Vec<BoxFuture<'_, String>> =
            self.shares.iter_mut().map(|d| d.exited().boxed()).collect();
        if let Some(nat) = self.nat.as_mut() {
            exits.push(nat.exited().boxed());
        }
        if exits.is_empty() {
            return std::future::pending().await;
        }
        select_all(exits).await.0
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
/// the runner's transport (and virtio-net's for a networked job).
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
    if job.network.is_some() {
        // The agent loads its dependencies (failover, net_failover) first.
        job.modules.push("virtio_net".into());
    }
    span.in_scope(|| guest_image::build_initramfs(base, &job, &initramfs))
        .map_err(SessionError::Initramfs)?;
    Ok(initramfs)
}

/// `run_dir/initramfs.cpio` for a warm VM: the base image and the modules
/// of the runner's transport; no job yet.
async fn warm_initramfs(
    runner: &dyn VmRunner,
    boot: &GuestBoot,
    run_dir: &Path,
) -> Result<PathBuf, SessionError> {
    let initramfs = run_dir.join("initramfs.cpio");
    let span = info_span!("initramfs");
    let base = boot.base_image().instrument(span.clone()).await?;
    let warm = kiln_guest::contract::Warm {
        modules: runner
            .guest_modules()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    };
    span.in_scope(|| guest_image::build_warm_initramfs(base, &warm, &initramfs))
        .map_err(SessionError::Initramfs)?;
    Ok(initramfs)
}

/// The NAT helper, on `run_dir/net.sock`, in the mode the runner's VMM
/// speaks.
async fn start_nat(
    runner: &dyn VmRunner,
    run_dir: &Path,
    network: &SessionNetwork,
) -> Result<Passt, SessionError> {
    let spec = PasstSpec {
        binary: network.passt.clone(),
        socket: run_dir.join("net.sock"),
        uid: network.id.uid(),
        dns: network.dns,
        vhost_user: runner.vhost_user_net(),
    };
    Passt::spawn(&spec).await.map_err(SessionError::Network)
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
