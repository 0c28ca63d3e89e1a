//! What the daemon writes to the client while it works on a request: log
//! messages, activities and their results, then `STDERR_LAST` or an error.
//!
//! Nix sends a build's log as an activity of type `actBuild` whose results
//! are `resBuildLogLine`s; that is what `nix build -L` prints and what Nix
//! stores for `nix log` when the build ran on an `ssh-ng://` builder.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::protocol::{activity, result, stderr, verbosity};
use super::wire::Frame;

/// Writes the daemon's side of the connection.
pub struct Output<W> {
    inner: W,
    next_activity: u64,
}

/// A started activity; [`Output::stop_activity`] ends it.
#[derive(Debug, Clone, Copy)]
pub struct Activity(u64);

impl<W: AsyncWrite + Unpin + Send> Output<W> {
    /// Writes to `inner` (give it a buffered writer).
    pub fn new(inner: W) -> Self {
        Output {
            inner,
            // Activity ids only need to be unique within the connection;
            // Nix's own start high so that they do not collide with the
            // client's.
            next_activity: (u64::from(std::process::id()) << 32) + 1,
        }
    }

    /// The underlying writer, for the raw NAR `NarFromPath` sends.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Writes `frame`'s bytes.
    pub async fn send(&mut self, frame: Frame) -> io::Result<()> {
        self.inner.write_all(frame.as_bytes()).await
    }

    /// Flushes what was written.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().await
    }

    /// A log message (`STDERR_NEXT`), shown by the client as it is.
    pub async fn message(&mut self, text: &str) -> io::Result<()> {
        let mut line = text.to_owned();
        if !line.ends_with('\n') {
            line.push('\n');
        }
        self.send(Frame::new().u64(stderr::NEXT).string(&line))
            .await?;
        self.flush().await
    }

    /// Starts a build activity for `drv`.
    pub async fn start_build(&mut self, drv: &str) -> io::Result<Activity> {
        let id = self.next_activity;
        self.next_activity += 1;
        let frame = Frame::new()
            .u64(stderr::START_ACTIVITY)
            .u64(id)
            .u64(verbosity::INFO)
            .u64(activity::BUILD)
            .string(&format!("building '{drv}'"))
            // Fields: drv path, machine, current round, rounds.
            .u64(4)
            .u64(1)
            .string(drv)
            .u64(1)
            .string("")
            .u64(0)
            .u64(1)
            .u64(0)
            .u64(1)
            // Parent activity: none.
            .u64(0);
        self.send(frame).await?;
        self.flush().await?;
        Ok(Activity(id))
    }

    /// One line of a build's log, without its newline.
    pub async fn log_line(&mut self, activity: Activity, line: &str) -> io::Result<()> {
        let frame = Frame::new()
            .u64(stderr::RESULT)
            .u64(activity.0)
            .u64(result::BUILD_LOG_LINE)
            .u64(1)
            .u64(1)
            .string(line);
        self.send(frame).await
    }

    /// Ends an activity.
    pub async fn stop_activity(&mut self, activity: Activity) -> io::Result<()> {
        self.send(Frame::new().u64(stderr::STOP_ACTIVITY).u64(activity.0))
            .await?;
        self.flush().await
    }

    /// The request is done (`STDERR_LAST`); its result follows.
    pub async fn last(&mut self) -> io::Result<()> {
        self.send(Frame::new().u64(stderr::LAST)).await
    }

    /// The request failed (`STDERR_ERROR`, the 1.26+ form): `message` is
    /// what the client prints after `error:`.
    pub async fn error(&mut self, message: &str) -> io::Result<()> {
        let frame = Frame::new()
            .u64(stderr::ERROR)
            .string("Error")
            .u64(verbosity::ERROR)
            .string("Error")
            .string(message)
            // No position, no traces.
            .u64(0)
            .u64(0);
        self.send(frame).await?;
        self.flush().await
    }
}

/// Splits a build's log into lines as Nix does: on `\n`, with `\r` and
/// what precedes it on the line dropped (a progress bar's redraws); what
/// is left after the last newline waits in `pending`.
pub fn split_lines(pending: &mut Vec<u8>, data: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    for &b in data {
        match b {
            b'\n' => {
                lines.push(String::from_utf8_lossy(pending).into_owned());
                pending.clear();
            }
            b'\r' => pending.clear(),
            _ => pending.push(b),
        }
    }
    lines
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_newlines_and_carriage_returns_reset_them() {
        let mut pending = Vec::new();
        assert_eq!(split_lines(&mut pending, b"one\ntw"), vec!["one"]);
        assert_eq!(
            split_lines(&mut pending, b"o\n10%\r50%\rdone\n"),
            vec!["two", "done"]
        );
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn an_error_frame_has_nix_s_layout() {
        let mut out = Output::new(Vec::new());
        out.error("boom").await.unwrap();
        let bytes = out.inner;
        let expected = Frame::new()
            .u64(0x6378_7470)
            .string("Error")
            .u64(0)
            .string("Error")
            .string("boom")
            .u64(0)
            .u64(0)
            .into_bytes();
        assert_eq!(bytes, expected);
    }
}
