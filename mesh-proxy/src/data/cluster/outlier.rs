//! Outlier detection (Envoy's; Istio's `outlierDetection`): an endpoint that answers 5xx (or
//! fails to connect, or resets) so many times in a row is ejected — it gets no requests — for
//! `base_ejection_time` times the number of times it has been ejected (capped at 300 s, Envoy's
//! `max_ejection_time`), then comes back by itself.
//!
//! The state is per endpoint ([`State`], in the endpoint, so it survives reloads); the policy and
//! its metrics are per cluster ([`Detector`]). Consecutive errors are counted as responses arrive,
//! as Envoy does; the end of an ejection is a timer task, so `/clusters` and the gauge are right
//! even when no request comes.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use crate::config::{OutlierDetection, MAX_EJECTION_TIME};

/// One endpoint's record.
#[derive(Debug, Default)]
pub struct State {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejected: AtomicBool,
    /// Times ejected so far: the next ejection lasts that many base ejection times more.
    ejections: AtomicU32,
}

impl State {
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }
}

/// How an exchange with an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: connect failure, reset or timeout (Envoy counts these as a 503 for both
    /// checks when local and upstream errors are not split, its default).
    Failed,
}

/// A cluster's outlier detection.
#[derive(Debug)]
pub struct Detector {
    pub config: OutlierDetection,
    ejections_total: Counter,
    ejections_active: Gauge,
}

impl Detector {
    pub fn new(config: OutlierDetection, ejections_total: Counter, ejections_active: Gauge) -> Self {
        Self { config, ejections_total, ejections_active }
    }

    /// Counts `outcome` against `endpoint`; returns true when that ejected it. `states` are all the
    /// cluster's endpoints', for `max_ejection_percent`.
    pub fn record<'a>(
        &self,
        endpoint: &Arc<State>,
        outcome: Outcome,
        states: impl ExactSizeIterator<Item = &'a Arc<State>>,
    ) -> bool {
        let status = match outcome {
            Outcome::Status(s) => s,
            Outcome::Failed => 503,
        };
        let c = &self.config;
        let (five, gateway) = if status >= 500 {
            let five = endpoint.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            let gateway = if matches!(status, 502..=504) {
                endpoint.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
                0
            };
            (five, gateway)
        } else {
            // A success ends both runs.
            endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
            endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
            return false;
        };
        let tripped = (c.consecutive_5xx_errors > 0 && five >= c.consecutive_5xx_errors)
            || (c.consecutive_gateway_errors > 0 && gateway >= c.consecutive_gateway_errors);
        tripped && self.eject(endpoint, states)
    }

    fn eject<'a>(&self, endpoint: &Arc<State>, states: impl ExactSizeIterator<Item = &'a Arc<State>>) -> bool {
        let n = states.len();
        let ejected = states.filter(|s| s.is_ejected()).count();
        // At least one endpoint may always be ejected, whatever the percentage (Envoy's rule).
        if ejected > 0 && (ejected + 1) * 100 > self.config.max_ejection_percent as usize * n {
            return false;
        }
        if endpoint.ejected.swap(true, Ordering::AcqRel) {
            return false;
        }
        endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = ejection_time(self.config.base_ejection_time, times);
        self.ejections_total.inc();
        self.ejections_active.inc();
        let (state, gauge) = (endpoint.clone(), self.ejections_active.clone());
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            state.ejected.store(false, Ordering::Release);
            gauge.dec();
        });
        true
    }

    /// Whether ejections are honoured now: not when fewer than `min_health_percent` of the
    /// endpoints are healthy (then every endpoint takes traffic, as Envoy's panic threshold does).
    pub fn honoured<'a>(&self, states: impl ExactSizeIterator<Item = &'a Arc<State>>) -> bool {
        let n = states.len();
        let ejected = states.filter(|s| s.is_ejected()).count();
        ejected > 0 && (n - ejected) * 100 >= self.config.min_health_percent as usize * n
    }
}

/// How long the `times`-th ejection of an endpoint lasts.
pub fn ejection_time(base: Duration, times: u32) -> Duration {
    base.saturating_mul(times).min(MAX_EJECTION_TIME.max(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(consecutive_5xx: u32, gateway: u32, max_pct: u32) -> Detector {
        Detector::new(
            OutlierDetection {
                consecutive_5xx_errors: consecutive_5xx,
                consecutive_gateway_errors: gateway,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: max_pct,
                min_health_percent: 0,
            },
            Counter::default(),
            Gauge::default(),
        )
    }

    #[tokio::test]
    async fn consecutive_errors_eject_and_a_success_resets_the_run() {
        let states: Vec<Arc<State>> = (0..4).map(|_| Arc::default()).collect();
        let d = detector(3, 0, 100);
        let rec = |i: usize, o| d.record(&states[i], o, states.iter());
        assert!(!rec(0, Outcome::Status(500)));
        assert!(!rec(0, Outcome::Status(503)));
        assert!(!rec(0, Outcome::Status(200)));
        assert!(!rec(0, Outcome::Status(500)));
        assert!(!rec(0, Outcome::Failed));
        assert!(rec(0, Outcome::Status(500)));
        assert!(states[0].is_ejected());
        assert_eq!(d.ejections_active.get(), 1);
        assert!(d.honoured(states.iter()));
    }

    #[tokio::test]
    async fn gateway_errors_and_the_ejection_percentage() {
        let states: Vec<Arc<State>> = (0..4).map(|_| Arc::default()).collect();
        // Gateway errors only (5xx check off), at most 25 %: one of four.
        let d = detector(0, 2, 25);
        let rec = |i: usize, o| d.record(&states[i], o, states.iter());
        assert!(!rec(0, Outcome::Status(500)));
        assert!(!rec(0, Outcome::Status(500)), "a 500 is not a gateway error");
        assert!(!rec(0, Outcome::Status(502)));
        assert!(rec(0, Outcome::Status(504)));
        assert!(!rec(1, Outcome::Failed));
        assert!(!rec(1, Outcome::Failed), "a second ejection would exceed 25 %");
        assert!(!states[1].is_ejected());
        // At least one may always be ejected, even under a tiny percentage.
        let d = detector(1, 0, 1);
        assert!(d.record(&states[2], Outcome::Status(500), states[2..].iter()));
    }

    #[test]
    fn ejections_grow_and_are_capped() {
        let base = Duration::from_secs(30);
        assert_eq!(ejection_time(base, 1), base);
        assert_eq!(ejection_time(base, 3), Duration::from_secs(90));
        assert_eq!(ejection_time(base, 100), MAX_EJECTION_TIME);
        assert_eq!(ejection_time(Duration::from_secs(600), 2), Duration::from_secs(600));
    }
}
