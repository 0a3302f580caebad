//! Latency histograms in microseconds.
//!
//! [`Histogram`] is a log-linear histogram for percentiles: every power-of-two
//! range is split into 16 equal sub-buckets, so a bucket is never wider than
//! 1/16 of its lower bound (values below 32 µs are exact). It covers
//! 0..2^37 µs (about 38 hours); larger values are counted in the last bucket,
//! and `sum_us`/`max_us` still see their true value. The bucket array is
//! allocated once in [`Histogram::new`] and never grows. It is not
//! synchronised: its owner (for example a locked map entry) serialises access.
//!
//! [`AtomicBuckets`] is the hot-path alternative: fixed Prometheus-style
//! bounds ([`BOUNDS_US`]), one relaxed atomic add per bucket, sum and count,
//! no lock and no allocation. Its [`snapshot`](AtomicBuckets::snapshot) is
//! cumulative, as Prometheus' `le` buckets are.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// log2 of the number of linear sub-buckets per power-of-two range.
const SUB_BITS: u32 = 4;
/// Linear sub-buckets per power-of-two range.
const SUB: usize = 1 << SUB_BITS;
/// Values are tracked exactly below `2^MAX_BITS` µs.
const MAX_BITS: u32 = 37;
/// Largest value that gets its own bucket; anything above shares the last one.
const MAX_TRACKED: u64 = (1 << MAX_BITS) - 1;
/// Number of buckets: `2 * SUB` exact ones below `2 * SUB`, then `SUB` for
/// each power-of-two range from `2^(SUB_BITS + 1)` up to `2^MAX_BITS`.
const BUCKETS: usize = SUB * (MAX_BITS - SUB_BITS + 1) as usize;

/// Bucket holding `us` (values above [`MAX_TRACKED`] go to the last bucket).
fn bucket_of(us: u64) -> usize {
    let v = us.min(MAX_TRACKED);
    let msb = 63 - (v | 1).leading_zeros();
    let shift = msb.saturating_sub(SUB_BITS);
    // (v >> shift) is in SUB..2*SUB once shift > 0, so ranges follow each other.
    (shift as usize) * SUB + (v >> shift) as usize
}

/// Lowest value and width of bucket `index`.
fn bucket_range(index: usize) -> (u64, u64) {
    if index < 2 * SUB {
        return (index as u64, 1);
    }
    let shift = index / SUB - 1;
    let mantissa = (index - shift * SUB) as u64;
    (mantissa << shift, 1 << shift)
}

/// A log-linear latency histogram (see the module docs).
#[derive(Clone)]
pub struct Histogram {
    buckets: Box<[u32]>,
    count: u64,
    sum_us: u64,
    min_us: u64,
    max_us: u64,
}

impl Histogram {
    /// An empty histogram; allocates its buckets once.
    pub fn new() -> Self {
        Self {
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum_us: 0,
            min_us: u64::MAX,
            max_us: 0,
        }
    }

    /// Counts one value.
    pub fn record(&mut self, us: u64) {
        if let Some(slot) = self.buckets.get_mut(bucket_of(us)) {
            *slot = slot.saturating_add(1);
        }
        self.count = self.count.saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(us);
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the recorded values (saturating).
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// Largest recorded value, 0 when empty.
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// Smallest recorded value, 0 when empty.
    pub fn min_us(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min_us }
    }

    /// Integer mean, 0 when empty.
    pub fn mean_us(&self) -> u64 {
        self.sum_us.checked_div(self.count).unwrap_or(0)
    }

