//! Graceful shutdown, the way Istio drains a sidecar.
//!
//! When the drain begins (SIGTERM, SIGINT, `POST /quitquitquit`), `/ready` turns 503 `DRAINING`
//! on both ports, and every HTTP connection is told to close: its next response carries
//! `Connection: close`, and keep-alive connections idle at that moment are closed. Listeners
//! keep accepting: the application may still be running (a classic sidecar, any pod during a
//! rollout) and peers keep sending until they have all seen the endpoint go; closing at once
//! answered them "connection refused". The process exits once every connection has finished —
//! not before `drain_minimum` — or when `drain_timeout` has passed (Istio's
//! `terminationDrainDuration`, 5 s), closing what remains. By default the minimum is the whole
//! period, as Istio's agent does unless `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` is set; a shorter
//! minimum is that option.
//!
//! [`Trigger`] starts the drain and counts connections: each accepted connection holds a
//! [`Watch`] (made by the accept loop's [`Handle`]) until it ends.

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

struct Shared {
    /// Read per request (a response then says `Connection: close`): an atomic, not the channel.
    draining: AtomicBool,
    /// Wakes the connections waiting on [`Watch::signaled`].
    signal: watch::Sender<bool>,
    /// Downstream connections still open.
    open: AtomicUsize,
    /// Notified when `open` drops to zero.
    none_open: Notify,
}

/// Starts the drain and waits for the connections; owned by whoever decides to shut down.
pub struct Trigger(Arc<Shared>);

/// Makes a [`Watch`] for each accepted connection; held by the accept loops.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

/// Held by every downstream connection until it ends.
pub struct Watch {
    shared: Arc<Shared>,
    rx: watch::Receiver<bool>,
}

impl Default for Trigger {
    fn default() -> Self {
        Self(Arc::new(Shared {
            draining: AtomicBool::new(false),
            signal: watch::channel(false).0,
            open: AtomicUsize::new(0),
            none_open: Notify::new(),
        }))
    }
}

impl Trigger {
    pub fn handle(&self) -> Handle {
        Handle(self.0.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// Begins the drain: every connection is told, new ones learn it as they start.
    pub fn start(&self) {
        if !self.0.draining.swap(true, Ordering::AcqRel) {
            self.0.signal.send_replace(true);
        }
    }

    /// Downstream connections still open.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// Resolves when no connection is open.
    pub async fn none_open(&self) {
        loop {
            let notified = self.0.none_open.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Handle {
    /// Counts a new connection until the returned watch is dropped.
    pub fn watch(&self) -> Watch {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Watch { shared: self.0.clone(), rx: self.0.signal.subscribe() }
    }
}

impl Watch {
    /// Resolves once the drain has begun (the future does not borrow the watch).
    pub fn signaled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            // An error means the trigger is gone, which only happens once the process stops.
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.none_open.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_connections_and_says_when_none_is_open() {
        let trigger = Trigger::default();
        let handle = trigger.handle();
        let held = handle.watch();
        assert_eq!(trigger.open(), 1);
        trigger.start();
        assert!(held.is_draining());
        // A connection accepted during the drain is counted too, and told at once.
        let late = handle.watch();
        late.signaled().await;
        let finisher = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held);
            drop(late);
        });
        tokio::time::timeout(Duration::from_secs(1), trigger.none_open()).await.expect("none open");
        finisher.await.unwrap();
        assert_eq!(trigger.open(), 0);
    }
}
