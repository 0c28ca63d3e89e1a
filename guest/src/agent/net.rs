//! The sandbox's network: `lo` always; `eth0` only for a build that asked
//! for network, whose VM then has exactly one virtio-net device, wired to
//! the host's NAT helper. The interface is configured from the job (fixed
//! address, prefix, default route) with the classic ioctls, before the
//! builder starts; the resolver and `/etc` files are the sandbox's
//! ([`super::sandbox`]).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_guest::contract::GuestNetwork;

/// The one network device of a networked build's VM.
pub const INTERFACE: &str = "eth0";

/// How long the virtio-net device may take to appear after its module
/// loaded.
const APPEAR_LIMIT: Duration = Duration::from_secs(10);

/// Brings `lo` up.
pub fn loopback_up() -> io::Result<()> {
    let sock = inet_socket()?;
    set_up(&sock, "lo")
}

/// Configures [`INTERFACE`] from `net`: address and prefix, up, default
/// route through the gateway.
pub fn configure(net: &GuestNetwork) -> io::Result<()> {
    let address = parse(&net.address, "address")?;
    let gateway = parse(&net.gateway, "gateway")?;
    if net.prefix > 32 {
        return Err(io::Error::other(format!(
            "prefix /{} is over 32",
            net.prefix
        )));
    }
    wait_for_device()?;
    let sock = inet_socket()?;
    let mask = if net.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(net.prefix))
    };
    let mut req = ifreq(INTERFACE);
    req.ifr_ifru.ifru_addr = sockaddr(address);
    // SAFETY: SIOCSIFADDR reads `req` (name and address), which lives for
    // the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) };
    check(rc, "setting the address")?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    // SAFETY: as above, for the netmask.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) };
    check(rc, "setting the netmask")?;
    set_up(&sock, INTERFACE)?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads `route` (rt_dev is null: any interface that
    // reaches the gateway), which lives for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) };
    check(rc, "adding the default route")
}

/// Waits, bounded, for the kernel to register the device.
fn wait_for_device() -> io::Result<()> {
    let path = Path::new("/sys/class/net").join(INTERFACE);
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > APPEAR_LIMIT {
            return Err(io::Error::other(format!(
                "{INTERFACE} did not appear within {APPEAR_LIMIT:?} (is virtio_net loaded?)"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn parse(text: &str, what: &str) -> io::Result<Ipv4Addr> {
    text.parse()
        .map_err(|_| io::Error::other(format!("{what} {text:?} is not an IPv4 address")))
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `IFF_UP` on `name` (`SIOCGIFFLAGS`, then `SIOCSIFFLAGS`).
fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into `req`,
    // which lives for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(rc, "reading the flags")?;
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check(rc, "bringing it up")
}

/// An `ifreq` naming `name` (shorter than `IFNAMSIZ`, as every name here).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

/// `addr` as a generic `sockaddr` holding a `sockaddr_in`.
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain old data;
    // the kernel reads a sockaddr_in wherever the family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("{INTERFACE}: {what}: {e}"),
        ));
    }
    Ok(())
}
