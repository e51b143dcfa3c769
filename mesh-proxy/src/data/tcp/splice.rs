//! Relaying between two TCP sockets without copying: splice(2) moves the bytes from one socket
//! into a pipe and from the pipe into the other socket inside the kernel (page references, never
//! through user space), both directions at once, with half-close and an idle timeout.
//!
//! A direction holds a pipe only while bytes are in flight: it fills the pipe only when it is
//! empty, drains it completely, and gives it back to its thread's small pool as soon as its
//! socket has nothing more to read. So thousands of quiet sessions hold a handful of pipes, not
//! two each (descriptors, and the kernel's per-user pipe budget, `fs.pipe-user-pages-soft`, which
//! shrinks every new pipe to two pages once about 1,000 default-size pipes exist). Filling only an
//! empty pipe also keeps readiness exact: an `EAGAIN` from the reading splice then means the socket
//! has nothing, never that the pipe is full (which would otherwise wait for a readiness edge that
//! never comes). When no pipe can be had (the descriptor limit), that direction copies through a
//! buffer instead.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    net::Shutdown,
    os::fd::OwnedFd,
    task::{ready, Context, Poll},
    time::Duration,
};

use nix::{
    fcntl::{splice as splice_fd, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::{
    idle::{until_idle, Activity},
    Transfer,
};

/// Empty pipes a data-plane thread keeps for the next burst.
const POOLED_PIPES_PER_THREAD: usize = 16;
/// Bytes asked of one splice into a pipe: a default pipe's capacity (16 pages).
const PIPE_CHUNK: usize = 64 * 1024;
/// The buffer of a direction that could not get a pipe.
const FALLBACK_BUFFER: usize = 64 * 1024;

/// Relays both ways between `downstream` and `upstream` until both sides are done. When one side
/// finishes sending, the other side's write half is shut down (a FIN, not a reset) and the other
/// direction keeps flowing: protocols that half-close (`shutdown(SHUT_WR)`, then read the answer)
/// work through the proxy. A session in which neither side sends anything for `idle` ends with a
/// `TimedOut` error; any other error ends it too. Either way the caller closes both sockets.
pub async fn splice(downstream: &mut TcpStream, upstream: &mut TcpStream, idle: Duration) -> io::Result<Transfer> {
    let clock = Activity::new();
    let (down, up) = (&*downstream, &*upstream);
    let mut to_up = Direction::default();
    let mut to_down = Direction::default();
    let session = poll_fn(|cx| {
        let sent = to_up.poll(cx, down, up, &clock)?;
        let received = to_down.poll(cx, up, down, &clock)?;
        if sent.is_ready() && received.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    });
    until_idle(session, &clock, idle).await?;
    Ok(Transfer { sent: to_up.moved, received: to_down.moved })
}

/// A kernel pipe, both ends non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with_borrow_mut(Vec::pop) {
            return Ok(p);
        }
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Only for an empty pipe: the next taker must find nothing in it.
    fn give_back(self) {
        PIPES.with_borrow_mut(|pool| {
            if pool.len() < POOLED_PIPES_PER_THREAD {
                pool.push(self);
            }
        });
    }
}

/// Where one direction's bytes wait between the read and the write.
#[derive(Default)]
enum Via {
    /// Nothing in flight and nothing held.
    #[default]
    Nothing,
    Pipe(Pipe),
    /// No pipe could be had: a buffer, kept for the rest of the session.
    Buffer(Box<[u8]>),
}

/// One direction of a session: read from one socket, write to the other.
#[derive(Default)]
struct Direction {
    via: Via,
    /// Bytes read and not yet written: in the pipe, or `buffer[offset..offset + pending]`.
    pending: usize,
    offset: usize,
    /// The source has sent its FIN.
    eof: bool,
    /// The FIN has been passed on: this direction is over.
    done: bool,
    /// Bytes written to the destination.
    moved: u64,
}

