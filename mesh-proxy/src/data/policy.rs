//! The traffic policies of a route rule and of a cluster as the data plane keeps them: built once
//! per snapshot from the validated config, with their metric handles looked up then. A rule
//! without policies has none of this (`RuleEntry::policy` is `None`): its requests pay one branch.
//!
//! - [`RulePolicy`]: what a rule adds to forwarding — retries (the loop is `http::retry`) and
//!   fault injection ([`FaultInjection`]);
//! - [`RetryBudget`]: per cluster, how many retries may be in flight at once, so that retries
//!   cannot multiply the load on a cluster that is failing (Envoy's retry budget).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use rand::Rng;

use crate::{
    config::{self, AbortStatus, Percent},
    data::balance,
    metrics::Metrics,
};

/// The policies of one rule that act on each of its requests.
#[derive(Debug)]
pub struct RulePolicy {
    pub retries: Option<config::Retries>,
    pub fault: Option<FaultInjection>,
}

impl RulePolicy {
    /// None when the rule has no policy the request path applies.
    pub fn new(route: &str, rule: &config::Rule, metrics: &Metrics) -> Option<Box<RulePolicy>> {
        let retries = rule.retries.clone().filter(|r| r.attempts > 0);
        let fault = rule.fault.as_ref().map(|f| FaultInjection::new(route, f, metrics));
        (retries.is_some() || fault.is_some()).then(|| Box::new(RulePolicy { retries, fault }))
    }
}

/// Istio's fault injection: a delay before the request goes on, then an abort instead of
/// forwarding it, each for a share of the requests (drawn independently, as Envoy does).
#[derive(Debug)]
pub struct FaultInjection {
    delay: Option<(Duration, Percent)>,
    abort: Option<(AbortStatus, Percent)>,
    delays: Counter,
    aborts: Counter,
}

impl FaultInjection {
    fn new(route: &str, f: &config::Fault, metrics: &Metrics) -> Self {
        Self {
            delay: f.delay.as_ref().map(|d| (d.fixed_delay, d.percentage)),
            abort: f.abort.as_ref().map(|a| (a.status, a.percentage)),
            delays: metrics.fault(route, "delay"),
            aborts: metrics.fault(route, "abort"),
        }
    }

    /// The delay to wait for this request, if it draws one (counted).
    pub fn delay(&self) -> Option<Duration> {
        let (d, p) = self.delay?;
        drawn(p).then(|| {
            self.delays.inc();
            d
        })
    }

    /// The status to abort this request with, if it draws one (counted).
    pub fn abort(&self) -> Option<AbortStatus> {
        let (s, p) = self.abort?;
        drawn(p).then(|| {
            self.aborts.inc();
            s
        })
    }
}

/// True for `p` percent of the calls.
fn drawn(p: Percent) -> bool {
    p.0 >= 100.0 || (p.0 > 0.0 && balance::with_rng(|r| r.random::<f64>() * 100.0 < p.0))
}

/// Retries in flight to one cluster, bounded by Envoy's budget: at most `budget_percent` of the
/// requests in flight, but always `min_retry_concurrency`; and by `max_retries` when given.
#[derive(Debug)]
pub struct RetryBudget {
    active: AtomicU64,
    percent: f64,
    min_concurrency: u64,
    max: Option<u64>,
    /// Retries sent (Envoy's `upstream_rq_retry`).
    pub retries: Counter,
    /// Retries not sent because the budget was spent (Envoy's `upstream_rq_retry_overflow`).
    pub overflow: Counter,
    /// Tries that ran out of their `per_try_timeout` (Envoy's `upstream_rq_per_try_timeout`).
    pub per_try_timeouts: Counter,
}

impl RetryBudget {
    pub fn new(cluster: &str, c: &config::CircuitBreakers, metrics: &Metrics) -> Self {
        Self {
            active: AtomicU64::new(0),
            percent: c.retry_budget_percent.0,
            min_concurrency: u64::from(c.min_retry_concurrency),
            max: c.max_retries.map(u64::from),
            retries: metrics.retry_counter(cluster, "retry"),
            overflow: metrics.retry_counter(cluster, "overflow"),
            per_try_timeouts: metrics.retry_counter(cluster, "per_try_timeout"),
        }
    }

    /// A retry may go when fewer than the budget are in flight; `in_flight` is the cluster's
    /// requests in flight. The retry counts until the returned guard drops.
    pub fn acquire(&self, in_flight: u64) -> Option<RetryGuard<'_>> {
        let by_share = (in_flight as f64 * self.percent / 100.0) as u64;
        let mut limit = by_share.max(self.min_concurrency);
        if let Some(m) = self.max {
            limit = limit.min(m);
        }
        let taken = self.active.fetch_add(1, Ordering::AcqRel);
        if taken >= limit {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.overflow.inc();
            return None;
        }
        self.retries.inc();
        Some(RetryGuard(self))
    }
}

/// One retry in flight, counted against its cluster's budget.
pub struct RetryGuard<'a>(&'a RetryBudget);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_share_of_requests_in_flight_with_a_floor() {
        let m = Metrics::new();
        let b = RetryBudget::new("c", &config::CircuitBreakers::default(), &m);
        // 20 % of 10 is 2, below the floor of 3.
        let held: Vec<_> = (0..3).map(|_| b.acquire(10).expect("within the floor")).collect();
        assert!(b.acquire(10).is_none());
        assert!(b.acquire(20).is_some(), "20 % of 20 is 4");
        drop(held);
        assert!(b.acquire(10).is_some());
        let capped = RetryBudget::new("c", &config::CircuitBreakers { max_retries: Some(1), ..Default::default() }, &m);
        let _one = capped.acquire(1000).unwrap();
        assert!(capped.acquire(1000).is_none(), "max_retries caps the budget");
    }

    #[test]
    fn percentages_are_drawn() {
        assert!(drawn(Percent(100.0)) && !drawn(Percent(0.0)));
        let n = (0..20_000).filter(|_| drawn(Percent(25.0))).count();
        assert!((4_500..5_500).contains(&n), "{n}");
    }
}
