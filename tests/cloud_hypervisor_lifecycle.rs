//! Orchestration of the cloud-hypervisor backend against a fake VMM.
//!
//! The fake is a small Python program that speaks just enough of
//! cloud-hypervisor's REST API on the `--api-socket` it is given (or
//! misbehaves on purpose). It proves the runner's lifecycle — spawn, wait for
//! the API, `vm.create`/`vm.boot`, channel, wait, kill, reaping — and never
//! that a real VM boots: that is `cloud_hypervisor_e2e.rs`'s job.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

/// `SKIPPED: …` straight to stderr, past libtest's capture, so `make test`
/// shows it.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {}", format_args!($($arg)*));
    }};
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloud_hypervisor_client::models::VmConfig;
use kiln::vmm::cloud_hypervisor::{
    vm_config, CloudHypervisorRunner, API_SOCKET, EVENTS_FIFO, VMM_LOG,
};
use kiln::vmm::{FsShare, VmExit, VmRunner, VmSpec, VmmError};
use tokio::io::AsyncReadExt;

/// The fake VMM. `MODE` is substituted per test:
/// - `silent`: never opens the API socket;
/// - `die`: complains on stderr and exits 3;
/// - `boot`: serves the API; after `vm.boot` writes a line on stdout (the
///   console) and exits 0 shortly after, like a guest powering off;
/// - `reject`: answers `vm.create` with HTTP 400;
/// - `hang`: never answers `vm.boot` (but, unlike cloud-hypervisor, would
///   answer a `vmm.shutdown` sent meanwhile);
/// - `slow`: answers `vm.boot` after 2.5 s, then behaves like `boot`;
/// - `polite`: boots and stays up until `vmm.shutdown`, then exits 0;
/// - `stubborn`: boots and ignores `vmm.shutdown`;
/// - `reboot`: boots, writes a kernel panic on the serial console, then
///   reports a guest reboot on the event monitor and carries on (as
///   cloud-hypervisor would, rebooting the guest).
const FAKE: &str = r#"
import http.server, json, os, socketserver, sys, threading, time
MODE = "@MODE@"
args = sys.argv[1:]
opts = dict(zip(args[0::2], args[1::2]))
sock = opts["--api-socket"][len("path="):]
run = os.path.dirname(sock)
events = open(opts["--event-monitor"][len("path="):], "w") if "--event-monitor" in opts else None
def event(source, name):
    if events:
        events.write(json.dumps({"timestamp": {"secs": 0, "nanos": 0}, "source": source,
                                 "event": name, "properties": None}, indent=2) + "\n")
        events.flush()
event("vmm", "starting")
with open(os.path.join(run, "fake.pid"), "w") as f: f.write(str(os.getpid()))
with open(os.path.join(run, "fake.argv"), "w") as f: json.dump(args, f)
if MODE == "silent":
    time.sleep(3600)
if MODE == "die":
    sys.stderr.write("fake: cannot open /dev/kvm\n"); sys.exit(3)

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body); self.wfile.flush()
    def do_GET(self):
        if self.path == "/api/v1/vmm.ping": self.reply(200, b'{"version":"fake"}')
        else: self.reply(404)
    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        name = self.path.rsplit("/", 1)[-1]
        with open(os.path.join(run, "calls"), "a") as f: f.write(name + "\n")
        if name == "vm.create":
            with open(os.path.join(run, "vm.create.json"), "wb") as f: f.write(body)
            if MODE == "reject": return self.reply(400, b"fake: bad config")
            return self.reply(204)
        if name == "vm.boot":
            if MODE == "hang": time.sleep(3600)
            if MODE == "slow": time.sleep(2.5)
            self.reply(204)
            sys.stdout.buffer.write(b"hello from the guest\n"); sys.stdout.flush()
            event("vm", "booted")
            if MODE in ("boot", "slow"): threading.Timer(0.2, lambda: os._exit(0)).start()
            if MODE == "reboot":
                serial = json.load(open(os.path.join(run, "vm.create.json")))["serial"]["file"]
                with open(serial, "a") as f:
                    f.write("[    2.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n"
                            "[    2.5] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n")
                threading.Timer(0.2, lambda: event("vm", "rebooting")).start()
            return
        if name == "vmm.shutdown":
            self.reply(204)
            if MODE != "stubborn": os._exit(0)
            return
        self.reply(404)

