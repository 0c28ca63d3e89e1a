//! The QEMU backend: `qemu-system-x86_64 -M microvm`, virtio over mmio.
//!
//! One QEMU process per build. Its argv is built by the pure [`qemu_args`]:
//! a microvm whose RAM is a shared memfd (vhost-user needs the daemon to map
//! guest memory), the PVH kernel and the initramfs given directly, no
//! firmware devices, no network device, the kernel console on the serial
//! port into the serial log, one `vhost-user-fs-device` per share, and the
//! guest channel: a `virtserialport` (the guest's `/dev/vport0p1`; not a
//! `virtconsole`, whose output QEMU drops when the host reads slower than the
//! guest writes, while a serial port is back-pressured) whose chardev
//! connects to a unix socket kiln has already bound, so there is no race
//! between QEMU starting and kiln listening.
//!
//! [`QemuRunner::start`] returns once QEMU has connected that channel (or
//! failed with the end of its log, or the build's deadline passed first);
//! dropping the [`QemuVm`] SIGKILLs and reaps QEMU.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use super::net::NetEndpoint;
use super::{GuestChannel, RunningVm, Transport, VmExit, VmRunner, VmSpec, VmmError};

/// Name of the guest channel socket in the build's run directory.
pub const CHANNEL_SOCKET: &str = "channel.sock";
/// Name of QEMU's own log (its stderr) in the build's run directory.
pub const QEMU_LOG: &str = "qemu.log";

/// QEMU's acceleration: host selection's [`Accel`](crate::vmm::host::Accel),
/// re-exported for callers that only deal with QEMU.
pub use super::host::Accel;

/// TCG's translated-code cache per VM, MiB (`-accel tcg,tb-size=`).
/// QEMU's default is 1 GiB, allocated lazily, so a VM's host memory
/// outside guest RAM grows with the code it has run (83–135 MiB seen per
/// VM). A cap trades that memory against latency: booting kiln's kernel to
/// the agent translates about 25 MiB of host code, and a cache that fills
/// during boot is flushed whole, taking with it the kernel paths a build's
/// start runs again (exec, page faults, FUSE, mounts). With 32 MiB a boot
/// fits, and a warm VM's request reaches its builder in 47–53 ms against
/// 107–138 ms with 8, 16 or 24 MiB (the same runs: `kiln-bench --only
/// warm`; a bare boot ≈ 700 ms); the cold path gains too. The heavy build
/// of `make bench` runs as fast as with QEMU's default. The price is about
/// 17 MiB more per VM than a cap of 8 (47 against 29 MiB per waiting VM);
/// `make bench` reports both.
pub const TCG_TB_SIZE_MIB: u32 = 32;

/// Boots build VMs with QEMU's microvm machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuRunner {
    /// Acceleration to use.
    pub accel: Accel,
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Under TCG, the translated-code cache, MiB ([`TCG_TB_SIZE_MIB`]);
    /// 0: QEMU's default.
    pub tb_size_mib: u32,
}

impl QemuRunner {
    /// A runner using `qemu-system-x86_64` from PATH.
    pub fn new(accel: Accel) -> Self {
        Self {
            accel,
            binary: PathBuf::from("qemu-system-x86_64"),
            tb_size_mib: TCG_TB_SIZE_MIB,
        }
    }
}

/// QEMU's `-accel` value: `kvm`, or `tcg` with its code cache capped.
pub fn accel_arg(accel: Accel, tb_size_mib: u32) -> String {
    match accel {
        Accel::Tcg if tb_size_mib > 0 => format!("tcg,tb-size={tb_size_mib}"),
        other => other.as_str().to_owned(),
    }
}

