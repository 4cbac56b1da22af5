//! Token-to-expert routing: MoGE, plain top-K and group-limited top-K.
//!
//! All three start from the same scores: `router_logits = W_gate x` and a
//! softmax over all N experts, in f32. They differ only in which experts a
//! token takes:
//!
//! | mode | picks | per-group load |
//! | --- | --- | --- |
//! | [`RoutingMode::Moge`] | the K' = K / M best experts inside every group | exactly K' x T, always |
//! | [`RoutingMode::TopK`] | the K best of all N experts | whatever the scores give |
//! | [`RoutingMode::GroupLimited`] | the K best experts inside the `topk_group` groups with the highest best score | whatever the scores give |
//!
//! A chosen expert `e` gets the weight `s[e] * router_scale[e]`; with
//! renormalization the chosen scores are first divided by their sum. Ties go
//! to the lower expert (or group) index.

use std::fmt;
use std::str::FromStr;

use crate::config::ModelConfig;
use crate::kernels::{self, Kernel};
use crate::weights::WeightMatrix;

/// Rule the router uses to pick each token's experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RoutingMode {
    /// Mixture of Grouped Experts: the best K' experts inside every group.
    #[default]
    Moge,
    /// Plain top-K over all experts, the baseline.
    TopK,
    /// DeepSeek-style group-limited top-K: keep the `topk_group` groups whose
    /// best expert scores highest, then take the top K inside them.
    GroupLimited,
}

impl RoutingMode {
    /// All modes, in a stable order.
    pub const ALL: [RoutingMode; 3] = [RoutingMode::Moge, RoutingMode::TopK, RoutingMode::GroupLimited];

    /// Command-line and metric label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Moge => "moge",
            RoutingMode::TopK => "top-k",
            RoutingMode::GroupLimited => "group-limited",
        }
    }
}

impl fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing mode name that is not `moge`, `top-k` or `group-limited`.
#[derive(Debug, thiserror::Error)]
#[error("unknown routing mode {0:?}, expected moge, top-k or group-limited")]
pub struct UnknownRoutingMode(pub String);

impl FromStr for RoutingMode {
    type Err = UnknownRoutingMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "moge" => Ok(RoutingMode::Moge),
            "top-k" | "topk" => Ok(RoutingMode::TopK),
            "group-limited" => Ok(RoutingMode::GroupLimited),
            other => Err(UnknownRoutingMode(other.to_owned())),
        }
    }
}

/// Routing choices that may differ per deployment or per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutingOptions {
    /// Rule for picking each token's experts.
    pub mode: RoutingMode,
    /// Divide the chosen softmax scores by their sum before `router_scale`.
    pub renormalize: bool,
}

/// The sizes routing needs, taken from the model configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingShape {
    /// Routed experts N.
    pub num_experts: usize,
    /// Expert groups M.
    pub num_groups: usize,
    /// Experts per token K.
    pub top_k: usize,
    /// Groups kept by group-limited top-K.
    pub topk_group: usize,
}

impl RoutingShape {
    /// Takes the sizes from a validated configuration.
    pub fn from_config(config: &ModelConfig) -> Self {
        RoutingShape {
            num_experts: config.num_experts,
            num_groups: config.num_groups(),
            top_k: config.num_experts_per_tok,
            topk_group: config.topk_group(),
        }
    }

    /// Experts in each group, N / M.
    pub fn experts_per_group(&self) -> usize {
        self.num_experts / self.num_groups
    }

    /// Group of a global expert index.
    pub fn group_of(&self, expert: usize) -> usize {
        expert / self.experts_per_group()
    }
}