    /// The value at percentile `p` (0..=100, clamped; NaN counts as 0).
    ///
    /// Returns the midpoint of the bucket that holds the rank, clamped to
    /// `[min, max]`, so the error is within that bucket's width. `p <= 0`
    /// gives the exact minimum, `p >= 100` the exact maximum, and an empty
    /// histogram gives 0.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
        if p <= 0.0 {
            return self.min_us();
        }
        if p >= 100.0 {
            return self.max_us;
        }
        // Rank of the wanted value, 1-based; the float product is exact
        // enough: counts above 2^53 are far beyond any realistic lifetime.
        let rank = ((p / 100.0) * self.count as f64).ceil() as u64;
        let rank = rank.clamp(1, self.count);
        let mut seen = 0u64;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                let (low, width) = bucket_range(index);
                let mid = low + (width - 1) / 2;
                return mid.clamp(self.min_us(), self.max_us);
            }
        }
        // Only reachable if a bucket saturated at u32::MAX.
        self.max_us
    }

    /// Adds every value of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("sum_us", &self.sum_us)
            .field("min_us", &self.min_us())
            .field("max_us", &self.max_us)
            .finish_non_exhaustive()
    }
}

/// Upper bounds (`le`, inclusive) of [`AtomicBuckets`], in microseconds.
pub const BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Number of [`AtomicBuckets`] buckets: one per bound plus `+Inf`.
const ATOMIC_BUCKETS: usize = BOUNDS_US.len() + 1;

/// Lock-free latency buckets with fixed bounds, for the hot path.
#[derive(Debug, Default)]
pub struct AtomicBuckets {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    counts: [AtomicU64; ATOMIC_BUCKETS],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A point-in-time copy of [`AtomicBuckets`], ready for Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketsSnapshot {
    /// `cumulative[i]` counts values `<= BOUNDS_US[i]`; the last is `+Inf`.
    pub cumulative: [u64; ATOMIC_BUCKETS],
    pub sum_us: u64,
    /// Equal to the `+Inf` bucket, as Prometheus requires.
    pub count: u64,
}

impl BucketsSnapshot {
    /// Adds another snapshot (e.g. of another stripe) to this one.
    pub fn merge(&mut self, other: &BucketsSnapshot) {
        for (a, b) in self.cumulative.iter_mut().zip(other.cumulative.iter()) {
            *a += b;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }
}

impl Default for BucketsSnapshot {
    fn default() -> Self {
        Self {
            cumulative: [0; ATOMIC_BUCKETS],
            sum_us: 0,
            count: 0,
        }
    }
}

impl AtomicBuckets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one value (relaxed atomics, no lock); `owned`: only this
    /// thread writes these buckets (see [`super::bump`]).
    pub fn record(&self, us: u64, owned: bool) {
        let index = BOUNDS_US.partition_point(|&bound| bound < us);
        if let Some(slot) = self.counts.get(index) {
            super::bump(slot, 1, owned);
        }
        super::bump(&self.sum_us, us, owned);
        super::bump(&self.count, 1, owned);
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Cumulative counts. Concurrent records may land between the loads, so
    /// `count` is taken from the buckets themselves (it always equals the
    /// `+Inf` bucket) and `sum_us` may be a few values ahead or behind.
    pub fn snapshot(&self) -> BucketsSnapshot {
        let mut cumulative = [0u64; ATOMIC_BUCKETS];
        let mut total = 0u64;
        for (out, slot) in cumulative.iter_mut().zip(self.counts.iter()) {
            total = total.wrapping_add(slot.load(Ordering::Relaxed));
            *out = total;
        }
        BucketsSnapshot {
            cumulative,
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        let mut expected_low = 0u64;
        for index in 0..BUCKETS {
            let (low, width) = bucket_range(index);
            assert_eq!(low, expected_low, "bucket {index}");
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(low + width - 1), index);
            expected_low = low + width;
        }
        assert_eq!(expected_low, 1 << MAX_BITS);
    }

    #[test]
    fn bucket_width_is_at_most_a_sixteenth_of_its_values() {
        for index in 2 * SUB..BUCKETS {
            let (low, width) = bucket_range(index);
            assert!(width * 16 <= low, "bucket {index}: low {low} width {width}");
        }
    }

    #[test]
    fn values_beyond_the_range_clamp_into_the_last_bucket() {
        let mut h = Histogram::new();
        h.record(u64::MAX / 2);
        h.record(1 << 40);
        assert_eq!(bucket_of(1 << 40), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(h.count(), 2);
        assert_eq!(h.max_us(), u64::MAX / 2);
        assert_eq!(h.percentile(50.0), 1 << 40);
    }

    #[test]
    fn empty_histogram_reports_zeroes() {
        let h = Histogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.min_us(), 0);
        assert_eq!(h.max_us(), 0);
        assert_eq!(h.mean_us(), 0);
        assert_eq!(h.percentile(50.0), 0);
        assert_eq!(h.percentile(100.0), 0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 0..32 {
            h.record(v);
        }
        assert_eq!(h.percentile(0.0), 0);
        assert_eq!(h.percentile(50.0), 15);
        assert_eq!(h.percentile(100.0), 31);
        assert_eq!(h.sum_us(), (0..32).sum::<u64>());
        assert_eq!(h.mean_us(), 15);
    }

    #[test]
    fn percentiles_are_within_the_bucket_width() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for p in [1.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9] {
            let exact = (p / 100.0 * 100_000.0_f64).ceil() as u64;
            let got = h.percentile(p);
            let (_, width) = bucket_range(bucket_of(exact));
            assert!(
                got.abs_diff(exact) < width,
                "p{p}: got {got}, exact {exact}"
            );
            assert!(
                got.abs_diff(exact) * 16 <= exact,
                "p{p}: got {got}, exact {exact}"
            );
        }
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(100.0), 100_000);
        assert_eq!(h.percentile(f64::NAN), 1);
        assert_eq!(h.percentile(250.0), 100_000);
        assert_eq!(h.mean_us(), 50_000);
    }

