//! Gateway metrics: requests, tokens and latency by stage, batch sizes,
//! the straggler gap, ready replicas, and the balance report's tracker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use moge_telemetry::LATENCY_BUCKETS;
use moge_telemetry::balance::{BalanceTracker, DeviceShare};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableCounter, ObservableGauge};

use crate::upstream::{Pool, Upstreams};

/// Bucket bounds of batch sizes, in tokens.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Bucket bounds of requests per batch.
const REQUEST_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Measurements of one batch, for metrics and the balance report.
pub struct BatchStats {
    /// Layer index.
    pub layer: u32,
    /// Routing mode the router applied.
    pub mode: &'static str,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Requests in the batch.
    pub requests: usize,
    /// Seconds of the router call.
    pub route_seconds: f64,
    /// Seconds from the first expert call to the last response.
    pub experts_seconds: f64,
    /// Seconds between the first and the last group to respond.
    pub straggler_gap_seconds: f64,
    /// Imbalance score of the batch, one group per device.
    pub imbalance_score: f64,
    /// Assignments each device computed.
    pub shares: Vec<DeviceShare>,
}

/// The gateway's instruments.
pub struct GatewayMetrics {
    requests: Counter<u64>,
    tokens: Counter<u64>,
    request_duration: Histogram<f64>,
    queue_duration: Histogram<f64>,
    route_duration: Histogram<f64>,
    experts_duration: Histogram<f64>,
    batch_tokens: Histogram<u64>,
    batch_requests: Histogram<u64>,
    straggler_gap: Histogram<f64>,
    _ready_replicas: ObservableGauge<u64>,
    _configured_replicas: ObservableGauge<u64>,
    _queued_tokens: ObservableGauge<u64>,
    _retries: ObservableCounter<u64>,
    _ejections: ObservableCounter<u64>,
    /// Tokens admitted but not yet in a running batch; the batcher updates it.
    pub queued_tokens: Arc<AtomicUsize>,
    /// Per-device loads for `GET /v1/balance`.
    pub balance: BalanceTracker,
}

/// Labels of an upstream pool: its role and, for a group, its index.
fn pool_attributes(upstreams: &Upstreams) -> Vec<(&Pool, [KeyValue; 2])> {
    let mut pools = vec![(
        &upstreams.router,
        [KeyValue::new("role", "router"), KeyValue::new("group", "")],
    )];
    for (index, pool) in upstreams.groups.iter().enumerate() {
        pools.push((
            pool,
            [
                KeyValue::new("role", "expert_group"),
                KeyValue::new("group", index.to_string()),
            ],
        ));
    }
    pools.push((
        &upstreams.shared_expert,
        [
            KeyValue::new("role", "shared_expert"),
            KeyValue::new("group", moge_telemetry::balance::SHARED_GROUP),
        ],
    ));
    pools
}