/// A failure to route a batch.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A router logit is NaN or infinite, usually from a non-finite input.
    #[error("token {token}: router logit for expert {expert} is {value}, expected a finite value")]
    NonFiniteLogit {
        /// Row of the token in the batch.
        token: usize,
        /// Expert whose logit is not finite.
        expert: usize,
        /// The logit.
        value: f32,
    },
    /// The input does not have the shape the router expects.
    #[error("{what} has {actual} values, expected {expected}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// Values expected.
        expected: usize,
        /// Values received.
        actual: usize,
    },
    /// A group-to-device map does not cover every group.
    #[error("device map has {actual} entries, expected one per group ({expected})")]
    DeviceMap {
        /// Number of groups.
        expected: usize,
        /// Entries in the map.
        actual: usize,
    },
}

/// The routing of a batch of T tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Tokens routed, T.
    pub tokens: usize,
    /// Experts per token, K.
    pub top_k: usize,
    /// Global expert indices, `[T, K]` row-major. Under MoGE ordered by group,
    /// then by descending score; otherwise by descending score.
    pub expert_ids: Vec<u32>,
    /// Weight of each chosen expert, `[T, K]` row-major.
    pub expert_weights: Vec<f32>,
    /// Token-expert assignments per group, `[M]`.
    pub group_assignments: Vec<u64>,
}

/// One token-expert pair handed to an expert group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    /// Row of the token in the batch.
    pub row: u32,
    /// Expert index inside the group, `0..N/M`.
    pub expert: u32,
    /// Routing weight applied to the expert's output.
    pub weight: f32,
}

impl Routing {
    /// Returns the chosen experts and weights of token `t`.
    pub fn token(&self, t: usize) -> (&[u32], &[f32]) {
        let range = t * self.top_k..(t + 1) * self.top_k;
        (&self.expert_ids[range.clone()], &self.expert_weights[range])
    }

    /// Collects the assignments of one group, in token order, with group-local
    /// expert indices.
    pub fn group_assignments(&self, shape: &RoutingShape, group: usize) -> Vec<Assignment> {
        let per_group = shape.experts_per_group();
        let first = group * per_group;
        let mut out = Vec::with_capacity(self.group_assignments[group] as usize);
        for (index, (&expert, &weight)) in self.expert_ids.iter().zip(&self.expert_weights).enumerate() {
            let expert = expert as usize;
            if (first..first + per_group).contains(&expert) {
                out.push(Assignment {
                    row: (index / self.top_k) as u32,
                    expert: (expert - first) as u32,
                    weight,
                });
            }
        }
        out
    }

    /// Imbalance score `IS = (max_i T_i - min_i T_i) / T` of the batch, with
    /// `T_i` the assignments of device `i` when group `g` runs on device
    /// `device_of_group[g]`. Devices are `0..=max(device_of_group)`; an empty
    /// batch scores 0.
    pub fn imbalance_score(&self, device_of_group: &[usize]) -> Result<f64, RoutingError> {
        if device_of_group.len() != self.group_assignments.len() {
            return Err(RoutingError::DeviceMap {
                expected: self.group_assignments.len(),
                actual: device_of_group.len(),
            });
        }
        let devices = device_of_group.iter().max().map_or(0, |max| max + 1);
        let mut loads = vec![0u64; devices];
        for (&device, &count) in device_of_group.iter().zip(&self.group_assignments) {
            loads[device] += count;
        }
        Ok(imbalance_score(&loads, self.tokens))
    }

    /// Imbalance score with one group per device.
    pub fn imbalance_score_per_group(&self) -> f64 {
        imbalance_score(&self.group_assignments, self.tokens)
    }
}

/// `IS = (max_i T_i - min_i T_i) / tokens` for per-device loads `T_i`; 0 for
/// an empty batch.
pub fn imbalance_score(device_loads: &[u64], tokens: usize) -> f64 {
    if tokens == 0 || device_loads.is_empty() {
        return 0.0;
    }
    let max = device_loads.iter().max().copied().unwrap_or(0);
    let min = device_loads.iter().min().copied().unwrap_or(0);
    (max - min) as f64 / tokens as f64
}

/// The router of one layer: the gate weights and `router_scale`.
#[derive(Clone, Debug)]
pub struct Router {
    shape: RoutingShape,
    gate: WeightMatrix,
    router_scale: Vec<f32>,
}

