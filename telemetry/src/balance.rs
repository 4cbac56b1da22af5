//! The balance report: per device (expert group and replica), the
//! token-expert assignments it computed, per second over the last minute and
//! in total, with the imbalance score and straggler gap of recent batches.
//! The gateway serves it as JSON at `GET /v1/balance`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::window::{Summary, Window};

/// Group label of the shared expert, which computes every token.
pub const SHARED_GROUP: &str = "shared";

/// The load of one device, a replica of a group or of the shared expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceLoad {
    /// Group index, or `shared` for the shared expert.
    pub group: String,
    /// Replica name, as the replica reports it.
    pub replica: String,
    /// Assignments per second over the window.
    pub assignments_per_second: f64,
    /// Assignments since the gateway started.
    pub assignments_total: u64,
}

/// The load of one group, summed over its replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupLoad {
    /// Group index, or `shared` for the shared expert.
    pub group: String,
    /// Assignments per second over the window.
    pub assignments_per_second: f64,
    /// Assignments since the gateway started.
    pub assignments_total: u64,
    /// Replicas that computed assignments in the window.
    pub active_replicas: usize,
}

/// Batch statistics of one routing mode over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModeBalance {
    /// Routing mode: `moge`, `top-k` or `group-limited`.
    pub mode: String,
    /// Batches in the window.
    pub batches: u64,
    /// Batches since the gateway started.
    pub batches_total: u64,
    /// Mean imbalance score of the batches in the window.
    pub imbalance_score: f64,
    /// Largest imbalance score in the window.
    pub imbalance_score_max: f64,
    /// Mean straggler gap in the window, in seconds: how long the first
    /// group to finish waited for the last.
    pub straggler_gap_seconds: f64,
    /// Largest straggler gap in the window, in seconds.
    pub straggler_gap_seconds_max: f64,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalanceReport {
    /// Seconds the window covers: one minute, or less just after start.
    pub window_seconds: f64,
    /// Routing mode of requests that do not choose one.
    pub routing_mode: String,
    /// Mean imbalance score of every batch in the window, all modes together.
    pub imbalance_score: f64,
    /// Largest imbalance score in the window.
    pub imbalance_score_max: f64,
    /// Mean straggler gap in the window, in seconds.
    pub straggler_gap_seconds: f64,
    /// Largest straggler gap in the window, in seconds.
    pub straggler_gap_seconds_max: f64,
    /// Per routing mode used in the window or before.
    pub modes: Vec<ModeBalance>,
    /// Per group, in group order, the shared expert last.
    pub groups: Vec<GroupLoad>,
    /// Per device, in group order.
    pub devices: Vec<DeviceLoad>,
}

#[derive(Debug)]
struct Counted {
    window: Window,
    total: u64,
}

impl Counted {
    fn new(start: Instant) -> Counted {
        Counted {
            window: Window::starting_at(start, Window::MINUTE),
            total: 0,
        }
    }
}

#[derive(Debug)]
struct ModeStats {
    imbalance: Window,
    straggler: Window,
    total: u64,
}

/// Sort key of a group label: groups by index, then the shared expert.
fn group_order(group: &str) -> (u64, String) {
    (group.parse().unwrap_or(u64::MAX), group.to_owned())
}

/// A device: the group's sort key from [`group_order`], and the replica name.
type DeviceKey = ((u64, String), String);

/// Collects the loads of every batch and builds the report.
#[derive(Debug)]
pub struct BalanceTracker {
    /// Start of every window, so that rates of devices seen late compare.
    start: Instant,
    routing_mode: String,
    groups: Vec<String>,
    devices: Mutex<BTreeMap<DeviceKey, Counted>>,
    modes: Mutex<BTreeMap<String, ModeStats>>,
}

/// One device's share of a batch.
#[derive(Clone, Debug)]
pub struct DeviceShare {
    /// Group index, or [`SHARED_GROUP`].
    pub group: String,
    /// Replica name.
    pub replica: String,
    /// Assignments computed.
    pub assignments: u64,
}

