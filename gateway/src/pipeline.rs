//! One layer over the split deployment: route, send every group its rows
//! and the shared expert every row, in parallel, and sum the partials.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use moge_shared::DType;
use moge_shared::proto::moge::v1::expert_group_client::ExpertGroupClient;
use moge_shared::proto::moge::v1::router_client::RouterClient;
use moge_shared::proto::moge::v1::{ComputeRequest, DataType, RouteRequest, Tensor};
use moge_shared::wire::{decode_f32s, decode_matrix, decode_u32s, encode_f32s, encode_u32s};
use moge_telemetry::balance::{DeviceShare, SHARED_GROUP};
use moge_telemetry::propagation::traced_request;
use tracing::Instrument;

use crate::metrics::BatchStats;
use crate::upstream::{CallError, Upstreams};

/// Sizes the gateway learned from the router at start.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Hidden size H.
    pub hidden_size: usize,
    /// Experts per token K.
    pub top_k: usize,
    /// Expert groups M.
    pub num_groups: usize,
    /// Experts per group.
    pub experts_per_group: usize,
}

/// A batch of one layer, with hidden states in the client's encoding.
pub struct LayerBatch {
    /// Layer index.
    pub layer: u32,
    /// Element type of `hidden`.
    pub dtype: DType,
    /// Tokens T.
    pub tokens: usize,
    /// `[T, H]` little-endian bytes.
    pub hidden: Bytes,
    /// `moge.v1.RoutingMode` value; 0 for the router's default.
    pub mode: i32,
    /// Time by which every upstream call must finish, sent on as
    /// `grpc-timeout`; None for no limit.
    pub deadline: Option<tokio::time::Instant>,
}

/// The combined output of a batch.
pub struct LayerResult {
    /// `[T, H]`: shared expert plus every group's partial sum, in f32.
    pub output: Vec<f32>,
    /// `[T, K]` chosen experts.
    pub expert_ids: Vec<u32>,
    /// `[T, K]` routing weights.
    pub expert_weights: Vec<f32>,
}

/// A failure of one stage of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An upstream call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// An upstream returned a response that does not fit the batch.
    #[error("{upstream} returned an invalid response: {message}")]
    Protocol {
        /// Pool name.
        upstream: String,
        /// Description of the mismatch.
        message: String,
    },
}

fn protocol(upstream: &str, message: impl ToString) -> PipelineError {
    PipelineError::Protocol {
        upstream: upstream.to_owned(),
        message: message.to_string(),
    }
}

fn tensor(dtype: DType, rows: usize, cols: usize, data: Bytes) -> Tensor {
    Tensor {
        dtype: DataType::from(dtype) as i32,
        shape: vec![rows as u64, cols as u64],
        data,
    }
}

/// Returns the name of a `moge.v1.RoutingMode` value, as metrics label it.
fn mode_name(mode: i32) -> &'static str {
    match moge_shared::proto::moge::v1::RoutingMode::try_from(mode) {
        Ok(moge_shared::proto::moge::v1::RoutingMode::Moge) => "moge",
        Ok(moge_shared::proto::moge::v1::RoutingMode::TopK) => "top-k",
        Ok(moge_shared::proto::moge::v1::RoutingMode::GroupLimited) => "group-limited",
        _ => "unspecified",
    }
}

