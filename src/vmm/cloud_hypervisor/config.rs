//! The `vm.create` request: a [`VmSpec`] turned into cloud-hypervisor's
//! `VmConfig`, by pure code so every field can be checked in unit tests.
//!
//! Every device that matters is set explicitly rather than left to
//! cloud-hypervisor's defaults, because several defaults are wrong for a build
//! VM: `cpus.nested` defaults to on, `memory.shared` to off (virtiofs needs
//! shared memory), the serial port to `Null` (the guest has a serial port
//! whose output goes nowhere, so kernel messages would be lost) and the
//! console to `Tty`.
//!
//! The guest channel is the virtio console (`hvc0`) in `Tty` mode, i.e. the
//! VMM's stdout. cloud-hypervisor has a `Socket` mode for the serial port only:
//! asking for it on the console fails already at `vm.create` (which sets up
//! the console devices) with "No socket option support for console device".
//! Its stdout is a pipe we own, which gives the same reliable byte stream,
//! ending when the VMM exits.

use std::path::Path;

use cloud_hypervisor_client::models::{
    ConsoleConfig, ConsoleMode, CpusConfig, FsConfig, MemoryConfig, NetConfig, PayloadConfig,
    SerialConfig, VmConfig,
};

use crate::vmm::net::NetEndpoint;
use crate::vmm::VmSpec;

/// virtqueues per virtiofs device; virtiofsd serves one request queue.
pub const FS_NUM_QUEUES: i32 = 1;
/// Descriptors per virtiofs queue (cloud-hypervisor's own default).
pub const FS_QUEUE_SIZE: i32 = 1024;

/// virtqueues of the network device: one receive, one transmit.
pub const NET_NUM_QUEUES: i32 = 2;
/// Descriptors per network queue (cloud-hypervisor's own default).
pub const NET_QUEUE_SIZE: i32 = 256;

const MIB: i64 = 1024 * 1024;

/// A [`VmSpec`] that cannot be expressed as a cloud-hypervisor `VmConfig`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The API carries paths as JSON strings, so they must be UTF-8.
    #[error(
        "{field} path {path:?} is not valid UTF-8, which cloud-hypervisor's JSON API cannot carry"
    )]
    NonUtf8Path {
        /// Which field of the spec holds the path.
        field: &'static str,
        /// The path, lossily rendered.
        path: String,
    },
    /// The API's integer fields are signed 32/64-bit.
    #[error("{field} = {value} is out of range for cloud-hypervisor (at most {max})")]
    OutOfRange {
        /// Which field of the spec is too large.
        field: &'static str,
        /// The requested value.
        value: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// cloud-hypervisor reaches its network device by vhost-user socket.
    #[error("cloud-hypervisor takes a network device as a vhost-user socket, not an inherited descriptor")]
    NetEndpoint,
    /// A VM needs at least one vCPU and some memory.
    #[error("{field} must be at least 1")]
    Zero {
        /// Which field of the spec is zero.
        field: &'static str,
    },
}

/// Builds the `vm.create` body for `spec`.
///
/// Payload: `kernel`, `initramfs`, `cmdline` (no firmware: the kernel is a PVH
/// `vmlinux`). CPUs: `boot_vcpus = max_vcpus = spec.vcpus`, `nested` exactly
/// `spec.nested_virt`. Memory: `spec.memory_mib` MiB, `shared = true`. One `fs`
/// device per share, in order. Serial: `File` at `spec.serial_log`. Console:
/// `Tty` (the VMM's stdout, see the module docs). No disks; a network
/// device only for a networked build: vhost-user on the NAT helper's
/// socket (passt `--vhost-user`), cloud-hypervisor connecting as client.
pub fn vm_config(spec: &VmSpec) -> Result<VmConfig, ConfigError> {
    let payload = PayloadConfig {
        kernel: Some(utf8("kernel", &spec.kernel)?),
        initramfs: Some(utf8("initramfs", &spec.initramfs)?),
        cmdline: Some(spec.cmdline.clone()),
        ..PayloadConfig::new()
    };

    let vcpus = vcpus(spec.vcpus)?;
    let cpus = CpusConfig {
        nested: Some(spec.nested_virt),
        ..CpusConfig::new(vcpus, vcpus)
    };

    let memory = MemoryConfig {
        shared: Some(true),
        ..MemoryConfig::new(memory_bytes(spec.memory_mib)?)
    };

    let fs = spec
        .shares
        .iter()
        .map(|share| {
            Ok(FsConfig::new(
                share.tag.clone(),
                utf8("share socket", &share.socket)?,
                FS_NUM_QUEUES,
                FS_QUEUE_SIZE,
            ))
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    let net = spec
        .net
        .as_ref()
        .map(|device| {
            let NetEndpoint::Socket(socket) = &device.endpoint else {
                return Err(ConfigError::NetEndpoint);
            };
            Ok(vec![NetConfig {
                vhost_user: Some(true),
                vhost_socket: Some(utf8("net socket", socket)?),
                vhost_mode: Some("client".into()),
                mac: Some(device.mac.clone()),
                num_queues: Some(NET_NUM_QUEUES),
                queue_size: Some(NET_QUEUE_SIZE),
                ..NetConfig::new()
            }])
        })
        .transpose()?;

    let serial = SerialConfig {
        file: Some(utf8("serial_log", &spec.serial_log)?),
        ..SerialConfig::new(ConsoleMode::File)
    };

    Ok(VmConfig {
        cpus: Some(cpus),
        memory: Some(memory),
        fs: (!fs.is_empty()).then_some(fs),
        net,
        serial: Some(serial),
        console: Some(ConsoleConfig::new(ConsoleMode::Tty)),
        ..VmConfig::new(payload)
    })
}

fn utf8(field: &'static str, path: &Path) -> Result<String, ConfigError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| ConfigError::NonUtf8Path {
            field,
            path: path.to_string_lossy().into_owned(),
        })
}

