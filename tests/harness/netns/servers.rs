//! Starting the lab's servers: an HTTP server per address, the DNS
//! server, each waited for until it listens.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{find_binary, processes_in, read, runs_program, NetLab, Server};
use super::{ALLOWED, FILES_NAME, PORT, START_LIMIT};

/// Python's `http.server` serving the directory `argv[3]` on `argv[1]`,
/// port `argv[2]`; but where `python3 -m http.server` looks its own address
/// up (`socket.getfqdn`, a DNS query to this machine's resolver, outside the
/// lab), this server does not.
const HTTP_SERVER: &str = "\
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
";

impl NetLab {
    pub(super) fn start_http(&mut self, inet: bool, addr: &str) {
        let root = self.dir.path().join(format!("www-{addr}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("file"), self.file(addr)).unwrap();
        let python = find_binary("python3").expect("python3");
        let mut argv = vec![python.into_os_string()];
        argv.extend(["-u", "-c", HTTP_SERVER, addr, &PORT.to_string()].map(Into::into));
        argv.push(root.into_os_string());
        self.start_server(inet, &format!("http-{addr}"), argv, addr, "tcp");
    }

    pub(super) fn start_dns(&mut self) {
        let dnsmasq = find_binary("dnsmasq").expect("dnsmasq");
        let mut argv = vec![dnsmasq.into_os_string()];
        argv.extend(
            [
                "--no-daemon",
                // No /etc/dnsmasq.conf or its conf-dir: nothing can add an upstream.
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                &format!("--listen-address={ALLOWED}"),
                "--bind-interfaces",
                // A record, so that its AAAA is NODATA; with `--address`
                // the AAAA would be NXDOMAIN, and nslookup fail.
                &format!("--host-record={FILES_NAME},{ALLOWED}"),
                // Every other name is local, hence NXDOMAIN; without it
                // dnsmasq, which has no upstream, answers REFUSED.
                "--local=/#/",
                // Which queries arrived, for the tests and their failures.
                "--log-queries",
            ]
            .map(Into::into),
        );
        self.start_server(true, "dns", argv, ALLOWED, "udp");
    }

    /// Starts `argv` in a namespace and waits until it listens on
    /// `addr`:53 (udp) or `addr`:[`PORT`] (tcp).
    fn start_server(
        &mut self,
        inet: bool,
        what: &str,
        argv: Vec<std::ffi::OsString>,
        addr: &str,
        proto: &str,
    ) {
        let ns = if inet { &self.inet } else { &self.host };
        let log = self.dir.path().join(format!("{what}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .netns_exec(ns, &argv)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what} in {ns}: {e}"));
        let pid = child.id() as i32;
        let inode = self.inodes[usize::from(inet)];
        let program = Path::new(&argv[0])
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        self.servers.push(Server {
            what: what.into(),
            child,
            log: log.clone(),
        });
        let port = if proto == "udp" { 53 } else { PORT };
        let ip: std::net::Ipv4Addr = addr.parse().unwrap();
        // /proc/net/tcp prints the address as the raw (network order) u32
        // in hex, read on this little-endian host.
        let local = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let server = self.servers.last_mut().unwrap();
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("{what} exited ({status}):\n{}", read(&log));
            }
            // Only once `ip netns exec` has entered the namespace and
            // exec'd the server: before, /proc/PID/net is the root's.
            let entered = processes_in(inode).contains(&pid) && runs_program(pid, &program);
            let sockets =
                std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")).unwrap_or_default();
            if entered
                && sockets
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(&local))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not listen on {addr}:{port} within {START_LIMIT:?}:\n{}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
