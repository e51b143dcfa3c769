//! Copying bytes both ways between any two streams (an upgraded HTTP connection, say) through
//! buffers in user space, with half-close and an idle timeout. Two TCP sockets take
//! [`splice`](super::splice) instead, which moves the bytes without copying them.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    idle::{until_idle, Activity},
    Transfer,
};

/// Per direction. tokio's default (8 KiB) costs one read and one write system call per 8 KiB;
/// bulk transfers through the proxy were bound by that. Allocated when a session starts, so
/// idle HTTP connections do not pay for it.
const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides are done. When one side finishes sending, the other side's
/// write half is shut down (a FIN, not a reset), and the other direction keeps flowing: protocols
/// that half-close (`shutdown(SHUT_WR)` then read the answer) work through the proxy. A session in
/// which neither side sends anything for `idle` ends with a `TimedOut` error (both sides closed).
pub async fn copy<A, B>(downstream: &mut A, upstream: &mut B, idle: Duration) -> io::Result<Transfer>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let clock = Activity::new();
    let mut a = Stamped { inner: downstream, clock: &clock };
    let mut b = Stamped { inner: upstream, clock: &clock };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER);
    let (sent, received) = until_idle(copy, &clock, idle).await?;
    Ok(Transfer { sent, received })
}

/// A stream whose reads stamp the shared [`Activity`].
struct Stamped<'a, S: ?Sized> {
    inner: &'a mut S,
    clock: &'a Activity,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Stamped<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.stamp();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Stamped<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_times_out_and_an_active_one_does_not() {
        let (mut client, mut proxy_down) = tokio::io::duplex(64);
        let (mut proxy_up, mut server) = tokio::io::duplex(64);
        let copy = tokio::spawn(async move { copy(&mut proxy_down, &mut proxy_up, Duration::from_secs(10)).await });
        // Activity every 6 s keeps it alive past 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
        }
        assert!(!copy.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        let err = copy.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