/// Runs one layer on the deployment. Every group and the shared expert must
/// respond, so a batch never gets a sum that lacks a group. Returns the
/// result and the batch's statistics (with `requests` left at 1).
pub async fn execute(
    upstreams: &Arc<Upstreams>,
    shape: Shape,
    max_message_bytes: usize,
    batch: LayerBatch,
) -> Result<(LayerResult, BatchStats), PipelineError> {
    let (tokens, h, k) = (batch.tokens, shape.hidden_size, shape.top_k);
    let row_bytes = h * batch.dtype.size();

    // Stage 1: routing.
    let route = RouteRequest {
        layer: batch.layer,
        hidden_states: Some(tensor(batch.dtype, tokens, h, batch.hidden.clone())),
        mode: batch.mode,
        renormalize: None,
    };
    let route_started = Instant::now();
    let span = tracing::debug_span!(
        "route",
        otel.name = "moge.v1.Router/Route",
        otel.kind = "client",
        moge.layer = batch.layer,
        moge.tokens = tokens,
    );
    let (routed, _) = upstreams
        .router
        .call(batch.deadline, |attempt| {
            let request = attempt.request(traced_request(route.clone()));
            async move {
                let mut client = RouterClient::new(attempt.channel).max_decoding_message_size(max_message_bytes);
                client.route(request).await.map(tonic::Response::into_inner)
            }
        })
        .instrument(span)
        .await?;
    let route_seconds = route_started.elapsed().as_secs_f64();
    let expert_ids = decode_u32s("expert_ids", &routed.expert_ids).map_err(|e| protocol("router", e))?;
    let expert_weights = decode_f32s("expert_weights", &routed.expert_weights).map_err(|e| protocol("router", e))?;
    if expert_ids.len() != tokens * k || expert_weights.len() != tokens * k {
        return Err(protocol(
            "router",
            format!("expected {tokens} x {k} experts and weights"),
        ));
    }

    // Stage 2: each group's rows (ascending) and assignments.
    let mut group_rows: Vec<Vec<u32>> = vec![Vec::new(); shape.num_groups];
    let mut group_assignments: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = vec![Default::default(); shape.num_groups];
    for token in 0..tokens {
        for slot in token * k..(token + 1) * k {
            let expert = expert_ids[slot] as usize;
            let group = expert / shape.experts_per_group;
            if group >= shape.num_groups {
                return Err(protocol(
                    "router",
                    format!("expert {expert} is outside the {} groups", shape.num_groups),
                ));
            }
            let rows = &mut group_rows[group];
            if rows.last() != Some(&(token as u32)) {
                rows.push(token as u32);
            }
            let (local_rows, experts, weights) = &mut group_assignments[group];
            local_rows.push((rows.len() - 1) as u32);
            experts.push((expert % shape.experts_per_group) as u32);
            weights.push(expert_weights[slot]);
        }
    }

    // Stage 3: every group with rows and the shared expert, in parallel.
    let experts_started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut assignment_counts = vec![0u64; shape.num_groups];
    for (group, (rows, (local_rows, experts, weights))) in group_rows.iter().zip(group_assignments).enumerate() {
        if rows.is_empty() {
            continue;
        }
        assignment_counts[group] = experts.len() as u64;
        // Under MoGE every group gets every row: send the batch's bytes as they are.
        let hidden = if rows.len() == tokens {
            batch.hidden.clone()
        } else {
            let mut gathered = Vec::with_capacity(rows.len() * row_bytes);
            for &row in rows {
                let start = row as usize * row_bytes;
                gathered.extend_from_slice(&batch.hidden[start..start + row_bytes]);
            }
            Bytes::from(gathered)
        };
        let request = ComputeRequest {
            layer: batch.layer,
            hidden_states: Some(tensor(batch.dtype, rows.len(), h, hidden)),
            rows: encode_u32s(&local_rows),
            experts: encode_u32s(&experts),
            weights: encode_f32s(&weights),
        };
        let span = compute_span(Some(group), rows.len());
        calls.spawn(
            compute(
                Arc::clone(upstreams),
                Some(group),
                request,
                max_message_bytes,
                batch.deadline,
            )
            .instrument(span),
        );
    }
    let shared = ComputeRequest {
        layer: batch.layer,
        hidden_states: Some(tensor(batch.dtype, tokens, h, batch.hidden.clone())),
        ..Default::default()
    };
    calls.spawn(
        compute(Arc::clone(upstreams), None, shared, max_message_bytes, batch.deadline)
            .instrument(compute_span(None, tokens)),
    );

    let mut partials: Vec<Option<Vec<f32>>> = vec![None; shape.num_groups];
    let mut shared_output = None;
    let mut shares = Vec::with_capacity(shape.num_groups + 1);
    let (mut first_group_done, mut last_group_done) = (None, None);
    while let Some(joined) = calls.join_next().await {
        let (group, output, replica) =
            joined.map_err(|error| protocol("gateway", format!("expert call task failed: {error}")))??;
        match group {
            Some(group) => {
                let now = Instant::now();
                first_group_done.get_or_insert(now);
                last_group_done = Some(now);
                shares.push(DeviceShare {
                    group: group.to_string(),
                    replica: replica.to_string(),
                    assignments: assignment_counts[group],
                });
                partials[group] = Some(output);
            }
            None => {
                shares.push(DeviceShare {
                    group: SHARED_GROUP.to_owned(),
                    replica: replica.to_string(),
                    assignments: tokens as u64,
                });
                shared_output = Some(output);
            }
        }
    }
    let experts_seconds = experts_started.elapsed().as_secs_f64();
    let straggler_gap_seconds = match (first_group_done, last_group_done) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => 0.0,
    };

    // Stage 4: the shared expert, then each group's partial in group order,
    // only on the rows the group computed, as the in-process layer sums.
    let mut output = shared_output.ok_or_else(|| protocol("shared expert", "no output"))?;
    if output.len() != tokens * h {
        return Err(protocol(
            "shared expert",
            format!("output has {} values, expected {}", output.len(), tokens * h),
        ));
    }
    for (group, rows) in group_rows.iter().enumerate() {
        let Some(partial) = &partials[group] else {
            continue;
        };
        if partial.len() != rows.len() * h {
            return Err(protocol(
                &format!("group {group}"),
                "output does not match the rows sent",
            ));
        }
        for (local, &row) in rows.iter().enumerate() {
            let sum = &mut output[row as usize * h..(row as usize + 1) * h];
            for (value, part) in sum.iter_mut().zip(&partial[local * h..(local + 1) * h]) {
                *value += part;
            }
        }
    }
    let stats = BatchStats {
        layer: batch.layer,
        mode: mode_name(routed.mode),
        tokens,
        requests: 1,
        route_seconds,
        experts_seconds,
        straggler_gap_seconds,
        imbalance_score: routed.imbalance_score,
        shares,
    };
    let result = LayerResult {
        output,
        expert_ids,
        expert_weights,
    };
    Ok((result, stats))
}

