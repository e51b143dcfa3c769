//! Circuit breakers (Envoy's; Istio's `connectionPool`): a cluster's upstream connections, the
//! requests waiting for one, and its requests in flight are bounded. A request past a bound is
//! answered 503 at once and counted (Envoy's `upstream_rq_pending_overflow`) instead of queueing
//! without end behind a saturated service.
//!
//! The counts live in [`Load`], one per cluster name that every snapshot's copy of the cluster
//! shares (as it shares the endpoints): a reload neither forgets the open connections nor resets
//! the counts. A cluster without limits never touches them beyond the connection count.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::sync::Notify;

use crate::config::CircuitBreakers;

/// The bounds of one cluster; `None` is no bound.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: Option<u64>,
    pub max_pending: Option<u64>,
    pub max_requests: Option<u64>,
}

impl Limits {
    /// `None` when the cluster sets no bound, so the request path checks one `Option`.
    pub fn new(cb: &CircuitBreakers) -> Option<Limits> {
        let l = Limits {
            max_connections: cb.max_connections.map(u64::from),
            max_pending: cb.max_pending_requests.map(u64::from),
            max_requests: cb.max_requests.map(u64::from),
        };
        (l.max_connections.is_some() || l.max_pending.is_some() || l.max_requests.is_some()).then_some(l)
    }
}

/// What one cluster's circuit breakers count.
#[derive(Debug, Default)]
pub struct Load {
    /// Open upstream connections to all its endpoints, and those being opened under a bound.
    connections: AtomicU64,
    /// Requests waiting for a connection.
    pending: AtomicU64,
    /// Requests in flight; counted only while the cluster bounds them.
    requests: AtomicU64,
    /// Woken when a connection goes back to a pool or closes, for the requests waiting for one.
    freed: Notify,
    /// The cluster's `idle_timeout` in milliseconds (0: none), as the latest snapshot says: the
    /// endpoints, which outlive snapshots, read it when a connection becomes idle.
    idle_timeout_ms: AtomicU64,
}

/// A request past a circuit breaker's bound.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open: {0}")]
pub struct Overflow(pub &'static str);

impl Load {
    /// A connection opened without a reservation.
    pub fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection (or a reservation) ended.
    pub fn closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.wake();
    }

    /// Tells the requests waiting for a connection, if any, that one may be free.
    pub fn wake(&self) {
        if self.pending.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    pub fn set_idle_timeout(&self, t: Option<std::time::Duration>) {
        let ms = t.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
        self.idle_timeout_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        match self.idle_timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts a connection about to be opened, if that keeps the count within `max`.
    pub fn try_reserve(&self, max: u64) -> bool {
        self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c < max).then_some(c + 1)).is_ok()
    }

    /// The future a waiting request awaits; create it (and `enable` it) before looking for a
    /// connection, so that a connection freed meanwhile is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Counts a request as waiting for a connection, unless `max` are waiting already.
    pub fn enter_pending(self: &Arc<Self>, max: Option<u64>) -> Result<Pending, Overflow> {
        let entered = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| max.is_none_or(|m| p < m).then_some(p + 1));
        match entered {
            Ok(_) => Ok(Pending(self.clone())),
            Err(_) => Err(Overflow("too many requests waiting for a connection")),
        }
    }

    /// Counts a request in flight, unless `max` are in flight already.
    pub fn admit(self: &Arc<Self>, max: u64) -> Result<RequestPermit, Overflow> {
        match self.requests.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| (r < max).then_some(r + 1)) {
            Ok(_) => Ok(RequestPermit(self.clone())),
            Err(_) => Err(Overflow("too many requests in flight")),
        }
    }
}

/// A request waiting for a connection, until dropped.
pub struct Pending(Arc<Load>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight under `max_requests`, until dropped (with its response body).
#[derive(Debug)]
pub struct RequestPermit(Arc<Load>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_and_release() {
        let load = Arc::new(Load::default());
        assert!(load.try_reserve(1));
        assert!(!load.try_reserve(1));
        load.closed();
        assert!(load.try_reserve(1));

        let p = load.enter_pending(Some(1)).unwrap();
        assert!(load.enter_pending(Some(1)).is_err());
        drop(p);
        assert!(load.enter_pending(Some(1)).is_ok());
        assert!(load.enter_pending(None).is_ok());

        let r = load.admit(1).unwrap();
        assert!(load.admit(1).is_err());
        drop(r);
        assert!(load.admit(1).is_ok());
    }
}
