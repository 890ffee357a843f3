//! The figures every benchmark reports: percentiles (one definition, nearest
//! rank, for latencies and lateness alike) and rates.

use std::time::Duration;

/// The value at percentile `p` (0–100) of `sorted` (ascending), nearest rank:
/// the smallest value with at least `p` % of the values at or below it. `0.0`
/// for no values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds of each duration, sorted: ready for [`percentile`].
pub fn sorted_ms(durations: impl IntoIterator<Item = Duration>) -> Vec<f64> {
    let mut ms: Vec<f64> = durations
        .into_iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// `count` per second of `elapsed` (never a division by zero).
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&values, 50.0) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&values, 99.0) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&values, 100.0) - 100.0).abs() < f64::EPSILON);
        assert!((percentile(&[7.0], 99.0) - 7.0).abs() < f64::EPSILON);
        assert!((percentile(&[1.0, 2.0, 3.0], 50.0) - 2.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 50.0).abs() < f64::EPSILON);
    }

    #[test]
    fn durations_become_sorted_milliseconds() {
        let ms = sorted_ms([Duration::from_millis(3), Duration::from_micros(1500)]);
        assert_eq!(ms, vec![1.5, 3.0]);
        assert!((percentile(&ms, 50.0) - 1.5).abs() < f64::EPSILON);
    }

    #[test]
    fn rates_never_divide_by_zero() {
        assert!((rate(10, Duration::from_secs(2)) - 5.0).abs() < f64::EPSILON);
        assert!(rate(1, Duration::ZERO).is_finite());
    }
}
