//! A whole MoGE layer in one process: the router, every expert group and the
//! shared expert. The services split exactly these stages across processes;
//! this type is the in-process path that tests and benchmarks compare them to.

use crate::config::ModelConfig;
use crate::expert::{Expert, ExpertError, ExpertGroup, GroupWork, forward_groups};
use crate::kernels::Kernel;
use crate::routing::{Assignment, Router, Routing, RoutingError, RoutingOptions, RoutingShape};

/// Batches up to this many tokens run all groups in one pair of parallel
/// phases, which saves the per-group synchronisation that dominates decode
/// batches; larger batches run group by group, which keeps the intermediate
/// buffers of one group in cache (about 20% faster at T = 256 on the Pangu
/// Pro MoE shape, measured with `moge-bench` on 2 cores). Both give the
/// same bits.
const JOINT_SCHEDULE_MAX_TOKENS: usize = 8;

/// All weights of one MoE layer.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    /// Layer index in the model.
    pub layer: usize,
    /// The router.
    pub router: Router,
    /// Expert groups, by group index.
    pub groups: Vec<ExpertGroup>,
    /// The shared expert.
    pub shared_expert: Expert,
}

/// Output of a layer for a batch.
#[derive(Clone, Debug)]
pub struct LayerOutput {
    /// `shared_expert(x) + sum_e weight_e * expert_e(x)`, `[T, H]`.
    pub hidden: Vec<f32>,
    /// The routing the experts ran with.
    pub routing: Routing,
}

/// A failure in one stage of a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Routing failed.
    #[error("routing failed: {0}")]
    Routing(#[from] RoutingError),
    /// An expert group or the shared expert failed.
    #[error("expert computation failed: {0}")]
    Expert(#[from] ExpertError),
}

impl MoeLayer {
    /// Hidden size H.
    pub fn hidden_size(&self) -> usize {
        self.router.hidden_size()
    }

    /// Routing sizes.
    pub fn shape(&self) -> &RoutingShape {
        self.router.shape()
    }

    /// Bytes of expert weights (routed and shared).
    pub fn expert_bytes(&self) -> usize {
        self.groups.iter().map(ExpertGroup::bytes).sum::<usize>() + self.shared_expert.bytes()
    }

    /// Checks that the layer's pieces match `config`.
    pub fn matches(&self, config: &ModelConfig) -> bool {
        self.groups.len() == config.num_groups()
            && self.hidden_size() == config.hidden_size
            && self.shared_expert.intermediate_size() == config.shared_expert_intermediate_size
    }

    /// Runs the layer on `tokens` hidden states (`[T, H]`, row-major).
    pub fn forward(
        &self,
        kernel: Kernel,
        hidden: &[f32],
        tokens: usize,
        options: RoutingOptions,
    ) -> Result<LayerOutput, LayerError> {
        let routing = self.router.route(kernel, hidden, tokens, options)?;
        let assignments: Vec<Vec<Assignment>> = self
            .groups
            .iter()
            .map(|group| routing.group_assignments(self.shape(), group.group))
            .collect();
        let work: Vec<GroupWork<'_>> = self
            .groups
            .iter()
            .zip(&assignments)
            .map(|(group, assignments)| GroupWork { group, assignments })
            .collect();
        let (partials, shared) = if tokens <= JOINT_SCHEDULE_MAX_TOKENS {
            forward_groups(kernel, hidden, tokens, &work, Some(&self.shared_expert))?
        } else {
            let mut partials = Vec::with_capacity(work.len());
            for item in &work {
                let (mut partial, _) = forward_groups(kernel, hidden, tokens, std::slice::from_ref(item), None)?;
                partials.append(&mut partial);
            }
            let (_, shared) = forward_groups(kernel, hidden, tokens, &[], Some(&self.shared_expert))?;
            (partials, shared)
        };

        // Sum as the gateway does: the shared expert, then each group's
        // partial in group order.
        let mut out = shared.unwrap_or_default();
        let h = self.hidden_size();
        let mut added = vec![false; tokens];
        for (partial, assignments) in partials.iter().zip(&assignments) {
            // Add only the rows this group computed: adding a zero row could
            // turn a -0.0 into +0.0 and make a row depend on its batch.
            added.fill(false);
            for assignment in assignments {
                let row = assignment.row as usize;
                if std::mem::replace(&mut added[row], true) {
                    continue;
                }
                let range = row * h..(row + 1) * h;
                for (sum, value) in out[range.clone()].iter_mut().zip(&partial[range]) {
                    *sum += value;
                }
            }
        }
        Ok(LayerOutput { hidden: out, routing })
    }
}