fn vcpus(n: u32) -> Result<i32, ConfigError> {
    if n == 0 {
        return Err(ConfigError::Zero { field: "vcpus" });
    }
    // Up to v47 cloud-hypervisor kept vCPU counts in a u8 (at most 255);
    // v48 made them u32, with a limit of 8192 on KVM/x86_64 and still 255
    // elsewhere. 255 is what every version takes: refuse more here with a
    // clear message instead of an opaque API error.
    const MAX_VCPUS: u32 = u8::MAX as u32;
    if n > MAX_VCPUS {
        return Err(ConfigError::OutOfRange {
            field: "vcpus",
            value: n.into(),
            max: MAX_VCPUS.into(),
        });
    }
    i32::try_from(n).map_err(|_| ConfigError::OutOfRange {
        field: "vcpus",
        value: n.into(),
        max: MAX_VCPUS.into(),
    })
}

fn memory_bytes(mib: u64) -> Result<i64, ConfigError> {
    if mib == 0 {
        return Err(ConfigError::Zero {
            field: "memory_mib",
        });
    }
    let max = (i64::MAX / MIB) as u64;
    i64::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB))
        .ok_or(ConfigError::OutOfRange {
            field: "memory_mib",
            value: mib,
            max,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::*;
    use crate::vmm::FsShare;

    fn spec() -> VmSpec {
        VmSpec {
            id: "b1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/run/b1/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            memory_mib: 1536,
            vcpus: 2,
            nested_virt: false,
            shares: vec![
                FsShare {
                    tag: "kiln-inputs".into(),
                    socket: "/run/b1/in.sock".into(),
                    source: std::path::PathBuf::new(),
                },
                FsShare {
                    tag: "kiln-scratch".into(),
                    socket: "/run/b1/scratch.sock".into(),
                    source: std::path::PathBuf::new(),
                },
            ],
            net: None,
            run_dir: "/run/b1".into(),
            serial_log: "/run/b1/serial.log".into(),
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(600),
        }
    }

    #[test]
    fn payload_is_kernel_initramfs_cmdline_and_nothing_else() {
        let c = vm_config(&spec()).unwrap();
        assert_eq!(c.payload.kernel.as_deref(), Some("/k/vmlinux"));
        assert_eq!(c.payload.initramfs.as_deref(), Some("/run/b1/initrd"));
        assert_eq!(c.payload.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(c.payload.firmware, None);
        assert_eq!(c.payload.igvm, None);
        assert_eq!(c.payload.host_data, None);
    }

    #[test]
    fn cpus_fixed_count_and_nested_off_unless_asked() {
        let c = vm_config(&spec()).unwrap();
        let cpus = c.cpus.unwrap();
        assert_eq!(cpus.boot_vcpus, 2);
        assert_eq!(cpus.max_vcpus, 2);
        // Explicit false, not None: cloud-hypervisor's default is nested on.
        assert_eq!(cpus.nested, Some(false));

        let nested = vm_config(&VmSpec {
            nested_virt: true,
            ..spec()
        })
        .unwrap();
        assert_eq!(nested.cpus.unwrap().nested, Some(true));
    }

    #[test]
    fn memory_in_bytes_and_shared_for_virtiofs() {
        let c = vm_config(&spec()).unwrap();
        let mem = c.memory.unwrap();
        assert_eq!(mem.size, 1536 * 1024 * 1024);
        assert_eq!(mem.shared, Some(true));
        assert_eq!(mem.hotplug_size, None);
        assert_eq!(mem.hugepages, None);
    }

    #[test]
    fn one_fs_device_per_share_in_order() {
        let c = vm_config(&spec()).unwrap();
        let fs = c.fs.unwrap();
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].tag, "kiln-inputs");
        assert_eq!(fs[0].socket, "/run/b1/in.sock");
        assert_eq!(fs[1].tag, "kiln-scratch");
        assert_eq!(fs[1].socket, "/run/b1/scratch.sock");
        for dev in &fs {
            assert_eq!(dev.num_queues, FS_NUM_QUEUES);
            assert_eq!(dev.queue_size, FS_QUEUE_SIZE);
        }

        let none = vm_config(&VmSpec {
            shares: vec![],
            ..spec()
        })
        .unwrap();
        assert_eq!(none.fs, None);
    }

    #[test]
    fn serial_to_file_and_console_to_stdout() {
        let c = vm_config(&spec()).unwrap();
        let serial = c.serial.unwrap();
        assert_eq!(serial.mode, ConsoleMode::File);
        assert_eq!(serial.file.as_deref(), Some("/run/b1/serial.log"));
        assert_eq!(serial.socket, None);
        let console = c.console.unwrap();
        assert_eq!(console.mode, ConsoleMode::Tty);
        assert_eq!(console.file, None);
        assert_eq!(console.socket, None);
    }

    #[test]
    fn no_network_no_disks_no_other_devices() {
        let c = vm_config(&spec()).unwrap();
        assert_eq!(c.net, None);
        assert_eq!(c.disks, None);
        assert_eq!(c.pmem, None);
        assert_eq!(c.vsock, None);
        assert_eq!(c.devices, None);
        assert_eq!(c.user_devices, None);
        assert_eq!(c.vdpa, None);
        assert_eq!(c.generic_vhost_user, None);
        assert_eq!(c.balloon, None);
    }

    #[test]
    fn a_networked_build_gets_one_vhost_user_net_device() {
        let spec = VmSpec {
            net: Some(crate::vmm::net::NetDevice {
                endpoint: NetEndpoint::Socket("/run/b1/net.sock".into()),
                mac: "52:54:00:6b:69:6c".into(),
            }),
            ..spec()
        };
        let json = serde_json::to_value(vm_config(&spec).unwrap()).unwrap();
        let net = json["net"].as_array().unwrap();
        assert_eq!(net.len(), 1, "{json}");
        assert_eq!(net[0]["vhost_user"], true);
        assert_eq!(net[0]["vhost_socket"], "/run/b1/net.sock");
        assert_eq!(net[0]["vhost_mode"], "client");
        assert_eq!(net[0]["mac"], "52:54:00:6b:69:6c");
        assert_eq!(net[0]["num_queues"], NET_NUM_QUEUES);
        assert!(net[0].get("tap").is_none(), "{json}");
    }

    #[test]
    fn json_on_the_wire_names_the_fields_cloud_hypervisor_reads() {
        let json = serde_json::to_value(vm_config(&spec()).unwrap()).unwrap();
        assert_eq!(json["cpus"]["nested"], false);
        assert_eq!(json["memory"]["shared"], true);
        assert_eq!(json["console"]["mode"], "Tty");
        assert_eq!(json["serial"]["mode"], "File");
        assert_eq!(json["fs"][1]["tag"], "kiln-scratch");
        assert!(json.get("net").is_none(), "no net key at all: {json}");
        assert!(json.get("disks").is_none(), "no disks key at all: {json}");
    }

    #[test]
    fn non_utf8_path_is_refused_naming_the_field() {
        let bad = PathBuf::from(OsStr::from_bytes(b"/run/\xff/initrd"));
        let err = vm_config(&VmSpec {
            initramfs: bad,
            ..spec()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::NonUtf8Path {
                field: "initramfs",
                ..
            }
        ));
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let zero_cpus = vm_config(&VmSpec { vcpus: 0, ..spec() }).unwrap_err();
        assert_eq!(zero_cpus, ConfigError::Zero { field: "vcpus" });
        let many = vm_config(&VmSpec {
            vcpus: 100_000,
            ..spec()
        })
        .unwrap_err();
        assert!(matches!(
            many,
            ConfigError::OutOfRange { field: "vcpus", .. }
        ));
        let zero_mem = vm_config(&VmSpec {
            memory_mib: 0,
            ..spec()
        })
        .unwrap_err();
        assert_eq!(
            zero_mem,
            ConfigError::Zero {
                field: "memory_mib"
            }
        );
        let huge = vm_config(&VmSpec {
            memory_mib: u64::MAX,
            ..spec()
        })
        .unwrap_err();
        assert!(matches!(
            huge,
            ConfigError::OutOfRange {
                field: "memory_mib",
                ..
            }
        ));
    }
}
