//! SwiGLU experts: one group's routed experts on a ragged list of token
//! assignments, and the shared expert on every token.
//!
//! For each expert with tokens, the stages are:
//!
//! 1. gather its token rows into a contiguous block `x`, `[m, H]`;
//! 2. `gate = x W_gate^T` and `up = x W_up^T`, `[m, I]`, one kernel call;
//! 3. `act = silu(gate) * up`, `[m, I]`;
//! 4. `y = act W_down^T`, `[m, H]`;
//! 5. scatter-add `weight * y` into each token's output row.
//!
//! Stages 2 and 4 run every active expert's products in one parallel call.
//! Stage 5 walks experts in ascending index, so a token's partial sums are
//! added in the same order whatever else is in the batch.

use std::borrow::Cow;

use crate::kernels::{self, Kernel, MatmulJob};
use crate::routing::Assignment;
use crate::weights::{WeightFormat, WeightMatrix};

/// One SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Expert {
    /// `gate_proj.weight`, `[I, H]`.
    pub gate_proj: WeightMatrix,
    /// `up_proj.weight`, `[I, H]`.
    pub up_proj: WeightMatrix,
    /// `down_proj.weight`, `[H, I]`.
    pub down_proj: WeightMatrix,
}

/// A failure to run experts on a batch.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    /// Expert weights do not fit together.
    #[error("expert {expert}: {tensor} has shape [{rows}, {cols}], expected [{expected_rows}, {expected_cols}]")]
    WeightShape {
        /// Expert index in its group.
        expert: usize,
        /// Which projection.
        tensor: &'static str,
        /// Rows found.
        rows: usize,
        /// Columns found.
        cols: usize,
        /// Rows expected.
        expected_rows: usize,
        /// Columns expected.
        expected_cols: usize,
    },
    /// The hidden states do not hold `tokens * H` values.
    #[error("hidden states have {actual} values, expected {tokens} tokens x {hidden_size} = {expected}")]
    HiddenShape {
        /// Tokens declared.
        tokens: usize,
        /// Hidden size of the experts.
        hidden_size: usize,
        /// Values expected.
        expected: usize,
        /// Values received.
        actual: usize,
    },
    /// An assignment names a token row outside the batch.
    #[error("assignment {index}: row {row} is out of range, expected a row below {tokens}")]
    Row {
        /// Position in the assignment list.
        index: usize,
        /// The row.
        row: u32,
        /// Tokens in the batch.
        tokens: usize,
    },
    /// An assignment names an expert outside the group.
    #[error("assignment {index}: expert {expert} is out of range, expected a group-local index below {experts}")]
    Expert {
        /// Position in the assignment list.
        index: usize,
        /// The expert.
        expert: u32,
        /// Experts in the group.
        experts: usize,
    },
    /// An assignment weight is NaN or infinite.
    #[error("assignment {index}: weight is {weight}, expected a finite value")]
    Weight {
        /// Position in the assignment list.
        index: usize,
        /// The weight.
        weight: f32,
    },
    /// Two assignments send the same token to the same expert.
    #[error("assignment {index}: row {row} is already assigned to expert {expert}")]
    Duplicate {
        /// Position of the second assignment.
        index: usize,
        /// The row.
        row: u32,
        /// The expert.
        expert: u32,
    },
}

impl Expert {
    /// Builds an expert, checking that the three projections fit together.
    pub fn new(
        index: usize,
        gate_proj: WeightMatrix,
        up_proj: WeightMatrix,
        down_proj: WeightMatrix,
    ) -> Result<Self, ExpertError> {
        let (intermediate, hidden) = (gate_proj.rows(), gate_proj.cols());
        let checks = [
            ("up_proj", &up_proj, intermediate, hidden),
            ("down_proj", &down_proj, hidden, intermediate),
        ];
        for (tensor, matrix, expected_rows, expected_cols) in checks {
            if matrix.rows() != expected_rows || matrix.cols() != expected_cols {
                return Err(ExpertError::WeightShape {
                    expert: index,
                    tensor,
                    rows: matrix.rows(),
                    cols: matrix.cols(),
                    expected_rows,
                    expected_cols,
                });
            }
        }
        Ok(Expert {
            gate_proj,
            up_proj,
            down_proj,
        })
    }

