//! The `kiln` binary: parses the command line, builds the services, serves.
//! Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kiln::cli::build::JsonLayout;
use kiln::executor::config::{defaults, image_cache_dir};
use kiln::executor::events::StopReason;
use kiln::server::{Listen, SocketMode};
use kiln::vmm::host::{AccelChoice, VmmChoice};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A gRPC build executor that runs every build in its own microVM"
)]
struct Cli {
    /// How kiln writes its own log lines (stderr): text, or json (one
    /// object per line, for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "KILN_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run; boxing buys nothing
enum Command {
    /// Serve the castore, build (tvix.build.v1, snix.build.v1) and event services.
    Serve(ServeArgs),
    /// Submit a build request written as JSON, follow its log, print its outputs.
    Build(BuildArgs),
    /// Import into or export from a running server's castore.
    #[command(subcommand)]
    Castore(CastoreCommand),
    /// Report what this host can do and what to do about what it cannot.
    Doctor(DoctorArgs),
    /// Speak the Nix worker protocol on stdin/stdout in front of a kiln
    /// server: what an `ssh-ng://` remote builder or store runs.
    NixDaemon(NixDaemonArgs),
    /// List the builds a server runs or queues (operators).
    Builds(BuildsArgs),
    /// Cancel a build (operators).
    Cancel(CancelArgs),
    /// Print a build's log, optionally following it to its end (operators).
    Logs(LogsArgs),
}

/// How an operator command reaches the server.
#[derive(Args)]
struct AdminArgs {
    /// The kiln server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    addr: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

/// `kiln builds`.
#[derive(Args)]
struct BuildsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// One JSON object per build and line instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kiln cancel ID`.
#[derive(Args)]
struct CancelArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The build's id (as `kiln builds` prints it).
    build_id: String,
}

/// `kiln logs ID`.
#[derive(Args)]
struct LogsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Keep printing until the build ends.
    #[arg(long, short)]
    follow: bool,
    /// The build's id.
    build_id: String,
}

/// `kiln nix-daemon --stdio`.
#[derive(Args)]
struct NixDaemonArgs {
    /// Serve one Nix client on stdin/stdout (Nix appends this flag to the
    /// remote program of an ssh-ng store).
    #[arg(long)]
    stdio: bool,
    /// The kiln server that stores and builds.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    addr: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
    #[command(flatten)]
    policy: NixPolicyArgs,
}

/// How the Nix worker protocol treats its clients (see "Security model"
/// in the README).
#[derive(Args, Clone)]
struct NixPolicyArgs {
    /// Trust the Nix clients, as Nix's `trusted-users`: they may build
    /// derivations sent inline (what remote builders send) and add
    /// input-addressed paths without signatures.
    #[arg(long)]
    nix_trusted: bool,
    /// Let untrusted Nix clients add input-addressed paths anyway.
    #[arg(long)]
    nix_allow_unsigned: bool,
    /// A system feature derivations may require (requiredSystemFeatures),
    /// e.g. big-parallel or benchmark (repeatable). `kvm` is always
    /// accepted: it gives the build /dev/kvm, if the server allows it.
    #[arg(long = "nix-system-feature", value_name = "FEATURE")]
    nix_system_features: Vec<String>,
    /// Nix's max-silent-time for clients that set none, seconds (ssh-ng
    /// clients never send their settings); 0: none.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    nix_max_silent_secs: u64,
    /// Nix's timeout (the whole build) for clients that set none, seconds;
    /// 0: the server's --timeout-secs.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    nix_build_timeout_secs: u64,
    /// Nix's max-build-log-size for clients that set none, bytes; 0: the
    /// server's --max-log-bytes.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    nix_max_log_bytes: u64,
}