impl Router {
    /// Builds a router from `gate` (`[N, H]`) and `router_scale` (`[N]`).
    pub fn new(shape: RoutingShape, gate: WeightMatrix, router_scale: Vec<f32>) -> Result<Self, RoutingError> {
        if gate.rows() != shape.num_experts {
            return Err(RoutingError::Shape {
                what: "gate weight rows",
                expected: shape.num_experts,
                actual: gate.rows(),
            });
        }
        if router_scale.len() != shape.num_experts {
            return Err(RoutingError::Shape {
                what: "router_scale",
                expected: shape.num_experts,
                actual: router_scale.len(),
            });
        }
        Ok(Router {
            shape,
            gate,
            router_scale,
        })
    }

    /// Routing sizes.
    pub fn shape(&self) -> &RoutingShape {
        &self.shape
    }

    /// Hidden size H.
    pub fn hidden_size(&self) -> usize {
        self.gate.cols()
    }

    /// Returns the gate weights, `[N, H]`.
    pub fn gate(&self) -> &WeightMatrix {
        &self.gate
    }

    /// `router_scale`, `[N]`.
    pub fn router_scale(&self) -> &[f32] {
        &self.router_scale
    }

    /// Computes `router_logits = hidden W_gate^T`, `[T, N]`.
    pub fn logits(&self, kernel: Kernel, hidden: &[f32], tokens: usize) -> Result<Vec<f32>, RoutingError> {
        let expected = tokens * self.hidden_size();
        if hidden.len() != expected {
            return Err(RoutingError::Shape {
                what: "hidden states",
                expected,
                actual: hidden.len(),
            });
        }
        Ok(kernels::matmul(kernel, hidden, tokens, &self.gate))
    }

    /// Routes a batch of `tokens` hidden states (`[T, H]`, row-major).
    pub fn route(
        &self,
        kernel: Kernel,
        hidden: &[f32],
        tokens: usize,
        options: RoutingOptions,
    ) -> Result<Routing, RoutingError> {
        let logits = self.logits(kernel, hidden, tokens)?;
        route_logits(&logits, tokens, &self.shape, &self.router_scale, options)
    }
}

/// Routes a batch from its router logits (`[T, N]`, row-major).
pub fn route_logits(
    logits: &[f32],
    tokens: usize,
    shape: &RoutingShape,
    router_scale: &[f32],
    options: RoutingOptions,
) -> Result<Routing, RoutingError> {
    let n = shape.num_experts;
    if logits.len() != tokens * n {
        return Err(RoutingError::Shape {
            what: "router logits",
            expected: tokens * n,
            actual: logits.len(),
        });
    }
    let k = shape.top_k;
    let mut routing = Routing {
        tokens,
        top_k: k,
        expert_ids: Vec::with_capacity(tokens * k),
        expert_weights: Vec::with_capacity(tokens * k),
        group_assignments: vec![0; shape.num_groups],
    };
    let mut scores = vec![0.0f32; n];
    let mut picked = Vec::with_capacity(k);
    let mut group_best = Vec::with_capacity(shape.num_groups);
    for (token, token_logits) in logits.chunks_exact(n).enumerate() {
        softmax(token, token_logits, &mut scores)?;
        picked.clear();
        match options.mode {
            RoutingMode::Moge => pick_moge(&scores, shape, &mut picked),
            RoutingMode::TopK => push_top(&scores, 0, k, &mut picked),
            RoutingMode::GroupLimited => pick_group_limited(&scores, shape, &mut group_best, &mut picked),
        }
        let norm = if options.renormalize {
            picked.iter().map(|&(score, _)| score).sum::<f32>()
        } else {
            1.0
        };
        for &(score, expert) in &picked {
            let expert = expert as usize;
            routing.expert_ids.push(expert as u32);
            routing.expert_weights.push(score / norm * router_scale[expert]);
            routing.group_assignments[shape.group_of(expert)] += 1;
        }
    }
    Ok(routing)
}

