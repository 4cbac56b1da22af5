//! Sliding one-minute statistics: per-second buckets of count, sum and
//! maximum, for rates and recent averages that a cumulative counter cannot
//! give.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Count, sum and maximum of the values recorded in some span of time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Sum of the values.
    pub sum: f64,
    /// Largest value; 0 when `count` is 0.
    pub max: f64,
}

impl Summary {
    fn add(&mut self, value: f64) {
        self.max = if self.count == 0 { value } else { self.max.max(value) };
        self.count += 1;
        self.sum += value;
    }

    /// Adds the values that `other` summarizes.
    pub fn merge(&mut self, other: &Summary) {
        if other.count == 0 {
            return;
        }
        self.max = if self.count == 0 {
            other.max
        } else {
            self.max.max(other.max)
        };
        self.count += other.count;
        self.sum += other.sum;
    }

    /// Mean of the values; 0 when none were recorded.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    second: u64,
    summary: Summary,
}

/// Values recorded over the last `seconds` seconds, in one-second buckets.
#[derive(Debug)]
pub struct Window {
    start: Instant,
    buckets: Mutex<Vec<Bucket>>,
}

impl Window {
    /// Length of the default window: one minute.
    pub const MINUTE: Duration = Duration::from_secs(60);

    /// Creates an empty window of `length`, rounded up to whole seconds.
    pub fn new(length: Duration) -> Window {
        Window::starting_at(Instant::now(), length)
    }

    /// Creates an empty window whose time starts at `start`; windows with
    /// the same start cover the same seconds, so their rates compare.
    pub fn starting_at(start: Instant, length: Duration) -> Window {
        let seconds = length.as_secs().max(1) + u64::from(length.subsec_nanos() > 0);
        Window {
            start,
            buckets: Mutex::new(vec![Bucket::default(); seconds as usize]),
        }
    }

    /// Records `value` at `now`.
    pub fn record_at(&self, now: Instant, value: f64) {
        let second = now.saturating_duration_since(self.start).as_secs() + 1;
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slots = buckets.len() as u64;
        let bucket = &mut buckets[(second % slots) as usize];
        if bucket.second != second {
            *bucket = Bucket {
                second,
                summary: Summary::default(),
            };
        }
        bucket.summary.add(value);
    }

    /// Records `value` now.
    pub fn record(&self, value: f64) {
        self.record_at(Instant::now(), value);
    }

    /// Summary of the values recorded in the window that ends at `now`, and
    /// the seconds the window covers: its length, or less while the window
    /// is younger than that.
    pub fn summary_at(&self, now: Instant) -> (Summary, f64) {
        let elapsed = now.saturating_duration_since(self.start);
        let second = elapsed.as_secs() + 1;
        let buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slots = buckets.len() as u64;
        let mut total = Summary::default();
        for bucket in buckets.iter() {
            if bucket.second != 0 && bucket.second + slots > second && bucket.second <= second {
                total.merge(&bucket.summary);
            }
        }
        let covered = elapsed.as_secs_f64().min(slots as f64).max(1e-3);
        (total, covered)
    }

    /// [`Window::summary_at`] now.
    pub fn summary(&self) -> (Summary, f64) {
        self.summary_at(Instant::now())
    }

    /// Sum of the recorded values per second over the window.
    pub fn rate(&self) -> f64 {
        let (summary, seconds) = self.summary();
        summary.sum / seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_last_minute_only() {
        let window = Window::new(Window::MINUTE);
        let t0 = window.start;
        window.record_at(t0, 5.0);
        window.record_at(t0 + Duration::from_secs(30), 7.0);
        let (summary, covered) = window.summary_at(t0 + Duration::from_secs(40));
        assert_eq!(summary.count, 2);
        assert_eq!(summary.sum, 12.0);
        assert_eq!(summary.max, 7.0);
        assert_eq!(covered, 40.0);

        let (later, covered) = window.summary_at(t0 + Duration::from_secs(75));
        assert_eq!(later.count, 1, "the value at t0 is older than a minute");
        assert_eq!(later.sum, 7.0);
        assert_eq!(covered, 60.0);

        let (empty, _) = window.summary_at(t0 + Duration::from_secs(200));
        assert_eq!(empty, Summary::default());
    }

    #[test]
    fn window_reuses_bucket_after_wrap() {
        let window = Window::new(Duration::from_secs(3));
        let t0 = window.start;
        window.record_at(t0, 1.0);
        window.record_at(t0 + Duration::from_secs(3), 2.0);
        let (summary, _) = window.summary_at(t0 + Duration::from_secs(3));
        assert_eq!(summary.count, 1);
        assert_eq!(summary.sum, 2.0);
    }

    proptest::proptest! {
        #[test]
        fn window_matches_direct_sum(events in proptest::collection::vec((0u64..300, 0.0f64..100.0), 0..200), at in 0u64..300) {
            let window = Window::new(Window::MINUTE);
            let t0 = window.start;
            let mut sorted = events.clone();
            sorted.sort_by_key(|event| event.0);
            for &(second, value) in &sorted {
                window.record_at(t0 + Duration::from_secs(second), value);
            }
            // Only buckets not overwritten by a later event count, so compare
            // at a time no earlier than the last event.
            let at = at.max(sorted.last().map_or(0, |event| event.0));
            let expected: Vec<f64> = sorted
                .iter()
                .filter(|event| event.0 + 60 > at)
                .map(|event| event.1)
                .collect();
            let (summary, _) = window.summary_at(t0 + Duration::from_secs(at));
            proptest::prop_assert_eq!(summary.count, expected.len() as u64);
            proptest::prop_assert!((summary.sum - expected.iter().sum::<f64>()).abs() < 1e-6);
        }
    }
}
