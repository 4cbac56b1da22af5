//! Expert service metrics: the assignments this device computed, its busy
//! time, batch sizes and queue time, and the skew between the experts of
//! its group.

use std::collections::BTreeMap;
use std::sync::Arc;

use moge_shared::routing::Assignment;
use moge_telemetry::window::Window;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};

/// Bucket bounds of batch sizes, in tokens.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Measurements of one `Compute` call.
pub struct ComputeRecord<'a> {
    pub layer: usize,
    pub tokens: usize,
    /// Token-expert assignments computed: one per row for the shared expert.
    pub assignments: u64,
    /// The group's assignments, for per-expert counts; empty for the shared expert.
    pub expert_assignments: &'a [Assignment],
    /// Seconds the call waited for a compute thread.
    pub queue_seconds: f64,
    /// Seconds of compute.
    pub busy_seconds: f64,
}

pub struct ExpertMetrics {
    device_assignments: Counter<u64>,
    expert_assignments: Option<Counter<u64>>,
    busy: Counter<f64>,
    batch_tokens: Histogram<u64>,
    queue: Histogram<f64>,
    /// Per layer, per expert of the group: assignments in the last minute.
    recent: Arc<BTreeMap<usize, Vec<Window>>>,
    _skew: Option<ObservableGauge<f64>>,
    base: [KeyValue; 2],
}

impl ExpertMetrics {
    /// Creates the instruments of a process hosting `group` (a group index,
    /// or `shared`) of `layers`, with `experts` experts per layer (0 for the
    /// shared expert). `per_expert` adds one assignment series per expert.
    pub fn new(group: String, replica: &str, layers: &[usize], experts: usize, per_expert: bool) -> ExpertMetrics {
        let meter = moge_telemetry::meter();
        let base = [
            KeyValue::new("group", group),
            KeyValue::new("replica", replica.to_owned()),
        ];
        let recent: Arc<BTreeMap<usize, Vec<Window>>> = Arc::new(
            layers
                .iter()
                .map(|&layer| (layer, (0..experts).map(|_| Window::new(Window::MINUTE)).collect()))
                .collect(),
        );
        let skew = (experts > 0).then(|| {
            let recent = Arc::clone(&recent);
            let base = base.clone();
            meter
                .f64_observable_gauge("moge_group_expert_skew")
                .with_unit("1")
                .with_description(
                    "Assignments of the busiest expert of the group over the mean of its experts, last minute",
                )
                .with_callback(move |observer| {
                    for (&layer, windows) in recent.iter() {
                        let sums: Vec<f64> = windows.iter().map(|window| window.summary().0.sum).collect();
                        let mean = sums.iter().sum::<f64>() / sums.len() as f64;
                        if mean > 0.0 {
                            let max = sums.iter().copied().fold(0.0, f64::max);
                            let mut attributes = base.to_vec();
                            attributes.push(KeyValue::new("layer", layer as i64));
                            observer.observe(max / mean, &attributes);
                        }
                    }
                })
                .build()
        });
        ExpertMetrics {
            device_assignments: meter
                .u64_counter("moge_device_assignments")
                .with_unit("{assignment}")
                .with_description("Token-expert assignments computed by this device")
                .build(),
            expert_assignments: per_expert.then(|| {
                meter
                    .u64_counter("moge_expert_assignments")
                    .with_unit("{assignment}")
                    .with_description("Token-expert assignments computed per expert of the group")
                    .build()
            }),
            busy: meter
                .f64_counter("moge_expert_busy")
                .with_unit("s")
                .with_description("Seconds this device spent computing")
                .build(),
            batch_tokens: meter
                .u64_histogram("moge_expert_batch_tokens")
                .with_unit("{token}")
                .with_description("Tokens per compute call")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            queue: meter
                .f64_histogram("moge_expert_queue_duration")
                .with_unit("s")
                .with_description("Time a compute call waited for a compute thread")
                .with_boundaries(moge_telemetry::LATENCY_BUCKETS.to_vec())
                .build(),
            recent,
            _skew: skew,
            base,
        }
    }

    /// Records one compute call.
    pub fn record(&self, record: ComputeRecord<'_>) {
        let mut attributes = self.base.to_vec();
        attributes.push(KeyValue::new("layer", record.layer as i64));
        self.device_assignments.add(record.assignments, &attributes);
        self.busy.add(record.busy_seconds, &attributes);
        self.batch_tokens.record(record.tokens as u64, &attributes);
        self.queue.record(record.queue_seconds, &self.base);

        let Some(windows) = self.recent.get(&record.layer) else {
            return;
        };
        if windows.is_empty() {
            return;
        }
        let mut counts = vec![0u64; windows.len()];
        for assignment in record.expert_assignments {
            if let Some(count) = counts.get_mut(assignment.expert as usize) {
                *count += 1;
            }
        }
        let now = std::time::Instant::now();
        for (window, &count) in windows.iter().zip(&counts) {
            if count > 0 {
                window.record_at(now, count as f64);
            }
        }
        if let Some(counter) = &self.expert_assignments {
            attributes.push(KeyValue::new("expert", ""));
            for (expert, &count) in counts.iter().enumerate() {
                if count > 0 {
                    attributes[3] = KeyValue::new("expert", expert as i64);
                    counter.add(count, &attributes);
                }
            }
        }
    }
}
