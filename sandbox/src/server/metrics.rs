//! Per-version request metrics: counts by outcome and a latency histogram,
//! recorded lock-free by the request path and read as a plain snapshot.
//!
//! Latency is the time from the request's routing to its response headers
//! (what a client waits before the first byte). Buckets grow by 2^(1/4)
//! from [`FIRST_BOUND_US`], so a percentile read from them is at most ~19 %
//! above the true value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bound of the first latency bucket, in microseconds.
pub const FIRST_BOUND_US: f64 = 16.0;
/// Buckets per doubling of latency.
const PER_DOUBLING: usize = 4;
/// Number of finite buckets: up to 16 us * 2^24 (about 4.5 minutes).
const BUCKETS: usize = 24 * PER_DOUBLING + 1;

/// Counters of one function version.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: AtomicU64,
    non_2xx: AtomicU64,
    errors: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Counts per bucket; the last one also takes everything beyond.
    latency: [AtomicU64; BUCKETS],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: AtomicU64::new(0),
            non_2xx: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Upper bound of bucket `i`, in microseconds.
fn bound_us(i: usize) -> f64 {
    FIRST_BOUND_US * 2f64.powf(i as f64 / PER_DOUBLING as f64)
}

fn bucket_of(us: f64) -> usize {
    if us <= FIRST_BOUND_US {
        return 0;
    }
    let i = ((us / FIRST_BOUND_US).log2() * PER_DOUBLING as f64).ceil();
    (i as usize).min(BUCKETS - 1)
}

impl RequestMetrics {
    /// Records one request: its status (or `None` when the function failed
    /// without a response of its own: trapped, timed out, over its memory
    /// limit, no capacity) and its latency.
    pub fn record(&self, status: Option<u16>, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match status {
            Some(s) if (200..300).contains(&s) => {}
            Some(_) => {
                self.non_2xx.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.non_2xx.fetch_add(1, Ordering::Relaxed);
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let us = latency.as_secs_f64() * 1e6;
        self.latency_sum_us
            .fetch_add(us.round() as u64, Ordering::Relaxed);
        self.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters (each read atomically).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> Option<Duration> {
            if total == 0 {
                return None;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Some(Duration::from_secs_f64(bound_us(i) / 1e6));
                }
            }
            None
        };
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            // Powers of two only: enough resolution for a Prometheus histogram.
            if i % PER_DOUBLING == 0 && i + 1 < BUCKETS {
                buckets.push((bound_us(i) / 1e6, cumulative));
            }
        }
        MetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            non_2xx: self.non_2xx.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_sum: Duration::from_micros(self.latency_sum_us.load(Ordering::Relaxed)),
            latency_p50: quantile(0.50),
            latency_p99: quantile(0.99),
            latency_buckets: buckets,
        }
    }
}

/// What [`RequestMetrics::snapshot`] returns: plain numbers for a caller to
/// render (Prometheus text, JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests routed to this version.
    pub requests: u64,
    /// Requests answered with a status outside 2xx (errors included).
    pub non_2xx: u64,
    /// Requests the function failed without answering itself (trap, time or
    /// memory limit, no instance capacity): the host answered 5xx.
    pub errors: u64,
    /// Sum of all latencies.
    pub latency_sum: Duration,
    /// Median latency (bucket upper bound), `None` before the first request.
    pub latency_p50: Option<Duration>,
    /// 99th percentile latency (bucket upper bound).
    pub latency_p99: Option<Duration>,
    /// Cumulative histogram: (upper bound in seconds, requests at or below
    /// it); requests beyond the last bound count only in `requests`.
    pub latency_buckets: Vec<(f64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let m = RequestMetrics::default();
        for _ in 0..98 {
            m.record(Some(200), Duration::from_micros(100));
        }
        m.record(Some(404), Duration::from_millis(10));
        m.record(None, Duration::from_millis(100));
        let s = m.snapshot();
        assert_eq!((s.requests, s.non_2xx, s.errors), (100, 2, 1));
        let p50 = s.latency_p50.expect("p50");
        assert!(p50 >= Duration::from_micros(100) && p50 < Duration::from_micros(120));
        let p99 = s.latency_p99.expect("p99");
        assert!(p99 >= Duration::from_millis(10) && p99 < Duration::from_millis(12));
        let last = s.latency_buckets.last().expect("buckets");
        assert_eq!(last.1, 100);
        assert!(s
            .latency_buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn empty_metrics_have_no_percentiles() {
        let s = RequestMetrics::default().snapshot();
        assert_eq!(s.requests, 0);
        assert!(s.latency_p50.is_none() && s.latency_p99.is_none());
    }
}
