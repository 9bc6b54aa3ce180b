//! The per-mirror sampling decision: a deterministic, evenly spread counter or a stable key hash.
//! Both work in basis points, so a percentage with two decimals is exact over a window of 10,000.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

/// Basis points in 100%.
pub const WINDOW: u64 = 10_000;

/// Decides whether one eligible request is copied to a mirror.
#[derive(Debug)]
pub struct Sampler {
    basis_points: u64,
    counter: AtomicU64,
}

impl Sampler {
    /// `basis_points` is the percentage × 100, from 0 to 10,000.
    pub fn new(basis_points: u32) -> Self {
        Sampler {
            basis_points: (basis_points as u64).min(WINDOW),
            counter: AtomicU64::new(0),
        }
    }

    /// Decide by the shared counter: request n is mirrored when
    /// ⌊(n+1)·p/W⌋ > ⌊n·p/W⌋. That takes exactly p of every W consecutive
    /// requests (p of every 100 for whole percentages), spaced evenly rather
    /// than the first p in a burst.
    pub fn by_counter(&self) -> bool {
        match self.basis_points {
            0 => false,
            WINDOW => true,
            p => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                (n + 1) * p / WINDOW > n * p / WINDOW
            }
        }
    }

    /// Decide by a stable hash of the key, the same in every process, build and
    /// machine. Mirrors of one route share the hash, so their sets nest: a key
    /// inside the 10% mirror is inside the 50% one too.
    pub fn by_key(&self, key: &[u8]) -> bool {
        key_position(key) < self.basis_points
    }
}

/// Where a key falls in the window [0, 10,000): xxh3 mapped without modulo bias.
pub fn key_position(key: &[u8]) -> u64 {
    ((xxh3_64(key) as u128 * WINDOW as u128) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(sampler: &Sampler, n: usize) -> Vec<bool> {
        (0..n).map(|_| sampler.by_counter()).collect()
    }

    #[test]
    fn whole_percentages_are_exact_per_hundred() {
        for p in [0u32, 1, 10, 25, 33, 50, 99, 100] {
            let sampler = Sampler::new(p * 100);
            let taken = picks(&sampler, 10_000);
            for window in taken.chunks(100) {
                assert_eq!(window.iter().filter(|x| **x).count(), p as usize, "p={p}");
            }
        }
    }

    #[test]
    fn two_decimals_are_exact_per_ten_thousand() {
        let sampler = Sampler::new(3333);
        let taken = picks(&sampler, 20_000);
        for window in taken.chunks(10_000) {
            assert_eq!(window.iter().filter(|x| **x).count(), 3333);
        }
    }

    #[test]
    fn picks_are_evenly_spaced_not_bursts() {
        let sampler = Sampler::new(2500);
        let taken = picks(&sampler, 100);
        let positions: Vec<usize> = (0..100).filter(|i| taken[*i]).collect();
        let gaps: Vec<usize> = positions.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g == 4), "{positions:?}");
    }

    #[test]
    fn key_decision_is_stable_and_nested() {
        let ten = Sampler::new(1000);
        let fifty = Sampler::new(5000);
        let mut in_ten = 0;
        for i in 0..20_000 {
            let key = format!("user-{i}");
            let a = ten.by_key(key.as_bytes());
            assert_eq!(a, ten.by_key(key.as_bytes()));
            if a {
                in_ten += 1;
                assert!(fifty.by_key(key.as_bytes()), "nesting broken for {key}");
            }
        }
        // 10% of 20,000 keys, within a generous binomial margin.
        assert!((1700..2300).contains(&in_ten), "{in_ten}");
    }

    #[test]
    fn key_positions_do_not_change_between_builds() {
        // Pinned values: a fleet of proxies, old and new builds, must agree on them.
        assert_eq!(key_position(b"user-1"), 4861);
        assert_eq!(key_position(b"user-42"), 3163);
        assert_eq!(key_position(b""), 1758);
    }
}
