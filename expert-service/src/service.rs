//! The `moge.v1.ExpertGroup` and `moge.v1.Host` services.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use moge_shared::DType;
use moge_shared::checkpoint::{Checkpoint, CheckpointError};
use moge_shared::expert::{Expert, ExpertError, ExpertGroup};
use moge_shared::kernels::Kernel;
use moge_shared::proto::moge::v1::{
    self as wire_v1, ComputeRequest, ComputeResponse, DataType, DescribeRequest, DescribeResponse, Role,
};
use moge_shared::routing::Assignment;
use moge_shared::weights::WeightFormat;
use moge_shared::wire::{self, decode_f32s, decode_u32s, encode_matrix};
use tonic::{Request, Response, Status};

use crate::metrics::{ComputeRecord, ExpertMetrics};

/// Experts one process hosts.
#[derive(Clone, Copy, Debug)]
pub enum Hosted {
    /// One group of routed experts.
    Group(usize),
    /// The shared expert.
    SharedExpert,
}

impl fmt::Display for Hosted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hosted::Group(group) => write!(f, "group {group}"),
            Hosted::SharedExpert => f.write_str("shared expert"),
        }
    }
}

impl Hosted {
    /// Value of the `group` label of metrics: the group index, or `shared`.
    pub fn group_label(&self) -> String {
        match self {
            Hosted::Group(group) => group.to_string(),
            Hosted::SharedExpert => moge_telemetry::balance::SHARED_GROUP.to_owned(),
        }
    }
}

enum LayerWeights {
    Group(ExpertGroup),
    Shared(Expert),
}

/// The hosted weights and the compute pool, shared by all request tasks.
#[derive(Clone)]
pub struct ExpertService {
    inner: Arc<Inner>,
}

struct Inner {
    hosted: Hosted,
    layers: BTreeMap<usize, Arc<LayerWeights>>,
    pool: Arc<rayon::ThreadPool>,
    kernel: Kernel,
    hidden_size: usize,
    num_groups: usize,
    top_k: usize,
    experts_per_group: usize,
    weight_dtype: DType,
    replica: String,
    metrics: ExpertMetrics,
}

/// Options of an [`ExpertService`] beyond what it hosts.
#[derive(Clone, Debug)]
pub struct ExpertOptions {
    /// Storage of the expert weights.
    pub format: WeightFormat,
    /// Replica name for `moge.v1.Host/Describe` and metrics.
    pub replica: String,
    /// Export one assignment series per expert, besides the per-device total.
    pub per_expert_metrics: bool,
}

impl ExpertService {
    /// Loads the hosted experts of `layers`, and nothing else.
    pub fn load(
        checkpoint: &Checkpoint,
        layers: &[usize],
        hosted: Hosted,
        pool: Arc<rayon::ThreadPool>,
        options: ExpertOptions,
    ) -> Result<Self, CheckpointError> {
        let format = options.format;
        let mut loaded = BTreeMap::new();
        let mut weight_dtype = DType::BF16;
        for &layer in layers {
            let weights = match hosted {
                Hosted::Group(group) => LayerWeights::Group(checkpoint.load_group(layer, group, format)?),
                Hosted::SharedExpert => LayerWeights::Shared(checkpoint.load_shared_expert(layer, format)?),
            };
            weight_dtype = match &weights {
                LayerWeights::Group(group) => group.experts[0].gate_proj.dtype(),
                LayerWeights::Shared(expert) => expert.gate_proj.dtype(),
            };
            loaded.insert(layer, Arc::new(weights));
        }
        let config = checkpoint.config();
        let experts = match hosted {
            Hosted::Group(_) => config.experts_per_group(),
            Hosted::SharedExpert => 0,
        };
        let metrics = ExpertMetrics::new(
            hosted.group_label(),
            &options.replica,
            layers,
            experts,
            options.per_expert_metrics,
        );
        Ok(ExpertService {
            inner: Arc::new(Inner {
                hosted,
                layers: loaded,
                pool,
                kernel: Kernel::detect(),
                hidden_size: config.hidden_size,
                num_groups: config.num_groups(),
                top_k: config.num_experts_per_tok,
                experts_per_group: config.experts_per_group(),
                weight_dtype,
                replica: options.replica,
                metrics,
            }),
        })
    }

    /// Bytes of hosted weights.
    pub fn weight_bytes(&self) -> usize {
        self.inner
            .layers
            .values()
            .map(|weights| match weights.as_ref() {
                LayerWeights::Group(group) => group.bytes(),
                LayerWeights::Shared(expert) => expert.bytes(),
            })
            .sum()
    }

    /// Threads of the compute pool.
    pub fn compute_threads(&self) -> usize {
        self.inner.pool.current_num_threads()
    }
}