impl GatewayMetrics {
    /// Creates the instruments; the replica gauges read `upstreams` at every
    /// collection. `routing_mode` is the deployment's default.
    pub fn new(upstreams: &Arc<Upstreams>, routing_mode: String) -> GatewayMetrics {
        let meter = moge_telemetry::meter();
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        let ready = Arc::clone(upstreams);
        let configured = Arc::clone(upstreams);
        let retried = Arc::clone(upstreams);
        let ejected = Arc::clone(upstreams);
        let queued_tokens = Arc::new(AtomicUsize::new(0));
        let queued = Arc::clone(&queued_tokens);
        GatewayMetrics {
            requests: meter
                .u64_counter("moge_gateway_requests")
                .with_unit("{request}")
                .with_description("Inference requests answered, by protocol and status code")
                .build(),
            tokens: meter
                .u64_counter("moge_gateway_tokens")
                .with_unit("{token}")
                .with_description("Tokens of successful inference requests")
                .build(),
            request_duration: seconds(
                "moge_gateway_request_duration",
                "Time from receiving an inference request to its response",
            ),
            queue_duration: seconds(
                "moge_gateway_queue_duration",
                "Time a request waited in the batch queue",
            ),
            route_duration: seconds("moge_gateway_route_duration", "Time of the router call of a batch"),
            experts_duration: seconds(
                "moge_gateway_experts_duration",
                "Time from the first expert call of a batch to the last response",
            ),
            batch_tokens: meter
                .u64_histogram("moge_gateway_batch_tokens")
                .with_unit("{token}")
                .with_description("Tokens per batch")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            batch_requests: meter
                .u64_histogram("moge_gateway_batch_requests")
                .with_unit("{request}")
                .with_description("Requests per batch")
                .with_boundaries(REQUEST_BUCKETS.to_vec())
                .build(),
            straggler_gap: seconds(
                "moge_gateway_straggler_gap",
                "Per batch, how long the first expert group to respond waited for the last",
            ),
            _ready_replicas: meter
                .u64_observable_gauge("moge_gateway_ready_replicas")
                .with_description("Upstream replicas that passed their last health check")
                .with_callback(move |observer| {
                    for (pool, attributes) in pool_attributes(&ready) {
                        observer.observe(pool.ready_replicas() as u64, &attributes);
                    }
                })
                .build(),
            _configured_replicas: meter
                .u64_observable_gauge("moge_gateway_configured_replicas")
                .with_description("Upstream replicas configured")
                .with_callback(move |observer| {
                    for (pool, attributes) in pool_attributes(&configured) {
                        observer.observe(pool.replicas.len() as u64, &attributes);
                    }
                })
                .build(),
            _queued_tokens: meter
                .u64_observable_gauge("moge_gateway_queued_tokens")
                .with_unit("{token}")
                .with_description("Tokens admitted but not yet in a running batch, limited by --max-queued-tokens")
                .with_callback(move |observer| observer.observe(queued.load(Ordering::Relaxed) as u64, &[]))
                .build(),
            _retries: meter
                .u64_observable_counter("moge_gateway_upstream_retries")
                .with_unit("{call}")
                .with_description("Upstream calls moved to another replica after a retryable failure")
                .with_callback(move |observer| {
                    for (pool, attributes) in pool_attributes(&retried) {
                        observer.observe(pool.retries(), &attributes);
                    }
                })
                .build(),
            _ejections: meter
                .u64_observable_counter("moge_gateway_replica_ejections")
                .with_unit("{ejection}")
                .with_description("Times an upstream replica was ejected after a failed call")
                .with_callback(move |observer| {
                    for (pool, [role, group]) in pool_attributes(&ejected) {
                        for replica in &pool.replicas {
                            let attributes = [
                                role.clone(),
                                group.clone(),
                                KeyValue::new("replica", replica.name().to_string()),
                            ];
                            observer.observe(replica.ejections(), &attributes);
                        }
                    }
                })
                .build(),
            queued_tokens,
            balance: BalanceTracker::new(upstreams.groups.len(), routing_mode),
        }
    }

    /// Records one completed request, successful or not.
    pub fn record_request(&self, protocol: &'static str, status: tonic::Code, seconds: f64) {
        let status = moge_telemetry::status_name(status);
        self.requests.add(
            1,
            &[KeyValue::new("protocol", protocol), KeyValue::new("status", status)],
        );
        self.request_duration
            .record(seconds, &[KeyValue::new("protocol", protocol)]);
    }

    /// Records how long one request waited for its batch to start.
    pub fn record_queue(&self, seconds: f64) {
        self.queue_duration.record(seconds, &[]);
    }

    /// Records one successful batch.
    pub fn record_batch(&self, stats: &BatchStats) {
        let attributes = [
            KeyValue::new("layer", i64::from(stats.layer)),
            KeyValue::new("mode", stats.mode),
        ];
        self.tokens.add(stats.tokens as u64, &attributes);
        self.route_duration.record(stats.route_seconds, &attributes);
        self.experts_duration.record(stats.experts_seconds, &attributes);
        self.straggler_gap.record(stats.straggler_gap_seconds, &attributes);
        self.batch_tokens.record(stats.tokens as u64, &attributes);
        self.batch_requests.record(stats.requests as u64, &attributes);
        self.balance.record_batch(
            stats.mode,
            stats.imbalance_score,
            stats.straggler_gap_seconds,
            &stats.shares,
        );
    }
}