    /// Hidden size H.
    pub fn hidden_size(&self) -> usize {
        self.gate_proj.cols()
    }

    /// Intermediate size I.
    pub fn intermediate_size(&self) -> usize {
        self.gate_proj.rows()
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }

    /// Returns the expert with its weights converted to `format`.
    pub fn into_format(self, format: WeightFormat) -> Expert {
        Expert {
            gate_proj: self.gate_proj.into_format(format),
            up_proj: self.up_proj.into_format(format),
            down_proj: self.down_proj.into_format(format),
        }
    }

    /// Runs the expert on every token (`[T, H]`) and returns `[T, H]`; this
    /// is how the shared expert runs.
    pub fn forward_dense(&self, kernel: Kernel, hidden: &[f32], tokens: usize) -> Result<Vec<f32>, ExpertError> {
        let (_, shared) = forward_groups(kernel, hidden, tokens, &[], Some(self))?;
        Ok(shared.unwrap_or_default())
    }
}

/// The routed experts of one group, for one layer.
#[derive(Clone, Debug)]
pub struct ExpertGroup {
    /// Group index g.
    pub group: usize,
    /// Global index of the group's first expert, `g * N / M`.
    pub first_expert: usize,
    /// The experts, by group-local index.
    pub experts: Vec<Expert>,
}

/// Tokens one expert computes.
struct ExpertBatch {
    expert: usize,
    rows: Vec<u32>,
    weights: Vec<f32>,
}

impl ExpertGroup {
    /// Hidden size H.
    pub fn hidden_size(&self) -> usize {
        self.experts.first().map_or(0, Expert::hidden_size)
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        self.experts.iter().map(Expert::bytes).sum()
    }

    /// Computes, for each of `tokens` rows of `hidden` (`[T, H]`), the sum of
    /// `weight * expert(x)` over its assignments; rows without assignments
    /// are zero. Returns `[T, H]`.
    pub fn forward(
        &self,
        kernel: Kernel,
        hidden: &[f32],
        tokens: usize,
        assignments: &[Assignment],
    ) -> Result<Vec<f32>, ExpertError> {
        let work = [GroupWork {
            group: self,
            assignments,
        }];
        let (mut partials, _) = forward_groups(kernel, hidden, tokens, &work, None)?;
        Ok(partials.pop().unwrap_or_default())
    }

    /// Validates the assignments and groups them by expert, in ascending
    /// expert order, skipping experts without tokens.
    fn bucket(&self, tokens: usize, assignments: &[Assignment]) -> Result<Vec<ExpertBatch>, ExpertError> {
        let experts = self.experts.len();
        let mut counts = vec![0usize; experts];
        for (index, assignment) in assignments.iter().enumerate() {
            if assignment.row as usize >= tokens {
                return Err(ExpertError::Row {
                    index,
                    row: assignment.row,
                    tokens,
                });
            }
            if assignment.expert as usize >= experts {
                return Err(ExpertError::Expert {
                    index,
                    expert: assignment.expert,
                    experts,
                });
            }
            if !assignment.weight.is_finite() {
                return Err(ExpertError::Weight {
                    index,
                    weight: assignment.weight,
                });
            }
            counts[assignment.expert as usize] += 1;
        }
        let mut batches: Vec<ExpertBatch> = counts
            .iter()
            .enumerate()
            .map(|(expert, &count)| ExpertBatch {
                expert,
                rows: Vec::with_capacity(count),
                weights: Vec::with_capacity(count),
            })
            .collect();
        let mut last_expert_of_row = vec![u32::MAX; tokens];
        let mut order: Vec<usize> = (0..assignments.len()).collect();
        order.sort_by_key(|&index| assignments[index].expert);
        for index in order {
            let assignment = assignments[index];
            let last = &mut last_expert_of_row[assignment.row as usize];
            if *last == assignment.expert {
                return Err(ExpertError::Duplicate {
                    index,
                    row: assignment.row,
                    expert: assignment.expert,
                });
            }
            *last = assignment.expert;
            let batch = &mut batches[assignment.expert as usize];
            batch.rows.push(assignment.row);
            batch.weights.push(assignment.weight);
        }
        batches.retain(|batch| !batch.rows.is_empty());
        Ok(batches)
    }
}