const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl Direction {
    /// Moves what `from` has to `to` until `from` has nothing more for now (Pending) or has ended
    /// and the FIN was passed on (Ready). Readiness follows tokio's rule: an operation is tried
    /// after `poll_*_ready` said ready, and a `WouldBlock` clears the readiness, so the next
    /// `poll_*_ready` waits for the socket.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        clock: &Activity,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.pending > 0 {
                ready!(to.poll_write_ready(cx))?;
                let written = match &self.via {
                    Via::Pipe(p) => to.try_io(Interest::WRITABLE, || {
                        splice_fd(&p.read, None, to, None, self.pending, SPLICE_FLAGS).map_err(io::Error::from)
                    }),
                    Via::Buffer(b) => to.try_write(&b[self.offset..self.offset + self.pending]),
                    Via::Nothing => unreachable!("bytes pending without a pipe or buffer"),
                };
                match written {
                    Ok(n) => {
                        self.pending -= n;
                        self.offset += n;
                        self.moved += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.eof {
                self.release();
                self.done = true;
                socket2::SockRef::from(to).shutdown(Shutdown::Write)?;
                return Poll::Ready(Ok(()));
            }
            if from.poll_read_ready(cx)?.is_pending() {
                self.release();
                return Poll::Pending;
            }
            if matches!(self.via, Via::Nothing) {
                self.via = match Pipe::take() {
                    Ok(p) => Via::Pipe(p),
                    Err(e) => {
                        tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
                        Via::Buffer(vec![0; FALLBACK_BUFFER].into_boxed_slice())
                    }
                };
            }
            let read = match &mut self.via {
                Via::Pipe(p) => from.try_io(Interest::READABLE, || {
                    splice_fd(from, None, &p.write, None, PIPE_CHUNK, SPLICE_FLAGS).map_err(io::Error::from)
                }),
                Via::Buffer(b) => from.try_read(b),
                Via::Nothing => unreachable!("a pipe or buffer was just set"),
            };
            match read {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    (self.pending, self.offset) = (n, 0);
                    clock.stamp();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Gives an emptied pipe back to the thread's pool (a buffer stays: it is the fallback).
    fn release(&mut self) {
        debug_assert_eq!(self.pending, 0);
        if matches!(self.via, Via::Pipe(_)) {
            if let Via::Pipe(p) = std::mem::take(&mut self.via) {
                p.give_back();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn both_ways_at_once_then_half_close_and_the_answer_still_flows() {
        let (client, mut proxy_down) = pair().await;
        let (mut proxy_up, server) = pair().await;
        let session =
            tokio::spawn(async move { splice(&mut proxy_down, &mut proxy_up, Duration::from_secs(30)).await });
        let ((mut client_r, mut client_w), (mut server_r, mut server_w)) = (client.into_split(), server.into_split());
        // Several pipes' worth each way, at the same time: neither side reads before it is done
        // writing, so a relay that served one direction at a time would deadlock.
        let (up_bytes, down_bytes) = (pattern(3 << 20, 1), pattern(2 << 20, 7));
        let (mut got_up, mut got_down) = (Vec::new(), vec![0; down_bytes.len()]);
        let (w1, w2, r1, r2) = tokio::join!(
            async {
                client_w.write_all(&up_bytes).await?;
                // Half-close: the server sees EOF, and may still answer.
                client_w.shutdown().await
            },
            server_w.write_all(&down_bytes),
            server_r.read_to_end(&mut got_up),
            client_r.read_exact(&mut got_down),
        );
        (w1.unwrap(), w2.unwrap(), r1.unwrap(), r2.unwrap());
        assert!(got_up == up_bytes, "upstream got {} of {} bytes", got_up.len(), up_bytes.len());
        assert!(got_down == down_bytes, "downstream got other bytes");
        server_w.write_all(b"the answer after the FIN").await.unwrap();
        drop(server_w);
        let mut rest = Vec::new();
        client_r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"the answer after the FIN");
        let t = session.await.unwrap().unwrap();
        assert_eq!((t.sent, t.received), (up_bytes.len() as u64, (down_bytes.len() + rest.len()) as u64));
        // The pipes went back to this thread's pool (the test's runtime runs everything here).
        assert!(PIPES.with_borrow(|p| !p.is_empty()));
    }

    #[tokio::test]
    async fn a_silent_session_ends_with_timed_out() {
        let (_client, mut proxy_down) = pair().await;
        let (mut proxy_up, _server) = pair().await;
        let err = splice(&mut proxy_down, &mut proxy_up, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
