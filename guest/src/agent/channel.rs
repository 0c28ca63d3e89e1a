//! The agent's side of the host channel: the virtio serial port on QEMU
//! (back-pressured, two-way: the host acknowledges the report), else the
//! first virtio console, `/dev/hvc0`, switched to raw mode so frames pass
//! byte for byte (no `\n` -> `\r\n`). See `kiln_guest::contract`.
//!
//! The channel is a process-wide singleton so the panic hook can still send a
//! report. Every frame goes out in one `write_all` under the lock, so frames
//! never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::Mutex;

use std::time::{Duration, Instant};

use kiln_guest::contract::{
    encode_chunks, encode_frame, FrameKind, Report, ACK, ACK_TIMEOUT_MS, CONSOLE_PATH, MAGIC,
    MAX_JOB_BYTES, SERIAL_PORT_PATH,
};
use nix::sys::termios;

/// The console, where the serial port is missing (cloud-hypervisor).
pub const CHANNEL_DEVICE: &str = CONSOLE_PATH;
/// How long the serial port may take to appear after the module loaded (the
/// port is announced over the device's control queue, asynchronously; under
/// TCG on a busy host that can take seconds).
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Feature bit of a virtio console device with several ports (QEMU's
/// `virtio-serial-device`); cloud-hypervisor's plain console lacks it.
const VIRTIO_CONSOLE_F_MULTIPORT: usize = 1;
/// virtio device id of consoles.
const VIRTIO_ID_CONSOLE: &str = "0x0003";

static CHANNEL: Mutex<Option<File>> = Mutex::new(None);
static TWO_WAY: Mutex<bool> = Mutex::new(false);

/// What the VM's virtio console devices say about the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Console {
    /// A bound console device with ports (QEMU): the channel is the port.
    Ports,
    /// A bound console device without ports (cloud-hypervisor): hvc0.
    Plain,
    /// No console device bound to its driver yet.
    NotYet,
}

/// Reads the console devices' state from sysfs: the negotiated features
/// (`0`/`1` per bit, bit 0 first) are only meaningful once the device is
/// bound to its driver.
fn console_state() -> Console {
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return Console::NotYet;
    };
    let mut state = Console::NotYet;
    for d in devices.flatten() {
        let read = |name: &str| std::fs::read_to_string(d.path().join(name)).unwrap_or_default();
        if read("device").trim() != VIRTIO_ID_CONSOLE || !d.path().join("driver").exists() {
            continue;
        }
        if read("features").as_bytes().get(VIRTIO_CONSOLE_F_MULTIPORT) == Some(&b'1') {
            return Console::Ports;
        }
        state = Console::Plain;
    }
    state
}

