//! A private network for the network tests, so that they contact nothing
//! outside this machine: two network namespaces the test creates, joined
//! by a veth pair, and `kiln serve` started in one of them.
//!
//! ```text
//!  host namespace (kiln, its passt)         inet namespace ("the internet")
//!  lo    127.0.0.1   HTTP                   lo    10.251.1.1       HTTP, DNS (allowed)
//!  veth  10.251.0.1  HTTP   <---------->    veth  10.251.0.2       10.251.1.2 HTTP (private)
//!  default via 10.251.0.2                   lo    169.254.169.254  HTTP (link-local)
//! ```
//!
//! The inet namespace has no route beyond the veth: a packet to any other
//! address dies there. Its DNS server (dnsmasq) knows one name,
//! [`FILES_NAME`], answers NXDOMAIN for every other and forwards nothing.
//! Every address is the same in every lab; the namespaces (and so the
//! addresses) are the lab's own, so labs run side by side.
//!
//! [`NetLab`]'s drop kills what it started (its servers, the kilns it
//! started and whatever runs in its namespaces) and deletes the namespaces;
//! [`NetLab::teardown`] does the same and fails if anything is left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod host;
pub mod kiln_serve;
mod servers;

pub use host::{cmdline, find_binary, lab_unavailable, processes_in, runs_program, unavailable};
use host::{ip, kill, namespace_inode, try_ip};

use super::procs::processes_mentioning;

/// The host side of the veth pair (kiln's namespace).
pub const HOST_VETH: &str = "10.251.0.1";
/// The inet side of the veth pair, the host namespace's default gateway.
pub const INET_VETH: &str = "10.251.0.2";
/// The server kiln is started allowing (`--network-allow 10.251.1.1/32`),
/// also the DNS server (`--network-dns`).
pub const ALLOWED: &str = "10.251.1.1";
/// A server in a private range (10/8) that kiln is not told to allow.
pub const DENIED: &str = "10.251.1.2";
/// The cloud metadata address (link-local).
pub const LINK_LOCAL: &str = "169.254.169.254";
/// The host namespace's loopback, where a server runs too.
pub const LOOPBACK: &str = "127.0.0.1";
/// The port of every HTTP server of the lab.
pub const PORT: u16 = 8080;
/// The one name the lab's DNS knows: it resolves to [`ALLOWED`].
pub const FILES_NAME: &str = "files.kiln.test";
/// A name the lab's DNS answers NXDOMAIN for.
pub const UNKNOWN_NAME: &str = "nowhere.kiln.test";

/// Where the lab's servers are: (namespace is inet, address).
const SERVERS: &[(bool, &str)] = &[
    (true, ALLOWED),
    (true, DENIED),
    (true, LINK_LOCAL),
    (false, LOOPBACK),
    (false, HOST_VETH),
];

/// How long a server or kiln may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(60);

/// `http://ADDR:PORT/file`: the file the server on `addr` serves.
pub fn url(addr: &str) -> String {
    format!("http://{addr}:{PORT}/file")
}

/// One server the lab started.
struct Server {
    what: String,
    child: Child,
    log: PathBuf,
}

/// Two namespaces, their veth pair, the HTTP servers and the DNS server;
/// see the module docs for the addresses.
pub struct NetLab {
    /// The namespace kiln runs in.
    pub host: String,
    /// The namespace standing for the internet.
    pub inet: String,
    /// The namespaces' identities, kept to find processes in them also
    /// after they were deleted.
    inodes: Vec<u64>,
    created: Vec<String>,
    servers: Vec<Server>,
    kilns: AtomicUsize,
    dir: tempfile::TempDir,
}