/// Per-group `[T, H]` partial sums and the shared expert's `[T, H]` output.
pub type GroupOutputs = (Vec<Vec<f32>>, Option<Vec<f32>>);

/// One group's share of a batch for [`forward_groups`].
#[derive(Clone, Copy)]
pub struct GroupWork<'a> {
    /// The group.
    pub group: &'a ExpertGroup,
    /// Its assignments, with group-local expert indices.
    pub assignments: &'a [Assignment],
}

/// Runs several groups and optionally the shared expert on one batch, with
/// every expert's products scheduled together, so a whole layer in one
/// process needs two parallel phases instead of two per group.
///
/// Returns one `[T, H]` partial sum per entry of `work`, computed exactly as
/// [`ExpertGroup::forward`] computes it alone, and the shared expert's
/// `[T, H]` output when `shared` is given.
pub fn forward_groups(
    kernel: Kernel,
    hidden: &[f32],
    tokens: usize,
    work: &[GroupWork<'_>],
    shared: Option<&Expert>,
) -> Result<GroupOutputs, ExpertError> {
    let h = shared
        .map(Expert::hidden_size)
        .or_else(|| work.first().map(|item| item.group.hidden_size()))
        .unwrap_or(0);
    check_hidden(hidden, tokens, h)?;

    // One list of experts and one list of batches across all groups.
    let mut experts: Vec<&Expert> = Vec::new();
    let mut batches = Vec::new();
    let mut group_batches = Vec::with_capacity(work.len());
    for item in work {
        let offset = experts.len();
        experts.extend(item.group.experts.iter());
        let start = batches.len();
        for mut batch in item.group.bucket(tokens, item.assignments)? {
            batch.expert += offset;
            batches.push(batch);
        }
        group_batches.push(start..batches.len());
    }
    let shared_batch = match shared {
        Some(expert) if tokens > 0 => {
            experts.push(expert);
            batches.push(ExpertBatch {
                expert: experts.len() - 1,
                rows: (0..tokens as u32).collect(),
                weights: Vec::new(),
            });
            Some(batches.len() - 1)
        }
        _ => None,
    };
    let outputs = run_swiglu(kernel, &experts, hidden, &batches);

    // Scatter-add in ascending expert order (the order of each group's batches).
    let partials = group_batches
        .into_iter()
        .map(|range| {
            let mut out = vec![0.0f32; tokens * h];
            for (batch, y_t) in batches[range.clone()].iter().zip(&outputs[range]) {
                let m = batch.rows.len();
                for (i, (&row, &weight)) in batch.rows.iter().zip(&batch.weights).enumerate() {
                    let out_row = &mut out[row as usize * h..(row as usize + 1) * h];
                    for (col, value) in out_row.iter_mut().enumerate() {
                        *value += weight * y_t[col * m + i];
                    }
                }
            }
            out
        })
        .collect();
    let shared_out = shared.map(|_| {
        let mut out = vec![0.0; tokens * h];
        if let Some(index) = shared_batch {
            for (col, values) in outputs[index].chunks_exact(tokens).enumerate() {
                for (token, &value) in values.iter().enumerate() {
                    out[token * h + col] = value;
                }
            }
        }
        out
    });
    Ok((partials, shared_out))
}

fn check_hidden(hidden: &[f32], tokens: usize, hidden_size: usize) -> Result<(), ExpertError> {
    let expected = tokens * hidden_size;
    if hidden.len() != expected {
        return Err(ExpertError::HiddenShape {
            tokens,
            hidden_size,
            expected,
            actual: hidden.len(),
        });
    }
    Ok(())
}

/// Runs the SwiGLU MLP of each batch's expert on its rows and returns, per
/// batch, `y` transposed: `[H, m]`.
/// Every batch must have at least one row.
fn run_swiglu(kernel: Kernel, experts: &[&Expert], hidden: &[f32], batches: &[ExpertBatch]) -> Vec<Vec<f32>> {
    debug_assert!(batches.iter().all(|batch| !batch.rows.is_empty()));
    let Some(first) = experts.first() else {
        return Vec::new();
    };
    let h = first.hidden_size();
    let tokens = hidden.len() / h.max(1);

    // Stage 1: gather each expert's rows; all rows in order need no copy.
    let gathered: Vec<Cow<'_, [f32]>> = batches
        .iter()
        .map(|batch| {
            let in_order = batch.rows.len() == tokens && batch.rows.iter().enumerate().all(|(i, &r)| r as usize == i);
            if in_order {
                return Cow::Borrowed(hidden);
            }
            let mut x = Vec::with_capacity(batch.rows.len() * h);
            for &row in &batch.rows {
                x.extend_from_slice(&hidden[row as usize * h..(row as usize + 1) * h]);
            }
            Cow::Owned(x)
        })
        .collect();

    // Stage 2: gate and up projections of every expert in one call.
    let mut gate_t: Vec<Vec<f32>> = Vec::with_capacity(batches.len());
    let mut up_t: Vec<Vec<f32>> = Vec::with_capacity(batches.len());
    for batch in batches {
        let size = experts[batch.expert].intermediate_size() * batch.rows.len();
        gate_t.push(vec![0.0; size]);
        up_t.push(vec![0.0; size]);
    }
    let mut jobs = Vec::with_capacity(2 * batches.len());
    for (((batch, x), gate), up) in batches.iter().zip(&gathered).zip(&mut gate_t).zip(&mut up_t) {
        let expert = experts[batch.expert];
        let tokens = batch.rows.len();
        jobs.push(MatmulJob {
            x,
            tokens,
            weight: &expert.gate_proj,
            out_t: gate,
        });
        jobs.push(MatmulJob {
            x,
            tokens,
            weight: &expert.up_proj,
            out_t: up,
        });
    }
    kernels::matmul_transposed(kernel, &mut jobs);
    drop(jobs);

    // Stage 3: act = silu(gate) * up, transposed back to [m, I].
    let activations: Vec<Vec<f32>> = batches
        .iter()
        .zip(gate_t.iter().zip(&up_t))
        .map(|(batch, (gate, up))| {
            let m = batch.rows.len();
            let intermediate = experts[batch.expert].intermediate_size();
            let mut act = vec![0.0f32; m * intermediate];
            for (i, (gate_row, up_row)) in gate.chunks_exact(m).zip(up.chunks_exact(m)).enumerate() {
                for (t, (&g, &u)) in gate_row.iter().zip(up_row).enumerate() {
                    act[t * intermediate + i] = silu(g) * u;
                }
            }
            act
        })
        .collect();

    // Stage 4: down projection of every expert in one call.
    let mut outputs: Vec<Vec<f32>> = batches.iter().map(|batch| vec![0.0; h * batch.rows.len()]).collect();
    let mut jobs: Vec<MatmulJob<'_>> = batches
        .iter()
        .zip(&activations)
        .zip(&mut outputs)
        .map(|((batch, act), out_t)| MatmulJob {
            x: act,
            tokens: batch.rows.len(),
            weight: &experts[batch.expert].down_proj,
            out_t,
        })
        .collect();
    kernels::matmul_transposed(kernel, &mut jobs);
    drop(jobs);
    outputs
}

/// `silu(x) = x * sigmoid(x)`.
#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
