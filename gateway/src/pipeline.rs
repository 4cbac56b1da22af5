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

    // Stage 4, as the calls return: the shared expert's output, then each
    // group's partial in group order, only on the rows the group computed,
    // as the in-process layer sums. A partial is added and freed as soon as
    // every partial before it is in, so the gateway does not hold all of them.
    let mut sum = InOrderSum::new(&group_rows, tokens, h);
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
                sum.add_group(group, output)?;
            }
            None => {
                shares.push(DeviceShare {
                    group: SHARED_GROUP.to_owned(),
                    replica: replica.to_string(),
                    assignments: tokens as u64,
                });
                sum.add_shared(output)?;
            }
        }
    }
    let experts_seconds = experts_started.elapsed().as_secs_f64();
    let straggler_gap_seconds = match (first_group_done, last_group_done) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => 0.0,
    };
    let output = sum.finish()?;
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

/// Sum of the shared expert's output and the groups' partials in the
/// in-process order: the shared output first, then group 0, 1, and so on.
/// Partials that arrive before an earlier group's wait in `pending`.
struct InOrderSum<'a> {
    /// Rows of the batch each group computed, in its partial's row order.
    group_rows: &'a [Vec<u32>],
    tokens: usize,
    hidden: usize,
    /// The shared output plus every group before `next`, once the shared
    /// output is in.
    output: Option<Vec<f32>>,
    pending: Vec<Option<Vec<f32>>>,
    /// First group not yet added.
    next: usize,
}

impl<'a> InOrderSum<'a> {
    fn new(group_rows: &'a [Vec<u32>], tokens: usize, hidden: usize) -> Self {
        InOrderSum {
            group_rows,
            tokens,
            hidden,
            output: None,
            pending: vec![None; group_rows.len()],
            next: 0,
        }
    }

    fn add_shared(&mut self, output: Vec<f32>) -> Result<(), PipelineError> {
        let expected = self.tokens * self.hidden;
        if output.len() != expected {
            return Err(protocol(
                "shared expert",
                format!("output has {} values, expected {expected}", output.len()),
            ));
        }
        self.output = Some(output);
        self.advance()
    }

    fn add_group(&mut self, group: usize, partial: Vec<f32>) -> Result<(), PipelineError> {
        if partial.len() != self.group_rows[group].len() * self.hidden {
            return Err(protocol(
                &format!("group {group}"),
                "output does not match the rows sent",
            ));
        }
        self.pending[group] = Some(partial);
        self.advance()
    }

    /// Adds every partial that is next in order.
    fn advance(&mut self) -> Result<(), PipelineError> {
        let Some(output) = &mut self.output else {
            return Ok(());
        };
        while self.next < self.group_rows.len() {
            let rows = &self.group_rows[self.next];
            if rows.is_empty() {
                self.next += 1;
                continue;
            }
            let Some(partial) = self.pending[self.next].take() else {
                break;
            };
            let h = self.hidden;
            for (local, &row) in rows.iter().enumerate() {
                let sum = &mut output[row as usize * h..(row as usize + 1) * h];
                for (value, part) in sum.iter_mut().zip(&partial[local * h..(local + 1) * h]) {
                    *value += part;
                }
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Returns the sum once the shared output and every group with rows
    /// are in.
    fn finish(self) -> Result<Vec<f32>, PipelineError> {
        let output = self.output.ok_or_else(|| protocol("shared expert", "no output"))?;
        if let Some(group) = (self.next..self.group_rows.len()).find(|&group| !self.group_rows[group].is_empty()) {
            return Err(protocol(&format!("group {group}"), "no output"));
        }
        Ok(output)
    }
}

/// Creates the client span of one expert call: a group's, or the shared
/// expert's.
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Sums in the in-process order, written out plainly.
    fn sequential(shared: &[f32], group_rows: &[Vec<u32>], partials: &[Vec<f32>], h: usize) -> Vec<f32> {
        let mut output = shared.to_vec();
        for (rows, partial) in group_rows.iter().zip(partials) {
            for (local, &row) in rows.iter().enumerate() {
                for column in 0..h {
                    output[row as usize * h + column] += partial[local * h + column];
                }
            }
        }
        output
    }

    proptest! {
        #[test]
        fn any_arrival_order_sums_bitwise_in_group_order(
            tokens in 1_usize..6,
            h in 1_usize..5,
            membership in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 6), 4),
            values in proptest::collection::vec(-1.0e3_f32..1.0e3, 6 * 5 * 5),
            order in Just((0..5_usize).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            // Group g computes the rows whose membership bit is set.
            let group_rows: Vec<Vec<u32>> = membership
                .iter()
                .map(|bits| (0..tokens as u32).filter(|&row| bits[row as usize]).collect())
                .collect();
            let mut next_value = values.iter().copied().cycle();
            let mut take = |count: usize| -> Vec<f32> { (0..count).map(|_| next_value.next().unwrap()).collect() };
            let shared = take(tokens * h);
            let partials: Vec<Vec<f32>> = group_rows.iter().map(|rows| take(rows.len() * h)).collect();
            let expected = sequential(&shared, &group_rows, &partials, h);

            // Arrival order: a permutation of the shared expert (index 4)
            // and the groups with rows.
            let mut sum = InOrderSum::new(&group_rows, tokens, h);
            for &arrival in &order {
                if arrival == 4 {
                    sum.add_shared(shared.clone()).unwrap();
                } else if !group_rows[arrival].is_empty() {
                    sum.add_group(arrival, partials[arrival].clone()).unwrap();
                }
            }
            let output = sum.finish().unwrap();
            let bits = |values: &[f32]| values.iter().map(|value| value.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&output), bits(&expected));
        }
    }

    #[test]
    fn missing_group_output_is_an_error() {
        let group_rows = vec![vec![0], vec![1]];
        let mut sum = InOrderSum::new(&group_rows, 2, 1);
        sum.add_group(1, vec![1.0]).unwrap();
        sum.add_shared(vec![0.0, 0.0]).unwrap();
        let error = sum.finish().unwrap_err().to_string();
        assert!(error.contains("group 0"), "{error}");
        assert!(error.contains("no output"), "{error}");
    }

    #[test]
    fn partial_of_wrong_size_is_rejected() {
        let group_rows = vec![vec![0, 1]];
        let mut sum = InOrderSum::new(&group_rows, 2, 3);
        let error = sum.add_group(0, vec![0.0; 3]).unwrap_err().to_string();
        assert!(error.contains("group 0"), "{error}");
        let error = sum.add_shared(vec![0.0; 5]).unwrap_err().to_string();
        assert!(error.contains("expected 6"), "{error}");
    }
}