    #[test]
    fn percentile_is_clamped_to_min_and_max() {
        let mut h = Histogram::new();
        for _ in 0..10 {
            h.record(1_000_001);
        }
        // The bucket's midpoint differs from the only value; clamping fixes it.
        assert_eq!(h.percentile(50.0), 1_000_001);
        assert_eq!(h.percentile(99.0), 1_000_001);
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..1_000 {
            a.record(v);
            b.record(v + 10_000);
        }
        let mut both = Histogram::new();
        for v in 0..1_000 {
            both.record(v);
            both.record(v + 10_000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2_000);
        assert_eq!(a.min_us(), 0);
        assert_eq!(a.max_us(), 10_999);
        assert_eq!(a.sum_us(), both.sum_us());
        for p in [1.0, 25.0, 50.0, 75.0, 99.0] {
            assert_eq!(a.percentile(p), both.percentile(p));
        }
        // Merging an empty histogram changes nothing.
        a.merge(&Histogram::new());
        assert_eq!(a.min_us(), 0);
        assert_eq!(a.count(), 2_000);
    }

    #[test]
    fn atomic_buckets_are_cumulative_and_inclusive() {
        let b = AtomicBuckets::default();
        b.record(0, true);
        b.record(500, true); // le=500 is inclusive
        b.record(501, true);
        b.record(10_000_000, true);
        b.record(10_000_001, true); // +Inf
        let s = b.snapshot();
        assert_eq!(s.cumulative[0], 2);
        assert_eq!(s.cumulative[1], 3);
        assert_eq!(s.cumulative[12], 3);
        assert_eq!(s.cumulative[13], 4);
        assert_eq!(s.cumulative[14], 5);
        assert_eq!(s.count, 5);
        assert_eq!(b.count(), 5);
        assert_eq!(s.sum_us, 500 + 501 + 10_000_000 + 10_000_001);
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn atomic_buckets_count_from_many_threads() {
        let b = AtomicBuckets::new();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let b = &b;
                scope.spawn(move || {
                    for i in 0..1_000u64 {
                        b.record(i * 1_000 + t, false);
                    }
                });
            }
        });
        let s = b.snapshot();
        assert_eq!(s.count, 4_000);
        assert_eq!(b.count(), 4_000);
    }
}