impl NixPolicyArgs {
    fn config(&self) -> kiln::nix::daemon::DaemonConfig {
        kiln::nix::daemon::DaemonConfig {
            trusted: self.nix_trusted,
            allow_unsigned: self.nix_allow_unsigned,
            system_features: self.nix_system_features.iter().cloned().collect(),
            build_defaults: kiln::nix::daemon::BuildOptions {
                max_silent_secs: self.nix_max_silent_secs,
                timeout_secs: self.nix_build_timeout_secs,
                max_log_bytes: self.nix_max_log_bytes,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: kiln::cli::serve_config::ConfigArgs,
    /// HOST:PORT, or a unix socket path.
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:8000")]
    listen: Listen,
    /// Permissions of the unix socket (octal), whatever the umask: who may
    /// connect. 0600 lets only kiln's own user in; 0660 adds its group.
    #[arg(long, default_value = "0600")]
    unix_socket_mode: SocketMode,
    /// Where the embedded castore and build directories live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = defaults::DATA_DIR)]
    data_dir: PathBuf,
    /// Castore backend: empty for the embedded store in --data-dir, or
    /// grpc+http(s)://HOST:PORT / grpc+unix:/PATH for another kiln's castore.
    #[arg(long, default_value = "")]
    castore: String,
    /// Path-info store (the Nix front's metadata per store path): empty for
    /// the embedded one in --data-dir, or grpc+http(s)://HOST:PORT /
    /// grpc+unix:/PATH for another kiln's.
    #[arg(long, default_value = "")]
    path_info: String,
    /// PostgreSQL shared by several kiln hosts
    /// (postgres://USER[:PASSWORD]@HOST:PORT/DB; README "Running several
    /// hosts"): the castore's directories, path infos, tenants' grants, the
    /// result cache, and build records and logs (any host answers Watch and
    /// Logs for a build another runs). Empty: all of it stays on this host.
    #[arg(long, env = "KILN_DATABASE", default_value = "")]
    database: String,
    /// Blobs in S3-compatible object storage shared by several hosts:
    /// s3://BUCKET[/PREFIX]?endpoint=URL[&region=R], behind a local cache
    /// (<data dir>/blob-cache) that inputs are hardlinked from. Empty: the
    /// castore's blobs.
    #[arg(long, env = "KILN_BLOB_STORE", default_value = "")]
    blob_store: String,
    /// File holding the object store's KEY_ID:SECRET; without it,
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    blob_store_credentials: Option<PathBuf>,
    /// Bound of the local blob cache in front of --blob-store, MiB; least
    /// recently used blobs go first.
    #[arg(long, default_value_t = 10240)]
    blob_cache_mib: u64,
    /// This host's name among those sharing --database; empty: its
    /// hostname and --listen address.
    #[arg(long, env = "KILN_HOST_ID", default_value = "")]
    host_id: String,
    /// Answer HAProxy's agent check on this HOST:PORT: the weight a
    /// balancer should give this host (100% with room, 0% when full,
    /// `drain` while stopping); README "Running several hosts".
    #[arg(long)]
    lb_agent_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    vm: VmArgs,
    /// Concurrent VMs.
    #[arg(long, env = "KILN_MAX_VMS", default_value_t = defaults::MAX_VMS)]
    max_vms: usize,
    /// Total guest RAM of all running VMs, MiB.
    #[arg(long, env = "KILN_MEMORY_BUDGET_MIB", default_value_t = defaults::MEMORY_BUDGET_MIB)]
    memory_budget_mib: u64,
    /// Largest VM one build may get, MiB.
    #[arg(long, default_value_t = defaults::MAX_GUEST_MEMORY_MIB)]
    max_guest_memory_mib: u64,
    /// Builds allowed to wait for a VM before further ones are refused.
    #[arg(long, default_value_t = defaults::MAX_QUEUE)]
    max_queue: usize,
    /// VMs one tenant's builds may run at once (default: --max-vms).
    #[arg(long, value_name = "N")]
    tenant_max_vms: Option<usize>,
    /// Builds of one tenant that may wait for a VM before its further ones
    /// are refused (default: --max-queue).
    #[arg(long, value_name = "N")]
    tenant_max_queue: Option<usize>,
    /// Guest memory one tenant's running VMs may hold together, MiB
    /// (default: --memory-budget-mib).
    #[arg(long, value_name = "MIB")]
    tenant_memory_mib: Option<u64>,
    /// One tenant's own limits over the --tenant-* defaults, and its weight
    /// (its share of the VMs that free up while builds wait, 1 to 1000,
    /// default 1): `TENANT:max-vms=N,max-queue=N,memory-mib=N,weight=N`,
    /// any of the keys. Repeatable.
    #[arg(long, value_name = "TENANT:LIMITS")]
    tenant_limit: Vec<kiln::executor::admission::TenantOverride>,
    /// VMs kept booted and waiting for builds that fit them (the smallest
    /// VM size, no /dev/kvm, no network, no extra read-only paths); they
    /// count against --max-vms and --memory-budget-mib. 0: every build
    /// boots its own VM.
    #[arg(long, env = "KILN_WARM_VMS", default_value_t = defaults::WARM_VMS)]
    warm_vms: usize,
    /// Build every request, even one that already succeeded for its
    /// tenant with its outputs still stored (the result cache,
    /// `<data dir>/results.redb`, is then neither read nor written).
    #[arg(long)]
    no_result_cache: bool,
    /// Memory all requests held (queued or running) may take together, MiB;
    /// beyond it new builds get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = defaults::REQUEST_BUDGET_BYTES >> 20)]
    max_request_memory_mib: usize,
    /// vCPUs per VM.
    #[arg(long, default_value_t = defaults::VCPUS)]
    vcpus: u32,
    /// Default wall-clock limit of a build, seconds (a client deadline can shorten it).
    #[arg(long, default_value_t = defaults::TIMEOUT.as_secs())]
    timeout_secs: u64,
    /// Builder output allowed per build before it is stopped, bytes.
    #[arg(long, default_value_t = defaults::MAX_LOG_BYTES)]
    max_log_bytes: u64,
    /// Disk space one build's scratch directories may take, MiB.
    #[arg(long, default_value_t = defaults::MAX_SCRATCH_BYTES >> 20)]
    max_scratch_mib: u64,
    /// Free space kept on the data disk: builds are stopped below it, MiB.
    #[arg(long, default_value_t = defaults::MIN_FREE_DISK_BYTES >> 20)]
    min_free_disk_mib: u64,
    /// Entries the inputs of one build may expand to on disk (every copy of
    /// a directory referenced twice counts); more is refused before a VM is taken.
    #[arg(long, default_value_t = defaults::MAX_INPUT_ENTRIES)]
    max_input_entries: u64,
    /// File bytes the inputs of one build may expand to, MiB.
    #[arg(long, default_value_t = defaults::MAX_INPUT_BYTES >> 20)]
    max_input_mib: u64,
    /// A host path builds may ask for read-only (repeatable).
    #[arg(long = "allow-ro-path")]
    allow_ro_paths: Vec<PathBuf>,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    security: ServeSecurityArgs,
    #[command(flatten)]
    castore_client: CastoreClientArgs,
    /// Also serve the Nix worker protocol on this unix socket (a
    /// `unix://PATH` store for local Nix clients).
    #[arg(long, value_name = "PATH")]
    nix_daemon_socket: Option<PathBuf>,
    /// Permissions of the Nix daemon socket (octal): who may use kiln's
    /// store and builds through it.
    #[arg(long, default_value = "0600")]
    nix_daemon_socket_mode: SocketMode,
    /// The tenant the Nix daemon socket's clients build and store as, when
    /// callers authenticate (without authentication there is one tenant).
    #[arg(long, default_value = kiln::tenant::DEFAULT_TENANT, value_name = "TENANT")]
    nix_daemon_tenant: kiln::tenant::Tenant,
    #[command(flatten)]
    nix_policy: NixPolicyArgs,
    /// On SIGTERM or SIGINT, how long running builds may go on before they
    /// are cancelled, seconds (no new builds are accepted meanwhile; a
    /// second signal cancels them at once).
    #[arg(long = "shutdown-grace", default_value_t = defaults::SHUTDOWN_GRACE.as_secs(), value_name = "SECS")]
    shutdown_grace_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics, on a listener of
    /// their own (HOST:PORT; keep it on loopback or a private network).
    /// Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Network for the builds that ask for it (`network_access`, fixed-output
/// derivations): egress to public addresses only, through a NAT helper per
/// build (passt) policed by an nftables table.
#[derive(Args)]
struct NetworkArgs {
    /// Refuse every build that asks for network (FAILED_PRECONDITION).
    #[arg(long)]
    no_network: bool,
    /// A destination builds may reach although it is in a denied range
    /// (private, shared, link-local, loopback, the host's own addresses),
    /// e.g. a site mirror or proxy: an address or CIDR (repeatable).
    #[arg(long = "network-allow", value_name = "CIDR", value_parser = parse_cidr)]
    network_allow: Vec<ipnet::IpNet>,
    /// The resolver the builds' DNS queries are forwarded to (default: the
    /// first nameserver of the host's /etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    network_dns: Option<std::net::IpAddr>,
}

/// An address (a /32 or /128) or a CIDR network.
fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(addr) = text.parse::<std::net::IpAddr>() {
        return Ok(addr.into());
    }
    text.parse::<ipnet::IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR network"))
}

/// How `kiln serve` reaches a remote `--castore` that uses TLS or authentication.
#[derive(Args)]
struct CastoreClientArgs {
    /// PEM CA the remote castore's certificate must chain to; turns TLS on.
    #[arg(long)]
    castore_tls_ca: Option<PathBuf>,
    /// PEM client certificate for the remote castore (needs --castore-tls-key and --castore-tls-ca).
    #[arg(long, requires_all = ["castore_tls_key", "castore_tls_ca"])]
    castore_tls_cert: Option<PathBuf>,
    /// PEM private key of --castore-tls-cert.
    #[arg(long, requires = "castore_tls_cert")]
    castore_tls_key: Option<PathBuf>,
    /// File whose first line is the bearer token for the remote castore.
    #[arg(long, value_name = "FILE")]
    castore_token_file: Option<PathBuf>,
}

/// TLS and client authentication of `kiln serve` (see "Security model" in the README).
#[derive(Args)]
struct ServeSecurityArgs {
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: clients presenting a certificate signed by it are authenticated (needs TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File of accepted bearer tokens, one `TENANT TOKEN` per line (a bare
    /// `TOKEN` is the tenant `default`), read at start-up and on SIGHUP.
    #[arg(long, env = "KILN_AUTH_TOKENS", value_name = "FILE")]
    auth_tokens: Option<PathBuf>,
    /// File of operator bearer tokens, lines as in --auth-tokens: their
    /// callers see and stop every tenant's builds and read all of the
    /// castore. Giving it turns authentication on.
    #[arg(long, value_name = "FILE")]
    operator_tokens: Option<PathBuf>,
    /// Which tenant a client certificate names: `none` (every certificate
    /// is the tenant `default`), `cn` (its subject's common name),
    /// `san-dns[:SUFFIX]` (its first DNS name ending in SUFFIX, without it)
    /// or `san-uri:PREFIX` (its first URI starting with PREFIX, without it).
    #[arg(long, default_value = "none", value_name = "RULE")]
    tenant_from_cert: kiln::auth::CertTenantRule,
}

/// How a client reaches a server that uses TLS or authentication.
#[derive(Args)]
struct ClientSecurityArgs {
    /// PEM CA the server's certificate must chain to; turns TLS on.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (needs --tls-key and --tls-ca).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File whose first line is the bearer token to send.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    fn load(&self) -> anyhow::Result<kiln::client::ClientSecurity> {
        let options = kiln::client::ClientSecurityOptions {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token_file: self.token_file.clone(),
        };
        Ok(kiln::client::ClientSecurity::load(&options)?)
    }
}

#[derive(Args)]
struct VmArgs {
    /// VMM: auto, cloud-hypervisor or qemu.
    #[arg(long, value_enum, default_value = "auto")]
    vmm: VmmChoice,
    /// Acceleration: auto, kvm or tcg.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Kiln's cache: kernel artifacts, agent, base initramfs images.
    #[arg(long, env = "KILN_CACHE_DIR", default_value = defaults::CACHE_DIR)]
    cache_dir: PathBuf,
    /// Guest kernel: kiln (kiln's own, <cache-dir>/kernel-kiln), debian-cloud
    /// (the fallback, <cache-dir>/kernel-debian), or a kernel directory.
    #[arg(long, env = kiln::guest_image::KERNEL_ENV, default_value = "kiln", value_parser = kiln::guest_image::KernelChoice::parse)]
    kernel: kiln::guest_image::KernelChoice,
    /// The guest kernel is PVM-enabled (lets a PVM /dev/kvm count as KVM).
    #[arg(long)]
    pvm_kernel: bool,
}

impl VmArgs {
    /// The kernel, agent and shell these flags name.
    fn artifacts(&self) -> kiln::guest_image::Artifacts {
        kiln::guest_image::Artifacts {
            kernel_dir: self.kernel.dir(&self.cache_dir),
            ..kiln::guest_image::Artifacts::in_cache_dir(&self.cache_dir)
        }
    }
}

#[derive(Args)]
struct BuildArgs {
    /// The kiln server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    addr: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
    /// Layout of a bare request file (a {"snix": …} / {"tvix": …} wrapper says it itself).
    #[arg(long, value_enum, default_value = "snix")]
    layout: JsonLayout,
    /// Print the completed event as JSON.
    #[arg(long)]
    json: bool,
    /// Build even when the server's result cache holds the result (the
    /// request header `x-kiln-result-cache: bypass`); with --drv, for every
    /// derivation it builds.
    #[arg(long)]
    rebuild: bool,
    /// Build a Nix derivation instead of a request file: its input closure
    /// is imported from the local /nix/store (missing inputs are built
    /// first), and every output is printed with its NAR hash.
    #[arg(long, conflicts_with = "request")]
    drv: Option<PathBuf>,
    /// With --drv: materialise the outputs as DIR/<store basename>.
    #[arg(long, requires = "drv")]
    out: Option<PathBuf>,
    /// With --drv: NIX_BUILD_CORES for the builds (default: this machine's cores).
    #[arg(long, requires = "drv")]
    cores: Option<u32>,
    /// The request, in the protobuf JSON mapping.
    #[arg(required_unless_present = "drv")]
    request: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CastoreCommand {
    /// Ingest a host path and print its node.
    Import {
        /// The kiln server.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        addr: String,
        #[command(flatten)]
        security: ClientSecurityArgs,
        /// File, directory or symlink to import.
        path: PathBuf,
    },
    /// Materialise a node (as printed by `import`) into a new host path.
    Export {
        /// The kiln server.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        addr: String,
        #[command(flatten)]
        security: ClientSecurityArgs,
        /// The node: `directory:<hex>`, `file:<hex>[:x]` or `symlink:<target>`.
        node: String,
        /// Destination (must not exist).
        dir: PathBuf,
    },
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    network: NetworkArgs,
}

/// How long open calls may go on after the builds have ended at shutdown
/// (their last events and answers are on the way) before their
/// connections are closed.
const CALLS_GRACE: Duration = Duration::from_secs(3);
/// How long exiting waits for cancelled builds to stop their VMs and remove
/// their directories.
const BUILD_CLEANUP_GRACE: Duration = Duration::from_secs(20);
/// How long exiting waits for blocking work (hashing, copying) to return.
const BLOCKING_WORK_GRACE: Duration = Duration::from_secs(10);
/// How long `kiln serve` waits for --database to accept a connection at
/// start (a database starting alongside kiln), before it gives up.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // One process-wide TLS crypto provider (ring) before any TLS client is
    // made: the object store's HTTP client needs it.
    kiln::castore::blob::object_store::install_crypto_provider();
    let cli = match kiln::cli::serve_config::parse::<Cli>(std::env::args_os()) {
        Ok(kiln::cli::serve_config::Parsed::Run(cli)) => cli,
        Ok(kiln::cli::serve_config::Parsed::Check(settings)) => {
            print!("{settings}");
            return ExitCode::SUCCESS;
        }
        Err(e) => e.exit(),
    };
    // Behind ssh, the Nix daemon's stderr reaches the Nix user: only
    // warnings by default.
    let default_filter = match cli.command {
        Command::NixDaemon(_) => "kiln=warn",
        _ => "kiln=info",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // Spans (the build id) go on every line as fields.
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // What still runs now is dropped; children left by then die with kiln
    // (their parent-death signal).
    runtime.shutdown_timeout(BLOCKING_WORK_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM (what `systemctl stop` sends). Installed before
/// serving, so neither signal kills kiln without its clean-up from then on.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Build(args) => {
            let security = args.security.load()?;
            match (args.drv, args.request) {
                (Some(drv), _) => {
                    let options = kiln::cli::drv::DrvOptions {
                        addr: args.addr,
                        security,
                        drv,
                        out: args.out,
                        build_cores: args.cores,
                        rebuild: args.rebuild,
                    };
                    kiln::cli::drv::run(&options).await?;
                }
                (None, Some(request)) => {
                    kiln::cli::build::run(
                        &args.addr,
                        &security,
                        &request,
                        args.layout,
                        args.json,
                        args.rebuild,
                    )
                    .await?;
                }
                (None, None) => anyhow::bail!("give a request file or --drv"),
            }
            Ok(())
        }
        Command::Castore(CastoreCommand::Import {
            addr,
            security,
            path,
        }) => Ok(kiln::cli::castore::import(&addr, &security.load()?, &path).await?),
        Command::Castore(CastoreCommand::Export {
            addr,
            security,
            node,
            dir,
        }) => Ok(kiln::cli::castore::export(&addr, &security.load()?, &node, &dir).await?),
        Command::NixDaemon(args) => {
            anyhow::ensure!(
                args.stdio,
                "kiln nix-daemon serves one client on stdin/stdout: give --stdio \
                 (for a socket, use kiln serve --nix-daemon-socket PATH)"
            );
            let security = args.security.load()?;
            let daemon =
                kiln::nix::daemon::Daemon::connect(&args.addr, &security, args.policy.config())
                    .await
                    .with_context(|| format!("connecting to the kiln server {}", args.addr))?;
            kiln::nix::daemon::serve_stdio(&daemon).await?;
            Ok(())
        }
        Command::Builds(args) => {
            let security = args.admin.security.load()?;
            Ok(kiln::cli::admin::builds(&args.admin.addr, &security, args.json).await?)
        }
        Command::Cancel(args) => {
            let security = args.admin.security.load()?;
            Ok(kiln::cli::admin::cancel(&args.admin.addr, &security, &args.build_id).await?)
        }
        Command::Logs(args) => {
            let security = args.admin.security.load()?;
            Ok(
                kiln::cli::admin::logs(&args.admin.addr, &security, &args.build_id, args.follow)
                    .await?,
            )
        }
        Command::Doctor(args) => {
            let opts = kiln::cli::doctor::DoctorOptions {
                vmm: args.vm.vmm,
                accel: args.vm.accel,
                kernel_is_pvm: args.vm.pvm_kernel,
                artifacts: args.vm.artifacts(),
                image_cache_dir: Some(image_cache_dir(&args.vm.cache_dir)),
                network: Some(kiln::vmm::net::NetworkFlags {
                    disabled: args.network.no_network,
                    allow: args.network.network_allow.clone(),
                    dns: args.network.network_dns,
                }),
            };
            let report = kiln::cli::doctor::doctor(&opts, &mut std::io::stdout()).await?;
            anyhow::ensure!(
                report.ready(),
                "this host cannot run builds yet (see the FAIL lines above)"
            );
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.config.config {
        tracing::info!(config = %path.display(), "settings from the config file, below the command line and KILN_* variables");
    }
    let security = kiln::auth::Security::load(&kiln::auth::SecurityOptions {
        tls_cert: args.security.tls_cert.clone(),
        tls_key: args.security.tls_key.clone(),
        tls_client_ca: args.security.tls_client_ca.clone(),
        auth_tokens: args.security.auth_tokens.clone(),
        operator_tokens: args.security.operator_tokens.clone(),
        tenant_from_cert: args.security.tenant_from_cert.clone(),
    })
    .context("loading the TLS and authentication settings")?;
    if security.requires_authentication() {
        let tenants: Vec<String> = security.tenants().iter().map(|t| t.to_string()).collect();
        tracing::info!(tenants = ?tenants, "builds and data are scoped to their tenant");
    }
    let castore_security =
        kiln::client::ClientSecurity::load(&kiln::client::ClientSecurityOptions {
            tls_ca: args.castore_client.castore_tls_ca.clone(),
            tls_cert: args.castore_client.castore_tls_cert.clone(),
            tls_key: args.castore_client.castore_tls_key.clone(),
            token_file: args.castore_client.castore_token_file.clone(),
        })
        .context("loading the remote castore's TLS and token settings")?;
    // Builds' directories and the blob store live here: root's alone,
    // whatever the umask.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.data_dir)
            .and_then(|()| {
                std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))
            })
            .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    }
    let db = match args.database.as_str() {
        "" => None,
        address => Some(
            kiln::db::Database::connect(address, DATABASE_WAIT)
                .await
                .with_context(|| format!("opening the database {}", kiln::db::redact(address)))?,
        ),
    };
    let store = open_store(&args, db.as_ref(), &castore_security).await?;
    let vm = kiln::vmm::choose::choose(args.vm.vmm, args.vm.accel, args.vm.pvm_kernel)
        .await
        .context("choosing the VMM")?;
    let network = kiln::vmm::net::NetworkSetup::from_flags(&kiln::vmm::net::NetworkFlags {
        disabled: args.network.no_network,
        allow: args.network.network_allow.clone(),
        dns: args.network.network_dns,
    });
    let (network_config, network_unavailable, firewall) = match network {
        kiln::vmm::net::NetworkSetup::Ready { config, firewall } => {
            tracing::info!(
                allow = ?config.policy.allow,
                dns = ?config.policy.dns,
                "builds that ask get network: public addresses only"
            );
            (Some(config), None, Some(firewall))
        }
        kiln::vmm::net::NetworkSetup::Unavailable(why) => {
            tracing::warn!(%why, "builds that ask for network are refused");
            (None, Some(why), None)
        }
    };
    let limits = kiln::executor::plan::Limits {
        max_guest_memory_mib: args.max_guest_memory_mib,
        vcpus: args.vcpus,
        nested_virt_available: vm.nested_available,
        ro_path_allowlist: args.allow_ro_paths.clone(),
        network_unavailable,
        ..Default::default()
    };
    let config = kiln::executor::ExecutorConfig {
        scratch: kiln::executor::scratch::ScratchLimits {
            max_bytes: args.max_scratch_mib << 20,
            min_free_bytes: args.min_free_disk_mib << 20,
        },
        inputs: kiln::castore::materialise::Limits {
            max_entries: args.max_input_entries,
            max_bytes: args.max_input_mib << 20,
            min_free_bytes: args.min_free_disk_mib << 20,
            ..Default::default()
        },
        limits,
        timeout: Duration::from_secs(args.timeout_secs),
        max_log_bytes: args.max_log_bytes,
        max_vms: args.max_vms,
        memory_budget_mib: args.memory_budget_mib,
        max_queue: args.max_queue,
        tenants: kiln::executor::admission::TenantPolicy {
            defaults: kiln::executor::admission::TenantLimits {
                max_vms: args.tenant_max_vms,
                max_queue: args.tenant_max_queue,
                memory_mib: args.tenant_memory_mib,
                weight: None,
            },
            overrides: Default::default(),
        }
        .with_overrides(&args.tenant_limit),
        warm_vms: args.warm_vms,
        request_budget_bytes: args.max_request_memory_mib << 20,
        network: network_config,
        artifacts: args.vm.artifacts(),
        ..kiln::executor::ExecutorConfig::in_dirs(args.data_dir.clone(), &args.vm.cache_dir)
    };
    let egress = config.network.as_ref().map(|n| n.policy.clone());
    let mut executor = kiln::executor::Executor::open(config, store.clone(), vm.runner)
        .context("starting the executor")?;
    if security.requires_authentication() {
        let grants = match &db {
            Some(db) => kiln::castore::scoped::Grants::postgres(db.clone()),
            None => {
                let path = args.data_dir.join("grants.redb");
                kiln::castore::scoped::Grants::open(&path).with_context(|| {
                    format!("opening the tenants' store grants {}", path.display())
                })?
            }
        };
        executor.set_scoping(kiln::castore::scoped::Scoping::by_tenant(grants));
    }
    if !args.no_result_cache {
        let cache = match &db {
            Some(db) => kiln::executor::result_cache::ResultCache::postgres(db.clone()),
            None => {
                let path = args.data_dir.join("results.redb");
                kiln::executor::result_cache::ResultCache::open(&path)
                    .with_context(|| format!("opening the result cache {}", path.display()))?
            }
        };
        executor.set_result_cache(cache);
    }
    let listen = match &args.listen {
        Listen::Tcp(addr) => addr.to_string(),
        Listen::Unix(path) => path.display().to_string(),
    };
    let host_id = match args.host_id.as_str() {
        "" => format!(
            "{}/{listen}",
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        ),
        id => id.to_owned(),
    };
    // A host among several names itself on every answer; a lone host
    // (no --database, no --host-id) tells clients nothing of its name.
    let health = if args.database.is_empty() && args.host_id.is_empty() {
        kiln::server::health::HostHealth::new()
    } else {
        kiln::server::health::HostHealth::named(&host_id)
    };
    let records = match &db {
        None => None,
        Some(db) => {
            let records = kiln::records::Records::start(db.clone(), &host_id, &listen)
                .await
                .context("registering this host in the shared build records")?;
            tracing::info!(host = %host_id, database = %records.database().name(), "sharing build records");
            executor.set_records(records.clone());
            let (records, mut state) = (records.clone(), health.subscribe());
            tokio::spawn(async move {
                loop {
                    records.set_state(*state.borrow_and_update());
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            });
            executor.records().cloned()
        }
    };
    let metrics = match args.metrics_listen {
        Some(addr) => Some((
            kiln::metrics::http::bind(addr).await?,
            kiln::metrics::follow(&mut executor),
        )),
        None => None,
    };
    let signals = StopSignals::install()?;
    let listener = args.listen.bind_with_mode(args.unix_socket_mode.0).await?;
    let runs_dir = executor.runs_dir();
    let stop = tokio_util::sync::CancellationToken::new();
    let cut = tokio_util::sync::CancellationToken::new();
    let executor = std::sync::Arc::new(executor);
    tokio::spawn(health.clone().follow(std::sync::Arc::downgrade(&executor)));
    if let Some(records) = &records {
        let executor = std::sync::Arc::downgrade(&executor);
        records.on_cancel(move |id| {
            if let Some(log) = executor.upgrade().and_then(|e| e.registry().get(id)) {
                if log.stop(StopReason::Operator) {
                    tracing::info!(build = %id, "build cancelled through another host");
                }
            }
        });
    }
    if let Some(addr) = args.lb_agent_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --lb-agent-listen {addr}"))?;
        tokio::spawn(kiln::server::health::serve_lb_agent(
            listener,
            health.clone(),
            cut.clone(),
        ));
    }
    tokio::spawn(shut_down_on_signal(
        signals,
        health.clone(),
        executor.clone(),
        Duration::from_secs(args.shutdown_grace_secs),
        stop.clone(),
        cut.clone(),
    ));
    let reloadable = Reloadable {
        security: security.clone(),
        executor: executor.clone(),
        firewall: firewall.zip(egress),
        allow_ro_paths: args.allow_ro_paths.clone(),
        network_allow: args.network.network_allow.clone(),
    };
    tokio::spawn(reload_on_hangup(reloadable)?);
    executor.start_pool();
    if let Some((listener, metrics)) = metrics {
        let sources = kiln::metrics::gauges::Sources {
            executor: std::sync::Arc::downgrade(&executor),
            store: store.clone(),
            health: Some(health.clone()),
        };
        // Metrics stay up while running builds drain at shutdown.
        tokio::spawn(kiln::metrics::http::serve(
            listener,
            metrics,
            sources,
            cut.clone(),
        ));
    }
    let pool_owner = executor.clone();
    let path_info: std::sync::Arc<dyn kiln::nix::path_info::PathInfoService> = match &db {
        Some(db) if args.path_info.is_empty() => std::sync::Arc::new(
            kiln::nix::path_info::postgres::PostgresPathInfoService::new(db.clone()),
        ),
        _ => kiln::nix::path_info::from_addr(&args.path_info, &args.data_dir, &castore_security)
            .await
            .with_context(|| format!("opening the path-info store {:?}", args.path_info))?,
    };
    let services = kiln::server::Services {
        store,
        executor,
        path_info: Some(path_info),
        health: Some(health.clone()),
    };
    if let Some(socket) = &args.nix_daemon_socket {
        // The Nix front is a client of kiln's own services, reached on a
        // socket only root can open (the data dir is 0700); the Nix clients
        // are authenticated by the permissions of their own socket, and act
        // as --nix-daemon-tenant when the main listener has tenants.
        let backend_security = if security.requires_authentication() {
            kiln::auth::Security::fixed(kiln::tenant::Identity::client(
                args.nix_daemon_tenant.clone(),
            ))
        } else {
            kiln::auth::Security::none()
        };
        let backend_path = args.data_dir.join("nix-backend.sock");
        let backend = Listen::Unix(backend_path.clone())
            .bind_with_mode(0o600)
            .await?;
        tokio::spawn(kiln::server::serve_services(
            backend,
            services.clone(),
            backend_security,
            stop.clone().cancelled_owned(),
            cut.clone(),
        ));
        let daemon = kiln::nix::daemon::Daemon::connect(
            &format!("grpc+unix:{}", backend_path.display()),
            &kiln::client::ClientSecurity::none(),
            args.nix_policy.config(),
        )
        .await
        .context("connecting the Nix daemon front to kiln's services")?;
        let socket = socket.clone();
        let mode = args.nix_daemon_socket_mode.0;
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) =
                kiln::nix::daemon::serve_unix(std::sync::Arc::new(daemon), &socket, mode, shutdown)
                    .await
            {
                tracing::error!(socket = %socket.display(), error = %e, "the Nix daemon socket failed");
            }
        });
    }
    kiln::server::serve_services(listener, services, security, stop.cancelled_owned(), cut).await?;
    // The pool's waiting VMs go with the server, and are waited for below
    // like the builds.
    pool_owner.stop_pool();
    drop(pool_owner);
    builds_cleaned_up(&runs_dir).await;
    health.stopped();
    if let Some(records) = records {
        records.stopped().await;
    }
    Ok(())
}