/// Writes the softmax of one token's logits into `scores`.
fn softmax(token: usize, logits: &[f32], scores: &mut [f32]) -> Result<(), RoutingError> {
    let mut max = f32::NEG_INFINITY;
    for (expert, &value) in logits.iter().enumerate() {
        if !value.is_finite() {
            return Err(RoutingError::NonFiniteLogit { token, expert, value });
        }
        max = max.max(value);
    }
    let mut sum = 0.0f32;
    for (score, &value) in scores.iter_mut().zip(logits) {
        *score = (value - max).exp();
        sum += *score;
    }
    for score in scores.iter_mut() {
        *score /= sum;
    }
    Ok(())
}

/// Returns whether `(score_a, index_a)` ranks before `(score_b, index_b)`: higher
/// score first, lower index on ties.
#[inline]
fn ranks_before(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Appends the `count` best of `values` (indices offset by `first`) to `out`,
/// best first.
fn push_top(values: &[f32], first: usize, count: usize, out: &mut Vec<(f32, u32)>) {
    let start = out.len();
    for (offset, &value) in values.iter().enumerate() {
        offer((value, (first + offset) as u32), start, count, out);
    }
}

/// Inserts `candidate` into the ranked list `out[start..]` of at most `count`
/// entries, dropping the last one when the list is full.
#[inline]
fn offer(candidate: (f32, u32), start: usize, count: usize, out: &mut Vec<(f32, u32)>) {
    let chosen = out.len() - start;
    if chosen == count {
        if count == 0 || !ranks_before(candidate, out[out.len() - 1]) {
            return;
        }
        out.pop();
    }
    let mut position = out.len();
    while position > start && ranks_before(candidate, out[position - 1]) {
        position -= 1;
    }
    out.insert(position, candidate);
}

fn pick_moge(scores: &[f32], shape: &RoutingShape, out: &mut Vec<(f32, u32)>) {
    let per_group = shape.experts_per_group();
    let per_token = shape.top_k / shape.num_groups;
    for (group, group_scores) in scores.chunks_exact(per_group).enumerate() {
        push_top(group_scores, group * per_group, per_token, out);
    }
}

fn pick_group_limited(
    scores: &[f32],
    shape: &RoutingShape,
    group_best: &mut Vec<(f32, u32)>,
    out: &mut Vec<(f32, u32)>,
) {
    let per_group = shape.experts_per_group();
    group_best.clear();
    for (group, group_scores) in scores.chunks_exact(per_group).enumerate() {
        let best = group_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        offer((best, group as u32), 0, shape.topk_group, group_best);
    }
    // Only experts of the kept groups compete; group order does not matter
    // because the ranking breaks ties by expert index.
    for &(_, group) in group_best.iter() {
        let first = group as usize * per_group;
        for (offset, &score) in scores[first..first + per_group].iter().enumerate() {
            offer((score, (first + offset) as u32), 0, shape.top_k, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> RoutingShape {
        RoutingShape {
            num_experts: 8,
            num_groups: 4,
            top_k: 4,
            topk_group: 2,
        }
    }

    fn route(logits: &[f32], mode: RoutingMode) -> Routing {
        let scale = vec![1.0; 8];
        let options = RoutingOptions {
            mode,
            renormalize: false,
        };
        route_logits(logits, logits.len() / 8, &shape(), &scale, options).unwrap()
    }

    #[test]
    fn moge_takes_best_expert_of_every_group() {
        let logits = [5.0, 4.0, 0.0, 1.0, 3.0, 2.0, -1.0, -2.0];
        let routing = route(&logits, RoutingMode::Moge);
        assert_eq!(routing.expert_ids, [0, 3, 4, 6]);
        assert_eq!(routing.group_assignments, [1, 1, 1, 1]);
        assert_eq!(routing.imbalance_score_per_group(), 0.0);
    }

    #[test]
    fn top_k_follows_scores_across_groups() {
        let logits = [5.0, 4.0, 0.0, 1.0, 3.0, 2.0, -1.0, -2.0];
        let routing = route(&logits, RoutingMode::TopK);
        assert_eq!(routing.expert_ids, [0, 1, 4, 5]);
        assert_eq!(routing.group_assignments, [2, 0, 2, 0]);
        assert_eq!(routing.imbalance_score_per_group(), 2.0);
    }

    #[test]
    fn group_limited_keeps_best_groups() {
        // Group bests: 5 (g0), 1 (g1), 3 (g2), 9 (g3); keep g3 and g0.
        let logits = [5.0, 4.0, 0.0, 1.0, 3.0, 2.0, 9.0, -2.0];
        let routing = route(&logits, RoutingMode::GroupLimited);
        assert_eq!(routing.expert_ids, [6, 0, 1, 7]);
        assert_eq!(routing.group_assignments, [2, 0, 0, 2]);
    }

    #[test]
    fn ties_go_to_lower_index() {
        let logits = [1.0; 8];
        assert_eq!(route(&logits, RoutingMode::TopK).expert_ids, [0, 1, 2, 3]);
        assert_eq!(route(&logits, RoutingMode::Moge).expert_ids, [0, 2, 4, 6]);
        assert_eq!(route(&logits, RoutingMode::GroupLimited).expert_ids, [0, 1, 2, 3]);
    }

    #[test]
    fn weights_are_softmax_times_router_scale() {
        let logits = [0.5, -0.25, 2.0, 1.0, 0.0, 0.0, 3.0, -1.0];
        let scale: Vec<f32> = (0..8).map(|e| 0.5 + e as f32 * 0.1).collect();
        let options = RoutingOptions::default();
        let routing = route_logits(&logits, 1, &shape(), &scale, options).unwrap();
        let total: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (&expert, &weight) in routing.expert_ids.iter().zip(&routing.expert_weights) {
            let expected = (logits[expert as usize] as f64).exp() / total * scale[expert as usize] as f64;
            assert!((weight as f64 - expected).abs() < 1e-6, "expert {expert}");
        }
    }

    #[test]
    fn renormalized_scores_sum_to_one() {
        let logits = [0.5, -0.25, 2.0, 1.0, 0.0, 0.0, 3.0, -1.0];
        let options = RoutingOptions {
            mode: RoutingMode::TopK,
            renormalize: true,
        };
        let routing = route_logits(&logits, 1, &shape(), &[1.0; 8], options).unwrap();
        let sum: f32 = routing.expert_weights.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn nan_logit_names_token_and_expert() {
        let mut logits = vec![0.0; 16];
        logits[11] = f32::NAN;
        let scale = vec![1.0; 8];
        let error = route_logits(&logits, 2, &shape(), &scale, RoutingOptions::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "token 1: router logit for expert 3 is NaN, expected a finite value"
        );
    }

    #[test]
    fn imbalance_score_uses_device_map() {
        let logits = [5.0, 4.0, 0.0, 1.0, 3.0, 2.0, -1.0, -2.0];
        let routing = route(&logits, RoutingMode::TopK);
        // Groups [2, 0, 2, 0] on devices [0, 0, 1, 1] give loads [2, 2].
        assert_eq!(routing.imbalance_score(&[0, 0, 1, 1]).unwrap(), 0.0);
        assert_eq!(routing.imbalance_score(&[0, 1, 1, 1]).unwrap(), 0.0);
        assert_eq!(routing.imbalance_score(&[0, 0, 0, 1]).unwrap(), 4.0);
        assert!(routing.imbalance_score(&[0, 1]).is_err());
    }

    #[test]
    fn empty_batch_routes_to_nothing() {
        let routing = route(&[], RoutingMode::Moge);
        assert_eq!(routing.tokens, 0);
        assert!(routing.expert_ids.is_empty());
        assert_eq!(routing.imbalance_score_per_group(), 0.0);
    }
}