/// The client span of one expert call: a group's, or the shared expert's.
fn compute_span(group: Option<usize>, rows: usize) -> tracing::Span {
    let group = group.map_or_else(|| SHARED_GROUP.to_owned(), |group| group.to_string());
    tracing::debug_span!(
        "compute",
        otel.name = "moge.v1.ExpertGroup/Compute",
        otel.kind = "client",
        moge.group = %group,
        moge.tokens = rows,
        moge.replica = tracing::field::Empty,
    )
}

/// Calls one group, or the shared expert with `group` None. Returns the
/// group, its output and the name of the replica that computed it.
async fn compute(
    upstreams: Arc<Upstreams>,
    group: Option<usize>,
    request: ComputeRequest,
    max_message_bytes: usize,
    deadline: Option<tokio::time::Instant>,
) -> Result<(Option<usize>, Vec<f32>, Arc<str>), PipelineError> {
    let pool = match group {
        Some(group) => &upstreams.groups[group],
        None => &upstreams.shared_expert,
    };
    let (reply, replica) = pool
        .call(deadline, |attempt| {
            let request = attempt.request(traced_request(request.clone()));
            async move {
                let mut client = ExpertGroupClient::new(attempt.channel)
                    .max_decoding_message_size(max_message_bytes)
                    .max_encoding_message_size(max_message_bytes);
                client.compute(request).await.map(tonic::Response::into_inner)
            }
        })
        .await?;
    let tensor = reply.output.ok_or_else(|| protocol(&pool.name, "missing output"))?;
    let width = tensor.shape.get(1).copied().unwrap_or(0) as usize;
    let (_, values) = decode_matrix("output", &tensor, width).map_err(|error| protocol(&pool.name, error))?;
    let replica = replica.name();
    tracing::Span::current().record("moge.replica", &*replica);
    Ok((group, values, replica))
}