/// The full QEMU argv (after the binary) for `spec`, with the guest channel
/// connecting to `channel_socket`. `tsc_khz`, when given, is appended to the
/// kernel command line as `tsc_early_khz` (see [`host_tsc_khz`]). Pure: no
/// file is touched.
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    tb_size_mib: u32,
    channel_socket: &Path,
    tsc_khz: Option<u64>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    let mem = format!("{}M", spec.memory_mib);
    push(&["-name", &format!("kiln-{}", spec.id)]);
    push(&["-M", "microvm,memory-backend=mem"]);
    push(&["-accel", &accel_arg(accel, tb_size_mib)]);
    // Without nested virtualisation the guest sees no VMX/SVM at all.
    let cpu = match (accel, spec.nested_virt) {
        (Accel::Tcg, true) => "max",
        (Accel::Tcg, false) => "max,svm=off,vmx=off",
        (Accel::Kvm, true) => "host",
        (Accel::Kvm, false) => "host,svm=off,vmx=off",
    };
    push(&["-cpu", cpu]);
    push(&["-smp", &spec.vcpus.max(1).to_string()]);
    push(&["-m", &mem]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into());
    a.push("-initrd".into());
    a.push(spec.initramfs.clone().into());
    a.push("-append".into());
    a.push(match tsc_khz {
        Some(khz) => format!("{} tsc_early_khz={khz}", spec.cmdline).into(),
        None => spec.cmdline.clone().into(),
    });
    a.push("-serial".into());
    a.push(prefixed("file:", &spec.serial_log));
    a.push("-chardev".into());
    a.push(chardev("agent", channel_socket));
    a.push("-device".into());
    a.push("virtio-serial-device".into());
    a.push("-device".into());
    a.push("virtserialport,chardev=agent,nr=1,name=kiln.channel".into());
    for (i, share) in spec.shares.iter().enumerate() {
        a.push("-chardev".into());
        a.push(chardev(&format!("fs{i}"), &share.socket));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag).into());
    }
    if let Some(net) = &spec.net {
        // The guest's Ethernet to the NAT helper, as a stream socket: an
        // inherited descriptor, or a socket path.
        let netdev = match &net.endpoint {
            NetEndpoint::Fd(fd) => format!("stream,id=net0,addr.type=fd,addr.str={fd}"),
            NetEndpoint::Socket(path) => {
                let path = path.to_string_lossy().replace(',', ",,");
                format!("stream,id=net0,server=off,addr.type=unix,addr.path={path}")
            }
        };
        a.push("-netdev".into());
        a.push(netdev.into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac).into());
    }
    a
}

fn prefixed(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s
}

/// A client chardev on a unix socket. QEMU's option parser splits on commas,
/// so a comma in the path is doubled.
fn chardev(id: &str, socket: &Path) -> OsString {
    let path = socket.to_string_lossy().replace(',', ",,");
    format!("socket,id={id},path={path},server=off").into()
}

/// The host's TSC frequency in kHz, measured once per process (x86_64 only).
///
/// Under TCG the guest reads the host's TSC, but microvm has no HPET or ACPI
/// PM timer to calibrate it against, and calibrating against the emulated PIT
/// fails when the host is busy: the kernel then has no working clock and
/// hangs early in boot. Telling it the frequency (`tsc_early_khz`) avoids
/// the calibration altogether.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let start = std::time::Instant::now();
    // SAFETY: rdtsc has no preconditions on x86_64.
    let t0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    let t1 = unsafe { std::arch::x86_64::_rdtsc() };
    let micros = start.elapsed().as_micros() as u64;
    let khz = t1.checked_sub(t0)? * 1000 / micros.max(1);
    (khz > 0).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[async_trait::async_trait]