/// The castore `kiln serve` uses: `--castore` as a whole, or its blobs from
/// `--blob-store` and its directories from `--database` (each part not
/// given from the embedded store).
async fn open_store(
    args: &ServeArgs,
    db: Option<&kiln::db::Database>,
    castore_security: &kiln::client::ClientSecurity,
) -> anyhow::Result<kiln::castore::Store> {
    if args.blob_store.is_empty() && db.is_none() {
        return kiln::castore::from_addr::from_addr_with(
            &args.castore,
            &args.data_dir,
            castore_security,
        )
        .await
        .with_context(|| format!("opening the castore {:?}", args.castore));
    }
    if !args.castore.is_empty() {
        anyhow::bail!(
            "--castore {:?} names a whole castore: with --blob-store or --database leave it empty",
            args.castore
        );
    }
    let embedded = if args.blob_store.is_empty() || db.is_none() {
        Some(
            kiln::castore::from_addr::embedded(&args.data_dir)
                .context("opening the embedded castore")?,
        )
    } else {
        None
    };
    let blobs = match (&embedded, args.blob_store.as_str()) {
        (Some(store), "") => store.blobs.clone(),
        (_, address) => kiln::castore::from_addr::open_blob_store(
            address,
            &args.data_dir,
            args.blob_cache_mib << 20,
            args.blob_store_credentials.as_deref(),
        )
        .await
        .with_context(|| format!("opening the blob store {address:?}"))?,
    };
    let directories: std::sync::Arc<dyn kiln::castore::directory_service::DirectoryService> =
        match (db, &embedded) {
            (Some(db), _) => std::sync::Arc::new(
                kiln::castore::directory_service::postgres::PostgresDirectoryService::new(
                    db.clone(),
                ),
            ),
            (None, Some(store)) => store.directories.clone(),
            (None, None) => anyhow::bail!("no directory store"),
        };
    Ok(kiln::castore::Store { blobs, directories })
}

