//! Graceful shutdown: stop accepting, let what is in flight finish, bounded by a deadline.
//!
//! Every accept loop and every downstream connection holds a [`Watch`]. Draining flips the shared
//! flag (accept loops return, HTTP connections finish their current request and close, idle
//! keep-alive connections close at once) and then waits until every `Watch` has been dropped, which
//! is exactly "every connection has finished", or until the drain timeout.

use std::time::Duration;

use tokio::sync::watch;

/// Starts the drain; owned by whoever decides to shut down.
pub struct Trigger(watch::Sender<bool>);

/// Held by every task that must finish before the process exits.
#[derive(Clone, Debug)]
pub struct Watch(watch::Receiver<bool>);

impl Default for Trigger {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Trigger {
    pub fn watch(&self) -> Watch {
        Watch(self.0.subscribe())
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Signals every holder and waits up to `timeout` for all of them to finish. Returns whether
    /// they all did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.0.send_replace(true);
        tokio::time::timeout(timeout, self.0.closed()).await.is_ok()
    }

    /// How many holders are still alive (accept loops plus open connections).
    pub fn holders(&self) -> usize {
        self.0.receiver_count()
    }
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.0.clone();
        // An error means the trigger is gone, which only happens once the drain is over.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_holders_then_gives_up_at_the_deadline() {
        let trigger = Trigger::default();
        let held = trigger.watch();
        let finisher = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held);
        });
        assert!(trigger.drain(Duration::from_secs(1)).await);
        finisher.await.unwrap();

        let trigger = Trigger::default();
        let stuck = trigger.watch();
        assert!(!trigger.drain(Duration::from_secs(1)).await);
        assert_eq!(trigger.holders(), 1);
        drop(stuck);
    }
}