/// Opens the channel device: the serial port if the VM's console device has
/// ports (QEMU), else the console. Decided from the bound device's features,
/// not from timing, and retried until [`PORT_WAIT`] while the device, its
/// driver or the port (announced asynchronously) are still appearing.
fn open_device() -> io::Result<(File, bool)> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        let attempt = match console_state() {
            Console::Ports => Some((SERIAL_PORT_PATH, true)),
            Console::Plain => Some((CHANNEL_DEVICE, false)),
            Console::NotYet => None,
        };
        let last_error = match attempt {
            Some((path, two_way)) => match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => return Ok((file, two_way)),
                Err(e) => e,
            },
            None => io::Error::new(
                io::ErrorKind::NotFound,
                "no virtio console device is bound yet",
            ),
        };
        if Instant::now() >= deadline {
            return Err(last_error);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens the channel, makes a console raw and writes [`MAGIC`].
pub fn open() -> io::Result<()> {
    let (mut file, two_way) = open_device()?;
    if !two_way {
        let mut attrs = termios::tcgetattr(file.as_fd())?;
        termios::cfmakeraw(&mut attrs);
        termios::tcsetattr(file.as_fd(), termios::SetArg::TCSANOW, &attrs)?;
    }
    *TWO_WAY.lock().unwrap_or_else(|p| p.into_inner()) = two_way;
    file.write_all(MAGIC)?;
    let mut slot = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    *slot = Some(file);
    Ok(())
}

/// Sends `data` as frames of `kind`. Without an open channel the bytes go to
/// the kernel console instead, so nothing is lost from the serial log.
pub fn send(kind: FrameKind, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(data.len() + 16);
    encode_chunks(kind, data, &mut buf);
    if data.is_empty() {
        encode_frame(kind, data, &mut buf);
    }
    let mut slot = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    match slot.as_mut() {
        Some(file) => file.write_all(&buf),
        None => {
            let mut err = io::stderr();
            err.write_all(&[b"kiln-agent: (no channel) ", data, b"\n"].concat())
        }
    }
}

/// A warm VM: tells the host it is ready ([`FrameKind::Ready`]) and waits
/// for the job message (`len:u32 LE | JSON`, at most [`MAX_JOB_BYTES`]).
/// Blocks until it arrives: the host decides how long a VM may wait, and
/// kills it when that is over. A channel that closes first is an error.
pub fn receive_job() -> io::Result<Vec<u8>> {
    use std::io::Read;
    send(FrameKind::Ready, &[])?;
    // A second descriptor for reading, so writers (the panic hook, logs)
    // never wait for the lock while this blocks.
    let mut file = {
        let slot = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(file) => file.try_clone()?,
            None => return Err(io::Error::new(io::ErrorKind::NotConnected, "no channel")),
        }
    };
    let mut len = [0u8; 4];
    file.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_JOB_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the host's job is {len} bytes, over the {MAX_JOB_BYTES}-byte limit"),
        ));
    }
    let mut job = vec![0u8; len as usize];
    file.read_exact(&mut job)?;
    Ok(job)
}

/// Sends a diagnostic line, also echoed to the kernel console.
pub fn log(line: &str) {
    eprintln!("kiln-agent: {line}");
    // A lost diagnostic is not worth failing a build over.
    let _ = send(FrameKind::AgentLog, line.as_bytes());
}

/// Sends the final report and waits until the console has passed every byte
/// on, so the power-off that follows cannot cut the stream short.
pub fn send_report(report: &Report) -> io::Result<()> {
    let json = serde_json::to_vec(report).map_err(io::Error::other)?;
    eprintln!("kiln-agent: report {}", String::from_utf8_lossy(&json));
    send(FrameKind::Report, &json)?;
    let mut slot = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(file) = slot.as_mut() {
        if *TWO_WAY.lock().unwrap_or_else(|p| p.into_inner()) {
            wait_for_ack(file);
        } else {
            termios::tcdrain(file.as_fd())?;
        }
    }
    Ok(())
}

/// Waits (bounded) for the host's [`ACK`]: once it arrives, every byte
/// before the report has left the VMM's buffers.
fn wait_for_ack(file: &mut File) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_millis(ACK_TIMEOUT_MS);
    let mut byte = [0u8; 1];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count, and a timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        match file.read(&mut byte) {
            Ok(1) if byte[0] == ACK => return,
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sends a report from the panic hook: never blocks on the lock (the panic may
/// have happened while it was held), falling back to a fresh descriptor.
pub fn emergency_report(report: &Report) {
    let Ok(json) = serde_json::to_vec(report) else {
        return;
    };
    eprintln!("kiln-agent: report {}", String::from_utf8_lossy(&json));
    let mut buf = Vec::new();
    encode_frame(FrameKind::Report, &json, &mut buf);
    if let Ok(mut slot) = CHANNEL.try_lock() {
        if let Some(file) = slot.as_mut() {
            let _ = file.write_all(&buf);
            let _ = termios::tcdrain(file.as_fd());
            return;
        }
    }
    // No channel yet, or its lock is unusable: write MAGIC-less frames on a
    // fresh descriptor; the host then sees either a report or a broken stream,
    // never a hang.
    let path = if *TWO_WAY.lock().unwrap_or_else(|p| p.into_inner()) {
        SERIAL_PORT_PATH
    } else {
        CHANNEL_DEVICE
    };
    if let Ok(mut file) = OpenOptions::new().write(true).open(path) {
        let _ = file.write_all(&buf);
        let _ = termios::tcdrain(file.as_fd());
    }
}