/// Shutting down on SIGTERM/SIGINT: no new builds or connections (the
/// health service answers NOT_SERVING), running builds go on for at most
/// `grace` (a second signal ends it), then those left are cancelled; once
/// no build runs, open calls get [`CALLS_GRACE`] to deliver their answers
/// before the connections are closed.
async fn shut_down_on_signal(
    mut signals: StopSignals,
    health: kiln::server::health::HostHealth,
    executor: std::sync::Arc<kiln::executor::Executor>,
    grace: Duration,
    stop: tokio_util::sync::CancellationToken,
    cut: tokio_util::sync::CancellationToken,
) {
    let name = signals.recv().await;
    let running = executor.running().len();
    tracing::info!(
        signal = name,
        running,
        grace_secs = grace.as_secs(),
        "shutting down: no new builds; running builds may finish within the grace"
    );
    health.drain();
    executor.drain();
    stop.cancel();
    let deadline = tokio::time::Instant::now() + grace;
    let ended = async {
        while !executor.running().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = ended => {}
        () = tokio::time::sleep_until(deadline) => {
            let stopped = executor.stop_all(StopReason::Shutdown { grace_secs: grace.as_secs() });
            tracing::warn!(builds = stopped, "shutdown grace over: cancelling the builds still running");
        }
        again = signals.recv() => {
            let stopped = executor.stop_all(StopReason::Shutdown { grace_secs: grace.as_secs() });
            tracing::warn!(signal = again, builds = stopped, "second signal: cancelling the builds still running");
        }
    }
    // Cancelled builds release their VMs and directories before their
    // final event; wait for that (bounded), then for the calls.
    let cleanup = tokio::time::Instant::now() + BUILD_CLEANUP_GRACE;
    while !executor.running().is_empty() && tokio::time::Instant::now() < cleanup {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(CALLS_GRACE).await;
    tracing::info!("closing the connections still open");
    cut.cancel();
}

/// What SIGHUP re-reads and where it goes.
struct Reloadable {
    security: kiln::auth::Security,
    executor: std::sync::Arc<kiln::executor::Executor>,
    /// The egress table and the policy it was installed with.
    firewall: Option<(kiln::vmm::net::Firewall, kiln::vmm::net::EgressPolicy)>,
    allow_ro_paths: Vec<PathBuf>,
    network_allow: Vec<ipnet::IpNet>,
}

/// On every SIGHUP: the token files are re-read, and the command line
/// (with its config file) parsed again for the allow-lists
/// (`allow-ro-path`, `network-allow`). Running builds are untouched; what
/// changed is logged (never a token). A file that fails to load changes
/// nothing of its part.
fn reload_on_hangup(
    mut state: Reloadable,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    Ok(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the token files and allow-lists");
            match state.security.reload() {
                Ok(changes) => {
                    for change in changes {
                        tracing::info!(%change, "reloaded");
                    }
                }
                Err(e) => tracing::error!(
                    error = %format!("{:#}", anyhow::Error::from(e)),
                    "the token files were not reloaded: the old tokens stay accepted"
                ),
            }
            match reparse_serve_args(&argv) {
                Ok(args) => {
                    state.apply_allow_lists(args.allow_ro_paths, args.network.network_allow)
                }
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "the allow-lists were not reloaded: the old ones stay"
                ),
            }
        }
    })
}