impl NetLab {
    /// Builds the lab and starts its servers; panics naming the step that
    /// failed (after undoing what it did).
    pub fn new() -> NetLab {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "kiln-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = NetLab {
            host: format!("{tag}-host"),
            inet: format!("{tag}-inet"),
            inodes: Vec::new(),
            created: Vec::new(),
            servers: Vec::new(),
            kilns: AtomicUsize::new(0),
            dir: tempfile::tempdir().unwrap(),
        };
        for ns in [lab.host.clone(), lab.inet.clone()] {
            ip(&["netns", "add", &ns]);
            lab.inodes.push(namespace_inode(&ns));
            lab.created.push(ns);
        }
        lab.wire();
        for (inet, addr) in SERVERS {
            lab.start_http(*inet, addr);
        }
        lab.start_dns();
        lab
    }

    /// The veth pair, the addresses and the routes.
    fn wire(&self) {
        let (h, i) = (self.host.as_str(), self.inet.as_str());
        ip(&["-n", h, "link", "set", "lo", "up"]);
        ip(&["-n", i, "link", "set", "lo", "up"]);
        // Created inside the namespaces, so the interface names never
        // meet another lab's in the root namespace.
        ip(&[
            "-n",
            h,
            "link",
            "add",
            "veth-host",
            "type",
            "veth",
            "peer",
            "name",
            "veth-inet",
            "netns",
            i,
        ]);
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{HOST_VETH}/30"),
            "dev",
            "veth-host",
        ]);
        ip(&[
            "-n",
            i,
            "addr",
            "add",
            &format!("{INET_VETH}/30"),
            "dev",
            "veth-inet",
        ]);
        ip(&["-n", h, "link", "set", "veth-host", "up"]);
        ip(&["-n", i, "link", "set", "veth-inet", "up"]);
        ip(&["-n", h, "route", "add", "default", "via", INET_VETH]);
        // The way back, on-link; no default route: nothing goes further.
        ip(&[
            "-n",
            i,
            "route",
            "replace",
            "10.251.0.0/30",
            "dev",
            "veth-inet",
        ]);
        for addr in [ALLOWED, DENIED, LINK_LOCAL] {
            ip(&["-n", i, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
    }

    /// The bytes the server on `addr` serves as `/file`: naming the server
    /// and the lab, and long enough that a cut-off transfer shows.
    pub fn file(&self, addr: &str) -> Vec<u8> {
        let mut text = format!("served by {addr} in {}\n", self.inet);
        for i in 0..512 {
            text.push_str(&format!("line {i} of the file on {addr}\n"));
        }
        text.into_bytes()
    }

    /// `ip netns exec NS ARGV…`, not started yet.
    pub fn netns_exec(&self, ns: &str, argv: &[impl AsRef<std::ffi::OsStr>]) -> Command {
        let mut command = Command::new(find_binary("ip").expect("ip (iproute2)"));
        command.args(["netns", "exec", ns]).args(argv);
        command
    }

    /// Runs the busybox applet `args` in the namespace `ns`, killed after
    /// `secs` seconds (busybox's `timeout`).
    pub fn busybox(&self, ns: &str, secs: u32, args: &[&str]) -> Output {
        let busybox = kiln::guest_image::DEFAULT_BUSYBOX;
        let secs = secs.to_string();
        let mut argv = vec![busybox, "timeout", &secs, busybox];
        argv.extend_from_slice(args);
        self.netns_exec(ns, &argv).output().unwrap()
    }

    /// Fetches `url` with busybox wget from the host namespace, for at
    /// most 10 s (`timeout`: this busybox's `wget -T` crashes it).
    pub fn fetch_from_host(&self, url: &str) -> Result<Vec<u8>, String> {
        let out = self.busybox(&self.host, 10, &["wget", "-q", "-O", "-", url]);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// How many times the HTTP server on `addr` served a request.
    pub fn hits(&self, addr: &str) -> usize {
        read(&self.log_of(&format!("http-{addr}")))
            .matches("\"GET ")
            .count()
    }

    /// What the DNS server logged (every query, with where it came from).
    pub fn dns_log(&self) -> String {
        read(&self.log_of("dns"))
    }

    fn log_of(&self, what: &str) -> PathBuf {
        self.servers
            .iter()
            .find(|s| s.what == what)
            .map(|s| s.log.clone())
            .unwrap_or_else(|| panic!("the lab has no server {what}"))
    }

    /// `kiln serve` in the host namespace, allowed to reach [`ALLOWED`] and
    /// forwarding DNS to it, with `extra` arguments.
    pub fn start_kiln(&self, extra: &[&str]) -> kiln_serve::Kiln<'_> {
        let mut args = vec!["--network-allow", "10.251.1.1/32", "--network-dns", ALLOWED];
        args.extend_from_slice(extra);
        self.start_kiln_plain(&args)
    }

    /// `kiln serve` in the host namespace with only `args` besides its
    /// socket and data directory.
    pub fn start_kiln_plain(&self, args: &[&str]) -> kiln_serve::Kiln<'_> {
        let n = self.kilns.fetch_add(1, Ordering::Relaxed);
        kiln_serve::Kiln::start(self, &self.dir.path().join(format!("kiln-{n}")), args)
    }

    /// The identity of the host namespace (see [`processes_in`]).
    pub fn host_inode(&self) -> u64 {
        self.inodes[0]
    }

    /// `passt` processes in the host namespace.
    pub fn passt_processes(&self) -> Vec<i32> {
        processes_in(self.host_inode())
            .into_iter()
            .filter(|pid| runs_program(*pid, "passt"))
            .collect()
    }

    /// Packets that tried to leave the lab, as `(counter, count)`: the
    /// inet namespace has no route beyond the lab and does not forward, so
    /// a packet for an address outside it is dropped there
    /// (`InAddrErrors`: it came over the veth; `OutNoRoutes`: its own) or
    /// already in the host namespace (`OutNoRoutes`).
    pub fn escaped_packets(&self) -> Vec<(String, u64)> {
        let mut found = Vec::new();
        for (inet, counters) in [
            (false, &["OutNoRoutes"][..]),
            (true, &["InAddrErrors", "OutNoRoutes"]),
        ] {
            let ns = if inet { &self.inet } else { &self.host };
            // Any process in the namespace shows its counters: a server's.
            let pid = processes_in(self.inodes[usize::from(inet)])
                .into_iter()
                .find(|pid| self.servers.iter().any(|s| s.child.id() as i32 == *pid))
                .unwrap_or_else(|| panic!("no server of the lab left in {ns}"));
            let snmp = read(Path::new(&format!("/proc/{pid}/net/snmp")));
            let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
            let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                if counters.contains(&name) && value != "0" {
                    found.push((format!("{ns} {name}"), value.parse().unwrap_or(u64::MAX)));
                }
            }
        }
        found
    }

    /// Kills everything the lab started and everything in its namespaces,
    /// and deletes them; returns what could not be removed.
    fn clean_up(&mut self) -> Vec<String> {
        for mut server in std::mem::take(&mut self.servers) {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        // What kiln started (passt, QEMU, virtiofsd) runs in the host
        // namespace or names a path under the lab's directory.
        let strays = || {
            let mut pids: Vec<i32> = self.inodes.iter().flat_map(|i| processes_in(*i)).collect();
            pids.extend(processes_mentioning(
                self.dir.path().as_os_str().as_encoded_bytes(),
            ));
            pids.sort_unstable();
            pids.dedup();
            pids
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !strays().is_empty() && Instant::now() < deadline {
            strays().into_iter().for_each(kill);
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut left: Vec<String> = strays()
            .into_iter()
            .map(|pid| format!("process {pid}: {}", cmdline(pid)))
            .collect();
        for ns in std::mem::take(&mut self.created) {
            if let Err(e) = try_ip(&["netns", "delete", &ns]) {
                left.push(e);
            }
        }
        match try_ip(&["netns", "list"]) {
            Ok(out) => {
                let listed = String::from_utf8_lossy(&out.stdout);
                for ns in [&self.host, &self.inet] {
                    if listed
                        .lines()
                        .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
                    {
                        left.push(format!("namespace {ns} is still listed"));
                    }
                }
            }
            Err(e) => left.push(e),
        }
        left
    }

    /// Removes the lab and fails naming whatever is left: a namespace
    /// still listed, a process in either namespace (a passt, say) or
    /// naming the lab's directory; or when a packet tried to leave the lab
    /// (see [`NetLab::escaped_packets`]).
    pub fn teardown(mut self) {
        let escaped = self.escaped_packets();
        let left = self.clean_up();
        assert!(left.is_empty(), "the lab left behind: {left:#?}");
        assert!(
            escaped.is_empty(),
            "packets tried to leave the lab (for an address outside it): {escaped:?}"
        );
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        if !self.created.is_empty() || !self.servers.is_empty() {
            let left = self.clean_up();
            if !left.is_empty() {
                eprintln!("warning: network lab {} left behind: {left:?}", self.host);
            }
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