impl BalanceTracker {
    /// Creates a tracker for `num_groups` groups plus the shared expert;
    /// `routing_mode` is the deployment's default.
    pub fn new(num_groups: usize, routing_mode: String) -> BalanceTracker {
        let mut groups: Vec<String> = (0..num_groups).map(|group| group.to_string()).collect();
        groups.push(SHARED_GROUP.to_owned());
        BalanceTracker {
            start: Instant::now(),
            routing_mode,
            groups,
            devices: Mutex::new(BTreeMap::new()),
            modes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one batch: its routing mode, imbalance score, straggler gap
    /// in seconds, and what each device computed.
    pub fn record_batch(&self, mode: &str, imbalance_score: f64, straggler_gap_seconds: f64, shares: &[DeviceShare]) {
        let now = Instant::now();
        {
            let mut devices = self.devices.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for share in shares {
                let key = (group_order(&share.group), share.replica.clone());
                let device = devices.entry(key).or_insert_with(|| Counted::new(self.start));
                device.window.record_at(now, share.assignments as f64);
                device.total += share.assignments;
            }
        }
        let mut modes = self.modes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let stats = modes.entry(mode.to_owned()).or_insert_with(|| ModeStats {
            imbalance: Window::starting_at(self.start, Window::MINUTE),
            straggler: Window::starting_at(self.start, Window::MINUTE),
            total: 0,
        });
        stats.imbalance.record_at(now, imbalance_score);
        stats.straggler.record_at(now, straggler_gap_seconds);
        stats.total += 1;
    }

    /// Builds the report as of now.
    pub fn report(&self) -> BalanceReport {
        let now = Instant::now();
        let mut window_seconds: f64 = 0.0;
        let mut devices = Vec::new();
        let mut groups: BTreeMap<(u64, String), GroupLoad> = self
            .groups
            .iter()
            .map(|group| {
                let load = GroupLoad {
                    group: group.clone(),
                    assignments_per_second: 0.0,
                    assignments_total: 0,
                    active_replicas: 0,
                };
                (group_order(group), load)
            })
            .collect();
        for ((order, replica), device) in self.devices.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (summary, seconds) = device.window.summary_at(now);
            window_seconds = window_seconds.max(seconds);
            let rate = summary.sum / seconds;
            devices.push(DeviceLoad {
                group: order.1.clone(),
                replica: replica.clone(),
                assignments_per_second: rate,
                assignments_total: device.total,
            });
            let group = groups.entry(order.clone()).or_insert_with(|| GroupLoad {
                group: order.1.clone(),
                assignments_per_second: 0.0,
                assignments_total: 0,
                active_replicas: 0,
            });
            group.assignments_per_second += rate;
            group.assignments_total += device.total;
            group.active_replicas += usize::from(summary.count > 0);
        }

        let mut modes = Vec::new();
        let (mut imbalance, mut straggler) = (Summary::default(), Summary::default());
        for (mode, stats) in self.modes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (mode_imbalance, seconds) = stats.imbalance.summary_at(now);
            let (mode_straggler, _) = stats.straggler.summary_at(now);
            window_seconds = window_seconds.max(seconds);
            imbalance.merge(&mode_imbalance);
            straggler.merge(&mode_straggler);
            modes.push(ModeBalance {
                mode: mode.clone(),
                batches: mode_imbalance.count,
                batches_total: stats.total,
                imbalance_score: mode_imbalance.mean(),
                imbalance_score_max: mode_imbalance.max,
                straggler_gap_seconds: mode_straggler.mean(),
                straggler_gap_seconds_max: mode_straggler.max,
            });
        }
        BalanceReport {
            window_seconds,
            routing_mode: self.routing_mode.clone(),
            imbalance_score: imbalance.mean(),
            imbalance_score_max: imbalance.max,
            straggler_gap_seconds: straggler.mean(),
            straggler_gap_seconds_max: straggler.max,
            modes,
            groups: groups.into_values().collect(),
            devices,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(group: &str, replica: &str, assignments: u64) -> DeviceShare {
        DeviceShare {
            group: group.to_owned(),
            replica: replica.to_owned(),
            assignments,
        }
    }

    #[test]
    fn report_sums_replicas_per_group() {
        let tracker = BalanceTracker::new(2, "moge".to_owned());
        tracker.record_batch(
            "moge",
            0.0,
            0.001,
            &[share("0", "a", 4), share("1", "c", 4), share("shared", "s", 4)],
        );
        tracker.record_batch(
            "moge",
            0.0,
            0.003,
            &[share("0", "b", 4), share("1", "c", 4), share("shared", "s", 4)],
        );
        let report = tracker.report();
        let groups: Vec<(&str, u64, usize)> = report
            .groups
            .iter()
            .map(|group| (group.group.as_str(), group.assignments_total, group.active_replicas))
            .collect();
        assert_eq!(groups, [("0", 8, 2), ("1", 8, 1), ("shared", 8, 1)]);
        assert_eq!(report.devices.len(), 4);
        assert_eq!(report.imbalance_score, 0.0);
        assert!((report.straggler_gap_seconds - 0.002).abs() < 1e-12);
        assert_eq!(report.straggler_gap_seconds_max, 0.003);
        assert_eq!(report.modes[0].batches, 2);
    }

    #[test]
    fn report_lists_idle_groups_and_orders_numerically() {
        let tracker = BalanceTracker::new(12, "top-k".to_owned());
        tracker.record_batch("top-k", 0.5, 0.0, &[share("10", "x", 3), share("2", "y", 1)]);
        let report = tracker.report();
        let order: Vec<&str> = report.groups.iter().map(|group| group.group.as_str()).collect();
        assert_eq!(order[..3], ["0", "1", "2"]);
        assert_eq!(order[10..], ["10", "11", "shared"]);
        assert_eq!(report.groups[0].assignments_total, 0);
        assert_eq!(report.devices[0].group, "2", "devices sort by group index");
        assert_eq!(report.imbalance_score, 0.5);
        assert_eq!(report.routing_mode, "top-k");
    }

    #[test]
    fn report_round_trips_as_json() {
        let tracker = BalanceTracker::new(1, "moge".to_owned());
        tracker.record_batch("moge", 0.0, 0.0, &[share("0", "a", 2)]);
        let report = tracker.report();
        let text = serde_json::to_string(&report).unwrap();
        let parsed: BalanceReport = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, report);
    }
}
