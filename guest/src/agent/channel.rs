//! The agent's side of the host channel: the first virtio console, `/dev/hvc0`,
//! switched to raw mode so frames pass byte for byte (no `\n` -> `\r\n`).
//!
//! The channel is a process-wide singleton so the panic hook can still send a
//! report. Every frame goes out in one `write_all` under the lock, so frames
//! never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::Mutex;

use kiln_guest::contract::{encode_chunks, encode_frame, FrameKind, Report, MAGIC};
use nix::sys::termios;

/// Where the channel is.
pub const CHANNEL_DEVICE: &str = "/dev/hvc0";

static CHANNEL: Mutex<Option<File>> = Mutex::new(None);

/// Opens the channel, makes it raw and writes [`MAGIC`].
pub fn open() -> io::Result<()> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CHANNEL_DEVICE)?;
    let mut attrs = termios::tcgetattr(file.as_fd())?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(file.as_fd(), termios::SetArg::TCSANOW, &attrs)?;
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
    let slot = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(file) = slot.as_ref() {
        termios::tcdrain(file.as_fd())?;
    }
    Ok(())
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
    if let Ok(mut file) = OpenOptions::new().write(true).open(CHANNEL_DEVICE) {
        let _ = file.write_all(&buf);
        let _ = termios::tcdrain(file.as_fd());
    }
}