/// Decodes the three parallel assignment arrays of a request.
fn assignments(request: &ComputeRequest) -> Result<Vec<Assignment>, Status> {
    let invalid = |error: wire::WireError| Status::invalid_argument(error.to_string());
    let rows = decode_u32s("rows", &request.rows).map_err(invalid)?;
    let experts = decode_u32s("experts", &request.experts).map_err(invalid)?;
    let weights = decode_f32s("weights", &request.weights).map_err(invalid)?;
    if experts.len() != rows.len() || weights.len() != rows.len() {
        return Err(Status::invalid_argument(format!(
            "rows, experts and weights hold {}, {} and {} values, expected equal lengths",
            rows.len(),
            experts.len(),
            weights.len()
        )));
    }
    Ok(rows
        .into_iter()
        .zip(experts)
        .zip(weights)
        .map(|((row, expert), weight)| Assignment { row, expert, weight })
        .collect())
}

#[tonic::async_trait]
impl wire_v1::expert_group_server::ExpertGroup for ExpertService {
    async fn compute(&self, request: Request<ComputeRequest>) -> Result<Response<ComputeResponse>, Status> {
        let request = request.into_inner();
        let layer = request.layer as usize;
        let Some(weights) = self.inner.layers.get(&layer).cloned() else {
            let hosted: Vec<&usize> = self.inner.layers.keys().collect();
            return Err(Status::not_found(format!(
                "layer: {layer} is not hosted, expected one of {hosted:?}"
            )));
        };
        let tensor = request
            .hidden_states
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("hidden_states: missing, expected a [T, H] tensor"))?;
        let h = self.inner.hidden_size;
        let (tokens, hidden) = wire::decode_matrix("hidden_states", tensor, h)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let span = tracing::Span::current();
        span.record("moge.layer", layer);
        span.record("moge.tokens", tokens);
        let assignments = match weights.as_ref() {
            LayerWeights::Group(_) => assignments(&request)?,
            LayerWeights::Shared(_) => Vec::new(),
        };

        // Run on the compute pool so that the async runtime keeps serving
        // health checks and accepting requests under full load.
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let kernel = self.inner.kernel;
        let queued = std::time::Instant::now();
        self.inner.pool.spawn(move || {
            // A caller that left (cancelled, or past its grpc-timeout) while
            // the request queued for a compute thread gets no work done.
            if sender.is_closed() {
                tracing::debug!(layer, tokens, "caller left before compute started; skipped");
                return;
            }
            let started = std::time::Instant::now();
            let result = match weights.as_ref() {
                LayerWeights::Group(group) => group
                    .forward(kernel, &hidden, tokens, &assignments)
                    .map(|out| (out, assignments.len() as u64)),
                LayerWeights::Shared(expert) => expert
                    .forward_dense(kernel, &hidden, tokens)
                    .map(|out| (out, tokens as u64)),
            };
            let timing = (started - queued, started.elapsed());
            let _ = sender.send((result, assignments, timing));
        });
        let (result, assignments, (queue, busy)) = receiver
            .await
            .map_err(|_| Status::internal("the compute task ended without a result"))?;
        if let Ok((_, count)) = &result {
            self.inner.metrics.record(ComputeRecord {
                layer,
                tokens,
                assignments: *count,
                expert_assignments: &assignments,
                queue_seconds: queue.as_secs_f64(),
                busy_seconds: busy.as_secs_f64(),
            });
        }
        let (output, count) = result.map_err(|error: ExpertError| {
            tracing::debug!(layer, %error, "rejected compute request");
            Status::invalid_argument(error.to_string())
        })?;
        tracing::debug!(layer, tokens, assignments = count, "computed");
        Ok(Response::new(ComputeResponse {
            output: Some(encode_matrix(&output, tokens, h, DType::F32)),
            assignments: count,
        }))
    }
}

#[tonic::async_trait]
impl wire_v1::host_server::Host for ExpertService {
    async fn describe(&self, _request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let inner = &self.inner;
        let (role, group, first_expert, num_experts) = match inner.hosted {
            Hosted::Group(group) => (
                Role::ExpertGroup,
                Some(group as u32),
                (group * inner.experts_per_group) as u32,
                inner.experts_per_group as u32,
            ),
            Hosted::SharedExpert => (Role::SharedExpert, None, 0, 1),
        };
        Ok(Response::new(DescribeResponse {
            role: role as i32,
            layers: inner.layers.keys().map(|&layer| layer as u32).collect(),
            group,
            first_expert,
            num_experts,
            weight_dtype: DataType::from(inner.weight_dtype) as i32,
            hidden_size: inner.hidden_size as u32,
            num_groups: inner.num_groups as u32,
            top_k: inner.top_k as u32,
            replica: inner.replica.clone(),
            default_mode: wire_v1::RoutingMode::Unspecified as i32,
        }))
    }
}
