//! A connection that can be cut from outside.
//!
//! tonic's graceful shutdown waits for every open call to end, and a build
//! call lasts as long as its build. When the grace period is over, kiln
//! cancels the token given to [`Cut::new`]: every read and write of every
//! connection then fails, hyper closes the connections, and the calls'
//! futures are dropped, which cancels their builds (see
//! `crate::grpc`), whose guards then stop their VMs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// `inner`, failing every operation once the token is cancelled.
pub struct Cut<T> {
    inner: T,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<T> Cut<T> {
    /// Wraps `inner`; cancelling `token` cuts it.
    pub fn new(inner: T, token: CancellationToken) -> Self {
        Self {
            inner,
            cut: Box::pin(token.cancelled_owned()),
        }
    }

    /// Ready (with an error) once cut; otherwise registers the task to be
    /// woken when it is, so an idle connection is closed too.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.cut
            .as_mut()
            .poll(cx)
            .map(|()| io::Error::new(io::ErrorKind::ConnectionAborted, "kiln is shutting down"))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cut<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cut<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Cut<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn cancelling_wakes_an_idle_reader_with_an_error() {
        let (a, _b) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let mut cut = Cut::new(a, token.clone());
        let reader = tokio::spawn(async move { cut.read(&mut [0u8; 8]).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        token.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(2), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
