//! Medians and percentiles of samples.

/// The median (upper middle for an even count); NaN for none.
pub fn median(v: Vec<f64>) -> f64 {
    percentile(v, 50.0)
}

/// The `p`th percentile by the nearest-rank method on the sorted samples (p50 of an even
/// count is the upper middle); NaN for none. NaN samples sort last.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).floor() as usize;
    v[rank.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert!(median(vec![]).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(v.clone(), 99.0), 100.0);
        assert_eq!(percentile(v.clone(), 50.0), 51.0);
        assert_eq!(percentile(v, 0.0), 1.0);
    }
}
