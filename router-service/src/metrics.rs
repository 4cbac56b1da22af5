//! Router metrics: per batch, the imbalance score and the assignments of
//! every group, by layer and routing mode.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};

/// Bucket bounds of the imbalance score histogram. MoGE scores exactly 0,
/// so the first bucket contains every MoGE batch.
const IMBALANCE_BUCKETS: [f64; 12] = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 4.0];

/// Bucket bounds of batch sizes, in tokens.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

pub struct RouterMetrics {
    imbalance_score: Histogram<f64>,
    group_assignments: Counter<u64>,
    batches: Counter<u64>,
    batch_tokens: Histogram<u64>,
    _routing_mode: ObservableGauge<u64>,
    replica: KeyValue,
}

impl RouterMetrics {
    pub fn new(default_mode: &'static str, replica: &str) -> RouterMetrics {
        let meter = moge_telemetry::meter();
        let replica = KeyValue::new("replica", replica.to_owned());
        let mode_attributes = [KeyValue::new("mode", default_mode), replica.clone()];
        RouterMetrics {
            imbalance_score: meter
                .f64_histogram("moge_router_imbalance_score")
                .with_description("Imbalance score (max - min) / tokens of each routed batch, one group per device")
                .with_boundaries(IMBALANCE_BUCKETS.to_vec())
                .build(),
            group_assignments: meter
                .u64_counter("moge_router_group_assignments")
                .with_unit("{assignment}")
                .with_description("Token-expert assignments routed to each group")
                .build(),
            batches: meter
                .u64_counter("moge_router_batches")
                .with_unit("{batch}")
                .with_description("Batches routed")
                .build(),
            batch_tokens: meter
                .u64_histogram("moge_router_batch_tokens")
                .with_unit("{token}")
                .with_description("Tokens per routed batch")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            _routing_mode: meter
                .u64_observable_gauge("moge_router_routing_mode")
                .with_description("1 for the routing mode of requests that do not choose one")
                .with_callback(move |observer| observer.observe(1, &mode_attributes))
                .build(),
            replica,
        }
    }

    /// Records one routed batch.
    pub fn record(
        &self,
        layer: usize,
        mode: &'static str,
        tokens: usize,
        imbalance_score: f64,
        group_assignments: &[u64],
    ) {
        let attributes = [
            KeyValue::new("layer", layer as i64),
            KeyValue::new("mode", mode),
            self.replica.clone(),
        ];
        self.imbalance_score.record(imbalance_score, &attributes);
        self.batches.add(1, &attributes);
        self.batch_tokens.record(tokens as u64, &attributes);
        let mut with_group = attributes.to_vec();
        with_group.push(KeyValue::new("group", ""));
        for (group, &count) in group_assignments.iter().enumerate() {
            with_group[3] = KeyValue::new("group", group.to_string());
            self.group_assignments.add(count, &with_group);
        }
    }
}