/// `kiln serve`'s settings as the command line (and its config file) give
/// them now.
fn reparse_serve_args(argv: &[std::ffi::OsString]) -> anyhow::Result<ServeArgs> {
    let parsed = kiln::cli::serve_config::parse::<Cli>(argv.iter().cloned())
        .context("parsing the command line and config file again")?;
    match parsed {
        kiln::cli::serve_config::Parsed::Run(Cli {
            command: Command::Serve(args),
            ..
        }) => Ok(args),
        _ => anyhow::bail!("kiln is not serving"),
    }
}

impl Reloadable {
    fn apply_allow_lists(&mut self, ro_paths: Vec<PathBuf>, network_allow: Vec<ipnet::IpNet>) {
        if ro_paths != self.allow_ro_paths {
            tracing::info!(before = ?self.allow_ro_paths, after = ?ro_paths, "allow-ro-path changed");
            self.executor.set_ro_path_allowlist(ro_paths.clone());
            self.allow_ro_paths = ro_paths;
        }
        if network_allow == self.network_allow {
            return;
        }
        let Some((firewall, policy)) = &mut self.firewall else {
            tracing::warn!(
                "network-allow changed, but builds get no network here: nothing to apply"
            );
            self.network_allow = network_allow;
            return;
        };
        let new = kiln::vmm::net::EgressPolicy {
            allow: network_allow.clone(),
            ..policy.clone()
        };
        match firewall.replace(&new) {
            Ok(()) => {
                tracing::info!(before = ?self.network_allow, after = ?network_allow, "network-allow changed");
                *policy = new;
                self.network_allow = network_allow;
            }
            Err(e) => tracing::error!(
                error = %format!("{:#}", anyhow::Error::from(e)),
                "network-allow was not changed: the egress table stays as it was"
            ),
        }
    }
}

/// Waits (at most [`BUILD_CLEANUP_GRACE`]) until cancelled builds have
/// released what they held: a build's directory is the last thing its
/// guards remove, after its VM and virtiofsd.
async fn builds_cleaned_up(runs_dir: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + BUILD_CLEANUP_GRACE;
    loop {
        let left = std::fs::read_dir(runs_dir).map_or(0, |dir| dir.count());
        if left == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                builds = left,
                "builds still cleaning up at exit; the next start sweeps them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
