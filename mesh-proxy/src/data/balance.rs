//! Load-balancing decisions: which endpoint of a cluster, and which cluster of a weighted rule.
//!
//! Pure functions over indices and loads, so they are tested without sockets; the random source is
//! passed in (a fixed seed in tests, a per-thread `SmallRng` in the proxy, which needs no lock).
//! [`hash`]: consistent hashing (ring hash and Maglev) for sticky keys.

pub mod hash;

use std::{
    cell::RefCell,
    sync::atomic::{AtomicUsize, Ordering},
};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::config::LbPolicy;

thread_local! {
    /// One generator per data-plane thread: no shared state, no lock.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// Runs `f` with this thread's random generator.
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

/// Picks an endpoint index among `n`, never `exclude` (the one whose connect just failed) unless it
/// is the only one, in which case `None`. `load(i)` is the endpoint's active requests.
pub fn pick_endpoint<R: Rng + ?Sized>(
    policy: LbPolicy,
    n: usize,
    exclude: Option<usize>,
    rr: &AtomicUsize,
    load: impl Fn(usize) -> u64,
    rng: &mut R,
) -> Option<usize> {
    let candidates = n - usize::from(exclude.is_some_and(|e| e < n));
    if candidates == 0 {
        return None;
    }
    // Maps 0..candidates onto 0..n skipping `exclude`.
    let skip = |i: usize| match exclude {
        Some(e) if i >= e => i + 1,
        _ => i,
    };
    Some(match policy {
        // A passthrough cluster has one endpoint, the connection's original destination.
        LbPolicy::RoundRobin | LbPolicy::Passthrough => skip(rr.fetch_add(1, Ordering::Relaxed) % candidates),
        LbPolicy::Random => skip(rng.random_range(0..candidates)),
        LbPolicy::LeastRequest => {
            if candidates == 1 {
                skip(0)
            } else {
                // Two distinct random choices, keep the less loaded (ties go to the first).
                let a = rng.random_range(0..candidates);
                let mut b = rng.random_range(0..candidates - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (skip(a), skip(b));
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        }
    })
}

/// Picks by weight: `cumulative[i]` is the sum of weights `0..=i`; the last entry is the total.
pub fn pick_weighted<R: Rng + ?Sized>(cumulative: &[u32], rng: &mut R) -> usize {
    match cumulative {
        [] | [_] => 0,
        _ => {
            let total = *cumulative.last().expect("checked non-empty");
            let x = rng.random_range(0..total);
            cumulative.partition_point(|&c| c <= x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn weights_are_followed_statistically() {
        let mut rng = seeded();
        // 99 / 1, then 50 / 50, then 10/20/70.
        for weights in [vec![99u32, 1], vec![50, 50], vec![10, 20, 70]] {
            let cumulative: Vec<u32> = weights
                .iter()
                .scan(0, |s, w| {
                    *s += w;
                    Some(*s)
                })
                .collect();
            let total: u32 = weights.iter().sum();
            let n = 100_000;
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..n {
                counts[pick_weighted(&cumulative, &mut rng)] += 1;
            }
            for (c, w) in counts.iter().zip(&weights) {
                let expected = f64::from(*w) / f64::from(total);
                let got = f64::from(*c) / f64::from(n);
                assert!((got - expected).abs() < 0.01, "weights {weights:?}: got {counts:?}");
            }
        }
    }

    #[test]
    fn a_single_cluster_needs_no_random_number() {
        assert_eq!(pick_weighted(&[100], &mut seeded()), 0);
    }

    #[test]
    fn round_robin_cycles_and_skips_the_failed_one() {
        let rr = AtomicUsize::new(0);
        let mut rng = seeded();
        let picks: Vec<_> =
            (0..6).map(|_| pick_endpoint(LbPolicy::RoundRobin, 3, None, &rr, |_| 0, &mut rng).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        for _ in 0..10 {
            let p = pick_endpoint(LbPolicy::RoundRobin, 3, Some(1), &rr, |_| 0, &mut rng).unwrap();
            assert_ne!(p, 1);
        }
        assert_eq!(pick_endpoint(LbPolicy::RoundRobin, 1, Some(0), &rr, |_| 0, &mut rng), None);
        assert_eq!(pick_endpoint(LbPolicy::Random, 0, None, &rr, |_| 0, &mut rng), None);
    }

    #[test]
    fn random_is_roughly_uniform() {
        let rr = AtomicUsize::new(0);
        let mut rng = seeded();
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[pick_endpoint(LbPolicy::Random, 4, None, &rr, |_| 0, &mut rng).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let rr = AtomicUsize::new(0);
        let mut rng = seeded();
        let loads = [10u64, 0, 10];
        let mut counts = [0u32; 3];
        for _ in 0..3_000 {
            counts[pick_endpoint(LbPolicy::LeastRequest, 3, None, &rr, |i| loads[i], &mut rng).unwrap()] += 1;
        }
        // Endpoint 1 wins every pair it is drawn into: 2 of the 3 pairs.
        assert!(counts[1] > 1_800, "{counts:?}");
        // Never the excluded one, even when it is the least loaded.
        for _ in 0..100 {
            assert_ne!(pick_endpoint(LbPolicy::LeastRequest, 3, Some(1), &rr, |i| loads[i], &mut rng), Some(1));
        }
    }
}