impl VmRunner for QemuRunner {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &'static str {
        self.accel.as_str()
    }

    fn transport(&self) -> Transport {
        Transport::Mmio
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        let channel_socket = spec.run_dir.join(CHANNEL_SOCKET);
        let listener = UnixListener::bind(&channel_socket).map_err(VmmError::Channel)?;
        let log_path = spec.run_dir.join(QEMU_LOG);
        let log = std::fs::File::create(&log_path).map_err(VmmError::Channel)?;
        let program = self.binary.display().to_string();
        let started = std::time::Instant::now();
        let tsc_khz = match self.accel {
            Accel::Tcg => tokio::task::spawn_blocking(host_tsc_khz)
                .await
                .ok()
                .flatten(),
            Accel::Kvm => None,
        };
        let mut command = Command::new(&self.binary);
        command
            .args(qemu_args(
                spec,
                self.accel,
                self.tb_size_mib,
                &channel_socket,
                tsc_khz,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(NetEndpoint::Fd(fd)) = spec.net.as_ref().map(|n| &n.endpoint) {
            let fd = *fd;
            // SAFETY: the closure runs in the forked child before exec and
            // only calls fcntl, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    // QEMU inherits the helper socket (kiln opens it CLOEXEC).
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child =
            super::child::spawn(command).map_err(|source| VmmError::Spawn { program, source })?;
        let mut vm = QemuVm {
            child: Some(child),
            channel: None,
            log_path,
        };
        // QEMU connects the channel while it sets the machine up; if it exits
        // first, its log says why.
        let accepted = {
            let child = vm
                .child
                .as_mut()
                .ok_or(VmmError::Wait(std::io::Error::other("no QEMU process")))?;
            tokio::select! {
                r = listener.accept() => Some(r.map_err(VmmError::Channel)?.0),
                status = child.wait() => {
                    let status = status.map_err(VmmError::Wait)?;
                    return Err(VmmError::Channel(std::io::Error::other(format!(
                        "QEMU exited ({status}) before connecting the guest channel: {}",
                        vm.log_tail()
                    ))));
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(spec.deadline)) => None,
            }
        };
        let _ = std::fs::remove_file(&channel_socket);
        match accepted {
            Some(stream) => vm.channel = Some(stream),
            None => return Err(VmmError::ChannelTimeout(started.elapsed())),
        }
        Ok(Box::new(vm))
    }
}

/// A running QEMU. Dropping it SIGKILLs and reaps QEMU.
#[derive(Debug)]
pub struct QemuVm {
    child: Option<Child>,
    channel: Option<UnixStream>,
    log_path: PathBuf,
}

impl QemuVm {
    /// The last lines of QEMU's own log (its stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

#[async_trait::async_trait]
impl RunningVm for QemuVm {
    async fn take_channel(&mut self) -> Result<GuestChannel, VmmError> {
        match self.channel.take() {
            Some(stream) => {
                let (reader, writer) = stream.into_split();
                Ok(GuestChannel {
                    reader: Box::new(reader),
                    ack: Some(Box::new(writer)),
                })
            }
            None => Err(VmmError::Channel(std::io::Error::other(
                "the guest channel was already taken",
            ))),
        }
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        let child = self
            .child
            .as_mut()
            .ok_or(VmmError::Wait(std::io::Error::other(
                "QEMU was already killed",
            )))?;
        let status = child.wait().await.map_err(VmmError::Wait)?;
        Ok(VmExit::Exited {
            code: status.code(),
            signal: status.signal(),
        })
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // QEMU has no graceful path worth waiting for here: the guest's
            // state is thrown away anyway. kill() sends SIGKILL and reaps.
            let _ = child.kill().await;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // A SIGKILLed QEMU is gone within milliseconds; reap it here so
            // no zombie outlives the build (tokio's reaper is the fallback).
            for _ in 0..250 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::vmm::FsShare;

    fn spec(nested: bool) -> VmSpec {
        VmSpec {
            id: "b1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/r/initramfs".into(),
            cmdline: "console=ttyS0 panic=-1".into(),
            memory_mib: 1536,
            vcpus: 2,
            nested_virt: nested,
            shares: vec![
                FsShare {
                    tag: "kiln-inputs".into(),
                    socket: "/r/in.sock".into(),
                    source: std::path::PathBuf::new(),
                },
                FsShare {
                    tag: "kiln-scratch".into(),
                    socket: "/r/scratch,odd.sock".into(),
                    source: std::path::PathBuf::new(),
                },
            ],
            net: None,
            run_dir: "/r".into(),
            serial_log: "/r/serial.log".into(),
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(600),
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value after each occurrence of `flag`.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn builds_a_microvm_with_shared_memfd_memory() {
        let a = strings(&qemu_args(
            &spec(false),
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/r/channel.sock"),
            None,
        ));
        assert_eq!(values(&a, "-M"), ["microvm,memory-backend=mem"]);
        assert_eq!(values(&a, "-m"), ["1536M"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=1536M,share=on"]
        );
        // TCG's code cache capped at 8 MiB (see TCG_TB_SIZE_MIB).
        assert_eq!(values(&a, "-accel"), ["tcg,tb-size=32"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(values(&a, "-initrd"), ["/r/initramfs"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 panic=-1"]);
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.contains(&flag.to_string()), "{flag} missing");
        }
    }

    #[test]
    fn a_known_tsc_frequency_goes_on_the_kernel_command_line() {
        let a = strings(&qemu_args(
            &spec(false),
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/c"),
            Some(2445406),
        ));
        assert_eq!(
            values(&a, "-append"),
            ["console=ttyS0 panic=-1 tsc_early_khz=2445406"]
        );
    }

    #[test]
    fn the_host_tsc_frequency_is_plausible() {
        let Some(khz) = host_tsc_khz() else {
            test_skip!("the_host_tsc_frequency_is_plausible because this is not x86_64");
            return;
        };
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }

    #[test]
    fn virtualisation_extensions_only_when_nested() {
        let plain = strings(&qemu_args(
            &spec(false),
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/c"),
            None,
        ));
        assert_eq!(values(&plain, "-cpu"), ["max,svm=off,vmx=off"]);
        let nested = strings(&qemu_args(
            &spec(true),
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/c"),
            None,
        ));
        assert_eq!(values(&nested, "-cpu"), ["max"]);
        let kvm = strings(&qemu_args(
            &spec(false),
            Accel::Kvm,
            TCG_TB_SIZE_MIB,
            Path::new("/c"),
            None,
        ));
        assert_eq!(values(&kvm, "-cpu"), ["host,svm=off,vmx=off"]);
        assert_eq!(values(&kvm, "-accel"), ["kvm"], "the code cache is TCG's");
        let uncapped = strings(&qemu_args(
            &spec(false),
            Accel::Tcg,
            0,
            Path::new("/c"),
            None,
        ));
        assert_eq!(values(&uncapped, "-accel"), ["tcg"], "0: QEMU's default");
    }

    /// A QEMU that never connects the channel is given up on at the build's
    /// deadline (not after a fixed limit), and killed.
    #[tokio::test]
    async fn the_channel_wait_ends_at_the_build_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho $$ > \"$(dirname \"$0\")/pid\"\nexec sleep 60\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let limit = Duration::from_millis(700);
        let spec = VmSpec {
            run_dir: run_dir.clone(),
            serial_log: run_dir.join("serial.log"),
            deadline: std::time::Instant::now() + limit,
            ..spec(false)
        };
        let runner = QemuRunner {
            accel: Accel::Kvm,
            binary: fake,
            tb_size_mib: 0,
        };
        let started = std::time::Instant::now();
        let err = match runner.start(&spec).await {
            Ok(_) => panic!("a QEMU that never connects must not start"),
            Err(e) => e,
        };
        let took = started.elapsed();
        match err {
            VmmError::ChannelTimeout(waited) => assert!(waited >= limit, "{waited:?}"),
            other => panic!("{other}"),
        }
        assert!(
            took >= limit && took < limit + Duration::from_secs(3),
            "{took:?}"
        );
        let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
        let proc = format!("/proc/{}", pid.trim());
        let gone = std::time::Instant::now() + Duration::from_secs(2);
        while Path::new(&proc).exists() && std::time::Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!Path::new(&proc).exists(), "the fake QEMU survived");
    }

    #[test]
    fn a_networked_build_gets_one_virtio_net_device_on_the_helper_socket() {
        let net = |endpoint| {
            Some(crate::vmm::net::NetDevice {
                endpoint,
                mac: "52:54:00:6b:69:6c".into(),
            })
        };
        let by_path = VmSpec {
            net: net(NetEndpoint::Socket("/r/net,1.sock".into())),
            ..spec(false)
        };
        let a = strings(&qemu_args(
            &by_path,
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/r/c.sock"),
            None,
        ));
        assert_eq!(
            values(&a, "-netdev"),
            ["stream,id=net0,server=off,addr.type=unix,addr.path=/r/net,,1.sock"]
        );
        let spec = VmSpec {
            net: net(NetEndpoint::Fd(7)),
            ..spec(false)
        };
        let a = strings(&qemu_args(
            &spec,
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/r/c.sock"),
            None,
        ));
        assert_eq!(
            values(&a, "-netdev"),
            ["stream,id=net0,addr.type=fd,addr.str=7"]
        );
        let devices = values(&a, "-device");
        assert_eq!(
            devices
                .iter()
                .filter(|d| d.starts_with("virtio-net"))
                .collect::<Vec<_>>(),
            ["virtio-net-device,netdev=net0,mac=52:54:00:6b:69:6c"]
        );
    }

    #[test]
    fn serial_channel_and_shares_are_wired_and_there_is_no_network() {
        let a = strings(&qemu_args(
            &spec(false),
            Accel::Tcg,
            TCG_TB_SIZE_MIB,
            Path::new("/r/channel.sock"),
            None,
        ));
        assert_eq!(values(&a, "-serial"), ["file:/r/serial.log"]);
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=agent,path=/r/channel.sock,server=off",
                "socket,id=fs0,path=/r/in.sock,server=off",
                "socket,id=fs1,path=/r/scratch,,odd.sock,server=off",
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-serial-device",
                "virtserialport,chardev=agent,nr=1,name=kiln.channel",
                "vhost-user-fs-device,chardev=fs0,tag=kiln-inputs",
                "vhost-user-fs-device,chardev=fs1,tag=kiln-scratch",
            ]
        );
        assert!(
            !a.iter().any(|x| x.contains("net")),
            "a network option slipped in: {a:?}"
        );
    }
}
