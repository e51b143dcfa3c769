//! A session's idle timeout: when bytes last moved, and the wait that ends a session in which
//! neither side sent anything for a while.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// When bytes last moved, in milliseconds since `start`; one atomic store per read.
pub(super) struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self { start: tokio::time::Instant::now(), last_ms: AtomicU64::new(0) }
    }

    pub(super) fn stamp(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Runs `session` until it ends, or until `clock` says nothing moved for `idle`: then a `TimedOut`
/// error (the caller closes both sides). The timer is re-armed at the last activity, not per read.
pub(super) async fn until_idle<T>(
    session: impl Future<Output = io::Result<T>>,
    clock: &Activity,
    idle: Duration,
) -> io::Result<T> {
    tokio::pin!(session);
    loop {
        tokio::select! {
            r = &mut session => return r,
            _ = tokio::time::sleep_until(clock.last() + idle) => {
                if clock.last() + idle <= tokio::time::Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
            }
        }
    }
}
