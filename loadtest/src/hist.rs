//! Latency histograms (HdrHistogram, microseconds, 3 significant digits) and their summaries.
//! Child processes send theirs to the parent as (value, count) pairs, which merge exactly at the
//! histogram's precision.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded: one hour in microseconds (larger values are clamped).
const MAX_US: u64 = 3_600_000_000;

#[derive(Debug, Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }
}

/// A histogram as (value, count) pairs, for moving it between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Hist {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn add(&mut self, other: &Hist) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds");
    }

    pub fn to_data(&self) -> HistData {
        HistData(
            self.0
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn from_data(data: &HistData) -> Hist {
        let mut h = Hist::default();
        for &(value, count) in &data.0 {
            let _ = h.0.record_n(value.clamp(1, MAX_US), count);
        }
        h
    }

    pub fn percentiles(&self) -> Percentiles {
        if self.0.is_empty() {
            return Percentiles::default();
        }
        let q = |q: f64| ms(self.0.value_at_quantile(q));
        Percentiles {
            count: self.0.len(),
            mean_ms: self.0.mean().round() / 1000.0,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(self.0.max()),
        }
    }

    /// The latency at a series of percentiles (0 to the 99.999th, denser towards the tail), as
    /// (percentile, milliseconds) — the curve of a percentile-distribution chart.
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let n = self.0.len() as f64;
        let mut points = Vec::new();
        // x = 1 / (1 - q): 1 at the median's left end, 10 at p90, 100 at p99, ...
        let mut x: f64 = 1.0;
        while x <= 100_000.0 {
            let q = 1.0 - 1.0 / x;
            // No point beyond the resolution of the sample count.
            if q > 1.0 - 1.0 / n && x > 1.0 {
                break;
            }
            points.push((q * 100.0, ms(self.0.value_at_quantile(q))));
            x *= 10f64.powf(0.05);
        }
        // The percentiles the reports quote, exactly.
        for q in [0.5, 0.9, 0.99, 0.999, 0.9999] {
            if q <= 1.0 - 1.0 / n {
                points.push((q * 100.0, ms(self.0.value_at_quantile(q))));
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup_by(|a, b| (a.0 - b.0).abs() < 1e-9);
        points.push((100.0, ms(self.0.max())));
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_merges() {
        let mut a = Hist::default();
        for v in 1..=1000 {
            a.record_us(v * 10);
        }
        let b = Hist::from_data(&a.to_data());
        assert_eq!(a.percentiles(), b.percentiles());
        let mut c = a.clone();
        c.add(&b);
        assert_eq!(c.len(), 2000);
        let p = a.percentiles();
        assert!((p.p50_ms - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.max_ms - 10.0).abs() < 0.01, "{p:?}");
        let curve = a.curve();
        assert!(curve.len() > 10);
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