class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(sock, H).serve_forever()
"#;

/// The real interpreter behind `python3` (not a shim), or why there is none.
fn python() -> Result<String, String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .map_err(|e| format!("python3 cannot be run: {e}"))?;
    if !out.status.success() {
        return Err("python3 failed".into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Fixture {
    _dir: tempfile::TempDir,
    run_dir: PathBuf,
    runner: CloudHypervisorRunner,
}

/// A temp dir holding the fake in `mode` and a run dir; `None` (after a loud
/// skip message) when Python is missing.
fn fixture(mode: &str) -> Option<Fixture> {
    let python = match python() {
        Ok(p) => p,
        Err(why) => {
            skip!("cloud-hypervisor lifecycle test, because {why} (the fake VMM is Python)");
            return None;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("cloud-hypervisor");
    let script = format!("#!{python}\n{}", FAKE.replace("@MODE@", mode));
    std::fs::write(&fake, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let mut runner = CloudHypervisorRunner::new(&fake);
    runner.shutdown_grace = Duration::from_millis(300);
    Some(Fixture {
        _dir: dir,
        run_dir,
        runner,
    })
}

fn spec(run_dir: &Path) -> VmSpec {
    VmSpec {
        id: "test-build".into(),
        kernel: "/nonexistent/vmlinux".into(),
        initramfs: run_dir.join("initramfs"),
        cmdline: "console=ttyS0".into(),
        memory_mib: 512,
        vcpus: 1,
        nested_virt: false,
        shares: vec![FsShare {
            tag: "kiln-inputs".into(),
            socket: run_dir.join("inputs.sock"),
            source: std::path::PathBuf::new(),
        }],
        net: None,
        run_dir: run_dir.to_owned(),
        serial_log: run_dir.join("serial.log"),
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

/// [`spec`] with the build's deadline `in_` from now.
fn spec_due(run_dir: &Path, in_: Duration) -> VmSpec {
    VmSpec {
        deadline: Instant::now() + in_,
        ..spec(run_dir)
    }
}

/// PID the fake wrote at start-up.
fn fake_pid(run_dir: &Path) -> u32 {
    std::fs::read_to_string(run_dir.join("fake.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// True once the process is gone and reaped (no /proc entry, not a zombie).
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn calls(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn boots_over_the_api_streams_the_console_and_exits_with_the_guest() {
    let Some(fx) = fixture("boot") else { return };
    let spec = spec(&fx.run_dir);
    let mut vm = fx.runner.start(&spec).await.expect("start");

    let argv: Vec<String> =
        serde_json::from_slice(&std::fs::read(fx.run_dir.join("fake.argv")).unwrap()).unwrap();
    let socket = fx.run_dir.join(API_SOCKET);
    let fifo = fx.run_dir.join(EVENTS_FIFO);
    assert_eq!(
        argv,
        vec![
            "--api-socket".to_owned(),
            format!("path={}", socket.display()),
            "--event-monitor".to_owned(),
            format!("path={}", fifo.display()),
            // Info level, so the VMM's log says something when a boot fails.
            "-v".to_owned(),
        ]
    );
    assert_eq!(calls(&fx.run_dir), vec!["vm.create", "vm.boot"]);
    // What went over the wire is exactly the pure function's output.
    let sent: VmConfig =
        serde_json::from_slice(&std::fs::read(fx.run_dir.join("vm.create.json")).unwrap()).unwrap();
    assert_eq!(sent, vm_config(&spec).unwrap());

    let mut channel = vm.take_channel().await.expect("channel");
    assert!(matches!(vm.take_channel().await, Err(VmmError::Channel(_))));
    let mut console = String::new();
    channel.reader.read_to_string(&mut console).await.unwrap();
    assert_eq!(console, "hello from the guest\n");

    let exit = vm.wait().await.expect("wait");
    assert_eq!(
        exit,
        VmExit::Exited {
            code: Some(0),
            signal: None
        }
    );
    // kill after exit is a no-op and wait stays answerable.
    vm.kill().await;
    assert_eq!(vm.wait().await.unwrap(), exit);
    assert!(gone(vm.pid().unwrap()));
}

#[tokio::test]
async fn a_vmm_that_never_opens_its_socket_is_given_up_at_the_deadline_and_reaped() {
    let Some(mut fx) = fixture("silent") else {
        return;
    };
    // A polite stop would take this long; the API never answered, so the
    // VMM must be killed at once instead.
    fx.runner.shutdown_grace = Duration::from_secs(30);
    let started = Instant::now();
    let limit = Duration::from_millis(1500);
    let err = match fx.runner.start(&spec_due(&fx.run_dir, limit)).await {
        Ok(_) => panic!("a silent VMM must not start"),
        Err(e) => e,
    };
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            VmmError::Api {
                call: "vmm.ping",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("did not answer by the build's deadline"),
        "{msg}"
    );
    assert!(msg.contains(API_SOCKET), "{msg}");
    // The deadline plus slack, not the fake's hour of sleep nor the grace.
    assert!(
        took >= limit && took < limit + Duration::from_secs(3),
        "{took:?}"
    );
    assert!(gone(fake_pid(&fx.run_dir)), "fake VMM still around");
}

#[tokio::test]
async fn a_vmm_that_dies_at_start_is_reported_with_its_log() {
    let Some(fx) = fixture("die") else { return };
    let err = match fx.runner.start(&spec(&fx.run_dir)).await {
        Ok(_) => panic!("a dead VMM must not start"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("exited (exit code 3)"), "{msg}");
    assert!(msg.contains("fake: cannot open /dev/kvm"), "{msg}");
    assert!(msg.contains(VMM_LOG), "{msg}");
    assert!(gone(fake_pid(&fx.run_dir)));
}

#[tokio::test]
async fn a_rejected_vm_create_names_the_call_and_the_reason() {
    let Some(fx) = fixture("reject") else { return };
    let err = match fx.runner.start(&spec(&fx.run_dir)).await {
        Ok(_) => panic!("a rejected config must not start"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            VmmError::Api {
                call: "vm.create",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("400"), "{msg}");
    assert!(msg.contains("fake: bad config"), "{msg}");
    assert_eq!(calls(&fx.run_dir), vec!["vm.create", "vmm.shutdown"]);
    assert!(gone(fake_pid(&fx.run_dir)));
}

/// `vm.boot` may take as long as the build's deadline allows (a slow host
/// took over the former fixed 10 s), and not longer.
#[tokio::test]
async fn a_hanging_vm_boot_ends_at_the_build_deadline_and_the_vmm_is_killed_at_once() {
    let Some(mut fx) = fixture("hang") else {
        return;
    };
    // Long enough that a polite stop would show in the time taken.
    fx.runner.shutdown_grace = Duration::from_secs(30);
    let limit = Duration::from_millis(1500);
    let started = Instant::now();
    let err = match fx.runner.start(&spec_due(&fx.run_dir, limit)).await {
        Ok(_) => panic!("a hanging boot must not start"),
        Err(e) => e,
    };
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            VmmError::Api {
                call: "vm.boot",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("no answer by the build's deadline"), "{msg}");
    assert!(
        took >= limit && took < limit + Duration::from_secs(3),
        "{took:?}"
    );
    // cloud-hypervisor's API queues a vmm.shutdown behind the unanswered
    // vm.boot, so none is sent: SIGKILL at once.
    assert_eq!(calls(&fx.run_dir), vec!["vm.create", "vm.boot"]);
    assert!(gone(fake_pid(&fx.run_dir)));
}

#[tokio::test]
async fn a_slow_vm_boot_is_waited_for_while_the_deadline_allows() {
    let Some(fx) = fixture("slow") else { return };
    let started = Instant::now();
    let mut vm = fx
        .runner
        .start(&spec_due(&fx.run_dir, Duration::from_secs(60)))
        .await
        .expect("a slow boot within the deadline starts");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(
        vm.wait().await.unwrap(),
        VmExit::Exited {
            code: Some(0),
            signal: None
        }
    );
}

#[tokio::test]
async fn kill_asks_for_vmm_shutdown_first() {
    let Some(mut fx) = fixture("polite") else {
        return;
    };
    // Roomy, so a loaded machine cannot turn the polite path into SIGKILL.
    fx.runner.shutdown_grace = Duration::from_secs(3);
    let mut vm = fx.runner.start(&spec(&fx.run_dir)).await.expect("start");
    let pid = vm.pid().unwrap();
    let started = Instant::now();
    vm.kill().await;
    assert!(started.elapsed() < fx.runner.shutdown_grace);
    assert_eq!(
        vm.wait().await.unwrap(),
        VmExit::Exited {
            code: Some(0),
            signal: None
        }
    );
    assert_eq!(
        calls(&fx.run_dir),
        vec!["vm.create", "vm.boot", "vmm.shutdown"]
    );
    assert!(gone(pid));
}

#[tokio::test]
async fn kill_sigkills_a_vmm_that_ignores_shutdown() {
    let Some(fx) = fixture("stubborn") else {
        return;
    };
    let mut vm = fx.runner.start(&spec(&fx.run_dir)).await.expect("start");
    let pid = vm.pid().unwrap();
    let started = Instant::now();
    vm.kill().await;
    let took = started.elapsed();
    assert!(took >= fx.runner.shutdown_grace, "{took:?}");
    assert!(
        took < fx.runner.shutdown_grace + Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(
        vm.wait().await.unwrap(),
        VmExit::Exited {
            code: None,
            signal: Some(9)
        }
    );
    assert!(calls(&fx.run_dir).contains(&"vmm.shutdown".to_owned()));
    assert!(gone(pid));
}

#[tokio::test]
async fn dropping_a_running_vm_kills_the_vmm() {
    let Some(fx) = fixture("stubborn") else {
        return;
    };
    let vm = fx.runner.start(&spec(&fx.run_dir)).await.expect("start");
    let pid = vm.pid().unwrap();
    drop(vm);
    // kill_on_drop sends SIGKILL at once; tokio reaps in the background.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !gone(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone(pid), "VMM {pid} survived its handle");
}

#[tokio::test]
async fn a_guest_reboot_kills_the_vmm_and_its_exit_says_why_with_the_panic_line() {
    let Some(fx) = fixture("reboot") else { return };
    let mut vm = fx.runner.start(&spec(&fx.run_dir)).await.expect("start");
    let pid = vm.pid().unwrap();
    let mut channel = vm.take_channel().await.unwrap();
    let started = Instant::now();
    // The console ends because the VMM is killed, well before any timeout.
    let mut console = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        channel.reader.read_to_string(&mut console),
    )
    .await
    .expect("the console ends once the reboot is seen")
    .unwrap();
    assert_eq!(console, "hello from the guest\n");
    // The reason and the guest's panic line, not "killed by signal 9".
    let exit = vm.wait().await.unwrap();
    assert_eq!(
        exit,
        VmExit::GuestRebooted {
            panic: Some(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into()
            )
        }
    );
    assert_eq!(
        exit.to_string(),
        "the guest rebooted after a kernel panic (Kernel panic - not syncing: Attempted to kill \
         init! exitcode=0x00000100), so the VMM was killed"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(gone(pid));
    let log = std::fs::read_to_string(fx.run_dir.join(VMM_LOG)).unwrap();
    assert!(
        log.contains("kiln: the guest rebooted after a kernel panic (Kernel panic"),
        "{log}"
    );
    // Killed outright: a rebooting guest gets no polite shutdown.
    assert_eq!(calls(&fx.run_dir), vec!["vm.create", "vm.boot"]);
}
